"""Information-flow saliency of a whole stack, fused vs the probe method; benchmarks/README.md."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks import harness as h
from benchmarks.shapes import saliency_cases
from fastattn_icl.testing import GRAD_FACTOR

OURS, EAGER = "fastattn_icl", "eager_probe"
SCORES = ("S_wp", "S_pq", "S_ww")
EAGER_TARGET, EAGER_TARGET_T, LONG_T, MEMORY_EXPONENT_MAX = 10.0, 1024, 16384, 1.15
NORM_EPS = 1e-6


@dataclass
class StackInputs:
    """``x0 [B, H, T, d]`` (leaf), ``w_qkv [L, 3, H, d, d]`` (benchmark dtype), ``w_out [H·d, C]`` float32,
    ``labels [B, A]``, ``target``, ``target_rows [B]``, ``gold [B]``, one ``fastattn_icl.Saliency`` per layer."""

    x0: torch.Tensor
    w_qkv: torch.Tensor
    w_out: torch.Tensor
    labels: torch.Tensor
    target: int
    target_rows: torch.Tensor
    gold: torch.Tensor
    requests: list = field(default_factory=list)

    def with_requests(self) -> StackInputs:
        import fastattn_icl

        self.requests = [fastattn_icl.Saliency(self.labels, self.target) for _ in range(self.w_qkv.shape[0])]
        return self

    def upcast(self, dtype: torch.dtype) -> StackInputs:
        """The same values in ``dtype`` (the benchmark dtype's, upcast), fresh requests."""
        return StackInputs(self.x0.detach().to(dtype).requires_grad_(), self.w_qkv.to(dtype), self.w_out.to(dtype),
                           self.labels, self.target, self.target_rows, self.gold).with_requests()


def make_inputs(case, group) -> StackInputs:
    device = group.device
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(case.name.encode()))
    B, H, T, D, L = case.B, case.H, case.T, case.D, case.layers

    def randn(*size, std=1.0):
        return std * torch.randn(size, generator=gen, device=device, dtype=torch.float32)

    labels = torch.tensor(case.layout()[0], dtype=torch.long, device=device)[None].expand(B, -1).contiguous()
    return StackInputs(randn(B, H, T, D).to(case.torch_dtype).requires_grad_(),
                       randn(L, 3, H, D, D, std=D**-0.5).to(case.torch_dtype), randn(H * D, case.classes,
                                                                                      std=(H * D) ** -0.5),
                       labels, T - 1, torch.full((B,), T - 1, dtype=torch.long, device=device),
                       torch.arange(B, device=device) % case.classes).with_requests()


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    """``x / rms(x)`` per head over ``d``, the statistic in float32 (float64 for float64 input)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    return x * (math.sqrt(x.shape[-1]) / (norm + NORM_EPS)).to(x.dtype)


def stack_loss(inp: StackInputs, attend) -> torch.Tensor:
    """The stack's loss; ``attend(layer, q, k, v)`` is the attention of ``layer`` (``[B, H, T, d]`` each)."""
    x = inp.x0
    for layer in range(inp.w_qkv.shape[0]):
        hidden = _rms_norm(x)
        x = x + attend(layer, *(torch.matmul(hidden, inp.w_qkv[layer, i]) for i in range(3)))
    B, H, _, D = x.shape
    logits = x[:, :, inp.target, :].reshape(B, H * D).to(inp.w_out.dtype) @ inp.w_out
    return F.cross_entropy(logits, inp.gold)


def flow_fastattn(case, inp: StackInputs) -> torch.Tensor:
    """The fused op with one saliency request per layer; returns ``[L, B, 3]``."""
    import fastattn_icl

    for request in inp.requests:
        request.clear()
    stack_loss(inp, lambda layer, q, k, v: fastattn_icl.attention(q, k, v, causal=True, saliency=inp.requests[layer],
                                                                  backend="auto")).backward()
    return torch.stack([torch.stack(r.result.scores(), dim=-1) for r in inp.requests])


