"""KV-cache gather benchmark (SPEC.md §5, anchor compression): ``gather_kv`` vs per-layer ``index_select`` loops.

What one timed call does: keep ``M`` positions of every layer's keys and values of a demonstrations-only
KV cache, i.e. the cache-compression step of Hidden_anchor. The outputs are allocated inside the call
and dropped after it; the cache and the index are built once per case, on the device.

The cache (identical for every provider): ``L`` key and ``L`` value tensors ``[B, Hkv, T, D]``, each its
own contiguous allocation, as a Hugging Face ``DynamicCache`` layer holds its ``keys`` / ``values`` after
the prompt's forward; standard normal values, seeded by the case name. ``T`` is the tokens of the
demonstrations only (no test input): ``n · (text tokens + DEMO_TEMPLATE_TOKENS)`` by the per-demonstration
rule of :mod:`benchmarks.shapes` (``prompt_tokens(dataset, 1) - prompt_tokens(dataset, 0)`` tokens each)
for ``n = classes · per_class`` demonstrations. The kept positions are the ``DEMO_TEMPLATE_TOKENS = 7``
template tokens of every demonstration (label word and formatting tokens, the anchors the compression
keeps), so ``M = 7 n``: by the template of :mod:`benchmarks.shapes`, ``"<Input prefix>: <text>\\n<Answer
prefix>: <label>\\n"``, a demonstration's first 2 tokens (prefix, colon) and its last 5 (newline, prefix,
colon, label, newline). The index is int64 ``[M]``, the same positions for every batch row (all rows of a
batch share the demonstrations' geometry), sorted.

Providers (all get the same ``keys``, ``values`` lists and ``index [M]``):

* ``gather_kv``: ``fastattn_icl.ops.gather.gather_kv(keys, values, index)`` with its defaults: one op
  (one CUDA launch for all layers) returning stacked ``K, V [L, B, Hkv, M, D]``. Its default
  ``check_index=True`` checks the positions on the host first (on CUDA: a few small kernels and one
  device-to-host sync). This is what a user calls, and the row the target is about.
* ``gather_kv_unchecked``: the same with ``check_index=False`` (no host check, no sync), the like-for-like
  comparison with the loops, which do not check on the host either.
* ``index_select_loop``: what users write today, a Python loop over layers of ``k.index_select(2, index)``
  and ``v.index_select(2, index)``, then ``torch.stack`` of each list into ``[L, B, Hkv, M, D]``: the
  same output as ``gather_kv``.
* ``index_select_loop_nostack``: the same loop without the stack, returning two lists of ``L`` tensors
  ``[B, Hkv, M, D]``. A compressed cache is built from per-layer tensors anyway, so a list is an equally
  valid consumer form; it saves the stack's extra read and write of the output. ``gather_kv`` returns the
  stacked form, whose per-layer tensors are free views (``K[l]``), so it is compared with both loops.

Correctness gate (every case, every provider, before it is timed): the provider's output (the lists
stacked, outside the timed call) must equal ``fastattn_icl.reference.compression.gather_kv_reference``
on the same cache (with ``index`` expanded to ``[B, M]``) bit for bit: same shape and dtype, every
element's bits equal (the op is a copy, so the tolerance is 0; ``check.errors`` reports the largest
absolute difference). A provider that fails is timed but marked ``incorrect`` and no speed-up involving
it is given.

Bytes moved and bandwidth: ``bytes = 4 · L · B · Hkv · M · D · element size``, K and V, every kept
element read once and written once (the index's ``8 M`` bytes are not counted). It is the useful traffic
of the gather and the same figure for every provider, so ``GB/s = bytes / median time`` is an effective
bandwidth that compares providers directly (``index_select_loop`` actually moves twice the output: the
stack reads the per-layer results back and writes them again).

Timing: the harness's ``bench`` (``triton.testing.do_bench`` on CUDA, L2 flushed before each call, default
100 ms of calls; a ``perf_counter`` loop on CPU, no flush). Caveat on CUDA: ``do_bench``'s L2 flush is a
GPU kernel, and while it runs the host is already queueing the call's launches, so up to the flush's
duration of a launch-bound provider's host overhead (the loops: ``2L`` launches, ``2L + 2`` with the
stacks) is hidden: if anything this tilts the comparison toward the loops. Peak memory: the harness's
``max_memory_allocated`` delta over one call on CUDA (the outputs, plus the per-layer intermediates of
``index_select_loop``), ``null`` on CPU.

Shape sets (:func:`gather_set`, dispatched like the other feature benchmarks by
``benchmarks.shapes._feature_set``):

* GPU (``default``/``all`` on a GPU): fp16, the compression paper's models, GPT2-XL (L 48, Hkv 25, d 64)
  and GPT-J (L 28, Hkv 16, d 256), with the demonstrations of SST-2, TREC, AGNews and EmoC at 1 and 4
  demonstrations per class, ``B = 1`` (``--batch`` changes it); plus ``B = 16`` at SST-2 1/class and
  AGNews 4/class per model.
* CPU (``default``/``all`` without a GPU, ``cpu``): float32, GPT2-XL's head geometry (Hkv 25, d 64) at
  ``CPU_LAYERS = 24`` of its 48 layers, SST-2 and AGNews, 1 and 4 demonstrations per class, ``B = 1``: a few
  seconds in ``make bench``. Why 24 layers: a stacked output over glibc's 32 MiB ``mmap`` ceiling is, on some
  runs and not others (it depends on what the heap has free), a fresh ``mmap`` page-faulted in during every
  call; at 48 layers the AGNews 4/class output (32.8 MiB per K) made ``gather_kv`` and ``index_select_loop``
  about 5x slower on such runs, a measurement of the allocator rather than of the copy. At 24 layers every
  output is at most 16.4 MiB. (CUDA's caching allocator has no such cost.)
* ``tiny``: the smoke test's two cases (3 layers, Hkv 2, d 8, SST-2 1/class, B 1 and 2, fp32).

Target (CUDA only; without CUDA it is listed as not evaluated, with the CPU figures for information):
``gather_kv`` (defaults) at least as fast as ``index_select_loop`` (median time) on every case. It is a
target, not a guarantee: the result reports each case's ratio.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.harness import (
    STATUS_ERROR,
    STATUS_INCORRECT,
    STATUS_OK,
    STATUS_OOM,
    STATUS_SKIPPED,
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
    speedup,
    targets_not_evaluated,
)
from benchmarks.harness import write_results as harness_write_results
from benchmarks.shapes import (
    DATASETS,
    DTYPES,
    MODELS,
    DemonstrationGeometry,
    _feature_set,
)

OURS = "gather_kv"
UNCHECKED = "gather_kv_unchecked"
LOOP = "index_select_loop"
LOOP_NOSTACK = "index_select_loop_nostack"
PROVIDERS = (OURS, UNCHECKED, LOOP, LOOP_NOSTACK)
MODE = "gather"

TARGET_RATIO = 1.0  # gather_kv median <= index_select_loop median, every case

LAYERS = {"gpt2-xl": 48, "gpt-j": 28}
GPU_MODELS = ("gpt2-xl", "gpt-j")
GPU_DATASETS = ("sst2", "trec", "agnews", "emoc")
PER_CLASS = (1, 4)
BATCHED_B = 16
BATCHED_CASES = (("sst2", 1), ("agnews", 4))
CPU_DATASETS = ("sst2", "agnews")
CPU_LAYERS = 24  # keeps every CPU output under glibc's 32 MiB mmap ceiling (module docstring)

GATE_TEXT = (
    "every case, every provider: its output (lists stacked outside the timed call) equals "
    "fastattn_icl.reference.compression.gather_kv_reference on the same cache bit for bit (same shape and "
    "dtype, all bits equal; tolerance 0, the error shown is the largest absolute difference)"
)


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class GatherCase(DemonstrationGeometry):
    """Keep the template tokens of ``per_class`` demonstrations per class of ``dataset`` from an ``L``-layer
    cache ``[B, Hkv, T, D]`` (see the module docstring)."""

    name: str
    group: str
    model: str
    layers: int
    Hkv: int
    D: int
    dataset: str
    per_class: int
    B: int = 1
    dtype: str = "fp16"
    note: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def T(self) -> int:
        """The cache's length: the demonstrations' tokens."""
        return self.T_demo

    @property
    def bytes_moved(self) -> int:
        """``4 · L · B · Hkv · M · D · element size``: K and V, each kept element read once and written once."""
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        return 4 * self.layers * self.B * self.Hkv * self.M * self.D * element

    @property
    def label(self) -> str:
        return (
            f"L{self.layers} B{self.B} Hkv{self.Hkv} T{self.T} M{self.M} d{self.D} {self.dtype}, "
            f"{self.demonstrations} {DATASETS[self.dataset].name} demos ({self.per_class}/class)"
        )

    def flops(self, mode: str) -> None:
        return None

    def params(self) -> dict:
        return {
            **asdict(self),
            "T": self.T,
            "M": self.M,
            "demonstrations": self.demonstrations,
            "bytes_moved": self.bytes_moved,
        }


def gather_case(
    model: str,
    dataset: str,
    per_class: int,
    *,
    B: int = 1,
    dtype: str = "fp16",
    group: str = "gather",
    layers: int | None = None,
) -> GatherCase:
    """``model``'s cache (``LAYERS[model]`` layers unless ``layers`` says otherwise; the name then ends in
    ``-L<layers>``)."""
    m, L = MODELS[model], layers or LAYERS[model]
    depth = f"L {L}" if L == LAYERS[model] else f"L {L} of its {LAYERS[model]}"
    note = f"{m.name} cache ({depth}, Hkv {m.kv_heads}, d {m.head_dim}), {DATASETS[dataset].name}"
    return GatherCase(
        f"{model}-{dataset}-{per_class}pc-b{B}" + ("" if L == LAYERS[model] else f"-L{L}"),
        group,
        model,
        L,
        m.kv_heads,
        m.head_dim,
        dataset,
        per_class,
        B,
        dtype,
        note,
    )


def gather_gpu_set(*, batch: int = 1) -> list[GatherCase]:
    """fp16, GPT2-XL and GPT-J caches, every dataset at 1 and 4 demonstrations per class, ``B = batch``; plus
    ``B = 16`` at SST-2 1/class and AGNews 4/class per model."""
    cases = [gather_case(m, ds, pc, B=batch) for m in GPU_MODELS for ds in GPU_DATASETS for pc in PER_CLASS] + [
        gather_case(m, ds, pc, B=BATCHED_B) for m in GPU_MODELS for ds, pc in BATCHED_CASES
    ]
    return list({c.name: c for c in cases}.values())  # --batch 16 would repeat the batched cases


def gather_cpu_set(*, batch: int = 1) -> list[GatherCase]:
    """fp32, GPT2-XL's head geometry at ``CPU_LAYERS`` layers, SST-2 and AGNews, 1 and 4 demonstrations per class."""
    return [
        gather_case("gpt2-xl", ds, pc, B=batch, dtype="fp32", group="gather-cpu", layers=CPU_LAYERS)
        for ds in CPU_DATASETS
        for pc in PER_CLASS
    ]


