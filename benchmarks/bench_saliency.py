"""Information-flow saliency benchmark (SPEC.md §4): the flow scores of every layer of a stack, fused vs probe.

What one timed call does: the forward of a chain of ``L`` causal attention layers over a batch of ICL
prompts, one ``loss.backward()``, and the flow scores ``(S_wp, S_pq, S_ww)`` of every layer as a
``[L, B, 3]`` tensor (left on the device).

The stack (identical for both providers; attention layers only, no MLP). Fixed inputs: ``x0 [B, H, T, d]``
(standard normal, the only leaf that requires grad), per-layer per-head projections ``W_q, W_k, W_v``
``[L, H, d, d]`` (``N(0, 1/d)``, a block-diagonal stand-in for a model's QKV projection at 1/H of its
FLOPs), a read-out ``W_out [H·d, C]`` (float32, ``N(0, 1/(H·d))``) and a gold class per prompt. Layer
``l``: ``h = RMSNorm(x_l)`` per head (over ``d``, no weight), ``q, k, v = h W_q[l], h W_k[l], h W_v[l]``,
``x_(l+1) = x_l + attention(q, k, v)``. Loss: cross-entropy of ``x_L[:, :, q, :] W_out`` (the target
position's features, in float32) against the gold class: the paper's loss (CE over the label logits at
the target position) on a random read-out. The residual stream carries the gradient to every layer and
the norm keeps the logits in range, so every layer's saliency is of the same order. As in a real model,
the last layer's gradient reaches only the target row, so its ``I`` has one non-zero row and ``S_wp = 0``
exactly; the one-layer (Llama-7B-shaped) cases are such a layer. Neither implementation skips the zero
rows: the work is that of any layer.

Prompt geometry: :func:`benchmarks.shapes.icl_anchor_layout` (16 demonstrations of 4 classes on the GPU
and CPU sets): their label words are the positions ``p_c``, the last position is the target ``q``.

Providers:

* ``fastattn_icl``: every layer calls ``fastattn_icl.attention(q, k, v, causal=True, saliency=request_l,
  backend="auto")`` with its own ``fastattn_icl.Saliency(label_positions [B, C], target)`` request (built
  once per case; its label tables are cached by the request); the backward records each layer's three
  numerators and ``request_l.result.scores()`` divides them by the denominators.
* ``eager_probe``: the paper's probe method. Per layer ``P = attention_probs(q, k)`` (the oracle's: ``QKᵀ``
  in the input dtype, masked softmax in float32) cast to the input dtype as Hugging Face eager attention
  does, multiplied by a tensor of ones ``[B, H, T, T]`` that requires grad (the probe), ``O = (P·probe) V``.
  After the backward, per layer ``I = |Σ_h probe.grad|`` (summed in float32) and the oracle's
  :func:`~fastattn_icl.reference.saliency.flow_scores` reduces it to the scores.

Correctness gate (per model geometry, on the first case where it runs, normally the smallest ``T``; the
other cases of that model carry its verdict and say so in their ``check.scope``): the scores of both
providers in the benchmark dtype against ``eager_probe`` run in float64 on the same inputs upcast, by the
rule of :mod:`fastattn_icl.testing` for gradients (error <= 3x the same-dtype probe's own error + 1e-5),
applied to each of ``S_wp``, ``S_pq``, ``S_ww`` divided by its largest float64 value (so the epsilon term
is relative). A provider that fails is timed but marked ``incorrect`` and its speed-ups are refused; if no
gate could run for a model, its rows are ``unchecked`` and their speed-ups are refused too.

Timing: the harness's ``bench`` (``do_bench`` on CUDA, with 1000 ms of calls by default since one call
takes up to about a second; a ``perf_counter`` loop on CPU), with ``x0.grad`` reset before every call;
peak memory: the harness's ``max_memory_allocated`` delta over one call on CUDA (the fixed inputs are
allocated before and not counted), ``null`` on CPU. Out of memory is a row with status ``oom``.

Targets (CUDA only, per model): ``fastattn_icl`` >= 10x faster than ``eager_probe`` at T = 1k; its peak
memory linear in T (fitted exponent <= 1.15; the probe's exponent is shown alongside); and it runs at
T = 16k, with the probe's row (an ``oom`` row is expected) alongside.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    STATUS_ERROR,
    STATUS_INCORRECT,
    STATUS_OK,
    STATUS_OOM,
    TimingConfig,
    _first_line,
    _row,
    add_speedups,
    bench,
    case_entries,
    environment,
    fit_exponent,
    free_memory,
    is_oom,
    markdown_with_gate,
    memory_note,
    peak_memory_bytes,
    row_emitter,
    speedup,
    targets_not_evaluated,
    tflops,
)
from benchmarks.harness import write_results as harness_write_results
from fastattn_icl.testing import GRAD_FACTOR, check_close, max_error, tolerance

OURS = "fastattn_icl"
EAGER = "eager_probe"
PROVIDERS = (OURS, EAGER)
MODE = "flow"
SCORES = ("S_wp", "S_pq", "S_ww")
STATUS_UNCHECKED = "unchecked"

EAGER_TARGET = 10.0
EAGER_TARGET_T = 1024
LONG_T = 16384
MEMORY_EXPONENT_MAX = 1.15
CUDA_REP_MS = 1000.0
NORM_EPS = 1e-6

GATE_TEXT = (
    "per model, on its first case where it runs (the other cases carry that verdict, see check.scope): each "
    f"provider's S_wp, S_pq, S_ww of every layer vs eager_probe in float64 on the same inputs upcast; error <= "
    f"{GRAD_FACTOR:g}x eager_probe's own error in the benchmark dtype + 1e-5, each score divided by its largest "
    "float64 value first (fastattn_icl.testing, gradient rule)"
)


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class StackInputs:
    """The fixed inputs of one case (see the module docstring), all on one device.

    ``x0 [B, H, T, d]`` (leaf, requires grad), ``w_qkv [L, 3, H, d, d]`` in the benchmark dtype;
    ``w_out [H·d, C]`` float32 (float64 in the gate's oracle); ``labels`` int64 ``[B, A]`` label-word
    positions; ``target_rows`` int64 ``[B]`` (all ``target``); ``gold`` int64 ``[B]``; ``requests``: one
    ``fastattn_icl.Saliency`` per layer."""

    x0: torch.Tensor
    w_qkv: torch.Tensor
    w_out: torch.Tensor
    labels: torch.Tensor
    target: int
    target_rows: torch.Tensor
    gold: torch.Tensor
    requests: list = field(default_factory=list)

    def upcast(self, dtype: torch.dtype) -> StackInputs:
        """The same values in ``dtype`` (the benchmark dtype's rounded values, upcast), fresh requests."""
        return _with_requests(
            StackInputs(
                self.x0.detach().to(dtype).requires_grad_(),
                self.w_qkv.to(dtype),
                self.w_out.to(dtype),
                self.labels,
                self.target,
                self.target_rows,
                self.gold,
            )
        )


def _with_requests(inp: StackInputs) -> StackInputs:
    import fastattn_icl

    inp.requests = [fastattn_icl.Saliency(inp.labels, inp.target) for _ in range(inp.w_qkv.shape[0])]
    return inp


def make_inputs(case, device: torch.device) -> StackInputs:
    """The case's inputs, seeded by its name."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(case.name.encode()))
    B, H, T, D, L = case.B, case.H, case.T, case.D, case.layers

    def randn(*size, std=1.0):
        return std * torch.randn(size, generator=gen, device=device, dtype=torch.float32)

    positions, _, _ = case.layout()
    labels = torch.tensor(positions, dtype=torch.long, device=device)[None].expand(B, -1).contiguous()
    return _with_requests(
        StackInputs(
            x0=randn(B, H, T, D).to(case.torch_dtype).requires_grad_(),
            w_qkv=randn(L, 3, H, D, D, std=D**-0.5).to(case.torch_dtype),
            w_out=randn(H * D, case.classes, std=(H * D) ** -0.5),
            labels=labels,
            target=T - 1,
            target_rows=torch.full((B,), T - 1, dtype=torch.long, device=device),
            gold=torch.arange(B, device=device) % case.classes,
        )
    )


# ---------------------------------------------------------------------------------------------- the stack


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    """``x / rms(x)`` per head over ``d``, the statistic in float32 (float64 for float64 input)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    return x * (math.sqrt(x.shape[-1]) / (norm + NORM_EPS)).to(x.dtype)


def stack_loss(inp: StackInputs, attend) -> torch.Tensor:
    """The stack's loss; ``attend(layer, q, k, v)`` is the attention of ``layer`` (``[B, H, T, d]`` each)."""
    x = inp.x0
    for layer in range(inp.w_qkv.shape[0]):
        h = _rms_norm(x)
        q, k, v = (torch.matmul(h, inp.w_qkv[layer, i]) for i in range(3))
        x = x + attend(layer, q, k, v)
    B, H, _, D = x.shape
    logits = x[:, :, inp.target, :].reshape(B, H * D).to(inp.w_out.dtype) @ inp.w_out
    return F.cross_entropy(logits, inp.gold)


def flow_fastattn(case, inp: StackInputs) -> torch.Tensor:
    """``fastattn_icl``: the fused op with one saliency request per layer; returns ``[L, B, 3]``."""
    import fastattn_icl

    for request in inp.requests:
        request.clear()

    def attend(layer, q, k, v):
        return fastattn_icl.attention(q, k, v, causal=True, saliency=inp.requests[layer], backend="auto")

    stack_loss(inp, attend).backward()
    return torch.stack([torch.stack(r.result.scores(), dim=-1) for r in inp.requests])


def flow_eager_probe(case, inp: StackInputs) -> torch.Tensor:
    """``eager_probe``: the paper's probe method on every layer; returns ``[L, B, 3]``."""
    from fastattn_icl.reference.attention import attention_probs
    from fastattn_icl.reference.saliency import flow_scores

    probes = []

    def attend(layer, q, k, v):
        p = attention_probs(q, k, causal=True).to(q.dtype)  # [B, H, T, T], materialised
        probe = torch.ones_like(p, requires_grad=True)
        probes.append(probe)
        return torch.matmul(p * probe, v)

    stack_loss(inp, attend).backward()
    acc = torch.float64 if inp.x0.dtype == torch.float64 else torch.float32
    scores = []
    for probe in probes:
        saliency = probe.grad.sum(dim=1, dtype=acc).abs()  # [B, T, T]: heads summed before |.|
        scores.append(torch.stack(flow_scores(saliency, inp.labels, inp.target_rows), dim=-1))
    return torch.stack(scores)


PROVIDER_FNS = {OURS: flow_fastattn, EAGER: flow_eager_probe}


def describe(provider: str, device: torch.device) -> str:
    if provider == OURS:
        kernel = "the fused Triton kernels" if device.type == "cuda" else "its CPU path, backend 'torch' (no CUDA)"
        return (
            "fastattn_icl.attention(causal=True, saliency=Saliency(label_positions, target), backend='auto') in "
            f"every layer, one request per layer ({kernel}); loss.backward() records every layer's flow-score "
            "numerators; scores = request.result.scores()"
        )
    return (
        "the paper's probe method: per layer P = reference attention_probs(q, k) (QKᵀ in the input dtype, "
        "softmax in float32) cast to the input dtype, times a ones probe [B, H, T, T] requiring grad, "
        "O = (P·probe) V; after loss.backward(), I = |Σ_h probe.grad| (float32) and reference flow_scores(I) "
        "per layer"
    )


# ---------------------------------------------------------------------------------------------- gate


def gate(case, inp: StackInputs, provider_names=PROVIDERS) -> dict[str, dict]:
    """``{provider: check}`` in the harness's check format, one error per score kind."""
    got = {p: PROVIDER_FNS[p](case, inp).detach() for p in provider_names if p != EAGER}
    inp.x0.grad = None
    same = flow_eager_probe(case, inp).detach()
    inp.x0.grad = None
    got[EAGER] = same
    ref64 = flow_eager_probe(case, inp.upcast(torch.float64)).detach()
    scope = f"gate on {case.name}: scores of all {case.layers} layers vs eager_probe in float64"
    checks = {}
    for provider in provider_names:
        errors, failures = {}, []
        for i, name in enumerate(SCORES):
            norm = float(ref64[..., i].abs().max()) or 1.0
            x, s, r = got[provider][..., i] / norm, same[..., i] / norm, ref64[..., i] / norm
            try:
                err, tol = check_close(name, x, s, r, factor=GRAD_FACTOR)
            except AssertionError as exc:
                err, tol = max_error(x, r), tolerance(s, r, factor=GRAD_FACTOR)
                failures.append(str(exc))
            errors[name] = {"error": err, "tolerance": tol}
        checks[provider] = {
            "status": STATUS_INCORRECT if failures else STATUS_OK,
            "scope": scope,
            "errors": errors,
            "message": "; ".join(failures) or None,
            "score_max_abs": [float(ref64[..., i].abs().max()) for i in range(len(SCORES))],
        }
    return checks


# ---------------------------------------------------------------------------------------------- targets


def _find(rows, case: str, provider: str):
    for r in rows:
        if (r["case"], r["provider"]) == (case, provider):
            return r
    return None


def _verdict(verdicts: list) -> str:
    if not verdicts:
        return "N/A"
    if False in verdicts:
        return "FAIL"
    return "N/A" if None in verdicts else "PASS"


def _mib(row) -> str:
    return "—" if row is None or row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.0f} MiB"


def _status_text(row) -> str:
    if row is None:
        return "not run"
    if row["median_ms"] is None:
        return row["status"]
    return f"{row['median_ms']:.4g} ms" + ("" if row["status"] == STATUS_OK else f" ({row['status']})")


def _peaks(rows, model: str, provider: str) -> tuple[list[int], list[int]]:
    """``(T, peak bytes)`` of ``provider``'s checked rows of ``model`` that have a peak."""
    rs = [r for r in rows if r["params"]["model"] == model and r["provider"] == provider]
    rs = [r for r in rs if r["status"] == STATUS_OK and r["peak_mem_bytes"]]
    return [r["params"]["T"] for r in rs], [r["peak_mem_bytes"] for r in rs]


def targets(rows: list[dict], *, evaluated: bool = True) -> list[dict]:
    """PASS / FAIL / N/A per model; with ``evaluated=False`` (no CUDA) every result is ``not evaluated``
    and the detail carries the measured figures for information only."""
    out = []
    models = list(dict.fromkeys(r["params"]["model"] for r in rows))
    for model in models:
        mine = [r for r in rows if r["params"]["model"] == model and r["provider"] == OURS]
        # 1. speed-up vs the probe method at T = 1k
        parts, verdicts = [], []
        for ours in mine:
            if ours["params"]["T"] != EAGER_TARGET_T:
                continue
            eager = _find(rows, ours["case"], EAGER)
            ratio, text = speedup(ours, eager)
            if ratio is None:
                verdicts.append(False if ours["status"] != STATUS_OK else None)
                parts.append(f"T{EAGER_TARGET_T}: {text}")
            else:
                verdicts.append(ratio >= EAGER_TARGET)
                parts.append(f"T{EAGER_TARGET_T}: {ratio:.1f}x ({_status_text(ours)} vs {_status_text(eager)})")
        out.append(
            {
                "target": f"{model}: >= {EAGER_TARGET:g}x faster than eager_probe at T = {EAGER_TARGET_T}",
                "result": _verdict(verdicts),
                "detail": ", ".join(parts) or f"no T = {EAGER_TARGET_T} case in this set",
            }
        )
        # 2. peak memory linear in T
        ts, mem = _peaks(rows, model, OURS)
        exponent = fit_exponent(ts, mem)
        eager_exp = fit_exponent(*_peaks(rows, model, EAGER))
        if exponent is None:
            result, detail = "N/A", "fewer than two measured peaks"
        else:
            result = "PASS" if exponent <= MEMORY_EXPONENT_MAX else "FAIL"
            peaks = ", ".join(f"T{t}: {m / 2**20:.0f} MiB" for t, m in zip(ts, mem))
            theirs = "n/a" if eager_exp is None else f"{eager_exp:.2f}"
            detail = f"exponent {exponent:.2f} ({peaks}); eager_probe: exponent {theirs}"
        out.append(
            {
                "target": f"{model}: peak memory linear in T (fitted exponent <= {MEMORY_EXPONENT_MAX:g})",
                "result": result,
                "detail": detail,
            }
        )
        # 3. runs at T = 16k; the probe's status alongside
        parts, verdicts = [], []
        for ours in mine:
            if ours["params"]["T"] != LONG_T:
                continue
            verdicts.append(ours["status"] == STATUS_OK)
            eager = _find(rows, ours["case"], EAGER)
            parts.append(
                f"ours {_status_text(ours)}, peak {_mib(ours)}; eager_probe {_status_text(eager)}"
                + ("" if eager is None or eager["median_ms"] is None else f", peak {_mib(eager)}")
            )
        out.append(
            {
                "target": f"{model}: runs at T = {LONG_T} (eager_probe's status alongside, OOM expected)",
                "result": _verdict(verdicts),
                "detail": "; ".join(parts) or f"no T = {LONG_T} case in this set",
            }
        )
    return out if evaluated else targets_not_evaluated(out)


# ---------------------------------------------------------------------------------------------- running


def saliency_timing(rep_ms: float | None = None) -> TimingConfig:
    """The harness's timing with ``CUDA_REP_MS`` of calls on CUDA (a call takes up to about a second);
    ``rep_ms`` replaces both the CUDA and the CPU figure."""
    timing = TimingConfig(cuda_rep_ms=CUDA_REP_MS)
    if rep_ms is not None:
        timing.cuda_rep_ms = timing.cpu_rep_ms = rep_ms
    return timing


def platform_notes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    return [
        "Triton kernels not run: no CUDA; the `fastattn_icl` rows are the fused op's CPU path (backend 'torch')",
        "peak memory not measured: no CUDA (reported as null; torch's CPU allocator keeps no peak counter)",
        "targets (10x eager_probe at T = 1k, memory linear in T, T = 16k) not evaluated: no CUDA",
    ]


def _inherit(check: dict, gate_case: str, case) -> dict:
    if gate_case == case.name:
        return check
    return {**check, "scope": f"inherited from the gate on {gate_case} (same model, smaller T): {check['scope']}"}


def run_saliency_bench(
    cases,
    device: torch.device,
    *,
    timing: TimingConfig | None = None,
    progress=print,
    set_name: str = "",
    provider_names=None,
) -> dict:
    """Gate, time and measure the providers on every case; returns the harness's results dict."""
    timing = timing or saliency_timing()
    t_start = time.perf_counter()
    provs = [p for p in PROVIDERS if provider_names is None or p in provider_names]
    rows, skipped = [], []
    total = len(cases) * len(provs)
    gates: dict[str, tuple[str, dict]] = {}  # model -> (case the gate ran on, {provider: check})

    emit = row_emitter(rows, total, progress)

    for case in cases:
        try:
            inp = make_inputs(case, device)
        except Exception as exc:
            status, message = STATUS_OOM if is_oom(exc) else STATUS_ERROR, f"inputs: {_first_line(exc)}"
            for p in provs:
                emit(_row(case, p, MODE, status, message=message))
            free_memory(device)
            continue
        gate_message = None
        if case.model not in gates:
            try:
                gates[case.model] = (case.name, gate(case, inp, tuple(provs)))
            except Exception as exc:
                gate_message = f"no correctness gate: {'oom' if is_oom(exc) else 'error'} in it: {_first_line(exc)}"
            inp.x0.grad = None
            free_memory(device)
        for p in provs:
            check = None
            if case.model in gates:
                gate_case, checks = gates[case.model]
                check = _inherit(checks[p], gate_case, case) if p in checks else None

            def fn(_p=p, _case=case, _inp=inp):
                return PROVIDER_FNS[_p](_case, _inp)

            try:
                stats = bench(fn, device, timing, grad_to_none=[inp.x0])
                mem = peak_memory_bytes(fn, device, grad_to_none=[inp.x0])
                error = None
            except Exception as exc:  # the traceback (and the tensors its frames hold) is dropped here
                error = (STATUS_OOM if is_oom(exc) else STATUS_ERROR, _first_line(exc))
            inp.x0.grad = None
            free_memory(device)
            if error is not None:
                emit(_row(case, p, MODE, error[0], check=check, message=error[1]))
                continue
            if check is None:
                status, message = STATUS_UNCHECKED, gate_message or "no correctness gate ran for this model"
            else:
                status = check["status"]
                message = check["message"] if status == STATUS_INCORRECT else None
            emit(
                _row(
                    case,
                    p,
                    MODE,
                    status,
                    **stats,
                    tflops=tflops(case.flops(MODE), stats["median_ms"]),
                    peak_mem_bytes=mem,
                    check=check,
                    message=message,
                )
            )
        del inp
        free_memory(device)
    add_speedups(rows, provs)
    for model in dict.fromkeys(c.model for c in cases):
        if model not in gates:
            skipped.append(f"{model}: no correctness gate could run (rows `unchecked`, speed-ups refused)")
    return {
        "op": "information-flow saliency: flow scores of every layer (forward + one backward + scores)",
        "set": set_name,
        "modes": [MODE],
        "header": environment(device),
        "timing": timing.describe(device) + "; one call = the stack's forward, loss.backward() and the "
        "[L, B, 3] scores of all layers (x0.grad reset before each call)",
        "memory": memory_note(device, "the fixed inputs (x0, projections) are allocated before and not counted"),
        "flop_model": "attention forward + backward of every layer: L · 3.5 · 4·B·H·T²·d / 2 (causal); the "
        "saliency pass, projections, norms and score reduction are not counted",
        "gate": GATE_TEXT,
        "providers": [{"name": p, "description": describe(p, device)} for p in provs],
        "cases": case_entries(cases),
        "skipped": platform_notes(device) + skipped,
        "rows": rows,
        "targets": targets(rows, evaluated=device.type == "cuda"),
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }


def side_by_side(results: dict) -> str:
    """A markdown table: per case, both providers' times, the speed-up and both peaks."""
    rows = results["rows"]
    lines = [
        "## Time and peak memory",
        "",
        f"| case | T | {OURS} ms | {EAGER} ms | speed-up vs {EAGER} | {OURS} peak MiB | {EAGER} peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["case"] for r in rows):
        ours, eager = _find(rows, name, OURS), _find(rows, name, EAGER)
        any_row = ours or eager
        text = "—" if ours is None else ours["speedup_text"].get(EAGER, "n/a")

        def peak(r):
            if r is None:
                return "not run"
            if r["median_ms"] is None:
                return "—"
            return "null" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"

        lines.append(
            f"| {name} | {any_row['params']['T']} | {_status_text(ours)} | {_status_text(eager)} | {text} | "
            f"{peak(ours)} | {peak(eager)} |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir=None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug>-saliency.json`` and ``.md``; return both paths."""
    md = markdown_with_gate(results).replace("\n## Summary:", "\n" + side_by_side(results) + "\n## Summary:", 1)
    return harness_write_results(results, out_dir, suffix="-saliency", markdown=md)
