"""Momentum attention (SPEC.md §6) and the Deep-Thinking update step (SPEC.md §7): two parts, one results file.

Results: ``<out>/<device-slug>-momentum.json`` and ``.md``. The JSON holds the shared header, the targets of both
parts (``targets``) and each part's own harness results dict under ``momentum`` (part A) and ``deep_thinking``
(part B), ``null`` for a part that did not run (no cases in the set, or none of its providers asked for); the
markdown is the two parts' reports one after the other, each with its correctness gate, a side-by-side table,
the summary and every row.

Part A, momentum attention: ``O = attention(q, k, v) + M`` with ``M_t = Σ_{i<t} η^{t-i} v_i`` (causal, η = 0.9).
One timed call is the forward (``fwd``, under ``torch.no_grad``) or the forward and one ``backward`` of a random
output gradient (``fwd+bwd``), by the harness's :func:`~benchmarks.harness.run_suite`, as in
``benchmarks/bench_attention.py`` (same inputs, seeded by the case name: ``q [B, H, T, d]``, ``k, v [B, Hkv, T,
d]`` standard normal).

* ``fastattn_icl``: ``fastattn_icl.momentum_attention(q, k, v, eta, causal=True)``: on CUDA ``M`` from a Triton
  chunked scan (float32), added in the attention kernel's epilogue; the backward is the base attention's plus a
  reversed scan for ``dV``. On CPU its ``torch`` backend (chunked attention, ``M`` by chunked decay matmuls).
* ``base``: ``fastattn_icl.attention(q, k, v, causal=True)``, the same kernel without momentum: the overhead
  reference. Its gate is base attention's (``fastattn_icl.reference.attention.attention``), not momentum's.
* ``eager``: ``fastattn_icl.reference.momentum.momentum_attention`` in the benchmark dtype: the reference base
  attention (materialised ``S`` and ``P``, K/V repeated for GQA) plus ``M`` as a materialised ``[T, T]`` decay
  matrix times ``V`` in float32, what one would write without a kernel. It is also the gate's same-dtype oracle.

Correctness gate (every case, provider and kind of mode, before timing; the harness's, as for base attention):
the output, and in ``fwd+bwd`` ``dq``, ``dk``, ``dv``, against the float64 oracle
(``reference.momentum.momentum_attention``, for ``base`` ``reference.attention.attention``) by the rule of
:mod:`fastattn_icl.testing`: error <= 2x (output) / 3x (gradients) the same-dtype oracle's error + 1e-5 ·
max(1, max|ref|). Large shapes are checked on one self-contained slice, the last batch row and the last kv head
with its query heads (``bench_attention.check_views``; the momentum term is per kv head, so the slice is exact).
A provider that fails is timed but marked ``incorrect`` and no speed-up or overhead involving it is given.

Part A shapes (:func:`momentum_set`, ``_feature_set`` dispatch: ``default``/``all`` = the GPU set on a GPU, else the
CPU set; ``cpu``; ``tiny``; the other sets have no momentum cases; ``--batch`` does not apply):

* GPU: bf16, causal, η = 0.9, Llama-7B-like (H 32, d 128) and GQA (H 32 / Hkv 8, d 128), ``T`` in 1k ... 16k with
  ``B · T = 16k`` tokens (``B = 16384 // T``, as the acceptance set).
* CPU: fp32, H 4, d 64, ``T`` in 128, 256, 512, ``B = 1``. ``tiny``: B 2, H 4 / Hkv 2, T 33, d 16, fp32.

Part A targets (CUDA only; without CUDA listed as not evaluated, the CPU figures for information): per model
and mode, ``fastattn_icl``'s overhead over ``base`` (its median time / base's - 1) <= 5% at every ``T >= 2k``
(SPEC §6's budget for an O(T·d) term next to O(T²·d) attention). The speed-up vs ``eager`` is reported in the
tables, not a target. FLOP model: the attention part's (SPEC's; the momentum term is not counted).

Part B, one Deep-Thinking step's state update over every layer's K and V (mode ``update``), in place:
``g = X_new - X̂``, ``m = g + β m`` (not the first update), ``X̂ <- X̂ + η m`` with the authors' defaults η = 0.01,
β = 0.9, computed in float32, ``m`` a float32 buffer.

* ``fused``: ``fastattn_icl.ops.deep_thinking.deep_thinking_update_(work.view(2·L·Hkv, 2, N·d), m, eta=0.01,
  beta=0.9, first=False)`` on the state buffer ``work [2, L, Hkv, 2, N, d]`` (K/V, layer, kv head, then ``X̂`` next
  to ``X_new``: the layout of ``fastattn_icl.methods.deep_thinking``) and ``m [2·L·Hkv, N·d]``: one Triton launch
  on CUDA, its torch twin (a few whole-buffer eager ops) on CPU.
* ``eager_loop``: what the authors' code does: a Python loop over the layers and over K, V of
  ``fastattn_icl.reference.deep_thinking.deep_thinking_update(x_hat, x_new, m, eta=, beta=)`` on per-layer tensors
  ``[1, Hkv, N, d]`` (each its own allocation, ``m`` float32), ``2·L`` calls, the results written back by
  rebinding the per-layer lists' entries (no copy, the cheapest write-back for the loop).

Both start from the same state: ``X̂``, ``X_new`` and ``m`` independent standard normal (seeded by the case name;
``X_new`` far from ``X̂`` so that ``η m`` moves ``X̂`` by several ulps and the gate sees the arithmetic), the
loop's tensors copies of the buffer's. The timed calls keep updating the state in place (each call is one more
step, ``first=False``; values stay bounded).

Part B gate (every case, before timing): one step of ``fused`` on the buffer and one of the loop on its copies,
then ``X̂`` (its dtype) and ``m`` (float32) of both compared element by element. They pass when equal to the loop's
bit for bit or at most ``ULP_TOLERANCE = 1`` unit in the last place apart; failing that, when within the rule of
:mod:`fastattn_icl.testing` against the step computed in float64 from the same state (error <= 2x the loop's own
error + 1e-5 · max(1, max|ref|)). ``X_new`` must be left unchanged bit for bit. The check records, per tensor, the
largest distance from the loop in ulps and how many elements differ at all (``check.ulp``), which criterion held
(``check.criterion``: ``bitwise``, ``<= 1 ulp`` or the testing rule), ``check.bitwise``, and the float64 figures
(``check.errors``, for every case). Which holds: on CPU the torch twin does the loop's float32 operations in the
same order, so the results are bitwise equal (the CPU run says ``bitwise`` for every case). On CUDA (not measured
here) the Triton kernel is free to contract ``g + β m`` and ``X̂ + η m`` into fused multiply-adds (one rounding
instead of two, more accurate); that moves ``m`` by about an ulp, but where ``g`` and ``β m`` nearly cancel the
loop's extra rounding of ``β m`` is many ulps of the small result, which is why a bare 1-ulp rule would refuse a
correct kernel and the float64 rule backs it up. The loop's rows carry no check of their own (it is the
reference); a ``fused`` that fails is timed but marked ``incorrect`` and its speed-up is refused.

Bytes moved and bandwidth (part B): ``bytes = 2·L·Hkv·N·d · (3·e + 8)`` with ``e`` the state's element size:
``X̂`` and ``X_new`` read and ``X̂`` written (``e`` each), ``m`` read and written (4 each). It is the update's
useful traffic, the same figure for both providers (the loop's temporaries move more), so ``GB/s = bytes /
median time`` compares them directly.

Part B cases: ``N`` = the tokens of the demonstrations, ``classes · 4`` of ``prompt_tokens(d, 1) -
prompt_tokens(d, 0)`` tokens each (the rule of :mod:`benchmarks.shapes`, as ``bench_gather``'s ``T``), for SST-2
(N 264) and AGNews (N 944); one prompt (``B = 1``, the state of a Deep-Thinking run).

* GPU: fp16, GPT2-XL-shaped (L 48, Hkv 25, d 64) and Llama-7B-shaped (L 32, Hkv 32, d 128) caches.
* CPU: fp32, the same head geometries at ``CPU_LAYERS = 4`` layers. ``tiny``: L 2, Hkv 2, d 8, SST-2 1/class
  (N 66), fp32 and fp16.

Part B target (CUDA only): ``fused`` at least ``5x`` faster than ``eager_loop`` on every case (a memory-bound
pass in one launch vs ``2·L`` calls of several small eager ops each).

Timing: the harness's ``bench`` (``do_bench`` on CUDA, L2 flushed before each call; a ``perf_counter`` loop on
CPU), peak memory: the harness's ``max_memory_allocated`` delta over one call on CUDA (inputs and state not
counted), ``null`` on CPU. Out of memory is a row with status ``oom``.

Caveats. Part A's ``eager`` materialises ``[B, H, T, T]`` scores and probabilities, so its long-``T`` rows are
expected to be ``oom`` on an 80 GB GPU; the float64 gate on the GQA slice (4 query heads) at T = 16k holds a few
``[4, T, T]`` float64 tensors (8 GiB each), and if even that does not fit, the harness records the provider's row
as ``oom`` (not timed). On CPU, part B's ``fused`` is the op's torch twin, which makes whole-state passes with
whole-state temporaries while the loop's per-layer tensors stay in cache, so there the loop is faster: the CPU
rows say nothing about the Triton kernel.
"""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import bench_attention
from benchmarks.harness import (
    STATUS_ERROR,
    STATUS_INCORRECT,
    STATUS_OK,
    STATUS_OOM,
    STATUS_SKIPPED,
    Provider,
    Suite,
    TimingConfig,
    _first_line,
    _row,
    add_speedups,
    bandwidth,
    bench,
    case_entries,
    environment,
    format_progress,
    free_memory,
    is_oom,
    markdown_with_gate,
    memory_note,
    peak_memory_bytes,
    row_emitter,
    run_suite,
    speedup,
    targets_not_evaluated,
)
from benchmarks.harness import write_results as harness_write_results
from benchmarks.shapes import (
    ACCEPTANCE_LENGTHS,
    ACCEPTANCE_TOKENS,
    DATASETS,
    DTYPES,
    MODELS,
    AttnShape,
    DemonstrationGeometry,
    _feature_set,
)
from fastattn_icl.testing import EPS, FWD_FACTOR, GRAD_FACTOR

