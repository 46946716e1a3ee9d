"""Benchmark harness shared by every ``bench_<op>.py``: timing, peak memory, the correctness gate,
OOM handling, the environment header and the JSON + markdown results.

Timing. On CUDA, ``triton.testing.do_bench`` (L2 flushed before every call, CUDA events) with
``quantiles=[0.5, 0.2, 0.8]``: the median and the 20th/80th percentiles in ms. On CPU (``do_bench``
needs a GPU) a ``time.perf_counter`` loop reporting the same three statistics over the same kind
of sample: one untimed call, a warm-up sized from an estimate, then ``rep_ms`` worth of timed calls
(no cache flush). Gradients named in ``grad_to_none`` are reset before every timed call.

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` just before one
call, after ``reset_peak_memory_stats``, measured after the timing (so compilation and autotuning
are not counted). On CPU: ``None`` (torch's CPU allocator keeps no peak counter).

Correctness gate. Before a provider is timed on a case, its output (and, when a backward mode is
asked for, the gradients of its inputs for a random output gradient) are compared with the float64
oracle under the tolerance rule of :mod:`fastattn_icl.testing` (2x / 3x the same-dtype oracle's
error). A provider that fails is still timed but marked ``incorrect``, and no speed-up involving it
is printed ("n/a (check failed)"). Speed-ups are only ever computed between rows of one run.

OOM. ``torch.OutOfMemoryError``, ``MemoryError`` or a ``RuntimeError`` saying "not enough memory" /
"out of memory" turns into a row with status ``oom``; any other exception of a provider into a row
with status ``error``; the run goes on.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fastattn_icl.testing import FWD_FACTOR, GRAD_FACTOR, check_close, max_error, tolerance

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
QUANTILES = (0.5, 0.2, 0.8)

STATUS_OK = "ok"
STATUS_INCORRECT = "incorrect"
STATUS_OOM = "oom"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"
TIMED = (STATUS_OK, STATUS_INCORRECT)


class Case(Protocol):
    """What the harness needs from a benchmark case (e.g. :class:`benchmarks.shapes.AttnShape`)."""

    name: str
    group: str
    note: str

    @property
    def label(self) -> str: ...

    def flops(self, mode: str) -> float: ...

    def params(self) -> dict: ...


@dataclass
class Provider:
    """One implementation of the op. ``fn(case, *inputs)`` returns the output tensor;
    ``skip_reason(case, device)`` returns why it cannot run here, or ``None``;
    ``describe(device)`` says what exactly ran (backend, dispatch)."""

    name: str
    fn: Callable[..., torch.Tensor]
    describe: Callable[[torch.device], str]
    skip_reason: Callable[[Any, torch.device], str | None] = lambda case, device: None


@dataclass
class CheckViews:
    """The sub-problem the oracle is run on: ``inputs[i]`` indexes input ``i`` (and its gradient),
    ``output`` indexes the provider's output, ``scope`` says what was checked. ``Ellipsis``
    everywhere is the whole problem. Indices must select a self-contained sub-problem whose output
    and input gradients are exactly those slices of the full problem."""

    inputs: Sequence[Any]
    output: Any
    scope: str
    names: Sequence[str] = ()


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
            return (
                f"triton.testing.do_bench(warmup={self.cuda_warmup_ms:g} ms, rep={self.cuda_rep_ms:g} ms, "
                f"quantiles={list(QUANTILES)}), L2 flushed before each call"
            )
        return (
            f"time.perf_counter loop (warm-up {self.cpu_warmup_ms:g} ms, {self.cpu_rep_ms:g} ms of timed calls, "
            f"{self.cpu_min_reps}-{self.cpu_max_reps} calls), median and p20/p80, no cache flush"
        )


@dataclass
class Suite:
    """An op's benchmark: how to build inputs, the oracle, the check views and the targets."""

    op: str
    make_inputs: Callable[[Any, torch.device], list[torch.Tensor]]
    oracle: Callable[..., torch.Tensor]  # oracle(case, *inputs) in any dtype, float64 included
    check_views: Callable[[Any], CheckViews]
    targets: Callable[[list[dict]], list[dict]] = lambda rows: []
    notes: list[str] = field(default_factory=list)


