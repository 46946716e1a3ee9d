"""Which attention kernels are compiled and how they are tuned: the flag sets, block configs and launch.

``FLAG_SETS`` lists every flag combination a launcher may produce per kernel: :func:`launch` refuses any other, and
the compile suite (``tests/compile``, ``triton_kernels/specializations.py``) compiles exactly these. ``CANDIDATES``
lists the block configs per kernel, padded head dim and input width, in the order the autotuner tries them; they
were chosen from the compile report so they do not spill on sm_80 and sm_90 (triton 3.6 and 3.9): change them only
with a new report. On CUDA the autotuner first drops the configs whose shared memory (:func:`smem_bytes`) exceeds
the device's, then times the rest once per key; under the interpreter one fixed config runs.
"""

from __future__ import annotations

import itertools

import torch
import triton

from .primitives import block_d

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, padded head dim and input width (2-byte fp16/bf16, 4-byte
# fp32), from the compile report (benchmarks/results/compile-sm80.md, -sm90.md): the configs that compile without
# spilling on sm_80 and sm_90 come first. The autotuner times them once per key (head dim, flags, power-of-two
# length buckets).
CANDIDATES = {
    "fwd": {
        (32, False): [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
        (64, False): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2)],
        (128, False): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
        (256, False): [(64, 64, 8, 2), (64, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 2), (32, 64, 8, 2)],
        (64, True): [(32, 32, 8, 2), (16, 64, 8, 2), (32, 32, 8, 1), (16, 64, 8, 1), (16, 128, 8, 1)],
        (128, True): [(32, 32, 8, 2), (16, 64, 8, 2), (32, 32, 8, 1), (16, 64, 8, 1), (16, 128, 8, 1)],
        (256, True): [(32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 2)],
    },
    "dkdv": {
        (32, False): [(32, 32, 8, 1), (16, 64, 4, 1), (32, 64, 4, 2), (64, 32, 8, 2)],
        (64, False): [(16, 64, 4, 1), (64, 16, 4, 1), (64, 32, 8, 2), (32, 128, 8, 2), (32, 128, 8, 1),
                      (128, 32, 8, 2)],
        (128, False): [(64, 32, 8, 1), (32, 32, 8, 1), (16, 128, 8, 1), (64, 32, 8, 2), (32, 32, 4, 2)],
        (256, False): [(16, 32, 4, 2), (16, 32, 4, 1), (32, 32, 4, 3), (32, 64, 8, 2), (32, 64, 8, 1)],
        (64, True): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 32, 8, 1), (32, 16, 4, 2)],
        (128, True): [(16, 32, 8, 1), (32, 32, 8, 1), (32, 32, 8, 2), (64, 32, 8, 2)],
        (256, True): [(16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 4, 2)],
    },
    "dq": {
        (64, False): [(128, 32, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)],
        (128, False): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (32, 32, 4, 2), (64, 32, 4, 3),
                       (128, 64, 8, 2)],
        (256, False): [(64, 32, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2), (32, 32, 8, 2), (16, 128, 8, 1), (64, 64, 8, 2)],
        (64, True): [(16, 64, 8, 2), (16, 64, 8, 1), (16, 32, 4, 2), (16, 32, 8, 1), (32, 32, 8, 1)],
        (128, True): [(16, 64, 8, 2), (16, 64, 8, 1), (16, 32, 4, 2), (16, 32, 8, 1), (32, 32, 8, 1)],
        (256, True): [(16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 4, 2)],
    },
    "saliency": {
        (64, False): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
        (128, False): [(32, 128, 8, 2), (32, 64, 8, 2), (32, 128, 8, 1), (32, 32, 8, 2), (64, 64, 8, 2)],
        (256, False): [(32, 32, 8, 2), (32, 64, 8, 1), (32, 64, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
        (64, True): [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 1)],
        (128, True): [(16, 64, 8, 1), (16, 32, 8, 1), (32, 32, 8, 1)],
        (256, True): [(16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 4, 2)],
    },
}
_INTERPRETER_BLOCKS = (32, 32)  # off CUDA: mid-size tiles exercise the multi-block paths at small T
PREPROCESS_BLOCK_M = 64  # rows per program of D = rowsum(dO ∘ O) (a memory-bound pass, not tuned)
_TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_PADDING", "DOT_PRECISION", "TQ_BUCKET", "TK_BUCKET"]
# per kind: extra autotune keys, and outputs to zero before every timed run and the final one: the partial sums
# (a config with smaller row blocks writes slots the chosen config never touches; per-head sums accumulate)
_TUNE_EXTRA = {"fwd": (["HAS_PREFIX"], None), "saliency": (["PER_HEAD", "STORE_ROWS"], ["SUMS", "HEAD_SUMS"])}
_tuned = {}  # (kind, BLOCK_D, input width) -> the autotuned kernel


