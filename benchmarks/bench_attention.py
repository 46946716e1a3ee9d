"""Base attention benchmark (SPEC.md §1): ``fastattn_icl.attention`` against the eager reference and
PyTorch SDPA, forward, backward and forward + backward.

Providers:

* ``fastattn_icl``: ``fastattn_icl.attention(..., backend="auto")``: the Triton kernel on CUDA; on
  CPU its CPU path (``backend="torch"``, chunked PyTorch), the Triton kernel being skipped there.
* ``eager``: ``fastattn_icl.reference.attention.attention``, the oracle, which materialises ``S`` and
  ``P`` like the papers' seed code (Hugging Face eager attention) and repeats K/V for GQA.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. On CUDA it is forced onto the
  FlashAttention-2 backend with ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` (the acceptance
  baseline), GQA through ``enable_gqa=True`` (falling back to K/V repeated inside the timed call if
  this torch's flash backend refuses it; the provider description says which ran). On CPU, torch's
  default CPU dispatch. Causal with ``Tq != Tk`` uses ``causal_lower_right`` (bottom-right).

Targets (CUDA only; the ``acceptance`` set): forward >= 0.9x and backward >= 0.8x of SDPA-flash,
>= 5x the eager reference at T = 4k, and peak memory linear in T. With ``B · T`` fixed at 16k tokens,
memory linear in T per sequence means peak / B grows like T¹ (flat peak), while eager's grows like
T²; the target fits the exponent of peak / B against T and passes at <= 1.15.
"""

from __future__ import annotations

import contextlib
import zlib

import torch
import torch.nn.functional as F

from benchmarks.harness import STATUS_OK, CheckViews, Provider, Suite, fit_exponent, speedup

FWD_TARGET = 0.9
BWD_TARGET = 0.8
EAGER_TARGET = 5.0
EAGER_TARGET_T = 4096
MEMORY_EXPONENT_MAX = 1.15
# the float64 oracle runs on the whole problem up to this many scores (B·H·Tq·Tk), else on one slice
FULL_CHECK_SCORES = 1 << 24


def reference_attention():
    from fastattn_icl.reference.attention import attention

    return attention