def _quantiles(times: Sequence[float], qs: Sequence[float] = QUANTILES) -> list[float]:
    t = torch.tensor(list(times), dtype=torch.float64)
    return [float(x) for x in torch.quantile(t, torch.tensor(list(qs), dtype=torch.float64))]


def _reset_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for x in tensors or ():
        x.grad = None


def bench_cpu(
    fn: Callable[[], Any],
    *,
    warmup_ms: float = 50.0,
    rep_ms: float = 200.0,
    min_reps: int = 3,
    max_reps: int = 50,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> dict:
    """``{"median_ms", "p20_ms", "p80_ms", "reps"}`` of ``fn`` timed with ``time.perf_counter``."""
    _reset_grads(grad_to_none)
    fn()
    _reset_grads(grad_to_none)
    t0 = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(0, min(int(warmup_ms / estimate_ms), max_reps) - 1)):
        _reset_grads(grad_to_none)
        fn()
    reps = max(min_reps, min(max_reps, int(rep_ms / estimate_ms)))
    times = []
    for _ in range(reps):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    median, p20, p80 = _quantiles(times)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": reps}


def bench_cuda(
    fn: Callable[[], Any],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> dict:
    """``{"median_ms", "p20_ms", "p80_ms", "reps"}`` from ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or []) or None, quantiles=list(QUANTILES)
    )
    return {"median_ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80), "reps": None}


def bench(fn, device: torch.device, config: TimingConfig, grad_to_none=None) -> dict:
    if device.type == "cuda":
        return bench_cuda(fn, warmup_ms=config.cuda_warmup_ms, rep_ms=config.cuda_rep_ms, grad_to_none=grad_to_none)
    return bench_cpu(
        fn,
        warmup_ms=config.cpu_warmup_ms,
        rep_ms=config.cpu_rep_ms,
        min_reps=config.cpu_min_reps,
        max_reps=config.cpu_max_reps,
        grad_to_none=grad_to_none,
    )


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device, grad_to_none=None) -> int | None:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it; ``None``
    on CPU."""
    if device.type != "cuda":
        return None
    _reset_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def tflops(flops: float, ms: float | None) -> float | None:
    if ms is None or not ms > 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(s in msg for s in ("out of memory", "not enough memory", "can't allocate memory"))
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """``"cpu"``, or the GPU name in lower case with runs of other characters turned into ``-``
    (``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") or "cuda"


def environment(device: torch.device) -> dict:
    """The results header: device, library versions, git commit and date."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        extra = {
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        }
    else:
        name = _cpu_name()
        extra = {"cpu_count": os.cpu_count()}
    return {
        "device": name,
        "device_type": device.type,
        "device_slug": device_slug(device),
        **extra,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "date": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def correctness_check(
    call: Callable[..., torch.Tensor],
    oracle: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    views: CheckViews,
    *,
    with_grad: bool,
    seed: int = 1234,
) -> dict:
    """Compare ``call(*inputs)`` (and its input gradients) with ``oracle`` on ``views``.

    Returns ``{"status": "ok" | "incorrect", "scope", "errors": {name: {"error", "tolerance"}},
    "message"}``; the provider's dtype is that of ``inputs``, the oracle runs in that dtype and in
    float64 on the sliced sub-problem.
    """
    leaves = [x.detach().clone().requires_grad_(with_grad) for x in inputs]
    if with_grad:
        out = call(*leaves)
        gen = torch.Generator(device=out.device).manual_seed(seed)
        dout = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        out.backward(dout)
        grads = [None if x.grad is None else x.grad[idx].detach().clone() for x, idx in zip(leaves, views.inputs)]
        dout = dout[views.output].clone()
    else:
        with torch.no_grad():
            out = call(*leaves)
        grads, dout = [], None
    got = {"out": out[views.output].detach().clone()}
    del out, leaves
    names = list(views.names) or [f"d{i}" for i in range(len(inputs))]

    def run_oracle(dtype):
        sub = [x.detach()[idx].to(dtype).requires_grad_(with_grad) for x, idx in zip(inputs, views.inputs)]
        if with_grad:
            o = oracle(*sub)
            o.backward(dout.to(dtype))
            return o.detach(), [x.grad for x in sub]
        with torch.no_grad():
            return oracle(*sub), []

    ref64, ref64_grads = run_oracle(torch.float64)
    refdt, refdt_grads = run_oracle(inputs[0].dtype)
    errors: dict[str, dict] = {}
    failures = []
    pairs = [("out", got["out"], refdt, ref64, FWD_FACTOR)]
    for name, g, gdt, g64 in zip(names, grads, refdt_grads, ref64_grads):
        pairs.append((name, g, gdt, g64, GRAD_FACTOR))
    for name, x, same, r64, factor in pairs:
        if x is None:
            failures.append(f"{name}: no gradient")
            continue
        try:
            err, tol = check_close(name, x, same, r64, factor=factor)
        except (AssertionError, ValueError) as exc:
            failures.append(str(exc))
            try:
                err, tol = max_error(x, r64), tolerance(same, r64, factor=factor)
            except ValueError:
                err, tol = float("inf"), float("nan")
        errors[name] = {"error": err, "tolerance": tol}
    return {
        "status": STATUS_INCORRECT if failures else STATUS_OK,
        "scope": views.scope,
        "errors": errors,
        "message": "; ".join(failures) or None,
    }


def _timed_fn(call, inputs: Sequence[torch.Tensor], mode: str):
    """``(fn, grad_to_none)`` timing ``mode`` of ``call``. ``fwd`` runs without autograd (inference);
    ``bwd`` times ``out.backward`` of a retained graph; ``fwd+bwd`` both."""
    if mode == "fwd":
        xs = [x.detach() for x in inputs]

        def fwd():
            with torch.no_grad():
                call(*xs)

        return fwd, None
    xs = [x.detach().requires_grad_() for x in inputs]
    out = call(*xs)
    dout = torch.randn_like(out)
    if mode == "bwd":
        return (lambda: out.backward(dout, retain_graph=True)), xs
    if mode == "fwd+bwd":
        del out
        return (lambda: call(*xs).backward(dout)), xs
    raise ValueError(f"unknown mode {mode!r}")


def _row(case, provider: str, mode: str, status: str, **kw) -> dict:
    row = {
        "case": case.name,
        "group": case.group,
        "label": case.label,
        "params": case.params(),
        "provider": provider,
        "mode": mode,
        "status": status,
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "reps": None,
        "flops": case.flops(mode),
        "tflops": None,
        "peak_mem_bytes": None,
        "check": None,
        "message": None,
    }
    row.update(kw)
    return row


def memory_note(device: torch.device, not_counted: str = "", call: str = "one call") -> str:
    """The results' ``memory`` line: what the peak-memory column measures on ``device``."""
    if device.type != "cuda":
        return "not measured on CPU (torch's CPU allocator keeps no peak counter): null"
    note = f"torch.cuda.max_memory_allocated delta over {call} (after reset_peak_memory_stats)"
    return f"{note}; {not_counted}" if not_counted else note


def case_entries(cases) -> list[dict]:
    """The results' ``cases`` list: name, label, note and parameters of each case."""
    return [{"name": c.name, "label": c.label, "note": c.note, "params": c.params()} for c in cases]


def run_suite(
    suite: Suite,
    cases: Sequence[Any],
    providers: Sequence[Provider],
    modes: Sequence[str],
    device: torch.device,
    *,
    timing: TimingConfig | None = None,
    progress: Callable[[str], None] | None = print,
    set_name: str = "",
) -> dict:
    """Check and time every provider on every case and mode; returns the results dict (header,
    providers, skipped, rows with speed-ups, targets) that :func:`write_results` writes."""
    timing = timing or TimingConfig()
    t_start = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = list(suite.notes)
    total = len(cases) * len(providers) * len(modes)

    emit = row_emitter(rows, total, progress)

    for case in cases:
        try:
            inputs = suite.make_inputs(case, device)
        except Exception as exc:
            status = STATUS_OOM if is_oom(exc) else STATUS_ERROR
            msg = f"inputs: {_first_line(exc)}"
            for p in providers:
                for mode in modes:
                    emit(_row(case, p.name, mode, status, message=msg))
            free_memory(device)
            continue
        for p in providers:
            reason = p.skip_reason(case, device)
            if reason:
                skipped.append(f"{p.name} on {case.name}: {reason}")
                for mode in modes:
                    emit(_row(case, p.name, mode, STATUS_SKIPPED, message=reason))
                continue

            def call(*xs, _p=p, _case=case):
                return _p.fn(_case, *xs)

            # the forward is checked alone first, so a provider whose backward does not fit still
            # gets its forward measured
            checks: dict[bool, dict | tuple[str, str]] = {}
            for with_grad in sorted({m != "fwd" for m in modes}):
                if with_grad in checks:
                    continue
                try:
                    checks[with_grad] = correctness_check(
                        call,
                        lambda *xs, _case=case: suite.oracle(_case, *xs),
                        inputs,
                        suite.check_views(case),
                        with_grad=with_grad,
                    )
                except Exception as exc:
                    checks[with_grad] = (STATUS_OOM if is_oom(exc) else STATUS_ERROR, f"check: {_first_line(exc)}")
                free_memory(device)
                if isinstance(checks[with_grad], tuple):
                    checks[True] = checks[with_grad]
            for mode in modes:
                check = checks[mode != "fwd"]
                if isinstance(check, tuple):
                    emit(_row(case, p.name, mode, check[0], message=check[1]))
                else:
                    emit(_measure(case, p, call, inputs, mode, device, timing, check))
        del inputs
        free_memory(device)

    add_speedups(rows, [p.name for p in providers])
    return {
        "op": suite.op,
        "set": set_name,
        "modes": list(modes),
        "header": environment(device),
        "timing": timing.describe(device),
        "memory": memory_note(device),
        "flop_model": "4·B·H·Tq·Tk·d per forward, halved when causal and Tq == Tk; bwd 2.5x, fwd+bwd 3.5x",
        "providers": [{"name": p.name, "description": p.describe(device)} for p in providers],
        "cases": case_entries(cases),
        "skipped": skipped,
        "rows": rows,
        "targets": suite.targets(rows) if device.type == "cuda" else [],
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }


def _measure(case, provider: Provider, call, inputs, mode, device, timing, check) -> dict:
    status = check["status"]
    fn = grads = None
    try:
        fn, grads = _timed_fn(call, inputs, mode)
        stats = bench(fn, device, timing, grad_to_none=grads)
        mem = peak_memory_bytes(fn, device, grad_to_none=grads)
    except Exception as exc:
        row = _row(case, provider.name, mode, STATUS_OOM if is_oom(exc) else STATUS_ERROR, check=check)
        row["message"] = _first_line(exc)
        return row
    finally:
        del fn, grads
        free_memory(device)
    return _row(
        case,
        provider.name,
        mode,
        status,
        **stats,
        tflops=tflops(case.flops(mode), stats["median_ms"]),
        peak_mem_bytes=mem,
        check=check,
        message=check.get("message") if status == STATUS_INCORRECT else None,
    )


def targets_not_evaluated(targets: list[dict]) -> list[dict]:
    """Mark GPU targets as not evaluated (no CUDA), keeping their CPU figures in the detail for information."""
    for t in targets:
        t["result"] = "not evaluated"
        t["detail"] = f"no CUDA. CPU figures, for information only: {t['detail']}"
    return targets


def speedup(row: dict, base: dict | None) -> tuple[float | None, str]:
    """``(base time / row time, text)``; refused (``None``) when either check failed or either row
    was not timed."""
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
    """Add ``speedup_vs[p]`` (float or ``None``) and ``speedup_text[p]`` to every row, against every
    other provider's row of the same case and mode in ``rows`` (one run)."""
    index = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        r["speedup_vs"], r["speedup_text"] = {}, {}
        for p in providers:
            if p == r["provider"]:
                continue
            ratio, text = speedup(r, index.get((r["case"], r["mode"], p)))
            r["speedup_vs"][p], r["speedup_text"][p] = ratio, text


PROGRESS_COLUMNS = (("case", 34), ("mode", 7), ("provider", 13))
# a file to which every benchmark appends each row, as one JSON line, the moment it is measured (set by
# scripts/gpu.py: a benchmark stopped by its time budget still leaves every row it measured)
ROWS_ENV = "FASTATTN_ICL_BENCH_ROWS"


def row_emitter(rows: list, total: int, progress: Callable[[str], None] | None, line=None) -> Callable[[dict], None]:
    """The row sink of a benchmark's run loop: keeps the row in ``rows``, prints ``[i/total] line(row)``
    (``line`` default :func:`format_progress`) through ``progress`` (None: quiet), and appends the row to
    the file named by ``$FASTATTN_ICL_BENCH_ROWS`` when that is set."""
    stream = os.environ.get(ROWS_ENV)
    line = line or format_progress

    def emit(row: dict) -> None:
        rows.append(row)
        if progress is not None:
            progress(f"[{len(rows)}/{total}] {line(row)}")
        if stream:
            with open(stream, "a") as f:
                f.write(json.dumps(_json_safe(row)) + "\n")

    return emit


def format_progress(row: dict, *, columns=PROGRESS_COLUMNS, rate=None) -> str:
    """One progress line: the ``columns`` (field, width), the status, the median and p20/p80 and a rate
    (``rate(row)``, default TFLOP/s), and the peak memory when measured."""
    head = " ".join(f"{row[name]:<{width}}" for name, width in columns) + f" {row['status']:<9}"
    if row["median_ms"] is None:
        return f"{head} {row['message'] or ''}"
    mem = "" if row["peak_mem_bytes"] is None else f"  peak {row['peak_mem_bytes'] / 2**20:.1f} MiB"
    rate_text = f"{row['tflops']:.3g} TFLOP/s" if rate is None else rate(row)
    return f"{head} {row['median_ms']:.4g} ms [{row['p20_ms']:.4g}, {row['p80_ms']:.4g}]  {rate_text}{mem}"


def bandwidth(row: dict) -> str:
    """The GB/s rate of a memory-bound row (for :func:`format_progress`)."""
    return f"{row['gb_per_s']:.3g} GB/s"


def _fmt_ms(row: dict) -> str:
    if row["median_ms"] is None:
        return "—"
    return f"{row['median_ms']:.4g} ({row['p20_ms']:.4g}–{row['p80_ms']:.4g})"


def _fmt_check(row: dict) -> str:
    check = row.get("check")
    if not check:
        return "—"
    worst = max(check["errors"].items(), key=lambda kv: kv[1]["error"] / max(kv[1]["tolerance"], 1e-300))
    mark = "pass" if check["status"] == STATUS_OK else "FAIL"
    return f"{mark} ({worst[0]} {worst[1]['error']:.1e} / tol {worst[1]['tolerance']:.1e})"


def render_markdown(results: dict) -> str:
    h = results["header"]
    providers = [p["name"] for p in results["providers"]]
    rows = results["rows"]
    lines = [f"# Benchmark: {results['op']} on {h['device']}", ""]
    dirty = {True: " (dirty)", False: "", None: " (dirty: unknown)"}[h["git_dirty"]]
    lines += [
        f"- date: {h['date']}; git commit: {h['git_commit'] or 'unknown'}{dirty}",
        f"- torch {h['torch']}, triton {h['triton']}, transformers {h['transformers']}, CUDA {h['cuda']}, "
        f"python {h['python']}, torch threads {h['torch_threads']}",
        f"- shape set: `{results['set']}`; modes: {', '.join(results['modes'])}; runtime {results['runtime_s']} s",
        f"- timing: {results['timing']}",
        f"- peak memory: {results['memory']}",
        f"- FLOP model: {results['flop_model']}",
        "- speed-up vs X = X's median time / this row's median time, same run; refused when a correctness check failed",
        "",
        "## Providers",
        "",
    ]
    lines += [f"- `{p['name']}`: {p['description']}" for p in results["providers"]]
    if results["skipped"]:
        lines += ["", "## Skipped or not measured", ""] + [f"- {s}" for s in results["skipped"]]
    if results["targets"]:
        lines += ["", "## Targets", "", "| target | result | detail |", "|---|---|---|"]
        lines += [f"| {t['target']} | **{t['result']}** | {t['detail']} |" for t in results["targets"]]

    ours = providers[0]
    others = providers[1:]
    lines += ["", f"## Summary: `{ours}`", ""]
    lines += [
        "| case | shape | mode | median ms (p20–p80) | TFLOP/s | " + " | ".join(f"vs {o}" for o in others) + " |",
        "|---|---|---|---|---|" + "---|" * len(others),
    ]
    for r in rows:
        if r["provider"] != ours:
            continue
        tf = "—" if r["tflops"] is None else f"{r['tflops']:.3g}"
        ms = _fmt_ms(r) if r["median_ms"] is not None else r["status"]
        sp = " | ".join(r["speedup_text"].get(o, "n/a") for o in others)
        lines.append(f"| {r['case']} | {r['label']} | {r['mode']} | {ms} | {tf} | {sp} |")

    lines += ["", "## All rows", ""]
    cols = ["mode", "provider", "status", "median ms (p20–p80)", "TFLOP/s", "peak MiB", "check (worst)"]
    cols += [f"vs {p}" for p in providers]
    notes = {c["name"]: c["note"] for c in results.get("cases", [])}
    for name in dict.fromkeys(r["case"] for r in rows):
        crows = [r for r in rows if r["case"] == name]
        note = f" ({notes[name]})" if notes.get(name) else ""
        lines += [f"### {name}: {crows[0]['label']}{note}", ""]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in crows:
            mem = "null" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
            tf = "—" if r["tflops"] is None else f"{r['tflops']:.3g}"
            sp = [("—" if p == r["provider"] else r["speedup_text"].get(p, "n/a")) for p in providers]
            status = r["status"] if r["status"] in TIMED else f"{r['status']}: {r['message']}"
            cells = [r["mode"], r["provider"], status, _fmt_ms(r), tf, mem, _fmt_check(r), *sp]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(
    results: dict, out_dir: str | os.PathLike | None = None, *, suffix: str = "", markdown: str | None = None
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug><suffix>.json`` and ``.md`` (``markdown``, default
    :func:`render_markdown` of ``results``); return both paths."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{results['header']['device_slug']}{suffix}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    md_path.write_text(render_markdown(results) if markdown is None else markdown)
    return json_path, md_path


def markdown_with_gate(results: dict) -> str:
    """``render_markdown(results)`` with the results' correctness-gate line put before the FLOP model."""
    md = render_markdown(results)
    return md.replace("- FLOP model:", f"- correctness gate: {results['gate']}\n- FLOP model:", 1)


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` on ``log x`` (1 = linear, 2 = quadratic)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None
