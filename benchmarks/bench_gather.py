"""KV-cache gather: ``gather_kv`` vs per-layer ``index_select`` loops; benchmarks/README.md."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from benchmarks import harness as h
from benchmarks.shapes import GATHER_CPU_LAYERS, gather_cases

OURS, UNCHECKED = "gather_kv", "gather_kv_unchecked"
LOOP, LOOP_NOSTACK = "index_select_loop", "index_select_loop_nostack"
TARGET_RATIO = 1.0  # gather_kv median <= index_select_loop median, every case


@dataclass
class CacheInputs:
    """``keys``, ``values``: ``L`` contiguous ``[B, Hkv, T, D]`` tensors each; ``index`` int64 ``[M]``; ``ref``:
    the oracle's ``(K, V)``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    index: torch.Tensor
    ref: tuple[torch.Tensor, torch.Tensor] | None = None


def make_inputs(case, group) -> CacheInputs:
    from fastattn_icl.reference.compression import gather_kv_reference

    gen = torch.Generator(device=group.device).manual_seed(zlib.crc32(case.name.encode()))
    shape = (case.B, case.Hkv, case.T, case.D)
    keys, values = ([torch.randn(shape, generator=gen, device=group.device, dtype=case.torch_dtype)
                     for _ in range(case.layers)] for _ in range(2))
    inp = CacheInputs(keys, values, torch.tensor(case.positions(), dtype=torch.long, device=group.device))
    inp.ref = gather_kv_reference(inp.keys, inp.values, inp.index.expand(case.B, -1))
    return inp


def gather(case, inp: CacheInputs, check_index: bool = True):
    from fastattn_icl.ops.gather import gather_kv

    return gather_kv(inp.keys, inp.values, inp.index, check_index=check_index)


def index_select_loop(case, inp: CacheInputs, stack: bool = True):
    k, v = ([x.index_select(2, inp.index) for x in xs] for xs in (inp.keys, inp.values))
    return (torch.stack(k), torch.stack(v)) if stack else (k, v)


def check_exact(got, ref) -> dict:
    """A bit-exact check of ``(K, V)`` (lists stacked) against the oracle's; ``errors`` hold the largest |diff|."""
    errors, failures = {}, []
    for name, x, r in zip(("K", "V"), got, ref):
        x = torch.stack(list(x)) if isinstance(x, (list, tuple)) else x
        if x.shape != r.shape or x.dtype != r.dtype:
            failures.append(f"{name}: {tuple(x.shape)} {x.dtype}, oracle {tuple(r.shape)} {r.dtype}")
            errors[name] = {"error": float("inf"), "tolerance": 0.0}
            continue
        equal = torch.equal(x.view(h.BITS[x.element_size()]), r.view(h.BITS[x.element_size()]))
        err = 0.0 if equal or x.numel() == 0 else float((x.double() - r.double()).abs().max())
        failures.append(None if equal else f"{name}: not bit-exact, max |diff| {err:.3g}")
        errors[name] = {"error": err, "tolerance": 0.0}
    return h.make_check(errors, failures, "whole output, bit-exact vs gather_kv_reference")


def gate(case, inp, group, providers, mode) -> dict:
    out = {}
    for p in providers:
        try:
            with torch.no_grad():
                out[p.name] = check_exact(p.fn(case, inp), inp.ref)
        except Exception as exc:  # the traceback (and the tensors its frames hold) is dropped here
            out[p.name] = h.failure(exc)
    return out


def needs_extension(case, group) -> str | None:
    from fastattn_icl import _ext

    try:
        _ext.require("gather_kv", group.device)
    except RuntimeError as exc:
        return str(exc)
    return None


def targets(rows: list[dict]) -> list[dict]:
    """``gather_kv`` >= ``index_select_loop`` on every case."""
    measured, others, verdicts = [], [], []
    for ours in (r for r in rows if r["provider"] == OURS):
        ok, ratio, text = h.ratio_verdict(ours, h.find(rows, ours["case"], LOOP), lambda x: x >= TARGET_RATIO)
        verdicts.append(ok)
        if ratio is None:
            others.append(f"{ours['case']}: {text}")
        else:
            measured.append((ratio, ours["case"]))
    parts = []
    if measured:
        below = [f"{c} {x:.2f}x" for x, c in measured if x < TARGET_RATIO]
        worst, best = min(measured), max(measured)
        parts.append(f"{len(measured) - len(below)}/{len(measured)} compared cases at >= {TARGET_RATIO:.2f}x; "
                     f"worst {worst[0]:.2f}x ({worst[1]}), best {best[0]:.2f}x ({best[1]})")
        parts += ["below: " + ", ".join(below)] if below else []
    parts += ["not compared: " + ", ".join(others)] if others else []
    return [{"target": f"{OURS} at least as fast as {LOOP} on every case (median time)", "result": h.verdict(verdicts),
             "detail": "; ".join(parts) or "no cases"}]


def _kernel(device) -> str:
    return "one CUDA launch for all layers" if device.type == "cuda" else "its C++ CPU kernel, no CUDA"


BENCH = h.Benchmark(
    name="gather", suffix="-gather", modes=("gather",), cases=gather_cases, inputs=make_inputs, gate=gate,
    op="KV-cache gather: keep M positions of every layer's keys and values (anchor compression)",
    **h.memory_bound_op(),
    providers=[
        h.Provider(OURS, gather, lambda d: (
            f"fastattn_icl.ops.gather.gather_kv(keys, values, index) with its defaults ({_kernel(d)}); "
            "check_index=True: positions checked on the host first (one device-to-host sync on CUDA); "
            "returns K, V [L, B, Hkv, M, D]"), skip=needs_extension),
        h.Provider(UNCHECKED, lambda case, inp: gather(case, inp, check_index=False), lambda d: (
            f"gather_kv(keys, values, index, check_index=False) ({_kernel(d)}): no host check, no sync"),
            skip=needs_extension),
        h.Provider(LOOP, index_select_loop, lambda d: (
            "for each layer k.index_select(2, index), v.index_select(2, index) (2L ops), then torch.stack of "
            "each list: K, V [L, B, Hkv, M, D]")),
        h.Provider(LOOP_NOSTACK, lambda case, inp: index_select_loop(case, inp, stack=False), lambda d: (
            "the same loop without torch.stack: two lists of L tensors [B, Hkv, M, D] (2L ops)")),
    ],
    gate_text="every case and provider: its output (lists stacked outside the timed call) equals fastattn_icl."
    "reference.compression.gather_kv_reference's bit for bit (tolerance 0; error shown: largest |diff|)",
    call="one call = the provider's gather of all L layers' keys and values (outputs allocated in it, dropped after)",
    memory="the cache and the index are allocated before and not counted",
    flop_model="none (a copy; TFLOP/s not reported). Bytes moved = 4·L·B·Hkv·M·D·element size (K and V, each kept "
    "element read once and written once; index not counted), GB/s = bytes / median time",
    cpu_path="the gather_kv rows are the op's C++ CPU kernel (csrc/gather_kv.cpp)",
    cpu_note=f"CPU set: GPT2-XL's head geometry at {GATHER_CPU_LAYERS} of its 48 layers, so that every stacked output "
    "stays under glibc's 32 MiB mmap ceiling (benchmarks/README.md); CPU times are a smoke signal, not the GPU result",
    targets=targets,
)

