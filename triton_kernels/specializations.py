"""Every specialization the launchers can compile, as data: the compile suite and report enumerate these.

One source of truth: the flag sets are the ones the launchers check every launch against
(:data:`attention.tuning.FLAG_SETS`, :data:`momentum.FLAG_SETS`; :data:`deep_thinking.FLAG_SETS` holds both values
of its one flag), and the block configs are the autotuner's own lists (:func:`attention.tuning.candidates`). A flag
or config added to a launcher is therefore compiled by ``tests/compile`` the day it is added, and a launch with a
flag set missing from the table fails at once (``attention.tuning.check_flags``).

A :class:`Spec` is one ``(kernel, flags, dtype, head dim, config)``; :func:`compile_spec` compiles it ahead of
time for a CUDA target (no GPU needed: ``triton.compile`` on an ``ASTSource`` with the argument types and
alignment hints the JIT would derive from a real launch: pointers 16-byte aligned, strides multiples of 16, the
last-dimension strides equal to 1 and so specialised away).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import deep_thinking, momentum
from .attention import backward, forward, primitives, saliency, tuning

# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin) on the targets the suite proves.
SMEM_LIMIT = {80: 166_912, 90: 232_448}
# Smaller chips (A10, L4, RTX 3090/4090: sm_86/sm_89) have 101,376 B; the autotuner prunes for the device it runs on.
SMEM_LIMIT_SMALL = 101_376

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128, 256)  # 80 and 96 pad to BLOCK_D 128 and compile like 128 (HEAD_DIM only bounds the masks)

# Pointer arguments per kernel: "x" = the input dtype, else a fixed Triton type.
_POINTERS = {
    "fwd": dict(Q="x", K="x", V="x", O="x", LSE="fp32", KPM="u8", LOGW="fp32", ROW_FROM="i32", ISO="i32",
                PK="x", PV="x", MOM="fp32", OA="x"),
    "preprocess": dict(O="x", DO="x", DELTA="fp32"),
    "dkdv": dict(Q="x", K="x", V="x", DO="x", DK="x", DV="x", LSE="fp32", DELTA="fp32", KPM="u8", LOGW="fp32",
                 DLOGW="fp32", ROW_FROM="i32", ISO="i32"),
    "dq": dict(Q="x", K="x", V="x", DO="x", DQ="x", LSE="fp32", DELTA="fp32", KPM="u8", LOGW="fp32",
               ROW_FROM="i32", ISO="i32"),
    "saliency": dict(Q="x", K="x", V="x", DO="x", LSE="fp32", KPM="u8", LOGW="fp32", ROW_FROM="i32", ISO="i32",
                     LABEL="u8", TARGET="i32", ROW_SLOT="i32", SUMS="fp32", HEAD_SUMS="fp32", ROWS="fp32"),
    "scan": dict(X="x", Y="fp32", KPM="u8", M0="fp32"),
    "deep_thinking": dict(W="x", M="fp32"),
}
_FLOATS = {"qk_scale", "sm_scale", "log2_eta", "eta", "beta"}


def _unit_stride(name: str) -> bool:
    # the last-dimension strides of every tensor (contiguous rows), and the padding mask's column stride
    return name.startswith("stride_") and (name.endswith("d") or name in ("stride_kpmn", "stride_kpmt"))


@dataclasses.dataclass(frozen=True)
class Spec:
    kind: str  # "fwd", "dkdv", "dq", "saliency", "preprocess", "scan", "deep_thinking"
    flags: tuple  # ((name, value), ...) of the launcher's flag set
    dtype: torch.dtype
    head_dim: int  # HEAD_DIM (the attention family pads it to BLOCK_D, a power of two >= 16)
    block_m: int | None = None
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    position: int = 0  # the config's place in the autotune list (0 = tried first)
    mha: bool = False  # N_REP == 1 (no GQA): the JIT turns an int argument equal to 1 into a constant

    @property
    def block_d(self) -> int:
        return primitives.block_d(self.head_dim) if self.kind != "scan" else momentum.scan_block_d(self.head_dim)

    @property
    def dtype_name(self) -> str:
        return _TL_DTYPE[self.dtype]

    @property
    def flag_text(self) -> str:
        on = [name for name, value in self.flags if value is True]
        other = [f"{name}={value}" for name, value in self.flags if not isinstance(value, bool)]
        return "+".join(on + other + (["N_REP=1"] if self.mha else [])) or "base"

    @property
    def config_text(self) -> str:
        tile = f"{self.block_m}x{self.block_n} " if self.block_m is not None else ""
        return f"{tile}w{self.num_warps} s{self.num_stages}"

    @property
    def hot(self) -> bool:
        """A hot path: forward, dq and dk/dv at fp16/bf16 and head dim <= 128 (any flag set)."""
        return (self.kind in ("fwd", "dq", "dkdv") and self.dtype != torch.float32 and self.head_dim <= 128)

    def __str__(self) -> str:
        return f"{self.kind}[{self.flag_text}] {self.dtype_name} d{self.head_dim} {self.config_text}"


_JIT = {
    "fwd": forward._attn_fwd_kernel, "preprocess": backward._attn_bwd_preprocess_kernel,
    "dkdv": backward._attn_bwd_dkdv_kernel, "dq": backward._attn_bwd_dq_kernel,
    "saliency": saliency._attn_bwd_saliency_kernel, "scan": momentum._decayed_scan_kernel,
    "deep_thinking": deep_thinking._deep_thinking_update_kernel,
}
_FLAG_SETS = {**tuning.FLAG_SETS, **momentum.FLAG_SETS, **deep_thinking.FLAG_SETS}
KINDS = tuple(_JIT)


def flag_sets(kind: str) -> list[tuple]:
    return sorted(_FLAG_SETS[kind])


def _fixed_config(kind: str, head_dim: int):
    # kernels launched with fixed meta-parameters: (block_m, block_n, num_warps, num_stages) as the launcher sets them
    if kind == "preprocess":
        return tuning.PREPROCESS_BLOCK_M, None, 4, 3
    if kind == "scan":
        return momentum.BLOCK_T, momentum.scan_block_d(head_dim), 4, 3
    return None, deep_thinking.BLOCK, 4, 3


def specs(kinds=KINDS, dtypes=DTYPES, head_dims=HEAD_DIMS, *, first_config_only: bool = False,
          flags_filter=None) -> list[Spec]:
    """The specializations of ``kinds`` (every flag set x dtype x head dim x autotune config)."""
    out = []
    for kind in kinds:
        for flags in flag_sets(kind):
            if flags_filter is not None and not flags_filter(kind, dict(flags)):
                continue
            for dtype in dtypes:
                for d in (head_dims if kind != "deep_thinking" else (0,)):
                    if kind in tuning.TUNED_KINDS:
                        cands = tuning.candidates(kind, primitives.block_d(d), dtype.itemsize)
                        if first_config_only:
                            cands = cands[:1]
                        for i, (bm, bn, w, st) in enumerate(cands):
                            out.append(Spec(kind, flags, dtype, d, bm, bn, w, st, i))
                    else:
                        bm, bn, w, st = _fixed_config(kind, d)
                        out.append(Spec(kind, flags, dtype, d, bm, bn, w, st))
    return out


def _source(spec: Spec):
    fn = _JIT[spec.kind]
    names = fn.arg_names
    constexpr_names = {names[i] for i in fn.constexprs}
    flags = dict(spec.flags)
    constants = dict(flags)
    if spec.kind in tuning.TUNED_KINDS or spec.kind == "preprocess":
        constants.update(HEAD_DIM=spec.head_dim, BLOCK_D=spec.block_d, BLOCK_M=spec.block_m)
        if spec.mha:
            constants["N_REP"] = 1
        if spec.kind != "preprocess":
            constants.update(BLOCK_N=spec.block_n, DOT_PRECISION=primitives.dot_precision_for(spec.dtype, True))
    elif spec.kind == "scan":
        constants.update(HEAD_DIM=spec.head_dim, BLOCK_T=spec.block_m, BLOCK_D=spec.block_n,
                         DOT_PRECISION=momentum.DOT_PRECISION)
    else:
        constants.update(BLOCK=spec.block_n)
    missing = constexpr_names - set(constants)
    if missing:
        raise ValueError(f"{spec}: no value for the constexpr parameters {sorted(missing)}")
    signature, attrs = {}, {}
    pointers = _POINTERS[spec.kind]
    for i, name in enumerate(names):
        if name in constexpr_names:
            signature[name] = "constexpr"
        elif name in pointers:
            ty = pointers[name]
            signature[name] = "*" + (spec.dtype_name if ty == "x" else ty)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif name in constants:  # specialised to a constant (N_REP == 1)
            signature[name] = "constexpr"
        elif _unit_stride(name):
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)


@dataclasses.dataclass
class Compiled:
    spec: Spec
    arch: int
    shared: int  # bytes of shared memory per block
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int  # stack frame bytes per thread
    tensor_core: str  # "wgmma", "mma", "fma" (no tensor-core instruction), or "-" (no dot product)
    seconds: float

    @property
    def fits(self) -> bool:
        return self.shared <= SMEM_LIMIT[self.arch]

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


_MMA = re.compile(r"\b(wgmma\.mma_async\.sync|mma\.sync)\.aligned\.m\d+n\d+k\d+(?:\.row\.col)?\.f32\.(f16|bf16|tf32)")


def _tensor_core(ptx: str) -> str:
    """The tensor-core instructions of the PTX as ``kind.operand`` (``wgmma.f16``, ``mma.tf32``, joined by
    ``+``), ``fma`` when the kernel has only FMA-unit float math, ``-`` when it has neither."""
    found = sorted({f"{'wgmma' if op.startswith('wgmma') else 'mma'}.{ty}" for op, ty in _MMA.findall(ptx)})
    if found:
        return "+".join(found)
    return "fma" if re.search(r"\bfma\.rn\.f32", ptx) else "-"


def compile_spec(spec: Spec, arch: int) -> Compiled:
    """Compile ``spec`` for ``sm_<arch>`` (80 or 90); raises what Triton raises when it does not compile."""
    from triton import knobs

    if not isinstance(_JIT[spec.kind], triton.runtime.JITFunction):
        raise RuntimeError("compile_spec needs the compiler: this process runs Triton's interpreter "
                           "(TRITON_INTERPRET=1); use compile_all, whose workers run without it")
    target = GPUTarget("cuda", arch, 32)
    options = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    if spec.kind == "deep_thinking":
        options["enable_fp_fusion"] = False  # as the launcher compiles it
    start = time.perf_counter()
    log = io.StringIO()
    # ptxas' own report (registers, spills) is printed by Triton when asked; capture it
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(_source(spec), target=target, options=options)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = _PTXAS_LINE.search(text)
    spill = _SPILL_LINE.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"{spec} sm_{arch}: no ptxas report in the compile log:\n{text[-2000:]}")
    return Compiled(spec, arch, int(kernel.metadata.shared), int(regs.group(1)), int(spill.group(2)),
                    int(spill.group(3)), int(spill.group(1)), _tensor_core(kernel.asm["ptx"]), seconds)


@dataclasses.dataclass
class Failed:
    spec: Spec
    arch: int
    error: str


def _cost(spec: Spec) -> float:
    # a rough compile-time model: fp32 (tf32x3 triples the dots) and wide heads dominate
    tile = (spec.block_m or 16) * (spec.block_n or 16)
    return (3.0 if spec.dtype == torch.float32 else 1.0) * max(spec.head_dim, 64) * tile ** 0.5


def _compile_one(job):
    spec, arch = job
    try:
        return compile_spec(spec, arch)
    except Exception as exc:  # reported, not raised: one failure must not hide the others
        return Failed(spec, arch, f"{type(exc).__name__}: {exc}"[:2000])


def compile_all(spec_list, archs=(80, 90), *, workers: int | None = None, progress=None):
    """Compile every spec for every arch in ``workers`` processes (default: all cores); returns one
    :class:`Compiled` or :class:`Failed` per (spec, arch), in order. ``progress(done, total, result)`` is called
    as results arrive."""
    import concurrent.futures
    import multiprocessing
    import os
    import shutil
    import tempfile

    jobs = [(spec, arch) for spec in spec_list for arch in archs]
    # the slowest compiles first (fp32, wide heads, big tiles), so no worker is left with a long one at the end
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i][0]))
    workers = workers or min(len(os.sched_getaffinity(0)), 16)
    # Workers are fresh processes (spawn: no fork of torch's thread pools) with the compiler on, whatever this
    # process runs under (the test session sets TRITON_INTERPRET=1, under which @triton.jit makes no compilable
    # kernel), and an empty Triton cache: a cached kernel skips ptxas, whose report gives registers and spills.
    cache = tempfile.mkdtemp(prefix="fastattn-icl-compile-")
    child_env = {"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache,
                 "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    saved = {name: os.environ.get(name) for name in child_env}
    results = [None] * len(jobs)
    pool = None
    try:
        os.environ.update(child_env)
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        futures = {pool.submit(_compile_one, jobs[j]): j for j in order}
        for n, future in enumerate(concurrent.futures.as_completed(futures)):
            j = futures[future]
            try:
                results[j] = future.result()
            except concurrent.futures.BrokenExecutor as exc:  # a worker died (a crash inside LLVM)
                results[j] = Failed(*jobs[j], f"the compile process died: {exc}")
            if progress:
                progress(n + 1, len(jobs), results[j])
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: drop what has not started
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(cache, ignore_errors=True)
    return results


def _representative(kind: str, *, alone: bool = True) -> list[tuple]:
    # the flag sets whose code differs most: no flag, each flag alone (``alone``), and every maximal set (not
    # contained in another); together they compile every flag's code and every combination's peak register pressure
    sets = flag_sets(kind)
    if kind == "scan":  # GROUP is an integer: every set
        return sets
    on = {fs: {name for name, value in fs if value is True} for fs in sets}
    few = [fs for fs in sets if len(on[fs]) <= (1 if alone else 0)]
    maximal = [fs for fs in sets if not any(on[fs] < on[other] for other in sets)]
    return sorted(set(few) | set(maximal), key=sets.index)


def ci_specs() -> list[Spec]:
    """What CI compiles on every change (``tests/compile``): the first (preferred) config of every kernel for its
    representative flag sets at fp16 d 64/128/256 and bf16 d 128, and for no flag and the maximal flag sets at fp32
    d 64/256; and every autotune config of the four tuned kernels with no flag on at fp16 d 64/128 and fp32 d 128
    (the hot paths, and the prune's inputs)."""
    chosen = []
    for kind in KINDS:
        for dtypes, dims, alone in (((torch.float16,), HEAD_DIMS, True), ((torch.bfloat16,), (128,), True),
                                    ((torch.float32,), (64, 256), False)):
            reps = set(_representative(kind, alone=alone))  # fp32 (slow to compile): no flag and the maximal sets
            keep = lambda k, flags, reps=reps: tuple(sorted(flags.items())) in reps  # noqa: E731
            chosen += specs((kind,), dtypes, dims, first_config_only=True, flags_filter=keep)
        if kind in tuning.TUNED_KINDS or kind == "preprocess":
            # head dims that pad (80 -> BLOCK_D 128: the masked loads) or use the smallest blocks (32), and MHA
            # (N_REP == 1, a constant to the JIT): no flag and the maximal flag sets, fp16, first config
            ends = set(_representative(kind, alone=False))
            keep = lambda k, flags, ends=ends: tuple(sorted(flags.items())) in ends  # noqa: E731
            chosen += specs((kind,), (torch.float16,), (32, 80), first_config_only=True, flags_filter=keep)
            if kind != "preprocess":
                chosen += [dataclasses.replace(s, mha=True) for s in specs((kind,), (torch.float16,), (64, 128),
                                                                           first_config_only=True, flags_filter=keep)]
        if kind in tuning.TUNED_KINDS:
            base = lambda k, flags: not any(v is True for v in flags.values())  # noqa: E731
            for dtype, dims in ((torch.float16, (64, 128)), (torch.float32, (128,))):
                chosen += [s for s in specs((kind,), (dtype,), dims, flags_filter=base) if s.position > 0]
    return list(dict.fromkeys(chosen))


def report_specs() -> list[Spec]:
    """The compile report's scope: every autotune config x fp16/bf16/fp32 x head dims 64/128/256 of every kernel's
    representative flag sets (each flag alone, every maximal combination), and every flag set of the fixed-config
    kernels."""
    chosen = []
    for kind in KINDS:
        reps = set(_representative(kind)) if kind in tuning.TUNED_KINDS else set(flag_sets(kind))
        chosen += specs((kind,), flags_filter=lambda k, flags, reps=reps: tuple(sorted(flags.items())) in reps)
    return chosen