def gather_tiny_set() -> list[GatherCase]:
    """The smoke test's two cases: 3 layers, Hkv 2, d 8, SST-2 1/class (T 66, M 14), B 1 and 2, fp32."""
    return [GatherCase(f"tiny-b{B}", "tiny", "tiny", 3, 2, 8, "sst2", 1, B, "fp32", "smoke test") for B in (1, 2)]


def gather_set(name: str, *, cuda: bool, batch: int | None = None) -> list[GatherCase]:
    """Gather cases of shape set ``name`` (the names of ``benchmarks.run --set``): ``default`` and ``all``
    are the GPU set on a GPU and the CPU set otherwise, ``cpu`` the CPU set, ``tiny`` the smoke test's;
    the other sets have no gather cases (``[]``)."""
    return _feature_set(name, "gather", gather_gpu_set, gather_cpu_set, gather_tiny_set, cuda, batch)


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class CacheInputs:
    """``keys``, ``values``: ``L`` contiguous ``[B, Hkv, T, D]`` tensors each; ``index``: int64 ``[M]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    index: torch.Tensor


def make_inputs(case: GatherCase, device: torch.device) -> CacheInputs:
    """The case's cache and index on ``device``, seeded by the case name."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(case.name.encode()))
    shape = (case.B, case.Hkv, case.T, case.D)

    def layer():
        return torch.randn(shape, generator=gen, device=device, dtype=case.torch_dtype)

    keys = [layer() for _ in range(case.layers)]
    values = [layer() for _ in range(case.layers)]
    return CacheInputs(keys, values, torch.tensor(case.positions(), dtype=torch.long, device=device))


