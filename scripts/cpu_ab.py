"""Two checkouts of fastattn_icl side by side on CPU, where one benchmark run is too noisy to tell them apart.

`benchmarks.run --bench cpu` times each row once, one row after another; on a shared 2-core machine the load drifts
between rows by 10-40 %, which is larger than the fixed costs a change at T = 256 moves. This script alternates
processes of the two checkouts (``--rounds`` each, interleaved) and, inside each process, interleaves the calls of the
issue-15 rows at T = 256 (the CPU-targets benchmark's shapes: attention B 2, H 8/2, d 64, the last row left-padded by
32, against SDPA; anchors and isolation B 1, H 8, d 64, 16 label words, against base attention) and one saliency
layer at T = 1024 (H 4, d 64). It prints each ratio's median over the processes, with its range.

    python scripts/cpu_ab.py BEFORE_DIR AFTER_DIR [--threads 1] [--rounds 3] [--reps 15]

Each directory is a checkout with its extension built in place (``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RATIOS = {  # name: (numerator, denominator); "x" rows are speed-ups (higher is better), "/ base" rows costs
    "attention fwd, x SDPA": ("sdpa_fwd", "attn_fwd"), "attention fwd+bwd, x SDPA": ("sdpa_fb", "attn_fb"),
    "anchors-from fwd / base": ("from_fwd", "base_fwd"), "anchors-from fwd+bwd / base": ("from_fb", "base_fb"),
    "anchors-last fwd / base": ("last_fwd", "base_fwd"), "anchors-last fwd+bwd / base": ("last_fb", "base_fb"),
    "isolation fwd / base": ("iso_fwd", "base_fwd"), "isolation fwd+bwd / base": ("iso_fb", "base_fb"),
}


def worker(threads: int, reps: int) -> dict:
    """Median milliseconds of every call, interleaved in one process."""
    import torch
    import torch.nn.functional as F

    import fastattn_icl

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 8, 2, 256, 64
    qa, ka, va, doa = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv, H))
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[-1, :32] = False
    mask = (torch.ones(T, T, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]).contiguous()
    q1, k1, v1, do1 = (torch.randn(1, H, T, D, generator=g) for _ in range(4))
    pos = torch.tensor([[(i + 1) * (T // 17) - 2 for i in range(16)]])
    cls, beta = torch.arange(16)[None] % 4, 0.5 * torch.randn(H, 4, generator=g)
    Ts = 1024
    qs, ks, vs, dos = (torch.randn(1, 4, Ts, D, generator=g) for _ in range(4))
    labels, target = torch.tensor([[(i + 1) * (Ts // 17) - 2 for i in range(16)]]), torch.tensor([Ts - 1])

    def fwd(f, *xs):
        def run():
            with torch.no_grad():
                f(*xs)
        return run

    def fwd_bwd(f, do, *xs):
        leaves = [x.clone().requires_grad_(True) for x in xs]

        def run():
            for x in leaves:
                x.grad = None
            f(*leaves).backward(do)
        return run

    def saliency():
        leaves = [x.clone().requires_grad_(True) for x in (qs, ks, vs)]
        fastattn_icl.attention(*leaves, causal=True, saliency=fastattn_icl.Saliency(labels, target)).backward(dos)

    ops = {
        "attn": (lambda q, k, v: fastattn_icl.attention(q, k, v, causal=True, key_padding_mask=keep), doa, qa, ka, va),
        "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), doa, qa,
                 ka, va),
        "base": (lambda q, k, v: fastattn_icl.attention(q, k, v, causal=True), do1, q1, k1, v1),
        "from": (lambda q, k, v, b: fastattn_icl.anchor_reweight_attention(q, k, v, b, pos, cls,
                                                                           reweight_from=int(pos[0, 0])),
                 do1, q1, k1, v1, beta),
        "last": (lambda q, k, v, b: fastattn_icl.anchor_reweight_attention(q, k, v, b, pos, cls), do1, q1, k1, v1,
                 beta),
        "iso": (lambda q, k, v: fastattn_icl.attention(q, k, v, causal=True, isolation_rows=pos), do1, q1, k1, v1),
    }
    calls = {}
    for name, (f, do, *xs) in ops.items():
        calls[f"{name}_fwd"], calls[f"{name}_fb"] = fwd(f, *xs), fwd_bwd(f, do, *xs)
    calls["saliency_T1024"] = saliency
    for call in calls.values():
        call(), call()
    times: dict = {name: [] for name in calls}
    for r in range(reps):
        for name, call in calls.items():
            if name == "saliency_T1024" and r % 4:  # 20x the others: a quarter of the rounds
                continue
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.threads, args.reps)))
        return
    runs: dict = {"before": [], "after": []}
    for _ in range(args.rounds):
        for key in runs:
            path = os.path.abspath(getattr(args, key))
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), path, path, "--worker", "--threads", str(args.threads),
                 "--reps", str(args.reps)], cwd=path, env=dict(os.environ, PYTHONPATH=path), capture_output=True,
                text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"cpu_ab: the {key} checkout failed:\n{done.stderr[-3000:]}")
            runs[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.threads} thread(s), {args.rounds} alternating processes per checkout: median [min-max]")
    for name, (num, den) in RATIOS.items():
        cells = [f"{key} {statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]"
                 for key, r in ((k, [d[num] / d[den] for d in v]) for k, v in runs.items())]
        print(f"{name:30s} " + "  ".join(cells))
    for name in ("saliency_T1024", "base_fwd", "base_fb"):
        print(f"{name + ' ms':30s} " + "  ".join(f"{k} {statistics.median(d[name] for d in v):.3f}"
                                                  for k, v in runs.items()))


if __name__ == "__main__":
    main()