def flow_eager_probe(case, inp: StackInputs) -> torch.Tensor:
    """The paper's probe method on every layer; returns ``[L, B, 3]``."""
    from fastattn_icl.reference.attention import attention_probs
    from fastattn_icl.reference.saliency import flow_scores

    probes = []

    def attend(layer, q, k, v):
        p = attention_probs(q, k, causal=True).to(q.dtype)  # [B, H, T, T], materialised
        probes.append(torch.ones_like(p, requires_grad=True))
        return torch.matmul(p * probes[-1], v)

    stack_loss(inp, attend).backward()
    acc = torch.float64 if inp.x0.dtype == torch.float64 else torch.float32
    return torch.stack([torch.stack(flow_scores(probe.grad.sum(dim=1, dtype=acc).abs(), inp.labels, inp.target_rows),
                                    dim=-1) for probe in probes])


def _gate_now(case, inp: StackInputs, providers) -> dict:
    got = {p.name: p.fn(case, inp).detach() for p in providers if p.name != EAGER}
    inp.x0.grad = None
    got[EAGER] = same = flow_eager_probe(case, inp).detach()
    inp.x0.grad = None
    ref64 = flow_eager_probe(case, inp.upcast(torch.float64)).detach()
    scope = f"gate on {case.name}: scores of all {case.layers} layers vs eager_probe in float64"
    norms = [float(ref64[..., i].abs().max()) or 1.0 for i in range(len(SCORES))]
    checks = {}
    for p in providers:
        pairs = {n: h.compare(n, got[p.name][..., i] / norms[i], same[..., i] / norms[i], ref64[..., i] / norms[i],
                            GRAD_FACTOR) for i, n in enumerate(SCORES)}
        checks[p.name] = h.make_check({n: e for n, (e, _) in pairs.items()}, [f for _, f in pairs.values()], scope,
                                    score_max_abs=[float(ref64[..., i].abs().max()) for i in range(len(SCORES))])
    return checks


def gate(case, inp, group, providers, mode) -> dict:
    """Once per model, on its first case where it runs; later cases carry that verdict (their ``scope`` says so)."""
    gates = group.__dict__.setdefault("gates", {})
    note = f"{case.model}: no correctness gate could run (rows `unchecked`, speed-ups refused)"
    if case.model not in gates:
        try:
            gates[case.model] = (case.name, _gate_now(case, inp, providers))
        except Exception as exc:
            status, message = h.failure(exc)
            inp.x0.grad = None
            if note not in group.notes:
                group.notes.append(note)
            return {p.name: (h.STATUS_UNCHECKED, f"no correctness gate: {status} in it: {message}") for p in providers}
        inp.x0.grad = None
        if note in group.notes:
            group.notes.remove(note)
    first, checks = gates[case.model]
    if first == case.name:
        return checks
    return {name: {**c, "scope": f"inherited from the gate on {first} (same model, smaller T): {c['scope']}"}
            for name, c in checks.items()}


def _peaks(rows, model, provider):
    rs = [r for r in rows if r["params"]["model"] == model and r["provider"] == provider]
    rs = [r for r in rs if r["status"] == h.STATUS_OK and r["peak_mem_bytes"]]
    return [r["params"]["T"] for r in rs], [r["peak_mem_bytes"] for r in rs]


def _status_text(row) -> str:
    if row is None:
        return "not run"
    if row["median_ms"] is None:
        return row["status"]
    return f"{row['median_ms']:.4g} ms" + ("" if row["status"] == h.STATUS_OK else f" ({row['status']})")


def _mib(row) -> str:
    return "—" if row is None or row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.0f} MiB"