# ---------------------------------------------------------------------------------------------- providers


def _gather_kv(case, inp: CacheInputs):
    from fastattn_icl.ops.gather import gather_kv

    return gather_kv(inp.keys, inp.values, inp.index)


def _gather_kv_unchecked(case, inp: CacheInputs):
    from fastattn_icl.ops.gather import gather_kv

    return gather_kv(inp.keys, inp.values, inp.index, check_index=False)


def _index_select_loop(case, inp: CacheInputs):
    idx = inp.index
    return torch.stack([k.index_select(2, idx) for k in inp.keys]), torch.stack(
        [v.index_select(2, idx) for v in inp.values]
    )


def _index_select_loop_nostack(case, inp: CacheInputs):
    idx = inp.index
    return [k.index_select(2, idx) for k in inp.keys], [v.index_select(2, idx) for v in inp.values]


PROVIDER_FNS = {
    OURS: _gather_kv,
    UNCHECKED: _gather_kv_unchecked,
    LOOP: _index_select_loop,
    LOOP_NOSTACK: _index_select_loop_nostack,
}


def describe(provider: str, device: torch.device) -> str:
    kernel = "one CUDA launch for all layers" if device.type == "cuda" else "its C++ CPU kernel, no CUDA"
    if provider == OURS:
        return (
            f"fastattn_icl.ops.gather.gather_kv(keys, values, index) with its defaults ({kernel}); "
            "check_index=True: positions checked on the host first (one device-to-host sync on CUDA); "
            "returns K, V [L, B, Hkv, M, D]"
        )
    if provider == UNCHECKED:
        return f"gather_kv(keys, values, index, check_index=False) ({kernel}): no host check, no sync"
    if provider == LOOP:
        return (
            "for each layer k.index_select(2, index), v.index_select(2, index) (2L ops), then torch.stack of "
            "each list: K, V [L, B, Hkv, M, D]"
        )
    return "the same loop without torch.stack: two lists of L tensors [B, Hkv, M, D] (2L ops)"