def _flag_product(names, *fixed_sets):
    """Every value combination of boolean ``names``, each joined with every dict of ``fixed_sets``."""
    out = set()
    for values in itertools.product((False, True), repeat=len(names)):
        for fixed in fixed_sets or ({},):
            out.add(tuple(sorted({**dict(zip(names, values)), **fixed}.items())))
    return frozenset(out)


_METHODS = ({"HAS_ANCHORS": False, "HAS_ISOLATION": False}, {"HAS_ANCHORS": True, "HAS_ISOLATION": False},
            {"HAS_ANCHORS": False, "HAS_ISOLATION": True}, {"HAS_ANCHORS": True, "HAS_ISOLATION": True})
_NO_METHOD = dict(HAS_ANCHORS=False, HAS_ISOLATION=False)
_FWD_EXTRAS = dict(HAS_PREFIX=False, HAS_MOMENTUM=False, STORE_ATTN=False)
# Every flag combination the launchers can produce, per kernel (see the module docstring). The forward's prefix and
# momentum epilogue run without method features (the launchers pass none with them); STORE_ATTN needs momentum.
FLAG_SETS = {
    "fwd": _flag_product(("IS_CAUSAL", "HAS_PADDING"), *({**m, **_FWD_EXTRAS} for m in _METHODS),
                         {**_NO_METHOD, **_FWD_EXTRAS, "HAS_PREFIX": True},
                         {**_NO_METHOD, **_FWD_EXTRAS, "HAS_MOMENTUM": True},
                         {**_NO_METHOD, **_FWD_EXTRAS, "HAS_MOMENTUM": True, "STORE_ATTN": True}),
    "dkdv": _flag_product(("IS_CAUSAL", "HAS_PADDING"), *_METHODS),
    "dq": _flag_product(("IS_CAUSAL", "HAS_PADDING"), *_METHODS),
    "saliency": _flag_product(("IS_CAUSAL", "HAS_PADDING", "PER_HEAD", "STORE_ROWS"), *_METHODS),
    "preprocess": frozenset({()}),
}
TUNED_KINDS = ("fwd", "dkdv", "dq", "saliency")
_FLAG_NAMES = {kind: tuple(name for name, _ in next(iter(sets))) for kind, sets in FLAG_SETS.items()}


def check_flags(kind: str, meta: dict) -> None:
    """Refuse a launch of kernel ``kind`` whose flags (in ``meta``) are not one of its :data:`FLAG_SETS`."""
    flags = tuple(sorted((name, bool(meta[name])) for name in _FLAG_NAMES[kind]))
    if flags not in FLAG_SETS[kind]:
        raise NotImplementedError(f"{kind} kernel: the flag set {dict(flags)} is not in FLAG_SETS (add it there, so "
                                  "the compile suite builds it, before a launcher uses it)")


def candidates(kind: str, block_d: int, elem_size: int):
    """The ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` list of kernel ``kind`` for a padded head dim and input
    width, in the order the autotuner tries it."""
    # head dims up to 32 have their own list where the d-64 one spills at BLOCK_D 32; otherwise they use it
    per_width = CANDIDATES[kind]
    d = min(max(block_d, 32), 256)
    return per_width.get((d, elem_size >= 4)) or per_width[(max(d, 64), elem_size >= 4)]


# Tile rows a config keeps in shared memory, per kind: (rows loaded once per program, rows loaded per loop step),
# each row BLOCK_D elements. fwd: q | k, v; dq: q, dO | k, v; dk/dv: k, v | q, dO; saliency: nothing | q, dO, k, v
# (all re-read per head).
_SMEM_ROWS = {
    "fwd": lambda bm, bn: (bm, 2 * bn),
    "dq": lambda bm, bn: (2 * bm, 2 * bn),
    "dkdv": lambda bm, bn: (2 * bn, 2 * bm),
    "saliency": lambda bm, bn: (0, 2 * bm + 2 * bn),
}