def targets(rows: list[dict]) -> list[dict]:
    """Per model: >= 10x the probe at T = 1k, peak memory linear in T, runs at T = 16k."""
    out = []
    for model in dict.fromkeys(r["params"]["model"] for r in rows):
        mine = [r for r in rows if r["params"]["model"] == model and r["provider"] == OURS]
        pairs = [(f"T{EAGER_TARGET_T}", o, h.find(rows, o["case"], EAGER)) for o in mine
                 if o["params"]["T"] == EAGER_TARGET_T]
        out.append(h.ratio_target(f"{model}: >= {EAGER_TARGET:g}x faster than eager_probe at T = {EAGER_TARGET_T}",
                                  pairs, lambda r: r >= EAGER_TARGET, lambda o, b, r, t: t if r is None else
                                  f"{r:.1f}x ({_status_text(o)} vs {_status_text(b)})",
                                  empty=f"no T = {EAGER_TARGET_T} case in this set"))
        ts, mem = _peaks(rows, model, OURS)
        exponent, eager_exp = h.fit_exponent(ts, mem), h.fit_exponent(*_peaks(rows, model, EAGER))
        if exponent is None:
            result, detail = "N/A", "fewer than two measured peaks"
        else:
            result = "PASS" if exponent <= MEMORY_EXPONENT_MAX else "FAIL"
            peaks = ", ".join(f"T{t}: {m / 2**20:.0f} MiB" for t, m in zip(ts, mem))
            detail = f"exponent {exponent:.2f} ({peaks}); eager_probe: exponent " + (
                "n/a" if eager_exp is None else f"{eager_exp:.2f}")
        out.append({"target": f"{model}: peak memory linear in T (fitted exponent <= {MEMORY_EXPONENT_MAX:g})",
                    "result": result, "detail": detail})
        parts, verdicts = [], []
        for ours in (r for r in mine if r["params"]["T"] == LONG_T):
            verdicts.append(ours["status"] == h.STATUS_OK)
            eager = h.find(rows, ours["case"], EAGER)
            parts.append(f"ours {_status_text(ours)}, peak {_mib(ours)}; eager_probe {_status_text(eager)}"
                         + ("" if eager is None or eager["median_ms"] is None else f", peak {_mib(eager)}"))
        out.append({"target": f"{model}: runs at T = {LONG_T} (eager_probe's status alongside, OOM expected)",
                    "result": h.verdict(verdicts), "detail": "; ".join(parts) or f"no T = {LONG_T} case in this set"})
    return out


BENCH = h.Benchmark(
    name="saliency", suffix="-saliency", modes=("flow",), cases=saliency_cases, group=lambda case: case.model,
    op="information-flow saliency: flow scores of every layer (forward + one backward + scores)",
    inputs=make_inputs, gate=gate, timing=h.TimingConfig(cuda_rep_ms=1000.0),
    timed=lambda case, inp, group, p, mode: h.Timed(lambda: p.fn(case, inp), [inp.x0]),
    providers=[
        h.Provider(OURS, flow_fastattn, lambda device: (
            "fastattn_icl.attention(causal=True, saliency=Saliency(label_positions, target), backend='auto') in "
            "every layer, one request per layer ("
            + ("the fused Triton kernels" if device.type == "cuda" else "its CPU path, backend 'torch' (no CUDA)")
            + "); loss.backward() records every layer's flow-score numerators; scores = request.result.scores()")),
        h.Provider(EAGER, flow_eager_probe, lambda device: (
            "the paper's probe method: per layer O = (P·probe) V, P = reference attention_probs(q, k) (QKᵀ in the "
            "input dtype, float32 softmax) in the input dtype, probe = ones [B, H, T, T] requiring grad; after "
            "loss.backward(), reference flow_scores(|Σ_h probe.grad|) (float32) per layer")),
    ],
    gate_text="per model, on its first case where it runs (the other cases carry that verdict, see check.scope): "
    "each provider's S_wp, S_pq, S_ww of every layer vs eager_probe in float64 on the same inputs upcast; error <= "
    f"{GRAD_FACTOR:g}x eager_probe's own error in the benchmark dtype + 1e-5, each score divided by its largest "
    "float64 value first (fastattn_icl.testing, gradient rule)",
    call="one call = the stack's forward, loss.backward() and the [L, B, 3] scores of all layers (x0.grad reset "
    "before each call)",
    memory="the fixed inputs (x0, projections) are allocated before and not counted",
    flop_model="attention forward + backward of every layer: L · 3.5 · 4·B·H·T²·d / 2 (causal); the saliency pass, "
    "projections, norms and score reduction are not counted",
    cpu_path="the `fastattn_icl` rows are the fused op's CPU path (backend 'torch')", targets=targets,
)
