"""Run the benchmark suite: ``python -m benchmarks.run`` (what ``make bench`` calls).

    python -m benchmarks.run [--set default|acceptance|papers|cpu|all] [--modes fwd bwd fwd+bwd]
                             [--providers fastattn_icl eager sdpa] [--batch N] [--threads N]
                             [--rep-ms MS] [--device cuda|cpu] [--out benchmarks/results]

``default`` is the acceptance set plus the papers' model shapes on a GPU, the small CPU set otherwise.
A CPU run uses one torch thread unless ``--threads`` says otherwise: with two or more, another
process on a small machine stalls every parallel region and times jump by 10-100x, while one thread
keeps the ratios between providers steady.

Writes ``<out>/<device-slug>.json`` and ``.md`` and prints one line per measured row, then the targets
(on a GPU) and where the results went.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import bench_attention
from benchmarks.harness import RESULTS_DIR, TimingConfig, run_suite, write_results
from benchmarks.shapes import MODES, get_set


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="default", choices=("default", "acceptance", "papers", "cpu", "all", "tiny"))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--providers", nargs="+", default=None, help="subset of fastattn_icl, eager, sdpa")
    ap.add_argument("--batch", type=int, default=None, help="batch size of the papers set (default 1)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder (default benchmarks/results)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on a CPU run: steady under other load; torch's choice on CUDA)",
    )
    ap.add_argument("--rep-ms", type=float, default=None, help="timed milliseconds per row (CUDA 100, CPU 200)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    cases = get_set(args.set, cuda=device.type == "cuda", batch=args.batch)
    providers = bench_attention.providers()
    if args.providers:
        unknown = set(args.providers) - {p.name for p in providers}
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {[p.name for p in providers]}")
        providers = [p for p in providers if p.name in args.providers]
    timing = TimingConfig()
    if args.rep_ms is not None:
        timing.cuda_rep_ms = timing.cpu_rep_ms = args.rep_ms
    suite = bench_attention.suite(device)
    print(f"benchmarks: attention on {device}, set {args.set!r} ({len(cases)} shapes), modes {args.modes}")
    for note in suite.notes:
        print(f"  note: {note}")
    results = run_suite(suite, cases, providers, args.modes, device, timing=timing, set_name=args.set)
    for t in results["targets"]:
        print(f"TARGET {t['result']:<4} {t['target']}: {t['detail']}")
    json_path, md_path = write_results(results, args.out)
    print(f"done in {results['runtime_s']} s; wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