# A 1-stage config (no software pipelining) stages its dot operands and layout conversions through shared memory:
# per kind, the fraction of the per-step tiles and the rows per (block_m + block_n) it was measured to need at most
# (compile report, sm_80 and sm_90, triton 3.6 and 3.9).
_ONE_STAGE = {"fwd": (1.0, 0.5), "dq": (1.0, 0.5), "dkdv": (1.0, 1.0), "saliency": (0.75, 0.0)}


def smem_bytes(kind: str, block_m: int, block_n: int, block_d: int, num_stages: int, elem_size: int) -> int:
    """An upper bound of the shared memory one program of config ``(block_m, block_n, num_stages)`` uses, in
    tile rows of ``block_d`` elements: the stationary tiles plus ``num_stages`` copies of the per-step tiles (what
    Hopper's warpgroup-MMA path allocates; Ampere's needs one copy less), dk/dv one more ``block_m`` rows, plus the
    per-row statistics of each stage; 1-stage configs per :data:`_ONE_STAGE`. The compile suite checks on every
    change that it bounds the compiled value of every specialization on sm_80 and sm_90 and is not loose (at most
    2x + 16 KiB for pipelined configs); the autotuner prunes with it."""
    once, per_step = _SMEM_ROWS[kind](block_m, block_n)
    if num_stages == 1:
        share, extra = _ONE_STAGE[kind]
        rows = once + share * per_step + extra * (block_m + block_n)
    else:
        rows = once + num_stages * per_step + (block_m if kind == "dkdv" else 0)
    return int(elem_size * block_d * rows) + 8 * block_m * num_stages


class SharedMemoryError(RuntimeError):
    """No autotune config of a kernel fits the device's shared memory per block."""


def device_smem_limit(device: torch.device) -> int:
    """Shared memory a block may opt in to on ``device`` (cudaDevAttrMaxSharedMemoryPerBlockOptin)."""
    return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)


def prune_configs(kind: str, block_d: int, elem_size: int, configs, limit: int):
    """The configs of ``kind`` whose :func:`smem_bytes` fit ``limit`` bytes, in order; raises
    :class:`SharedMemoryError` (kernel, needed and available bytes) when none does."""
    need = {c: smem_bytes(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, c.num_stages, elem_size)
            for c in configs}
    kept = [c for c in configs if need[c] <= limit]
    if not kept:
        raise SharedMemoryError(
            f"{kind} attention kernel (head dim block {block_d}, {elem_size}-byte inputs): its smallest config needs "
            f"{min(need.values()):,} B of shared memory per block, the device has {limit:,} B")
    return kept


def _device_pruner(kind: str, block_d: int, elem_size: int):
    def early_config_prune(configs, named_args, **kwargs):
        return prune_configs(kind, block_d, elem_size, configs, device_smem_limit(named_args["Q"].device))

    return early_config_prune


def _kernel(kind: str, jit_fn, q: torch.Tensor):
    """The kernel to launch for ``jit_fn`` (the kernel of ``kind``) and whether its block sizes come from the
    autotuner."""
    if q.device.type != "cuda":
        return jit_fn, False
    key = (kind, block_d(q.shape[-1]), q.element_size())
    if key not in _tuned:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in candidates(kind, key[1], key[2])
        ]
        extra_key, reset = _TUNE_EXTRA.get(kind, ([], None))
        _tuned[key] = triton.autotune(configs=configs, key=_TUNE_KEY + extra_key, reset_to_zero=reset,
                                      prune_configs_by={"early_config_prune": _device_pruner(kind, *key[1:])})(jit_fn)
    return _tuned[key], True


def bucket(n: int) -> int:
    """A sequence length's autotune key: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def launch(kind: str, jit_fn, q: torch.Tensor, grid_dim, *args, **meta):
    """Launch ``jit_fn``, the kernel of ``kind`` (``"fwd"``, ``"dkdv"``, ``"dq"``, ``"saliency"``), autotuned on CUDA;
    ``grid_dim(BLOCK_M, BLOCK_N)`` gives the grid for a block config."""
    check_flags(kind, meta)
    kernel, tuned = _kernel(kind, jit_fn, q)
    if tuned:
        kernel[lambda m: grid_dim(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)
    else:
        bm, bn = _INTERPRETER_BLOCKS
        kernel[grid_dim(bm, bn)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