def skip_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` (the extension or its CUDA kernels not built), or ``None``."""
    if provider not in (OURS, UNCHECKED):
        return None
    from fastattn_icl import _ext

    try:
        _ext.require("gather_kv", device)
    except RuntimeError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------- gate


def _stacked(out) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = out
    return tuple(torch.stack(list(x)) if isinstance(x, (list, tuple)) else x for x in (k, v))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_exact(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The harness's check format for a bit-exact comparison of ``(K, V)`` with the oracle's."""
    errors, failures = {}, []
    for name, x, r in zip(("K", "V"), got, ref):
        if x.shape != r.shape or x.dtype != r.dtype:
            failures.append(f"{name}: {tuple(x.shape)} {x.dtype}, oracle {tuple(r.shape)} {r.dtype}")
            errors[name] = {"error": float("inf"), "tolerance": 0.0}
            continue
        bits = _BITS[x.element_size()]
        equal = torch.equal(x.view(bits), r.view(bits))
        err = 0.0 if equal or x.numel() == 0 else float((x.double() - r.double()).abs().max())
        if not equal:
            failures.append(f"{name}: not bit-exact, max |diff| {err:.3g}")
        errors[name] = {"error": err, "tolerance": 0.0}
    return {
        "status": STATUS_INCORRECT if failures else STATUS_OK,
        "scope": "whole output, bit-exact vs gather_kv_reference",
        "errors": errors,
        "message": "; ".join(failures) or None,
    }


def oracle(case: GatherCase, inp: CacheInputs) -> tuple[torch.Tensor, torch.Tensor]:
    from fastattn_icl.reference.compression import gather_kv_reference

    return gather_kv_reference(inp.keys, inp.values, inp.index.expand(case.B, -1))


# ---------------------------------------------------------------------------------------------- targets


def _find(rows, case: str, provider: str):
    for r in rows:
        if (r["case"], r["provider"]) == (case, provider):
            return r
    return None


def targets(rows: list[dict], *, evaluated: bool = True) -> list[dict]:
    """``gather_kv`` >= ``index_select_loop`` on every case: PASS / FAIL / N/A; with ``evaluated=False`` (no
    CUDA) ``not evaluated``, the measured figures in the detail for information only."""
    measured, others, verdicts = [], [], []
    for ours in (r for r in rows if r["provider"] == OURS):
        ratio, text = speedup(ours, _find(rows, ours["case"], LOOP))
        if ratio is None:
            verdicts.append(None if ours["status"] in (STATUS_OK, STATUS_SKIPPED) else False)
            others.append(f"{ours['case']}: {text}")
        else:
            verdicts.append(ratio >= TARGET_RATIO)
            measured.append((ratio, ours["case"]))
    parts = []
    if measured:
        below = [f"{c} {x:.2f}x" for x, c in measured if x < TARGET_RATIO]
        worst, best = min(measured), max(measured)
        parts.append(
            f"{len(measured) - len(below)}/{len(measured)} compared cases at >= {TARGET_RATIO:.2f}x; "
            f"worst {worst[0]:.2f}x ({worst[1]}), best {best[0]:.2f}x ({best[1]})"
        )
        if below:
            parts.append("below: " + ", ".join(below))
    if others:
        parts.append("not compared: " + ", ".join(others))
    if not verdicts:
        result = "N/A"
    elif False in verdicts:
        result = "FAIL"
    else:
        result = "N/A" if None in verdicts else "PASS"
    out = [
        {
            "target": f"{OURS} at least as fast as {LOOP} on every case (median time)",
            "result": result,
            "detail": "; ".join(parts) or "no cases",
        }
    ]
    return out if evaluated else targets_not_evaluated(out)


# ---------------------------------------------------------------------------------------------- running


def platform_notes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    return [
        "CUDA kernel not run: no CUDA; the gather_kv rows are the op's C++ CPU kernel (csrc/gather_kv.cpp)",
        "peak memory not measured: no CUDA (reported as null; torch's CPU allocator keeps no peak counter)",
        f"target ({OURS} >= {LOOP} on every case) not evaluated: no CUDA",
        f"CPU set: GPT2-XL's head geometry at {CPU_LAYERS} of its 48 layers, so that every stacked output stays "
        "under glibc's 32 MiB mmap ceiling; above it an output can be a fresh, page-faulted mmap on every call "
        "(a measurement of the allocator, not of the copy; see benchmarks/bench_gather.py). CPU times are a "
        "smoke signal, not the GPU result",
    ]


def _progress_line(row: dict) -> str:
    return format_progress(row, columns=(("case", 26), ("provider", 25)), rate=bandwidth)


def run_gather_bench(
    cases,
    device: torch.device,
    *,
    timing: TimingConfig | None = None,
    progress=print,
    set_name: str = "",
    provider_names=None,
) -> dict:
    """Gate, time and measure the providers on every case; returns the harness's results dict."""
    timing = timing or TimingConfig()
    t_start = time.perf_counter()
    provs = [p for p in PROVIDERS if provider_names is None or p in provider_names]
    reasons = {p: skip_reason(p, device) for p in provs}
    rows, skipped = [], [f"{p}: {r}" for p, r in reasons.items() if r]
    total = len(cases) * len(provs)

    emit = row_emitter(rows, total, progress, _progress_line)

    for case in cases:
        extra = {"bytes_moved": case.bytes_moved, "gb_per_s": None}
        try:
            inp = make_inputs(case, device)
            ref = oracle(case, inp)
        except Exception as exc:
            status, message = STATUS_OOM if is_oom(exc) else STATUS_ERROR, f"inputs: {_first_line(exc)}"
            inp = ref = None
            for p in provs:
                emit(_row(case, p, MODE, status, message=message, **extra))
            free_memory(device)
            continue
        for p in provs:
            if reasons[p]:
                emit(_row(case, p, MODE, STATUS_SKIPPED, message=reasons[p], **extra))
                continue

            def fn(_p=p, _case=case, _inp=inp):
                with torch.no_grad():
                    return PROVIDER_FNS[_p](_case, _inp)

            check = None
            try:
                check = check_exact(_stacked(fn()), ref)
                free_memory(device)
                stats = bench(fn, device, timing)
                mem = peak_memory_bytes(fn, device)
            except Exception as exc:  # the traceback (and the tensors its frames hold) is dropped here
                status = STATUS_OOM if is_oom(exc) else STATUS_ERROR
                emit(_row(case, p, MODE, status, check=check, message=_first_line(exc), **extra))
                free_memory(device)
                continue
            free_memory(device)
            emit(
                _row(
                    case,
                    p,
                    MODE,
                    check["status"],
                    **stats,
                    peak_mem_bytes=mem,
                    check=check,
                    message=check["message"],
                    bytes_moved=case.bytes_moved,
                    gb_per_s=case.bytes_moved / (stats["median_ms"] * 1e-3) / 1e9,
                )
            )
        del inp, ref
        free_memory(device)
    add_speedups(rows, provs)
    return {
        "op": "KV-cache gather: keep M positions of every layer's keys and values (anchor compression)",
        "set": set_name,
        "modes": [MODE],
        "header": environment(device),
        "timing": timing.describe(device) + "; one call = the provider's gather of all L layers' keys and values "
        "(outputs allocated in the call, dropped after)",
        "memory": memory_note(device, "the cache and the index are allocated before and not counted"),
        "flop_model": "none (a copy; TFLOP/s not reported). Bytes moved = 4·L·B·Hkv·M·D·element size (K and V, "
        "each kept element read once and written once; index not counted), GB/s = bytes / median time",
        "gate": GATE_TEXT,
        "providers": [{"name": p, "description": describe(p, device)} for p in provs],
        "cases": case_entries(cases),
        "skipped": platform_notes(device) + skipped,
        "rows": rows,
        "targets": targets(rows, evaluated=device.type == "cuda"),
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }


def _cell(row) -> str:
    if row is None:
        return "not run"
    if row["median_ms"] is None:
        return row["status"]
    flag = "" if row["status"] == STATUS_OK else f", {row['status']}"
    return f"{row['median_ms']:.4g} ({row['gb_per_s']:.3g} GB/s{flag})"


def side_by_side(results: dict) -> str:
    """A markdown table: per case, the bytes moved, every provider's median time and GB/s, and the speed-up
    of ``gather_kv`` vs each other provider."""
    rows = results["rows"]
    provs = [p["name"] for p in results["providers"]]
    others = [p for p in provs if p != OURS]
    vs = others if OURS in provs else []
    lines = [
        "## Time, bytes moved and bandwidth",
        "",
        "median ms (effective GB/s = bytes moved / median time)",
        "",
        "| case | shape | MiB moved | "
        + " | ".join(f"{p} ms" for p in provs)
        + "".join(f" | {OURS} vs {p}" for p in vs)
        + " |",
        "|---|---|---|" + "---|" * (len(provs) + len(vs)),
    ]
    for name in dict.fromkeys(r["case"] for r in rows):
        by = {p: _find(rows, name, p) for p in provs}
        any_row = next(r for r in by.values() if r is not None)
        cells = [_cell(by[p]) for p in provs]
        cells += [by[OURS]["speedup_text"].get(p, "n/a") for p in vs]
        lines.append(
            f"| {name} | {any_row['label']} | {any_row['bytes_moved'] / 2**20:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir=None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug>-gather.json`` and ``.md``; return both paths."""
    md = markdown_with_gate(results).replace("\n## Summary:", "\n" + side_by_side(results) + "\n## Summary:", 1)
    return harness_write_results(results, out_dir, suffix="-gather", markdown=md)
