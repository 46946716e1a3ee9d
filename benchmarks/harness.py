"""The one benchmark runner: a benchmark is a :class:`Benchmark` declaration, :func:`run` is the loop that gates,
times and records it, :func:`write_results` writes JSON + markdown (benchmarks/README.md)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fastattn_icl.testing import FWD_FACTOR, GRAD_FACTOR, check_close, max_error, tolerance

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
QUANTILES = (0.5, 0.2, 0.8)
# a file to which every row is appended as one JSON line the moment it is measured (set by scripts/gpu.py: a
# benchmark stopped by its time budget still leaves every row it measured)
ROWS_ENV = "FASTATTN_ICL_BENCH_ROWS"

STATUS_OK, STATUS_INCORRECT, STATUS_UNCHECKED = "ok", "incorrect", "unchecked"
STATUS_OOM, STATUS_ERROR, STATUS_SKIPPED = "oom", "error", "skipped"
TIMED = (STATUS_OK, STATUS_INCORRECT)
UNITS = {"gb_per_s": "GB/s", "ms_per_input": "ms/input", "inputs_per_s": "inputs/s", "ms_per_example": "ms/example",
         "ms_per_problem": "ms/problem"}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # the integer view of a float of that size


@dataclass
class Provider:
    """One implementation. ``fn`` is what the benchmark's ``timed``/``gate`` call; ``skip(case, group)`` says why
    it cannot run, or ``None``; ``oracle``/``views`` replace the benchmark's for a tensor op (:func:`tensor_op`)."""

    name: str
    fn: Callable[..., Any]
    describe: Callable[[torch.device], str]
    skip: Callable[[Any, SimpleNamespace], str | None] = lambda case, group: None
    oracle: Callable[..., torch.Tensor] | None = None
    views: Callable[[Any], CheckViews] | None = None


@dataclass
class CheckViews:
    """The sub-problem a tensor op's oracle runs on: ``inputs[i]`` indexes input ``i`` (and its gradient),
    ``output`` the output, ``scope`` says what was checked; ``Ellipsis`` everywhere is the whole problem."""

    inputs: Sequence[Any]
    output: Any
    scope: str
    names: Sequence[str] = ()


@dataclass
class Timed:
    """A timed call: ``fn()``; ``grad_to_none`` reset before every call; run inside ``context``."""

    fn: Callable[[], Any]
    grad_to_none: Sequence[torch.Tensor] | None = None
    context: Any = field(default_factory=contextlib.nullcontext)


@dataclass
class TimingConfig:
    cuda_warmup_ms: float = 25.0
    cuda_rep_ms: float = 100.0
    cpu_warmup_ms: float = 50.0
    cpu_rep_ms: float = 200.0
    cpu_min_reps: int = 3
    cpu_max_reps: int = 50

    def describe(self, device: torch.device) -> str:
        if device.type == "cuda":
            return (f"triton.testing.do_bench(warmup={self.cuda_warmup_ms:g} ms, rep={self.cuda_rep_ms:g} ms, "
                    f"quantiles={list(QUANTILES)}), L2 flushed before each call")
        return (f"time.perf_counter loop (warm-up {self.cpu_warmup_ms:g} ms, {self.cpu_rep_ms:g} ms of timed calls, "
                f"{self.cpu_min_reps}-{self.cpu_max_reps} calls), median and p20/p80, no cache flush")