# part A: momentum attention
OURS = "fastattn_icl"
BASE = "base"
EAGER = "eager"
ATTN_PROVIDERS = (OURS, BASE, EAGER)
ATTN_MODES = ("fwd", "fwd+bwd")
ETA = 0.9
OVERHEAD_MAX = 0.05  # fastattn_icl median <= 1.05x base median ...
OVERHEAD_MIN_T = 2048  # ... at every T >= 2k
ATTN_GPU_MODELS = ("llama-7b", "llama-gqa")
ATTN_CPU_LENGTHS = (128, 256, 512)

# part B: the Deep-Thinking update
FUSED = "fused"
LOOP = "eager_loop"
UPDATE_PROVIDERS = (FUSED, LOOP)
UPDATE_MODE = "update"
DT_ETA, DT_BETA = 0.01, 0.9
UPDATE_TARGET = 5.0  # fused >= 5x eager_loop, every case
ULP_TOLERANCE = 1
DT_LAYERS = {"gpt2-xl": 48, "llama-7b": 32}
DT_DATASETS = ("sst2", "agnews")
DT_PER_CLASS = 4
CPU_LAYERS = 4

PROVIDERS = ATTN_PROVIDERS + UPDATE_PROVIDERS

ATTN_GATE_TEXT = (
    "every case, provider and kind of mode: the output (and dq, dk, dv in fwd+bwd) vs the float64 oracle "
    "(fastattn_icl.reference.momentum.momentum_attention; for `base` reference.attention.attention), error <= "
    f"{FWD_FACTOR:g}x (output) / {GRAD_FACTOR:g}x (gradients) the same-dtype oracle's error + 1e-5·max(1, max|ref|) "
    "(fastattn_icl.testing); large shapes on one self-contained slice (check.scope)"
)
UPDATE_GATE_TEXT = (
    "every case: one step of `fused` on the buffer vs one step of the per-tensor loop "
    "(fastattn_icl.reference.deep_thinking.deep_thinking_update) from the same state. X̂ (its dtype) and m (float32) "
    f"pass when bitwise equal to the loop's or at most {ULP_TOLERANCE} ulp apart (check.ulp, check.criterion), else "
    "when within the fastattn_icl.testing rule against the float64 step (error <= "
    f"{FWD_FACTOR:g}x the loop's own error + 1e-5·max(1, max|ref|); check.errors holds these figures for every case); "
    "X_new must be left unchanged bit for bit; eager_loop is the reference (no check of its own)"
)