def make_inputs(shape, device: torch.device) -> list[torch.Tensor]:
    """``q [B, H, Tq, D]``, ``k``/``v [B, Hkv, Tk, D]``, standard normal, seeded by the shape."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(shape.name.encode()))
    dtype = shape.torch_dtype

    def randn(*size):
        return torch.randn(size, generator=gen, device=device, dtype=torch.float32).to(dtype)

    return [
        randn(shape.B, shape.H, shape.Tq, shape.D),
        randn(shape.B, shape.Hkv, shape.Tk, shape.D),
        randn(shape.B, shape.Hkv, shape.Tk, shape.D),
    ]


def check_views(shape) -> CheckViews:
    """The whole problem when small; otherwise the last batch row and the last kv head with its
    query heads (non-zero offsets, so stride bugs show), which is a self-contained sub-problem."""
    names = ("dq", "dk", "dv")
    if shape.B * shape.H * shape.Tq * shape.Tk <= FULL_CHECK_SCORES:
        return CheckViews([..., ..., ...], ..., "full", names)
    b, g, rep = shape.B - 1, shape.Hkv - 1, shape.H // shape.Hkv
    qs = (slice(b, b + 1), slice(g * rep, (g + 1) * rep))
    kvs = (slice(b, b + 1), slice(g, g + 1))
    scope = f"batch {b}, kv head {g} (query heads {g * rep}..{(g + 1) * rep - 1})"
    return CheckViews([qs, kvs, kvs], qs, scope, names)


def _fastattn(shape, q, k, v):
    import fastattn_icl

    return fastattn_icl.attention(q, k, v, causal=shape.causal, backend="auto")


def _fastattn_describe(device: torch.device) -> str:
    from fastattn_icl.ops.backend import resolve_backend

    try:
        backend = resolve_backend("auto", device)
    except RuntimeError as exc:
        return f"fastattn_icl.attention(backend='auto'): unavailable ({exc})"
    if backend == "triton":
        return "fastattn_icl.attention(backend='auto') -> Triton kernel"
    return "fastattn_icl.attention(backend='auto') -> CPU path (backend 'torch', chunked PyTorch)"


def _eager(shape, q, k, v):
    return reference_attention()(q, k, v, causal=shape.causal)


class Sdpa:
    """``scaled_dot_product_attention`` provider; remembers how GQA was run."""

    def __init__(self) -> None:
        self.gqa = "enable_gqa=True"
        self.gqa_note = ""

    def __call__(self, shape, q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mask, is_causal = None, shape.causal
        if shape.causal and shape.Tq != shape.Tk:
            from torch.nn.attention.bias import causal_lower_right

            mask, is_causal = causal_lower_right(shape.Tq, shape.Tk), False
        ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if q.is_cuda else contextlib.nullcontext()
        with ctx:
            if shape.H != shape.Hkv and self.gqa == "enable_gqa=True":
                try:
                    return F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, is_causal=is_causal, scale=shape.D**-0.5, enable_gqa=True
                    )
                except (RuntimeError, TypeError) as exc:
                    from benchmarks.harness import is_oom

                    if is_oom(exc):
                        raise
                    self.gqa = "K/V repeated (repeat_interleave inside the timed call)"
                    self.gqa_note = f"; enable_gqa=True was refused: {str(exc).splitlines()[0][:160]}"
            if shape.H != shape.Hkv:
                rep = shape.H // shape.Hkv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=shape.D**-0.5)

    def describe(self, device: torch.device) -> str:
        backend = (
            "forced FLASH_ATTENTION backend (sdpa_kernel)"
            if device.type == "cuda"
            else "torch's default CPU dispatch (the flash backend needs CUDA)"
        )
        return f"torch.nn.functional.scaled_dot_product_attention, {backend}; GQA: {self.gqa}{self.gqa_note}"


def providers() -> list[Provider]:
    sdpa = Sdpa()
    return [
        Provider("fastattn_icl", _fastattn, _fastattn_describe),
        Provider("eager", _eager, lambda device: "fastattn_icl.reference.attention (materialised S and P)"),
        Provider("sdpa", sdpa, sdpa.describe),
    ]


def _oracle(shape, q, k, v):
    return reference_attention()(q, k, v, causal=shape.causal)


def platform_notes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    return [
        "Triton kernel skipped: no CUDA; the `fastattn_icl` rows are its CPU path (backend 'torch')",
        "sdpa FLASH_ATTENTION backend skipped: no CUDA; the `sdpa` rows use torch's default CPU dispatch",
        "peak memory not measured: no CUDA (reported as null)",
        "acceptance targets (throughput vs SDPA-flash, vs eager at 4k, memory linear in T) not evaluated: no CUDA",
    ]


def _find(rows, case, mode, provider):
    for r in rows:
        if (r["case"], r["mode"], r["provider"]) == (case, mode, provider):
            return r
    return None


def _ratio_target(rows, cases, mode, base, threshold, title) -> dict:
    parts, verdicts = [], []
    for case in cases:
        ours, other = _find(rows, case, mode, "fastattn_icl"), _find(rows, case, mode, base)
        if ours is None or other is None:
            continue
        ratio, text = speedup(ours, other)
        parts.append(f"T{ours['params']['Tq']}: {text}")
        if ratio is not None:
            verdicts.append(ratio >= threshold)
        else:  # an incorrect or failed kernel misses the target; a missing baseline leaves it open
            verdicts.append(False if ours["status"] != STATUS_OK else None)
    if not verdicts:
        return {"target": title, "result": "N/A", "detail": f"{mode} not measured on the acceptance set"}
    if None in verdicts:
        result = "FAIL" if False in verdicts else "N/A"
    else:
        result = "PASS" if all(verdicts) else "FAIL"
    return {"target": title, "result": result, "detail": ", ".join(parts)}


def _memory_target(rows, cases, mode) -> dict:
    title = f"peak memory linear in T ({mode}, exponent of peak/B vs T <= {MEMORY_EXPONENT_MAX})"
    detail, exps = [], {}
    for provider in ("fastattn_icl", "eager"):
        Ts, per_seq = [], []
        for case in cases:
            r = _find(rows, case, mode, provider)
            if r is None or r["status"] != STATUS_OK or r["peak_mem_bytes"] is None:
                continue
            Ts.append(r["params"]["Tq"])
            per_seq.append(r["peak_mem_bytes"] / r["params"]["B"])
        exps[provider] = fit_exponent(Ts, per_seq)
        if exps[provider] is not None:
            steps = [f"{b / a:.2f}" for a, b in zip(per_seq, per_seq[1:])]
            detail.append(f"{provider}: exponent {exps[provider]:.2f} (x per doubling of T: {', '.join(steps)})")
    if exps.get("fastattn_icl") is None:
        return {"target": title, "result": "N/A", "detail": "fewer than two measured lengths"}
    result = "PASS" if exps["fastattn_icl"] <= MEMORY_EXPONENT_MAX else "FAIL"
    return {"target": title, "result": result, "detail": "; ".join(detail)}


def targets(rows: list[dict]) -> list[dict]:
    """PASS/FAIL of the issue's targets from the ``acceptance`` rows of one CUDA run."""
    cases = list(dict.fromkeys(r["case"] for r in rows if r["group"] == "acceptance"))
    if not cases:
        return []
    out = [
        _ratio_target(rows, cases, "fwd", "sdpa", FWD_TARGET, f"forward >= {FWD_TARGET}x SDPA-flash throughput"),
        _ratio_target(rows, cases, "bwd", "sdpa", BWD_TARGET, f"backward >= {BWD_TARGET}x SDPA-flash throughput"),
    ]
    at = [c for c in cases if c.endswith(f"T{EAGER_TARGET_T}")]
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["case"] in at))
    for mode in modes:
        out.append(
            _ratio_target(rows, at, mode, "eager", EAGER_TARGET, f">= {EAGER_TARGET:g}x eager at T = 4k ({mode})")
        )
    for mode in ("fwd", "fwd+bwd"):
        if any(r["mode"] == mode for r in rows if r["case"] in cases):
            out.append(_memory_target(rows, cases, mode))
    return out


def suite(device: torch.device) -> Suite:
    return Suite(
        op="attention",
        make_inputs=make_inputs,
        oracle=_oracle,
        check_views=check_views,
        targets=targets,
        notes=platform_notes(device),
    )
