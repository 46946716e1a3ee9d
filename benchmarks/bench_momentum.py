"""Momentum attention (``-momentum``) and the Deep-Thinking update (``-deep-thinking``); benchmarks/README.md."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from benchmarks import bench_attention as attn
from benchmarks import harness as h
from benchmarks.shapes import momentum_cases, update_cases
from fastattn_icl.testing import EPS, FWD_FACTOR, GRAD_FACTOR

OURS, BASE, EAGER = "fastattn_icl", "base", "eager"
OVERHEAD_MAX, OVERHEAD_MIN_T = 0.05, 2048
FUSED, LOOP = "fused", "eager_loop"
UPDATE_TARGET, ULP_TOLERANCE = 5.0, 1


def momentum(case, q, k, v):
    import fastattn_icl

    return fastattn_icl.momentum_attention(q, k, v, case.eta, causal=case.causal)


def eager_momentum(case, q, k, v):
    from fastattn_icl.reference.momentum import momentum_attention

    return momentum_attention(q, k, v, case.eta, causal=case.causal)


def _describe_ours(device) -> str:
    how = ("M by a Triton chunked scan (float32) added in the attention kernel's epilogue; backward: base attention's "
           "plus a reversed scan for dV") if device.type == "cuda" else \
        "chunked attention, M by chunked decay matmuls (float32)"
    return f"fastattn_icl.momentum_attention(q, k, v, eta, causal=True) ({h.kernel_text(device)}): {how}"


def add_overhead(results: dict) -> None:
    """``overhead_vs_base`` (ours / base - 1, refused as a speed-up is) and its text on the ``fastattn_icl`` rows."""
    for r in results["rows"]:
        if r["provider"] == OURS:
            ratio, text = h.speedup(r, h.find(results["rows"], r["case"], BASE, r["mode"]))
            r["overhead_vs_base"] = None if ratio is None else 1 / ratio - 1
            r["overhead_text"] = text if ratio is None else f"{100 * (1 / ratio - 1):+.1f}%"


def momentum_targets(rows: list[dict]) -> list[dict]:
    """Per model and mode: overhead vs ``base`` <= 5% at every T >= 2k."""
    out = []
    for model in dict.fromkeys(r["params"]["model"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pairs = [(f"T{o['params']['Tq']}", o, h.find(rows, o["case"], BASE, mode)) for o in rows
                     if (o["provider"], o["mode"], o["params"]["model"]) == (OURS, mode, model)
                     and o["params"]["Tq"] >= OVERHEAD_MIN_T]
            out.append(h.ratio_target(f"{model} {mode}: {OURS} overhead vs {BASE} <= {100 * OVERHEAD_MAX:g}% at every "
                                      f"T >= {OVERHEAD_MIN_T}", pairs, lambda r: 1 / r - 1 <= OVERHEAD_MAX,
                                      lambda o, b, r, t: t if r is None else f"{100 * (1 / r - 1):+.1f}%",
                                      empty=f"no T >= {OVERHEAD_MIN_T} case in this set"))
    return out


MOMENTUM = h.Benchmark(
    name="momentum", suffix="-momentum", modes=("fwd", "fwd+bwd"), cases=momentum_cases,
    op="momentum attention (docs/methods.md §6): attention + M, M_t = Σ_{i<t} η^(t-i) v_i",
    inputs=lambda case, group: attn.make_inputs(case, group.device),
    **h.tensor_op(oracle=eager_momentum, views=attn.check_views),
    providers=[
        h.Provider(OURS, momentum, _describe_ours),
        h.Provider(BASE, attn.fastattn, lambda device: (
            f"fastattn_icl.attention(q, k, v, causal=True), the same kernel without momentum "
            f"({h.kernel_text(device)}): the overhead reference; gated against base attention's oracle"),
            oracle=attn.oracle),
        h.Provider(EAGER, eager_momentum, lambda device: (
            "fastattn_icl.reference.momentum.momentum_attention in the benchmark dtype: reference attention "
            "(materialised S and P, K/V repeated for GQA) + a materialised [T, T] float64-built decay matrix times V "
            "in float32")),
    ],
    gate_text="every case, provider and kind of mode: the output (and dq, dk, dv in fwd+bwd) vs the float64 oracle "
    "(fastattn_icl.reference.momentum.momentum_attention; for `base` reference.attention.attention), error <= "
    f"{FWD_FACTOR:g}x (output) / {GRAD_FACTOR:g}x (gradients) the same-dtype oracle's error + 1e-5·max(1, max|ref|) "
    "(fastattn_icl.testing); large shapes on one self-contained slice (check.scope)",
    flop_model="the attention part's: 4·B·H·T²·d / 2 per causal forward, fwd+bwd 3.5x (docs/methods.md §9); "
    "the momentum term "
    "(O(T·d) scans, eager's [T, T] decay matmul) is not counted",
    cpu_path="the `fastattn_icl` and `base` rows are the CPU path (backend 'torch')",
    columns=[("overhead vs base", lambda by: by[OURS]["overhead_text"] if by.get(OURS) else "n/a")],
    finish=add_overhead, targets=momentum_targets,
)


@dataclass
class UpdateInputs:
    """``work [2, L, Hkv, 2, N, d]`` and ``m [2·L·Hkv, N·d]`` (float32) for ``fused``; the loop's per-layer copies
    ``x_hat[kv][l]``, ``x_new[kv][l]`` ``[1, Hkv, N, d]`` and ``mom[kv][l]`` (float32), ``kv`` 0 = K, 1 = V."""

    work: torch.Tensor
    m: torch.Tensor
    x_hat: list[list[torch.Tensor]]
    x_new: list[list[torch.Tensor]]
    mom: list[list[torch.Tensor]]


def make_update_inputs(case, group) -> UpdateInputs:
    """``X̂``, ``X_new``, ``m`` independent standard normal, seeded by the case's name."""
    device, (L, Hkv, N, D) = group.device, (case.layers, case.Hkv, case.N, case.D)
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(case.name.encode()))
    work = torch.randn(2, L, Hkv, 2, N, D, generator=gen, device=device, dtype=torch.float32).to(case.torch_dtype)
    m = torch.randn(case.rows, N * D, generator=gen, device=device, dtype=torch.float32)
    m5 = m.view(2, L, Hkv, N, D)
    return UpdateInputs(work, m, *([[x[kv, layer].clone()[None] for layer in range(L)] for kv in range(2)]
                                   for x in (work[:, :, :, 0], work[:, :, :, 1], m5)))