# ---------------------------------------------------------------------------------------------- part A: cases


@dataclass(frozen=True)
class MomentumShape(AttnShape):
    """An :class:`~benchmarks.shapes.AttnShape` (self-attention) with the momentum coefficient ``eta``."""

    eta: float = ETA
    model: str = ""

    @property
    def label(self) -> str:
        return f"{super().label}, η {self.eta:g}"


def momentum_shape(model: str, T: int, *, B: int, dtype: str = "bf16", group: str = "momentum") -> MomentumShape:
    m = MODELS[model]
    return MomentumShape(
        f"momentum-{model}-T{T}",
        group,
        B,
        m.heads,
        m.kv_heads,
        T,
        T,
        m.head_dim,
        True,
        dtype,
        f"{m.name}, B·T = {B * T}",
        eta=ETA,
        model=model,
    )


def momentum_gpu_set() -> list[MomentumShape]:
    """bf16, Llama-7B-like and GQA 32/8 (d 128), T = 1k ... 16k with B·T = 16k."""
    return [momentum_shape(m, T, B=ACCEPTANCE_TOKENS // T) for m in ATTN_GPU_MODELS for T in ACCEPTANCE_LENGTHS]


def momentum_cpu_set() -> list[MomentumShape]:
    """fp32, H 4, d 64, B 1, T = 128, 256, 512."""
    return [
        MomentumShape(
            f"momentum-cpu-T{T}",
            "momentum-cpu",
            1,
            4,
            4,
            T,
            T,
            64,
            True,
            "fp32",
            "small CPU shape",
            eta=ETA,
            model="cpu-h4",
        )
        for T in ATTN_CPU_LENGTHS
    ]


def momentum_tiny_set() -> list[MomentumShape]:
    """The smoke test's case: B 2, H 4 / Hkv 2, T 33, d 16, fp32."""
    return [
        MomentumShape(
            "tiny-momentum-gqa", "tiny", 2, 4, 2, 33, 33, 16, True, "fp32", "smoke test", eta=ETA, model="tiny"
        )
    ]


# ---------------------------------------------------------------------------------------------- part B: cases


@dataclass(frozen=True)
class UpdateCase(DemonstrationGeometry):
    """One Deep-Thinking update of an ``L``-layer state ``[1, Hkv, N, d]`` per K and V, ``N`` the tokens of
    ``per_class`` demonstrations per class of ``dataset`` (see the module docstring)."""

    name: str
    group: str
    model: str
    layers: int
    Hkv: int
    D: int
    dataset: str
    per_class: int
    dtype: str = "fp16"
    eta: float = DT_ETA
    beta: float = DT_BETA
    note: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def N(self) -> int:
        """Demonstration tokens (the state's length)."""
        return self.T_demo

    @property
    def rows(self) -> int:
        """``R = 2·L·Hkv``: the rows of ``work.view(R, 2, N·d)``."""
        return 2 * self.layers * self.Hkv

    @property
    def elements(self) -> int:
        """Elements of the state ``X̂`` (all layers, K and V)."""
        return self.rows * self.N * self.D

    @property
    def bytes_moved(self) -> int:
        """``elements · (3·e + 8)``: ``X̂``, ``X_new`` read, ``X̂`` written (``e`` each); ``m`` read and written."""
        e = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.elements * (3 * e + 8)

    @property
    def label(self) -> str:
        return (
            f"L{self.layers} B1 Hkv{self.Hkv} N{self.N} d{self.D} {self.dtype}, η {self.eta:g} β {self.beta:g}, "
            f"{self.demonstrations} {DATASETS[self.dataset].name} demos ({self.per_class}/class)"
        )

    def flops(self, mode: str) -> None:
        return None

    def params(self) -> dict:
        return {**asdict(self), "N": self.N, "demonstrations": self.demonstrations, "bytes_moved": self.bytes_moved}


def update_case(
    model: str, dataset: str, *, dtype: str = "fp16", layers: int | None = None, group: str = "deep-thinking"
) -> UpdateCase:
    m, L = MODELS[model], layers or DT_LAYERS[model]
    depth = f"L {L}" if L == DT_LAYERS[model] else f"L {L} of its {DT_LAYERS[model]}"
    return UpdateCase(
        f"dt-{model}-{dataset}-{DT_PER_CLASS}pc" + ("" if L == DT_LAYERS[model] else f"-L{L}"),
        group,
        model,
        L,
        m.kv_heads,
        m.head_dim,
        dataset,
        DT_PER_CLASS,
        dtype,
        note=f"{m.name}-shaped state ({depth}, Hkv {m.kv_heads}, d {m.head_dim}), {DATASETS[dataset].name}",
    )


def update_gpu_set() -> list[UpdateCase]:
    """fp16, GPT2-XL- and Llama-7B-shaped states, SST-2 and AGNews at 4 demonstrations per class."""
    return [update_case(m, ds) for m in DT_LAYERS for ds in DT_DATASETS]


def update_cpu_set() -> list[UpdateCase]:
    """fp32, the same head geometries at ``CPU_LAYERS`` layers."""
    return [
        update_case(m, ds, dtype="fp32", layers=CPU_LAYERS, group="deep-thinking-cpu")
        for m in DT_LAYERS
        for ds in DT_DATASETS
    ]


def update_tiny_set() -> list[UpdateCase]:
    """The smoke test's two cases: L 2, Hkv 2, d 8, SST-2 1/class (N 66), fp32 and fp16."""
    return [
        UpdateCase(f"tiny-dt-{dt}", "tiny", "tiny", 2, 2, 8, "sst2", 1, dt, note="smoke test")
        for dt in ("fp32", "fp16")
    ]


# ---------------------------------------------------------------------------------------------- sets


def momentum_set(name: str, *, cuda: bool, batch: int | None = None) -> list:
    """Part A's then part B's cases of shape set ``name`` (the names of ``benchmarks.run --set``): ``default`` and
    ``all`` are the GPU sets on a GPU and the CPU sets otherwise, ``cpu`` the CPU sets, ``tiny`` the smoke test's;
    the other sets have no momentum cases (``[]``). ``batch`` does not apply (part A's ``B`` is ``16k / T``, part
    B's state is one prompt's)."""
    attn = _feature_set(name, "momentum", momentum_gpu_set, momentum_cpu_set, momentum_tiny_set, cuda, None)
    update = _feature_set(name, "momentum", update_gpu_set, update_cpu_set, update_tiny_set, cuda, None)
    return attn + update


# ---------------------------------------------------------------------------------------------- part A: providers


def _momentum(case, q, k, v):
    import fastattn_icl

    return fastattn_icl.momentum_attention(q, k, v, case.eta, causal=case.causal)


def _eager_momentum(case, q, k, v):
    from fastattn_icl.reference.momentum import momentum_attention

    return momentum_attention(q, k, v, case.eta, causal=case.causal)


def _momentum_oracle(case, q, k, v):
    return _eager_momentum(case, q, k, v)


def _kernel(device: torch.device) -> str:
    return "Triton" if device.type == "cuda" else "CPU path, backend 'torch', no CUDA"


def _describe_ours(device: torch.device) -> str:
    if device.type == "cuda":
        how = "M by a Triton chunked scan (float32) added in the attention kernel's epilogue; backward: base "
        how += "attention's plus a reversed scan for dV"
    else:
        how = "chunked attention, M by chunked decay matmuls (float32)"
    return f"fastattn_icl.momentum_attention(q, k, v, eta, causal=True) ({_kernel(device)}): {how}"


def attention_providers() -> dict[str, Provider]:
    return {
        OURS: Provider(OURS, _momentum, _describe_ours),
        BASE: Provider(
            BASE,
            bench_attention._fastattn,
            lambda device: (
                "fastattn_icl.attention(q, k, v, causal=True), the same kernel without momentum "
                f"({_kernel(device)}): the overhead reference; gated against base attention's oracle"
            ),
        ),
        EAGER: Provider(
            EAGER,
            _eager_momentum,
            lambda device: (
                "fastattn_icl.reference.momentum.momentum_attention in the benchmark dtype: reference "
                "attention (materialised S and P, K/V repeated for GQA) + a materialised [T, T] float64-built decay "
                "matrix times V in float32"
            ),
        ),
    }


def momentum_suite() -> Suite:
    return Suite("momentum attention", bench_attention.make_inputs, _momentum_oracle, bench_attention.check_views)


def base_suite() -> Suite:
    return Suite("attention", bench_attention.make_inputs, bench_attention._oracle, bench_attention.check_views)


# ---------------------------------------------------------------------------------------------- part A: targets


def _find(rows, case: str, mode: str, provider: str):
    for r in rows:
        if (r["case"], r["mode"], r["provider"]) == (case, mode, provider):
            return r
    return None


def _verdict(verdicts: list) -> str:
    if not verdicts:
        return "N/A"
    if False in verdicts:
        return "FAIL"
    return "N/A" if None in verdicts else "PASS"


def overhead(row: dict, base: dict | None) -> tuple[float | None, str]:
    """``(row time / base time - 1, text)``; refused (``None``) as :func:`benchmarks.harness.speedup` refuses."""
    ratio, text = speedup(row, base)
    if ratio is None:
        return None, text
    value = row["median_ms"] / base["median_ms"] - 1.0
    return value, f"{100 * value:+.1f}%"


def attention_targets(rows: list[dict], *, evaluated: bool = True) -> list[dict]:
    """Per model and mode: ``fastattn_icl``'s overhead over ``base`` <= 5% at every T >= 2k; PASS / FAIL / N/A,
    or ``not evaluated`` (no CUDA) with the figures in the detail."""
    out = []
    models = list(dict.fromkeys(r["params"]["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for model in models:
        for mode in modes:
            parts, verdicts = [], []
            for ours in rows:
                p = ours["params"]
                if (ours["provider"], ours["mode"], p["model"]) != (OURS, mode, model) or p["Tq"] < OVERHEAD_MIN_T:
                    continue
                value, text = overhead(ours, _find(rows, ours["case"], mode, BASE))
                if value is None:
                    verdicts.append(None if ours["status"] in (STATUS_OK, STATUS_SKIPPED) else False)
                else:
                    verdicts.append(value <= OVERHEAD_MAX)
                parts.append(f"T{p['Tq']}: {text}")
            out.append(
                {
                    "target": f"{model} {mode}: {OURS} overhead vs {BASE} <= {100 * OVERHEAD_MAX:g}% at every T >= "
                    f"{OVERHEAD_MIN_T}",
                    "result": _verdict(verdicts),
                    "detail": ", ".join(parts) or f"no T >= {OVERHEAD_MIN_T} case in this set",
                }
            )
    return out if evaluated else targets_not_evaluated(out)


# ---------------------------------------------------------------------------------------------- part A: running


def attention_platform_notes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    return [
        "Triton kernels not run: no CUDA; the `fastattn_icl` and `base` rows are the CPU path (backend 'torch')",
        "peak memory not measured: no CUDA (reported as null; torch's CPU allocator keeps no peak counter)",
        f"target ({OURS} overhead vs {BASE} <= {100 * OVERHEAD_MAX:g}% at T >= {OVERHEAD_MIN_T}) not evaluated: "
        "no CUDA",
    ]


def run_attention_part(
    cases,
    device: torch.device,
    *,
    modes=ATTN_MODES,
    timing: TimingConfig | None = None,
    progress=print,
    set_name: str = "",
    provider_names=None,
) -> dict:
    """Part A: the momentum providers through :func:`run_suite` with the momentum oracle, ``base`` through it with
    base attention's; rows merged, speed-ups and targets over all of them."""
    timing = timing or TimingConfig()
    t_start = time.perf_counter()
    provs = [p for p in ATTN_PROVIDERS if provider_names is None or p in provider_names]
    table = attention_providers()
    runs = []
    mom = [table[p] for p in provs if p != BASE]
    if mom:
        runs.append(
            run_suite(
                momentum_suite(), cases, mom, list(modes), device, timing=timing, progress=progress, set_name=set_name
            )
        )
    if BASE in provs:
        runs.append(
            run_suite(
                base_suite(),
                cases,
                [table[BASE]],
                list(modes),
                device,
                timing=timing,
                progress=progress,
                set_name=set_name,
            )
        )
    order = {c.name: i for i, c in enumerate(cases)}
    rows = sorted(
        (r for run in runs for r in run["rows"]),
        key=lambda r: (order[r["case"]], list(modes).index(r["mode"]), provs.index(r["provider"])),
    )
    add_speedups(rows, provs)
    for r in rows:
        if r["provider"] == OURS:
            r["overhead_vs_base"], r["overhead_text"] = overhead(r, _find(rows, r["case"], r["mode"], BASE))
    skipped = list(dict.fromkeys(s for run in runs for s in run["skipped"]))
    return {
        "op": "momentum attention (SPEC §6): attention + M, M_t = Σ_{i<t} η^(t-i) v_i",
        "set": set_name,
        "modes": list(modes),
        "header": environment(device),
        "timing": timing.describe(device),
        "memory": memory_note(device, "the inputs are allocated before and not counted"),
        "flop_model": "the attention part's: 4·B·H·T²·d / 2 per causal forward, fwd+bwd 3.5x (SPEC); the momentum "
        "term (O(T·d) scans, eager's [T, T] decay matmul) is not counted",
        "gate": ATTN_GATE_TEXT,
        "providers": [{"name": p, "description": table[p].describe(device)} for p in provs],
        "cases": case_entries(cases),
        "skipped": attention_platform_notes(device) + skipped,
        "rows": rows,
        "targets": attention_targets(rows, evaluated=device.type == "cuda"),
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }


# ---------------------------------------------------------------------------------------------- part B: inputs


@dataclass
class UpdateInputs:
    """``work [2, L, Hkv, 2, N, d]`` and ``m [2·L·Hkv, N·d]`` (float32) for ``fused``; the loop's per-layer copies
    ``x_hat[kv][l]``, ``x_new[kv][l]`` ``[1, Hkv, N, d]`` and ``mom[kv][l]`` (float32), ``kv`` 0 = K, 1 = V."""

    work: torch.Tensor
    m: torch.Tensor
    x_hat: list[list[torch.Tensor]]
    x_new: list[list[torch.Tensor]]
    mom: list[list[torch.Tensor]]


def make_update_inputs(case: UpdateCase, device: torch.device) -> UpdateInputs:
    """The case's state on ``device``, seeded by its name: ``X̂``, ``X_new``, ``m`` independent standard normal."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(case.name.encode()))
    L, Hkv, N, D = case.layers, case.Hkv, case.N, case.D
    work = torch.randn(2, L, Hkv, 2, N, D, generator=gen, device=device, dtype=torch.float32).to(case.torch_dtype)
    m = torch.randn(case.rows, N * D, generator=gen, device=device, dtype=torch.float32)
    m5 = m.view(2, L, Hkv, N, D)
    return UpdateInputs(
        work,
        m,
        [[work[kv, layer, :, 0].clone()[None] for layer in range(L)] for kv in range(2)],
        [[work[kv, layer, :, 1].clone()[None] for layer in range(L)] for kv in range(2)],
        [[m5[kv, layer].clone()[None] for layer in range(L)] for kv in range(2)],
    )


def _fused(case: UpdateCase, inp: UpdateInputs) -> None:
    from fastattn_icl.ops.deep_thinking import deep_thinking_update_

    deep_thinking_update_(
        inp.work.view(case.rows, 2, case.N * case.D), inp.m, eta=case.eta, beta=case.beta, first=False
    )


def _eager_loop(case: UpdateCase, inp: UpdateInputs) -> None:
    from fastattn_icl.reference.deep_thinking import deep_thinking_update

    for x_hat, x_new, mom in zip(inp.x_hat, inp.x_new, inp.mom):  # K, then V
        for layer in range(case.layers):
            x_hat[layer], mom[layer] = deep_thinking_update(
                x_hat[layer], x_new[layer], mom[layer], eta=case.eta, beta=case.beta
            )


UPDATE_FNS = {FUSED: _fused, LOOP: _eager_loop}


def describe_update(provider: str, device: torch.device) -> str:
    if provider == FUSED:
        how = "one Triton launch" if device.type == "cuda" else "its torch twin on CPU: a few whole-buffer eager ops"
        return (
            "fastattn_icl.ops.deep_thinking.deep_thinking_update_(work.view(2·L·Hkv, 2, N·d), m, eta, beta, "
            f"first=False) on the state buffer work [2, L, Hkv, 2, N, d] and m [2·L·Hkv, N·d] float32 ({how}), in place"
        )
    return (
        "the authors' way: for each layer and each of K, V, fastattn_icl.reference.deep_thinking.deep_thinking_update"
        "(x_hat, x_new, m, eta, beta) on per-layer tensors [1, Hkv, N, d] (m float32), 2·L calls, the results "
        "rebound into the per-layer lists"
    )


# ---------------------------------------------------------------------------------------------- part B: gate


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """int64 keys, monotone in the float value, adjacent floats one apart (+0 and -0 both 0)."""
    bits = x.view(_BITS[x.element_size()]).to(torch.int64)
    mag = bits & ((1 << (8 * x.element_size() - 1)) - 1)
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor, *, chunk: int = 1 << 24) -> tuple[float, int]:
    """``(largest distance in ulps, elements that differ)`` of two tensors of one floating dtype and shape; a
    NaN on either side counts as an infinite distance. Computed in chunks (int64 keys of the whole state could
    need gigabytes)."""
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
    """Largest ``|x - ref|`` in float64 on the tensors' device; a NaN gives inf."""
    d = (x.double() - ref.double()).abs()
    if not d.numel():
        return 0.0
    return float("inf") if bool(torch.isnan(d).any()) else float(d.max())


def update_gate(case: UpdateCase, inp: UpdateInputs) -> dict:
    """One step of ``fused`` on the buffer and one of the loop on its copies (both advance ``inp``'s state), then
    the check in the harness's format: ``errors`` are absolute errors against the float64 step (the
    :mod:`fastattn_icl.testing` figures), ``ulp`` the distance from the loop's result (see the module docstring)."""
    L, Hkv, N, D = case.layers, case.Hkv, case.N, case.D
    from fastattn_icl.reference.deep_thinking import deep_thinking_update

    old_x, old_m = [list(xs) for xs in inp.x_hat], [list(ms) for ms in inp.mom]  # the loop rebinds, never writes
    x_new = inp.work[:, :, :, 1].clone()
    UPDATE_FNS[FUSED](case, inp)
    _eager_loop(case, inp)
    got = {"X_hat": inp.work[:, :, :, 0], "m": inp.m.view(2, L, Hkv, N, D)}
    acc = {name: {"ulp": 0.0, "differing": 0, "error": 0.0, "loop_error": 0.0, "scale": 0.0} for name in got}
    for kv in range(2):
        for layer in range(L):
            ref64 = deep_thinking_update(
                old_x[kv][layer].double(),
                inp.x_new[kv][layer].double(),
                old_m[kv][layer].double(),
                eta=case.eta,
                beta=case.beta,
            )
            loop = (inp.x_hat[kv][layer], inp.mom[kv][layer])
            for (name, a), ref, theirs in zip(acc.items(), ref64, loop):
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
            failures.append(
                f"{name}: {a['ulp']:g} ulp from the loop's ({a['differing']} elements differ) and error "
                f"{a['error']:.3e} vs float64 > tolerance {tol:.3e} ({FWD_FACTOR:g}x the loop's {a['loop_error']:.3e} "
                "+ eps)"
            )
    unchanged = torch.equal(
        inp.work[:, :, :, 1].view(_BITS[x_new.element_size()]), x_new.view(_BITS[x_new.element_size()])
    )
    errors["X_new"] = {
        "error": 0.0 if unchanged else max(_max_abs_diff(inp.work[:, :, :, 1], x_new), 1e-300),
        "tolerance": 0.0,
    }
    if not unchanged:
        failures.append("X_new: changed by the update")
    return {
        "status": STATUS_INCORRECT if failures else STATUS_OK,
        "scope": "whole state (every layer's K and V), one step from the same state",
        "errors": errors,
        "ulp": ulps,
        "criterion": criterion,
        "bitwise": all(u["differing"] == 0 for u in ulps.values()),
        "message": "; ".join(failures) or None,
    }


# ---------------------------------------------------------------------------------------------- part B: targets


def _find_update(rows, case: str, provider: str):
    return _find(rows, case, UPDATE_MODE, provider)


def update_targets(rows: list[dict], *, evaluated: bool = True) -> list[dict]:
    """``fused`` >= 5x ``eager_loop`` on every case: PASS / FAIL / N/A, or ``not evaluated`` (no CUDA)."""
    parts, verdicts = [], []
    for ours in (r for r in rows if r["provider"] == FUSED):
        ratio, text = speedup(ours, _find_update(rows, ours["case"], LOOP))
        if ratio is None:
            verdicts.append(None if ours["status"] in (STATUS_OK, STATUS_SKIPPED) else False)
        else:
            verdicts.append(ratio >= UPDATE_TARGET)
        parts.append(f"{ours['case']}: {text}")
    out = [
        {
            "target": f"{FUSED} at least {UPDATE_TARGET:g}x faster than {LOOP} on every case (median time)",
            "result": _verdict(verdicts),
            "detail": ", ".join(parts) or "no cases",
        }
    ]
    return out if evaluated else targets_not_evaluated(out)


# ---------------------------------------------------------------------------------------------- part B: running


def update_platform_notes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    return [
        "Triton kernel not run: no CUDA; the `fused` rows are deep_thinking_update_'s torch twin: a few eager passes "
        "over the state in cache-sized row chunks (about 1 MiB of float32 temporaries each), not the GPU kernel the "
        "target is about",
        f"target ({FUSED} >= {UPDATE_TARGET:g}x {LOOP}) not evaluated: no CUDA",
        f"CPU set: fp32 at {CPU_LAYERS} layers (the GPU set's head geometries) so that it runs in seconds; CPU times "
        "are a smoke signal, not the GPU result",
    ]


def _progress_line(row: dict) -> str:
    return format_progress(row, rate=bandwidth)


def run_update_part(
    cases,
    device: torch.device,
    *,
    timing: TimingConfig | None = None,
    progress=print,
    set_name: str = "",
    provider_names=None,
) -> dict:
    """Part B: gate, time and measure the providers on every case; returns the harness's results dict."""
    timing = timing or TimingConfig()
    t_start = time.perf_counter()
    provs = [p for p in UPDATE_PROVIDERS if provider_names is None or p in provider_names]
    rows: list[dict] = []
    total = len(cases) * len(provs)

    emit = row_emitter(rows, total, progress, _progress_line)

    for case in cases:
        extra = {"bytes_moved": case.bytes_moved, "gb_per_s": None}
        check = inp = None
        try:
            inp = make_update_inputs(case, device)
            check = update_gate(case, inp) if FUSED in provs else None
        except Exception as exc:  # the traceback (and the tensors its frames hold) is dropped here
            status, message = STATUS_OOM if is_oom(exc) else STATUS_ERROR, f"inputs or gate: {_first_line(exc)}"
            inp = None
            for p in provs:
                emit(_row(case, p, UPDATE_MODE, status, message=message, **extra))
            free_memory(device)
            continue
        free_memory(device)
        for p in provs:
            row_check = check if p == FUSED else None

            def fn(_p=p, _case=case, _inp=inp):
                with torch.no_grad():
                    UPDATE_FNS[_p](_case, _inp)

            try:
                stats = bench(fn, device, timing)
                mem = peak_memory_bytes(fn, device)
            except Exception as exc:
                status = STATUS_OOM if is_oom(exc) else STATUS_ERROR
                emit(_row(case, p, UPDATE_MODE, status, check=row_check, message=_first_line(exc), **extra))
                free_memory(device)
                continue
            free_memory(device)
            status = STATUS_OK if row_check is None else row_check["status"]
            emit(
                _row(
                    case,
                    p,
                    UPDATE_MODE,
                    status,
                    **stats,
                    peak_mem_bytes=mem,
                    check=row_check,
                    message=None if row_check is None else row_check["message"],
                    bytes_moved=case.bytes_moved,
                    gb_per_s=case.bytes_moved / (stats["median_ms"] * 1e-3) / 1e9,
                )
            )
        del inp
        free_memory(device)
    add_speedups(rows, provs)
    return {
        "op": "Deep-Thinking update (SPEC §7): one step's X̂, m update over every layer's K and V",
        "set": set_name,
        "modes": [UPDATE_MODE],
        "header": environment(device),
        "timing": timing.describe(device) + "; one call = one step's update of the whole state, in place",
        "memory": memory_note(device, "the state and the loop's per-layer copies are allocated before and not counted"),
        "flop_model": "none (memory-bound; TFLOP/s not reported). Bytes moved = 2·L·Hkv·N·d·(3·e + 8) (X̂, X_new read "
        "and X̂ written at e bytes each, m read and written at 4), GB/s = bytes / median time",
        "gate": UPDATE_GATE_TEXT,
        "providers": [{"name": p, "description": describe_update(p, device)} for p in provs],
        "cases": case_entries(cases),
        "skipped": update_platform_notes(device),
        "rows": rows,
        "targets": update_targets(rows, evaluated=device.type == "cuda"),
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }


# ---------------------------------------------------------------------------------------------- both parts


def platform_notes(device: torch.device) -> list[str]:
    return attention_platform_notes(device) + update_platform_notes(device)


def run_momentum_bench(
    cases,
    device: torch.device,
    *,
    modes=ATTN_MODES,
    timing: TimingConfig | None = None,
    progress=print,
    set_name: str = "",
    provider_names=None,
) -> dict:
    """Both parts on their cases of ``cases`` (a part without cases or providers is ``None``); returns the
    combined results that :func:`write_results` writes."""
    t_start = time.perf_counter()
    attn = [c for c in cases if isinstance(c, MomentumShape)]
    upd = [c for c in cases if isinstance(c, UpdateCase)]

    def wanted(names):
        return provider_names is None or any(p in provider_names for p in names)

    part_a = part_b = None
    if attn and wanted(ATTN_PROVIDERS):
        part_a = run_attention_part(
            attn,
            device,
            modes=modes,
            timing=timing,
            progress=progress,
            set_name=set_name,
            provider_names=provider_names,
        )
    if upd and wanted(UPDATE_PROVIDERS):
        part_b = run_update_part(
            upd, device, timing=timing, progress=progress, set_name=set_name, provider_names=provider_names
        )
    parts = [p for p in (part_a, part_b) if p is not None]
    header = environment(device)
    for p in parts:
        p["header"] = header
    return {
        "op": "momentum attention (SPEC §6) and the Deep-Thinking update (SPEC §7)",
        "set": set_name,
        "header": header,
        "targets": [t for p in parts for t in p["targets"]],
        "skipped": [s for p in parts for s in p["skipped"]],
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "momentum": part_a,
        "deep_thinking": part_b,
    }


def _cell(row, gbs: bool = False) -> str:
    if row is None:
        return "not run"
    if row["median_ms"] is None:
        return row["status"]
    notes = [f"{row['gb_per_s']:.3g} GB/s"] if gbs else []
    if row["status"] != STATUS_OK:
        notes.append(row["status"])
    return f"{row['median_ms']:.4g}" + (f" ({', '.join(notes)})" if notes else "")


def attention_side_by_side(results: dict) -> str:
    """Per case and mode: every provider's median ms, ``fastattn_icl``'s overhead vs ``base`` and speed-up vs
    ``eager``."""
    rows = results["rows"]
    provs = [p["name"] for p in results["providers"]]
    lines = [
        "## Time, overhead and speed-up",
        "",
        "median ms; overhead = fastattn_icl / base - 1 (target <= 5% at T >= 2k on CUDA); speed-up = eager / "
        "fastattn_icl",
        "",
        "| case | shape | mode | " + " | ".join(f"{p} ms" for p in provs) + " | overhead vs base | vs eager |",
        "|---|---|---|" + "---|" * (len(provs) + 2),
    ]
    for name in dict.fromkeys(r["case"] for r in rows):
        for mode in results["modes"]:
            by = {p: _find(rows, name, mode, p) for p in provs}
            any_row = next((r for r in by.values() if r is not None), None)
            if any_row is None:
                continue
            ours = by.get(OURS)
            over = ours["overhead_text"] if ours is not None else "n/a"
            vs = ours["speedup_text"].get(EAGER, "n/a") if ours is not None else "n/a"
            cells = [_cell(by[p]) for p in provs]
            lines.append(f"| {name} | {any_row['label']} | {mode} | " + " | ".join(cells) + f" | {over} | {vs} |")
    return "\n".join(lines) + "\n"


def _gate_cell(check: dict | None, name: str) -> str:
    if not check or name not in check.get("ulp", {}):
        return "—"
    u = check["ulp"][name]
    text = "bitwise" if not u["differing"] else f"{u['max']:g} ulp max, {u['differing']} differ"
    return text if check["criterion"][name] != "failed" else f"{text}, FAIL"


def update_side_by_side(results: dict) -> str:
    """Per case: bytes moved, both providers' median ms and GB/s, the speed-up and the gate's ulp figures."""
    rows = results["rows"]
    provs = [p["name"] for p in results["providers"]]
    lines = [
        "## Time, bytes moved and bandwidth",
        "",
        "median ms (effective GB/s = bytes moved / median time); gate: fused's X̂ and m vs the loop's, bitwise or the "
        "largest distance in ulps and how many elements differ",
        "",
        "| case | shape | MiB moved | " + " | ".join(f"{p} ms" for p in provs) + " | fused vs eager_loop | gate X̂ | "
        "gate m |",
        "|---|---|---|" + "---|" * (len(provs) + 3),
    ]
    for name in dict.fromkeys(r["case"] for r in rows):
        by = {p: _find_update(rows, name, p) for p in provs}
        any_row = next(r for r in by.values() if r is not None)
        cells = [_cell(by[p], gbs=True) for p in provs]
        ours = by.get(FUSED)
        vs = ours["speedup_text"].get(LOOP, "n/a") if ours is not None else "n/a"
        check = ours["check"] if ours is not None and ours["check"] else None
        gate = [_gate_cell(check, k) for k in ("X_hat", "m")]
        lines.append(
            f"| {name} | {any_row['label']} | {any_row['bytes_moved'] / 2**20:.2f} | "
            + " | ".join(cells)
            + f" | {vs} | {gate[0]} | {gate[1]} |"
        )
    return "\n".join(lines) + "\n"


def _part_markdown(results: dict, title: str, table: str) -> str:
    md = markdown_with_gate(results).replace("\n## Summary:", "\n" + table + "\n## Summary:", 1)
    md = re.sub(r"^(#+) ", r"#\1 ", md, flags=re.MULTILINE)  # one level down: a part of the file
    return md.replace("## Benchmark: ", f"## {title}: ", 1)


def render(results: dict) -> str:
    """The file's markdown: a short head, then part A's and part B's reports."""
    h = results["header"]
    lines = [
        f"# Benchmark: momentum attention and the Deep-Thinking update on {h['device']}",
        "",
        "Two parts (benchmarks/bench_momentum.py): A, momentum attention (SPEC §6) vs the same kernel without "
        "momentum and vs eager; B, one Deep-Thinking step's state update over every layer (SPEC §7), fused vs a "
        "per-tensor eager loop. The JSON holds each part's results under `momentum` and `deep_thinking`.",
        "",
    ]
    out = "\n".join(lines)
    if results["momentum"] is not None:
        out += "\n" + _part_markdown(results["momentum"], "Part A", attention_side_by_side(results["momentum"]))
    else:
        out += "\n## Part A: not run (no momentum cases or providers)\n"
    if results["deep_thinking"] is not None:
        out += "\n" + _part_markdown(results["deep_thinking"], "Part B", update_side_by_side(results["deep_thinking"]))
    else:
        out += "\n## Part B: not run (no Deep-Thinking cases or providers)\n"
    return out


def write_results(results: dict, out_dir=None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug>-momentum.json`` and ``.md``; return both paths."""
    return harness_write_results(results, out_dir, suffix="-momentum", markdown=render(results))
