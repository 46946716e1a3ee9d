"""The compiled CPU attention (csrc/cpu_flash.cpp) against PyTorch's CPU flash kernel, call for call.

Both take the same mask-free problem (causal unless stated); the calls of the two alternate inside one process, so the
machine's drift falls on both alike. Prints a markdown table of median milliseconds and the speed-up per shape, for the
forward and the backward, at the thread count given.

    python scripts/cpu_flash_ab.py [--threads 1] [--reps 15] > benchmarks/results/cpu-flash-ab-1t.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [  # B, H, Hkv, Tq, Tk, D, causal, what
    (1, 8, 8, 256, 256, 64, True, "the CPU-targets anchors shape"),
    (2, 8, 2, 256, 256, 64, True, "GQA 8/2, B 2"),
    (1, 9, 3, 512, 512, 64, True, "SmolLM2-135M's heads, its e2e prompt"),
    (1, 8, 8, 1024, 1024, 64, True, ""),
    (1, 8, 8, 4096, 4096, 64, True, ""),
    (1, 16, 16, 512, 512, 256, True, "GPT-J's head dim"),
    (1, 32, 32, 512, 512, 128, True, "Llama-7B's heads"),
    (1, 8, 8, 64, 1024, 64, True, "a chunk of 64 rows over a cache"),
    (4, 8, 8, 1, 1024, 64, True, "a decode step, B 4"),
    (1, 8, 8, 256, 256, 64, False, "not causal"),
]


def time_shape(B, H, Hkv, Tq, Tk, D, causal, reps) -> dict:
    """Median ms of each of the four calls on one problem, interleaved."""
    aten_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    aten_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    ours_fwd, ours_bwd = torch.ops.fastattn_icl.flash_attention_fwd, torch.ops.fastattn_icl.flash_attention_bwd
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    scale = D**-0.5
    # PyTorch's kernel is top-left causal, bottom-right only on a square: a chunk over a cache is timed there without
    # a mask, Tq² / 2 more scores than ours computes (3 % at Tq 64, Tk 1024)
    top_left = causal and Tq == Tk
    o, lse = aten_fwd(q, k, v, 0.0, top_left, scale=scale)[:2]
    do = torch.randn_like(o)
    calls = {
        "aten_fwd": lambda: aten_fwd(q, k, v, 0.0, top_left, scale=scale),
        "ours_fwd": lambda: ours_fwd(q, k, v, causal, scale),
        "aten_bwd": lambda: aten_bwd(do, q, k, v, o, lse, 0.0, top_left, scale=scale),
        "ours_bwd": lambda: ours_bwd(do, q, k, v, o, lse, causal, scale),
    }
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(reps):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fastattn_icl.ops import _cpu_kernels

    if not _cpu_kernels.available():
        raise SystemExit("fastattn_icl._C is not built with the CPU kernels (pip install --no-build-isolation -e .)")
    from benchmarks.harness import environment

    h = environment(torch.device("cpu"))
    dirty = " (dirty)" if h["git_dirty"] else ""
    print(f"# PyTorch's CPU flash kernel against csrc/cpu_flash.cpp, {args.threads} thread(s)\n\n{h['device']}, torch "
          f"{h['torch']}, commit {h['git_commit']}{dirty}, {h['date']}; `python scripts/cpu_flash_ab.py --threads "
          f"{args.threads} --reps {args.reps}`: median of {args.reps} interleaved calls per kernel\n")
    print("| shape | fwd: PyTorch ms | fwd: ours ms | fwd speed-up | bwd: PyTorch ms | bwd: ours ms | bwd speed-up |")
    print("|---|---|---|---|---|---|---|")
    for B, H, Hkv, Tq, Tk, D, causal, what in SHAPES:
        med = time_shape(B, H, Hkv, Tq, Tk, D, causal, args.reps)
        label = f"B{B} H{H}/{Hkv} Tq{Tq} Tk{Tk} d{D} {'causal' if causal else 'full'}" + (f" ({what})" if what else "")
        print(f"| {label} | {med['aten_fwd']:.3g} | {med['ours_fwd']:.3g} | {med['aten_fwd'] / med['ours_fwd']:.2f}x "
              f"| {med['aten_bwd']:.3g} | {med['ours_bwd']:.3g} | {med['aten_bwd'] / med['ours_bwd']:.2f}x |")


if __name__ == "__main__":
    main()