@dataclass
class Benchmark:
    """A benchmark as data: its cases, providers and hooks (benchmarks/README.md, "How a benchmark is written").
    ``group`` also carries ``device``, ``notes`` (the results' skipped list) and ``extra`` (merged into the
    results; ``tables`` render its lists). ``targets`` are evaluated on CUDA, ``cpu_targets`` on CPU;
    ``modes_of(case)`` limits a case to some of the modes (``None``: all); ``per_thread_count``: run.py runs it
    at 1 thread and at all cores on CPU, the file names ending ``-{N}t``; ``measure_memory(case, device)``: whether
    a row's peak memory is measured (``None`` in the row otherwise: on CPU that is one more call under the profiler,
    several times the call's own time)."""

    name: str
    op: str
    providers: list[Provider]
    cases: Callable[[str, bool, int | None], list]
    inputs: Callable[[Any, SimpleNamespace], Any]
    gate: Callable[..., dict]
    timed: Callable[..., Timed]
    modes: tuple[str, ...] = ("fwd",)
    suffix: str = ""
    gate_key: Callable[[str], Hashable] = lambda mode: mode
    gate_text: str | None = None
    flop_model: str = "none (TFLOP/s not reported)"
    call: str = ""
    memory: str = "the inputs are allocated before and not counted"
    cpu_path: str = "the `fastattn_icl` rows are its CPU path (backend 'torch')"
    cpu_note: str = ""
    timing: TimingConfig = field(default_factory=TimingConfig)
    group: Callable[[Any], Hashable] = lambda case: case.name
    setup: Callable[[SimpleNamespace, list], None] = lambda group, cases: None
    metric: Callable[[Any, float | None], dict] = lambda case, ms: {}
    targets: Callable[[list[dict]], list[dict]] = lambda rows: []
    cpu_targets: Callable[[list[dict]], list[dict]] = lambda rows: []
    modes_of: Callable[[Any], Sequence[str] | None] = lambda case: None
    measure_memory: Callable[[Any, torch.device], bool] = lambda case, device: True
    per_thread_count: bool = False
    finish: Callable[[dict], None] = lambda results: None
    columns: Sequence[tuple[str, Callable[[dict], str]]] = ()
    tables: Sequence[tuple[str, str, Sequence[tuple[str, Callable[[dict], str]]]]] = ()


def _reset_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for x in tensors or ():
        x.grad = None


def bench(fn, device: torch.device, config: TimingConfig, grad_to_none=None) -> dict:
    """``{"median_ms", "p20_ms", "p80_ms", "reps"}`` of ``fn``: ``do_bench`` on CUDA; on CPU a ``perf_counter``
    loop (an untimed call, one that sizes the warm-up, the warm-up, then ``cpu_rep_ms`` worth of timed calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=config.cuda_warmup_ms, rep=config.cuda_rep_ms,
                                    grad_to_none=list(grad_to_none or []) or None, quantiles=list(QUANTILES))
        return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80), "reps": None}

    def timed_call() -> float:
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    timed_call()
    estimate = max(timed_call(), 1e-3)
    for _ in range(max(0, min(int(config.cpu_warmup_ms / estimate), config.cpu_max_reps) - 1)):
        timed_call()
    reps = max(config.cpu_min_reps, min(config.cpu_max_reps, int(config.cpu_rep_ms / estimate)))
    times = torch.tensor([timed_call() for _ in range(reps)], dtype=torch.float64)
    q = torch.quantile(times, torch.tensor(QUANTILES, dtype=torch.float64))
    return {"median_ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2]), "reps": reps}


def cpu_peak_memory_bytes(fn) -> int:
    """Peak CPU memory of one call of ``fn`` above what was allocated before it: the largest running sum of the
    CPU allocation and free records (``[memory]`` events of ``torch.profiler`` with ``profile_memory``, in time
    order). Tensors freed in the call but allocated before it count negative, so the result is clamped at 0."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


def peak_memory_bytes(fn, device: torch.device, grad_to_none=None) -> int | None:
    """Peak memory of one call of ``fn`` above what was allocated before it: on CUDA ``max_memory_allocated``,
    on CPU :func:`cpu_peak_memory_bytes`."""
    _reset_grads(grad_to_none)
    if device.type != "cuda":
        return cpu_peak_memory_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def tflops(flops: float | None, ms: float | None) -> float | None:
    if flops is None or ms is None or not ms > 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower() if isinstance(exc, RuntimeError) else ""
    return any(s in msg for s in ("out of memory", "not enough memory", "can't allocate memory"))


