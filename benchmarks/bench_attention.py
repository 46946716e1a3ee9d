"""Base attention: ``fastattn_icl.attention`` vs the eager reference and SDPA; benchmarks/README.md."""

from __future__ import annotations

import contextlib
import zlib

import torch
import torch.nn.functional as F

from benchmarks import harness as h
from benchmarks.shapes import MODES, attention_cases

FWD_TARGET, BWD_TARGET, EAGER_TARGET, EAGER_TARGET_T = 0.9, 0.8, 5.0, 4096
MEMORY_EXPONENT_MAX = 1.15
FULL_CHECK_SCORES = 1 << 24  # the float64 oracle runs on the whole problem up to this many scores, else a slice


def reference_attention(q, k, v, **kw):
    from fastattn_icl.reference.attention import attention

    return attention(q, k, v, **kw)


def make_inputs(shape, device: torch.device) -> list[torch.Tensor]:
    """``q [B, H, Tq, D]``, ``k``/``v [B, Hkv, Tk, D]``, standard normal, seeded by the shape's name."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(shape.name.encode()))

    def randn(*size):
        return torch.randn(size, generator=gen, device=device, dtype=torch.float32).to(shape.torch_dtype)

    return [randn(shape.B, shape.H, shape.Tq, shape.D), randn(shape.B, shape.Hkv, shape.Tk, shape.D),
            randn(shape.B, shape.Hkv, shape.Tk, shape.D)]


def check_views(shape) -> h.CheckViews:
    """The whole problem when small; else the last batch row and kv head with its query heads."""
    names = ("dq", "dk", "dv")
    if shape.B * shape.H * shape.Tq * shape.Tk <= FULL_CHECK_SCORES:
        return h.CheckViews([..., ..., ...], ..., "full", names)
    b, g, rep = shape.B - 1, shape.Hkv - 1, shape.H // shape.Hkv
    qs, kvs = (slice(b, b + 1), slice(g * rep, (g + 1) * rep)), (slice(b, b + 1), slice(g, g + 1))
    scope = f"batch {b}, kv head {g} (query heads {g * rep}..{(g + 1) * rep - 1})"
    return h.CheckViews([qs, kvs, kvs], qs, scope, names)


def fastattn(shape, q, k, v):
    import fastattn_icl

    return fastattn_icl.attention(q, k, v, causal=shape.causal, backend="auto")


def oracle(shape, q, k, v):
    return reference_attention(q, k, v, causal=shape.causal)


def describe_ours(call: str = "fastattn_icl.attention", what: str = ""):
    def describe(device: torch.device) -> str:
        from fastattn_icl.ops.backend import resolve_backend

        try:
            backend = resolve_backend("auto", device)
        except RuntimeError as exc:
            return f"{call}(backend='auto'){what}: unavailable ({exc})"
        kernel = "Triton kernel" if backend == "triton" else \
            "CPU path (backend 'torch': torch's CPU flash kernel + exact feature terms)"
        return f"{call}(backend='auto'){what} -> {kernel}"

    return describe


class Sdpa:
    """``scaled_dot_product_attention`` (flash backend on CUDA); remembers how GQA was run."""

    def __init__(self) -> None:
        self.gqa, self.gqa_note = "enable_gqa=True", ""

    def __call__(self, shape, q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mask, is_causal = None, shape.causal
        if shape.causal and shape.Tq != shape.Tk:
            from torch.nn.attention.bias import causal_lower_right

            mask, is_causal = causal_lower_right(shape.Tq, shape.Tk), False
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if q.is_cuda else contextlib.nullcontext():
            if shape.H != shape.Hkv and self.gqa == "enable_gqa=True":
                try:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                          scale=shape.D**-0.5, enable_gqa=True)
                except (RuntimeError, TypeError) as exc:
                    if h.is_oom(exc):
                        raise
                    self.gqa = "K/V repeated (repeat_interleave inside the timed call)"
                    self.gqa_note = f"; enable_gqa=True was refused: {str(exc).splitlines()[0][:160]}"
            if shape.H != shape.Hkv:
                k, v = (x.repeat_interleave(shape.H // shape.Hkv, dim=1) for x in (k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=shape.D**-0.5)

    def describe(self, device: torch.device) -> str:
        backend = ("forced FLASH_ATTENTION backend (sdpa_kernel)" if device.type == "cuda"
                   else "torch's default CPU dispatch (the flash backend needs CUDA)")
        return f"torch.nn.functional.scaled_dot_product_attention, {backend}; GQA: {self.gqa}{self.gqa_note}"


def _ratio_target(rows, cases, mode, base, threshold, title) -> dict:
    found = ((h.find(rows, c, "fastattn_icl", mode), h.find(rows, c, base, mode)) for c in cases)
    pairs = [(f"T{o['params']['Tq']}", o, b) for o, b in found if o is not None and b is not None]
    return h.ratio_target(title, pairs, lambda r: r >= threshold, empty=f"{mode} not measured on the acceptance set")


def _memory_target(rows, cases, mode) -> dict:
    title = f"peak memory linear in T ({mode}, exponent of peak/B vs T <= {MEMORY_EXPONENT_MAX})"
    detail, exps = [], {}
    for provider in ("fastattn_icl", "eager"):
        rs = [h.find(rows, c, provider, mode) for c in cases]
        rs = [r for r in rs if r is not None and r["status"] == h.STATUS_OK and r["peak_mem_bytes"] is not None]
        per_seq = [r["peak_mem_bytes"] / r["params"]["B"] for r in rs]
        exps[provider] = h.fit_exponent([r["params"]["Tq"] for r in rs], per_seq)
        if exps[provider] is not None:
            steps = ", ".join(f"{b / a:.2f}" for a, b in zip(per_seq, per_seq[1:]))
            detail.append(f"{provider}: exponent {exps[provider]:.2f} (x per doubling of T: {steps})")
    if exps["fastattn_icl"] is None:
        return {"target": title, "result": "N/A", "detail": "fewer than two measured lengths"}
    return {"target": title, "result": "PASS" if exps["fastattn_icl"] <= MEMORY_EXPONENT_MAX else "FAIL",
            "detail": "; ".join(detail)}


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets from the ``acceptance`` rows."""
    cases = list(dict.fromkeys(r["case"] for r in rows if r["group"] == "acceptance"))
    if not cases:
        return []
    out = [_ratio_target(rows, cases, "fwd", "sdpa", FWD_TARGET, f"forward >= {FWD_TARGET}x SDPA-flash throughput"),
           _ratio_target(rows, cases, "bwd", "sdpa", BWD_TARGET, f"backward >= {BWD_TARGET}x SDPA-flash throughput")]
    at = [c for c in cases if c.endswith(f"T{EAGER_TARGET_T}")]
    for mode in dict.fromkeys(r["mode"] for r in rows if r["case"] in at):
        out.append(_ratio_target(rows, at, mode, "eager", EAGER_TARGET,
                                 f">= {EAGER_TARGET:g}x eager at T = 4k ({mode})"))
    out += [_memory_target(rows, cases, m) for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    return out


SDPA = Sdpa()
BENCH = h.Benchmark(
    name="attention", op="attention", suffix="", modes=MODES, cases=attention_cases,
    inputs=lambda case, group: make_inputs(case, group.device), **h.tensor_op(oracle=oracle, views=check_views),
    providers=[
        h.Provider("fastattn_icl", fastattn, describe_ours()),
        h.Provider("eager", oracle, lambda device: "fastattn_icl.reference.attention (materialised S and P)"),
        h.Provider("sdpa", SDPA, SDPA.describe),
    ],
    flop_model="4·B·H·Tq·Tk·d per forward, halved when causal and Tq == Tk; bwd 2.5x, fwd+bwd 3.5x",
    cpu_note="sdpa FLASH_ATTENTION backend skipped: no CUDA; the `sdpa` rows use torch's default CPU dispatch",
    targets=targets,
)