def fused(case, inp: UpdateInputs) -> None:
    from fastattn_icl.ops.deep_thinking import deep_thinking_update_

    deep_thinking_update_(inp.work.view(case.rows, 2, case.N * case.D), inp.m, eta=case.eta, beta=case.beta,
                          first=False)


def eager_loop(case, inp: UpdateInputs) -> None:
    from fastattn_icl.reference.deep_thinking import deep_thinking_update

    for x_hat, x_new, mom in zip(inp.x_hat, inp.x_new, inp.mom):  # K, then V
        for layer in range(case.layers):
            x_hat[layer], mom[layer] = deep_thinking_update(x_hat[layer], x_new[layer], mom[layer], eta=case.eta,
                                                            beta=case.beta)


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """int64 keys, monotone in the float value, adjacent floats one apart (+0 and -0 both 0)."""
    bits = x.view(h.BITS[x.element_size()]).to(torch.int64)
    mag = bits & ((1 << (8 * x.element_size() - 1)) - 1)
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor, *, chunk: int = 1 << 24) -> tuple[float, int]:
    """``(largest distance in ulps, elements that differ)``; a NaN counts as infinitely far. In chunks."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf"), max(a.numel(), b.numel())
    worst, differ = 0.0, 0
    for x, y in zip(a.reshape(-1).split(chunk), b.reshape(-1).split(chunk)):
        if bool(torch.isnan(x).any() or torch.isnan(y).any()):
            return float("inf"), int((x != y).sum()) + differ
        d = (_ordered(x) - _ordered(y)).abs()
        differ += int((d > 0).sum())
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst, differ


def _max_abs_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    d = (x.double() - ref.double()).abs()
    return 0.0 if not d.numel() else float("inf") if bool(torch.isnan(d).any()) else float(d.max())


def update_gate(case, inp: UpdateInputs, group=None, providers=(), mode="update") -> dict:
    """One step of ``fused`` and one of the loop from the same state (both advance it), then ``fused``'s check;
    ``eager_loop`` is the reference (``None``: no check of its own)."""
    from fastattn_icl.reference.deep_thinking import deep_thinking_update

    if providers and FUSED not in [p.name for p in providers]:
        return dict.fromkeys((p.name for p in providers), None)
    fused_fn = next((p.fn for p in providers if p.name == FUSED), fused)
    old_x, old_m = [list(xs) for xs in inp.x_hat], [list(ms) for ms in inp.mom]  # the loop rebinds, never writes
    x_new = inp.work[:, :, :, 1].clone()
    fused_fn(case, inp)
    eager_loop(case, inp)
    got = {"X_hat": inp.work[:, :, :, 0], "m": inp.m.view(2, case.layers, case.Hkv, case.N, case.D)}
    acc = {name: {"ulp": 0.0, "differing": 0, "error": 0.0, "loop_error": 0.0, "scale": 0.0} for name in got}
    for kv in range(2):
        for layer in range(case.layers):
            ref64 = deep_thinking_update(old_x[kv][layer].double(), inp.x_new[kv][layer].double(),
                                         old_m[kv][layer].double(), eta=case.eta, beta=case.beta)
            for (name, a), ref, theirs in zip(acc.items(), ref64, (inp.x_hat[kv][layer], inp.mom[kv][layer])):
                mine = got[name][kv, layer][None]
                ulp, n = ulp_distance(mine, theirs)
                a["ulp"], a["differing"] = max(a["ulp"], ulp), a["differing"] + n
                a["error"] = max(a["error"], _max_abs_diff(mine, ref))
                a["loop_error"] = max(a["loop_error"], _max_abs_diff(theirs, ref))
                a["scale"] = max(a["scale"], float(ref.abs().max()) if ref.numel() else 0.0)
    errors, ulps, criterion, failures = {}, {}, {}, []
    for name, a in acc.items():
        tol = FWD_FACTOR * a["loop_error"] + EPS * max(1.0, a["scale"])
        errors[name] = {"error": a["error"], "tolerance": tol, "loop_error": a["loop_error"]}
        ulps[name] = {"max": a["ulp"], "differing": a["differing"]}
        if a["differing"] == 0:
            criterion[name] = "bitwise"
        elif a["ulp"] <= ULP_TOLERANCE:
            criterion[name] = f"<= {ULP_TOLERANCE} ulp"
        elif a["error"] <= tol:
            criterion[name] = f"> {ULP_TOLERANCE} ulp, within the fastattn_icl.testing rule"
        else:
            criterion[name] = "failed"
            failures.append(f"{name}: {a['ulp']:g} ulp from the loop's ({a['differing']} elements differ) and error "
                            f"{a['error']:.3e} vs float64 > tolerance {tol:.3e} ({FWD_FACTOR:g}x the loop's "
                            f"{a['loop_error']:.3e} + eps)")
    bits = h.BITS[x_new.element_size()]
    unchanged = torch.equal(inp.work[:, :, :, 1].view(bits), x_new.view(bits))
    errors["X_new"] = {"error": 0.0 if unchanged else max(_max_abs_diff(inp.work[:, :, :, 1], x_new), 1e-300),
                       "tolerance": 0.0}
    failures += [] if unchanged else ["X_new: changed by the update"]
    check = {"status": "incorrect" if failures else h.STATUS_OK,
             "scope": "whole state (every layer's K and V), one step from the same state", "errors": errors,
             "ulp": ulps, "criterion": criterion, "bitwise": all(u["differing"] == 0 for u in ulps.values()),
             "message": "; ".join(failures) or None}
    return {FUSED: check, LOOP: None}


def _gate_cell(by, name: str) -> str:
    check = by[FUSED]["check"] if by.get(FUSED) else None
    if not check or name not in check.get("ulp", {}):
        return "—"
    u = check["ulp"][name]
    text = "bitwise" if not u["differing"] else f"{u['max']:g} ulp max, {u['differing']} differ"
    return text if check["criterion"][name] != "failed" else f"{text}, FAIL"


def update_targets(rows: list[dict]) -> list[dict]:
    """``fused`` >= 5x ``eager_loop`` on every case."""
    pairs = [(o["case"], o, h.find(rows, o["case"], LOOP)) for o in rows if o["provider"] == FUSED]
    return [h.ratio_target(f"{FUSED} at least {UPDATE_TARGET:g}x faster than {LOOP} on every case (median time)", pairs,
                         lambda r: r >= UPDATE_TARGET)]


DEEP_THINKING = h.Benchmark(
    name="deep-thinking", suffix="-deep-thinking", modes=("update",), cases=update_cases,
    op="Deep-Thinking update (docs/methods.md §7): one step's X̂, m update over every layer's K and V",
    inputs=make_update_inputs, gate=update_gate,
    **h.memory_bound_op(("gate X̂", lambda by: _gate_cell(by, "X_hat")), ("gate m", lambda by: _gate_cell(by, "m"))),
    providers=[
        h.Provider(FUSED, fused, lambda device: (
            "fastattn_icl.ops.deep_thinking.deep_thinking_update_(work.view(2·L·Hkv, 2, N·d), m, eta, beta, "
            "first=False) on the state buffer work [2, L, Hkv, 2, N, d] and m [2·L·Hkv, N·d] float32 ("
            + ("one Triton launch" if device.type == "cuda" else "on CPU the torch backend's one-pass C++ kernel "
               "fastattn_icl::fused_deep_thinking_update_, or its eager chunked ops when fastattn_icl._C is not built")
            + "), in place")),
        h.Provider(LOOP, eager_loop, lambda device: (
            "the authors' way: for each layer and each of K, V, fastattn_icl.reference.deep_thinking."
            "deep_thinking_update(x_hat, x_new, m, eta, beta) on per-layer tensors [1, Hkv, N, d] (m float32), 2·L "
            "calls, the results rebound into the per-layer lists")),
    ],
    gate_text="every case: one step of `fused` vs one step of the per-tensor loop (fastattn_icl.reference."
    f"deep_thinking.deep_thinking_update) from the same state. X̂ (its dtype) and m (float32) pass when bitwise equal "
    f"or at most {ULP_TOLERANCE} ulp apart (check.ulp, check.criterion), else within the fastattn_icl.testing rule vs "
    f"the float64 step ({FWD_FACTOR:g}x the loop's own error + 1e-5·max(1, max|ref|); check.errors, every case); "
    "X_new must stay unchanged bit for bit; eager_loop is the reference (no check of its own)",
    call="one call = one step's update of the whole state, in place",
    memory="the state and the loop's per-layer copies are allocated before and not counted",
    flop_model="none (memory-bound; TFLOP/s not reported). Bytes moved = 2·L·Hkv·N·d·(3·e + 8) (X̂, X_new read and "
    "X̂ written at e bytes each, m read and written at 4), GB/s = bytes / median time",
    cpu_path="the `fused` rows are deep_thinking_update_'s CPU path: the one-pass C++ kernel of fastattn_icl._C "
    "(csrc/deep_thinking.cpp; eager chunked ops, with a warning, when the extension is not built), not the GPU kernel "
    "the target is about",
    cpu_note="CPU set: fp32 at 4 layers (the GPU set's head geometries) so that it runs in seconds; CPU times are a "
    "smoke signal, not the GPU result",
    targets=update_targets,
)
BENCHES = [MOMENTUM, DEEP_THINKING]