def failure(exc: BaseException, where: str = "") -> tuple[str, str]:
    """``(oom | error, "where: Type: first line")`` for an exception of a provider, a gate or a set-up."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
    return (STATUS_OOM if is_oom(exc) else STATUS_ERROR), (f"{where}: {line}" if where else line)


def free_memory(device: torch.device) -> None:
    """Between calls on CUDA: collect garbage and return the cache. On CPU reference counting frees the tensors
    (the profiler's records are of the measured call only), so it does nothing (a ``gc.collect`` costs ~0.3 s,
    hundreds of them a run)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` on ``log x`` (1 = linear, 2 = quadratic)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def compare(name: str, got: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, factor: float):
    """The tolerance rule of :mod:`fastattn_icl.testing`: ``({"error", "tolerance"}, failure text or None)``."""
    try:
        err, tol = check_close(name, got, same, ref, factor=factor)
        return {"error": err, "tolerance": tol}, None
    except (AssertionError, ValueError) as exc:
        try:
            err, tol = max_error(got, ref), tolerance(same, ref, factor=factor)
        except ValueError:
            err, tol = float("inf"), float("nan")
        return {"error": err, "tolerance": tol}, str(exc)


def make_check(errors: dict, failures: Sequence[str | None], scope: str, **extra) -> dict:
    """A check: ``{"status", "scope", "errors", "message", **extra}``, incorrect when any failure is given."""
    failures = [f for f in failures if f]
    status = STATUS_INCORRECT if failures else STATUS_OK
    return {"status": status, "scope": scope, "errors": errors, "message": "; ".join(failures) or None, **extra}


def correctness_check(call, oracle, inputs: Sequence[torch.Tensor], views: CheckViews, *, with_grad: bool,
                      seed: int = 1234) -> dict:
    """``call(*inputs)`` (and, ``with_grad``, its input gradients for a random output gradient) vs ``oracle`` in
    the inputs' dtype and in float64 on the sub-problem ``views``, by the rule of :mod:`fastattn_icl.testing`."""
    leaves = [x.detach().clone().requires_grad_(with_grad) for x in inputs]
    dout, grads = None, []
    with torch.set_grad_enabled(with_grad):
        out = call(*leaves)
    if with_grad:
        dout = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(seed),
                           device=out.device, dtype=out.dtype)
        out.backward(dout)
        grads = [None if x.grad is None else x.grad[i].detach().clone() for x, i in zip(leaves, views.inputs)]
        dout = dout[views.output].clone()
    got = out[views.output].detach().clone()
    del out, leaves

    def run_oracle(dtype):
        sub = [x.detach()[i].to(dtype).requires_grad_(with_grad) for x, i in zip(inputs, views.inputs)]
        with torch.set_grad_enabled(with_grad):
            o = oracle(*sub)
        if with_grad:
            o.backward(dout.to(dtype))
        return o.detach(), [x.grad for x in sub] if with_grad else []

    (r64, g64), (rdt, gdt) = run_oracle(torch.float64), run_oracle(inputs[0].dtype)
    errors, failures = {}, []
    names = list(views.names) or [f"d{i}" for i in range(len(inputs))]
    for name, x, same, ref, factor in [("out", got, rdt, r64, FWD_FACTOR),
                                       *((n, g, s, r, GRAD_FACTOR) for n, g, s, r in zip(names, grads, gdt, g64))]:
        if x is None:
            failures.append(f"{name}: no gradient")
            continue
        errors[name], fail = compare(name, x, same, ref, factor)
        failures.append(fail)
    return make_check(errors, failures, views.scope)


def tensor_op(*, oracle, views) -> dict:
    """The ``gate``, ``timed`` and ``gate_key`` of a tensor op ``provider.fn(case, *inputs) -> out``: the gate is
    :func:`correctness_check` (fwd alone, then with gradients); ``fwd`` runs under ``no_grad``, ``bwd`` times
    ``out.backward`` on a retained graph, ``fwd+bwd`` both."""

    def gate(case, inputs, group, providers, mode):
        out = {}
        for p in providers:
            v = (p.views or views)(case)
            xs = inputs[: len(v.inputs)]
            try:
                out[p.name] = correctness_check(lambda *a, _p=p: _p.fn(case, *a),
                                                lambda *a, _p=p: (_p.oracle or oracle)(case, *a),
                                                xs, v, with_grad=mode != "fwd")
            except Exception as exc:  # the traceback (and the tensors its frames hold) is dropped here
                out[p.name] = failure(exc, "check")
            free_memory(group.device)
        return out

    def timed(case, inputs, group, p, mode):
        xs = inputs[: len((p.views or views)(case).inputs)]
        if mode == "fwd":
            return Timed(no_grad(p.fn, case, *(x.detach() for x in xs)))
        xs = [x.detach().requires_grad_() for x in xs]
        out = p.fn(case, *xs)
        dout = torch.randn_like(out)
        if mode == "bwd":
            return Timed(functools.partial(out.backward, dout, retain_graph=True), xs)
        del out
        return Timed(lambda: p.fn(case, *xs).backward(dout), xs)

    return {"gate": gate, "timed": timed, "gate_key": lambda mode: mode != "fwd"}


def memory_bound_op(*columns) -> dict:
    """The ``timed`` (``provider.fn(case, inputs)`` without autograd), ``metric`` (``bytes_moved``, GB/s) and
    ``columns`` (MiB moved, then ``columns``) of a memory-bound op whose cases have ``bytes_moved``."""
    return {"timed": lambda case, inputs, group, p, mode: Timed(no_grad(p.fn, case, inputs)),
            "metric": lambda case, ms: {"bytes_moved": case.bytes_moved,
                                        "gb_per_s": None if ms is None else case.bytes_moved / (ms * 1e-3) / 1e9},
            "columns": [("MiB moved", lambda by: f"{next(r for r in by.values() if r)['bytes_moved'] / 2**20:.2f}"),
                        *columns]}


def kernel_text(device: torch.device) -> str:
    """How the package's own providers run on ``device`` (provider descriptions)."""
    return "the fused Triton kernel" if device.type == "cuda" else "its CPU path, backend 'torch' (no CUDA)"


def no_grad(fn, *args):
    """``fn(*args)`` as a call without autograd."""

    def call():
        with torch.no_grad():
            return fn(*args)

    return call


def speedup(row: dict, base: dict | None) -> tuple[float | None, str]:
    """``(base time / row time, text)``; refused (``None``) when a check failed or a row was not timed."""
    if base is None:
        return None, "n/a"
    if STATUS_INCORRECT in (row["status"], base["status"]):
        return None, "n/a (check failed)"
    for r in (row, base):
        if r["status"] not in TIMED or r["median_ms"] is None:
            return None, f"n/a ({r['provider']} {r['status']})"
    ratio = base["median_ms"] / row["median_ms"]
    return ratio, f"{ratio:.2f}x"


def add_speedups(rows: list[dict], providers: Sequence[str]) -> None:
    """``speedup_vs[p]`` and ``speedup_text[p]`` of every row against the other providers' rows of its case and
    mode (one run)."""
    index = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        pairs = {p: speedup(r, index.get((r["case"], r["mode"], p))) for p in providers if p != r["provider"]}
        r["speedup_vs"] = {p: v[0] for p, v in pairs.items()}
        r["speedup_text"] = {p: v[1] for p, v in pairs.items()}


def find(rows: list[dict], case: str, provider: str, mode: str | None = None) -> dict | None:
    """The row of ``case`` and ``provider`` (and ``mode``), or ``None``."""
    for r in rows:
        if r["case"] == case and r["provider"] == provider and mode in (None, r["mode"]):
            return r
    return None


def verdict(verdicts: Sequence[bool | None]) -> str:
    """A target's result from its parts: FAIL if any failed, N/A if any is open or there are none, else PASS."""
    if not verdicts:
        return "N/A"
    if False in verdicts:
        return "FAIL"
    return "N/A" if None in verdicts else "PASS"


def ratio_verdict(ours: dict, base: dict | None, ok: Callable[[float], bool]):
    """``(verdict, ratio, text)`` of a speed-up target part: an incorrect or failed ``ours`` misses it, a missing
    or failed baseline leaves it open."""
    ratio, text = speedup(ours, base)
    if ratio is None:
        return (None if ours["status"] in (STATUS_OK, STATUS_SKIPPED) else False), None, text
    return ok(ratio), ratio, text


def ratio_target(title: str, pairs, ok: Callable[[float], bool], text=None, empty: str = "no cases",
                 sep: str = ", ") -> dict:
    """A speed-up target over ``pairs`` of ``(label, ours, base)`` rows, ``ok(ratio)`` per part; the detail is
    ``label: text(ours, base, ratio, speed-up text)`` per part (default: the speed-up text)."""
    parts, verdicts = [], []
    for label, ours, base in pairs:
        v, ratio, t = ratio_verdict(ours, base, ok) if ours is not None else (None, None, "n/a (no row)")
        verdicts.append(v)
        parts.append(f"{label}: {t if text is None or ours is None else text(ours, base, ratio, t)}")
    return {"target": title, "result": verdict(verdicts), "detail": sep.join(parts) or empty}


def make_row(case, provider: str, mode: str, status: str, **kw) -> dict:
    row = {"case": case.name, "group": case.group, "label": case.label, "params": case.params(),
           "provider": provider, "mode": mode, "status": status, "median_ms": None, "p20_ms": None, "p80_ms": None,
           "reps": None, "flops": case.flops(mode), "tflops": None, "peak_mem_bytes": None, "check": None,
           "message": None}
    row.update(kw)
    return row


def row_emitter(rows: list, total: int, progress: Callable[[str], None] | None, line=None) -> Callable[[dict], None]:
    """The row sink of :func:`run`: keeps the row, prints ``[i/total] line(row)`` (None: quiet) and appends it to
    the file named by ``$FASTATTN_ICL_BENCH_ROWS`` when that is set."""
    stream, line = os.environ.get(ROWS_ENV), line or format_progress

    def emit(row: dict) -> None:
        rows.append(row)
        if progress is not None:
            progress(f"[{len(rows)}/{total}] {line(row)}")
        if stream:
            with open(stream, "a") as f:
                f.write(json.dumps(_json_safe(row)) + "\n")

    return emit


def _figures(row: dict) -> str:
    parts = [f"{row['tflops']:.3g} TFLOP/s"] if row.get("tflops") is not None else []
    parts += [f"{row[k]:.4g} {u}" for k, u in UNITS.items() if row.get(k) is not None]
    return ", ".join(parts)


def format_progress(row: dict) -> str:
    head = f"{row['case']:<34} {row['mode']:<7} {row['provider']:<25} {row['status']:<9}"
    if row["median_ms"] is None:
        return f"{head} {row['message'] or ''}"
    mem = "" if row["peak_mem_bytes"] is None else f"  peak {row['peak_mem_bytes'] / 2**20:.1f} MiB"
    return f"{head} {row['median_ms']:.4g} ms [{row['p20_ms']:.4g}, {row['p80_ms']:.4g}]  {_figures(row)}{mem}"


def _measure(spec, case, inputs, group, p, mode, check, device, timing) -> dict:
    if isinstance(check, tuple):  # (status, message): no check to record
        (status, message), check = check, None
    else:
        status, message = (STATUS_OK, None) if check is None else (check["status"], check["message"])
    if status in (STATUS_OOM, STATUS_ERROR, STATUS_SKIPPED):
        return make_row(case, p.name, mode, status, message=message, **spec.metric(case, None))
    t = None
    try:
        t = spec.timed(case, inputs, group, p, mode)
        with t.context:
            stats = bench(t.fn, device, timing, grad_to_none=t.grad_to_none)
            mem = (peak_memory_bytes(t.fn, device, grad_to_none=t.grad_to_none)
                   if spec.measure_memory(case, device) else None)
    except Exception as exc:  # the traceback (and the tensors its frames hold) is dropped here
        status, message = failure(exc)
        return make_row(case, p.name, mode, status, check=check, message=message, **spec.metric(case, None))
    finally:
        del t
        free_memory(device)
    return make_row(case, p.name, mode, status, **stats, tflops=tflops(case.flops(mode), stats["median_ms"]),
                    peak_mem_bytes=mem, check=check, message=message, **spec.metric(case, stats["median_ms"]))


def run(bench: Benchmark, cases: Sequence, providers: Sequence[Provider], modes: Sequence[str],
        device: torch.device, *, timing: TimingConfig | None = None, progress=print, set_name: str = "") -> dict:
    """Gate, time and measure every provider on every case and mode; returns the results dict that
    :func:`write_results` writes."""
    timing, t_start = timing or bench.timing, time.perf_counter()
    rows, extra, skipped = [], {}, [] if device.type == "cuda" else [
        f"Triton kernels and CUDA ops not run: no CUDA; {bench.cpu_path}",
        *([bench.cpu_note] if bench.cpu_note else [])]

    def modes_of(case) -> list[str]:
        own = bench.modes_of(case)
        return [m for m in modes if own is None or m in own]

    emit = row_emitter(rows, len(providers) * sum(len(modes_of(c)) for c in cases), progress)

    def fail(members, exc, where):
        status, message = failure(exc, where)
        for case, p in itertools.product(members, providers):
            for mode in modes_of(case):
                emit(make_row(case, p.name, mode, status, message=message, **bench.metric(case, None)))
        free_memory(device)

    groups: dict = {}
    for c in cases:
        groups.setdefault(bench.group(c), []).append(c)
    for members in groups.values():
        group = SimpleNamespace(device=device, notes=skipped, extra=extra, providers=providers, timing=timing)
        try:
            bench.setup(group, members)
        except Exception as exc:
            fail(members, exc, "setup")
            continue
        for case in members:
            try:
                inputs = bench.inputs(case, group)
            except Exception as exc:
                fail([case], exc, "inputs")
                continue
            reasons = {p.name: p.skip(case, group) for p in providers}
            for name, reason in reasons.items():
                if reason and f"{name}: {reason}" not in skipped:
                    skipped.append(f"{name}: {reason}")
            checks: dict = {}
            for mode in modes_of(case):
                key = bench.gate_key(mode)
                if key in checks:
                    continue
                todo = [p for p in providers if not reasons[p.name]]
                try:
                    checks[key] = bench.gate(case, inputs, group, todo, mode) if todo else {}
                except Exception as exc:
                    checks[key] = dict.fromkeys((p.name for p in todo), failure(exc, "gate"))
                free_memory(device)
            for p in providers:
                for mode in modes_of(case):
                    skip = reasons[p.name]
                    check = (STATUS_SKIPPED, skip) if skip else checks[bench.gate_key(mode)][p.name]
                    emit(_measure(bench, case, inputs, group, p, mode, check, device, timing))
            del inputs
            free_memory(device)
        del group
        free_memory(device)
    add_speedups(rows, [p.name for p in providers])
    cuda = device.type == "cuda"
    targets, cpu_targets = bench.targets(rows), bench.cpu_targets(rows)
    for t in targets:
        t["on"] = "cuda"
    for t in cpu_targets:
        t["on"] = "cpu"
    not_here, why = (cpu_targets, "a CPU target") if cuda else (targets, "no CUDA")
    if not_here:
        skipped.append(f"{'CPU' if cuda else 'GPU'} targets not evaluated: {why} (the figures of this run are in "
                       "their detail, for information only)")
    for t in not_here:
        t["result"], t["detail"] = "not evaluated", f"{why}. Figures of this run, for information only: {t['detail']}"
    targets += cpu_targets
    memory = (f"torch.cuda.max_memory_allocated delta over one call (after reset_peak_memory_stats); {bench.memory}"
              if cuda else "peak of the running sum of torch.profiler's CPU allocation and free records ([memory] "
              f"events, profile_memory=True) over one more call, above the start; {bench.memory}")
    results = {
        "op": bench.op, "set": set_name, "modes": list(modes), "header": environment(device),
        "timing": timing.describe(device) + (f"; {bench.call}" if bench.call else ""), "memory": memory,
        "flop_model": bench.flop_model, "gate": bench.gate_text,
        "providers": [{"name": p.name, "description": p.describe(device)} for p in providers],
        "cases": [{"name": c.name, "label": c.label, "note": c.note, "params": c.params()} for c in cases],
        **extra, "skipped": skipped, "rows": rows, "targets": targets,
    }
    bench.finish(results)
    results["runtime_s"] = round(time.perf_counter() - t_start, 1)
    return results


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """``"cpu"``, or the GPU's name in lower case, other characters as ``-`` (``"nvidia-h100-80gb-hbm3"``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") or "cuda"


def environment(device: torch.device) -> dict:
    """The results header: device, library versions, git commit and date."""
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        extra = {"compute_capability": f"{props.major}.{props.minor}",
                 "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        name, extra = _cpu_name(), {"cpu_count": os.cpu_count()}
    return {
        "device": name, "device_type": device.type, "device_slug": device_slug(device), **extra,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "triton": _version("triton"), "transformers": _version("transformers"), "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
        "date": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def md_table(heads, rows) -> list[str]:
    """A markdown table: the header, its rule and one line per row of cells."""
    return ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads), *("| " + " | ".join(r) + " |" for r in rows)]


def fmt_ms(row: dict) -> str:
    if row["median_ms"] is None:
        return "—"
    return f"{row['median_ms']:.4g} ({row['p20_ms']:.4g}–{row['p80_ms']:.4g})"


def _fmt_check(row: dict) -> str:
    check = row.get("check")
    if not check or not check["errors"]:
        return "—"
    worst = max(check["errors"].items(), key=lambda kv: kv[1]["error"] / max(kv[1]["tolerance"], 1e-300))
    mark = "pass" if check["status"] == STATUS_OK else "FAIL"
    return f"{mark} ({worst[0]} {worst[1]['error']:.1e} / tol {worst[1]['tolerance']:.1e})"


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    if row["median_ms"] is None:
        return row["status"]
    notes = [x for x in (_figures(row),) if x]
    if row["peak_mem_bytes"] is not None:
        notes.append(f"{row['peak_mem_bytes'] / 2**20:.1f} MiB")
    if row["status"] != STATUS_OK:
        notes.append(row["status"])
    return f"{row['median_ms']:.4g}" + (f" ({', '.join(notes)})" if notes else "")


def _side_by_side(results: dict, columns) -> list[str]:
    """Per case and mode: every provider's median ms (figures, peak MiB), the first provider's speed-up vs each
    other one, and the benchmark's own columns."""
    provs = [p["name"] for p in results["providers"]]
    ours, others = provs[0], provs[1:]
    heads = ["case", "shape", "mode", *(f"{p} ms" for p in provs), *(f"{ours} vs {p}" for p in others),
             *(c[0] for c in columns)]
    rows, cells = results["rows"], []
    for name in dict.fromkeys(r["case"] for r in rows):
        for mode in results["modes"]:
            by = {p: find(rows, name, p, mode) for p in provs}
            some = next((r for r in by.values() if r is not None), None)
            if some is None:
                continue
            vs = [by[ours]["speedup_text"].get(p, "n/a") if by[ours] else "n/a" for p in others]
            cells.append([name, some["label"], mode, *(_cell(by[p]) for p in provs), *vs, *(c[1](by) for c in columns)])
    return ["## Side by side", "", "median ms (figures, peak MiB); speed-up = the other's median / this one's, "
            "same run", "", *md_table(heads, cells)]


def _row_cells(r: dict, providers: Sequence[str]) -> list[str]:
    mem = "null" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
    status = r["status"] if r["status"] in TIMED else f"{r['status']}: {r['message']}"
    sp = [("—" if p == r["provider"] else r["speedup_text"].get(p, "n/a")) for p in providers]
    return [r["mode"], r["provider"], status, fmt_ms(r), _figures(r) or "—", mem, _fmt_check(r), *sp]


def render_markdown(results: dict, bench: Benchmark | None = None) -> str:
    h, rows = results["header"], results["rows"]
    providers = [p["name"] for p in results["providers"]]
    dirty = {True: " (dirty)", False: "", None: " (dirty: unknown)"}[h["git_dirty"]]
    lines = [
        f"# Benchmark: {results['op']} on {h['device']}", "",
        f"- date: {h['date']}; git commit: {h['git_commit'] or 'unknown'}{dirty}",
        f"- torch {h['torch']}, triton {h['triton']}, transformers {h['transformers']}, CUDA {h['cuda']}, "
        f"python {h['python']}, torch threads {h['torch_threads']}",
        f"- shape set: `{results['set']}`; modes: {', '.join(results['modes'])}; runtime {results['runtime_s']} s",
        f"- timing: {results['timing']}", f"- peak memory: {results['memory']}",
        *([f"- correctness gate: {results['gate']}"] if results.get("gate") else []),
        f"- FLOP model: {results['flop_model']}",
        "- speed-up vs X = X's median time / this row's median time, same run; refused when a correctness check failed",
        "", "## Providers", "", *(f"- `{p['name']}`: {p['description']}" for p in results["providers"]),
    ]
    if results["skipped"]:
        lines += ["", "## Skipped or not measured", "", *(f"- {s}" for s in results["skipped"])]
    if results["targets"]:
        lines += ["", "## Targets", "", *md_table(["target", "result", "detail"], (
            [t["target"], f"**{t['result']}**", t["detail"]] for t in results["targets"]))]
    for key, title, cols in bench.tables if bench else ():
        lines += ["", f"## {title}", "", *md_table([c[0] for c in cols],
                                                     ([c[1](e) for c in cols] for e in results.get(key, [])))]
    if rows:
        lines += ["", *_side_by_side(results, bench.columns if bench else ())]
    lines += ["", "## All rows", ""]
    cols = ["mode", "provider", "status", "median ms (p20–p80)", "figures", "peak MiB", "check (worst)",
            *(f"vs {p}" for p in providers)]
    notes = {c["name"]: c["note"] for c in results.get("cases", [])}
    for name in dict.fromkeys(r["case"] for r in rows):
        crows = [r for r in rows if r["case"] == name]
        lines += [f"### {name}: {crows[0]['label']}" + (f" ({notes[name]})" if notes.get(name) else ""), ""]
        lines += [*md_table(cols, (_row_cells(r, providers) for r in crows)), ""]
    return "\n".join(lines).rstrip() + "\n"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(results: dict, out_dir=None, bench: Benchmark | None = None, tail: str = "") -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug><bench.suffix><tail>.json`` and ``.md``; return both paths."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{results['header']['device_slug']}{bench.suffix if bench else ''}{tail}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    md_path.write_text(render_markdown(results, bench))
    return json_path, md_path
