"""Run the benchmarks: ``python -m benchmarks.run [--bench NAME] [--set SET] ...`` (``make bench``: all of them).

benchmarks/README.md: the sets, providers, gates, targets and results files of every benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks import (
    bench_anchors,
    bench_attention,
    bench_compression,
    bench_cpu,
    bench_gather,
    bench_momentum,
    bench_retuning,
    bench_reweighting_epoch,
    bench_saliency,
)
from benchmarks.harness import RESULTS_DIR, run, write_results
from benchmarks.shapes import MODES, SET_NAMES

# --bench name -> its declarations, in the order of --bench all
BENCHMARKS = {
    "attention": [bench_attention.BENCH],
    "anchors": bench_anchors.BENCHES,
    "epoch": [bench_reweighting_epoch.BENCH],
    "saliency": [bench_saliency.BENCH],
    "gather": [bench_gather.BENCH],
    "compression": [bench_compression.BENCH],
    "momentum": bench_momentum.BENCHES,
    "cpu": [bench_cpu.BENCH],
    "retuning": [bench_retuning.BENCH],
}
BENCHES = ("all", *BENCHMARKS)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="all", choices=BENCHES, help="which benchmark (default: all of them)")
    ap.add_argument("--set", default="default", choices=SET_NAMES)
    ap.add_argument("--modes", nargs="+", default=None, choices=MODES,
                    help="modes of the benchmarks timed in them (attention: all three; anchors, momentum: fwd fwd+bwd)")
    ap.add_argument("--providers", nargs="+", default=None, help="a subset of the benchmarks' providers (README)")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size of the papers, anchors and saliency sets and of the gather set's B = 1 cases "
                    "(default 1); the compression set's only batch size (default 1, 16, 64 on a GPU, 1, 8 on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on a CPU run: steady under other load; torch's choice on CUDA; "
                    "--bench cpu: 1 and then all cores)")
    ap.add_argument("--retuning-model", default=None,
                    help=f"the trained Re-Tuning model folder of --bench retuning (default "
                    f"{bench_retuning.DEFAULT_MODEL}; sets ${bench_retuning.MODEL_ENV})")
    ap.add_argument("--rep-ms", type=float, default=None, help="timed milliseconds per row (replaces each default)")
    return ap.parse_args(argv)


def thread_counts(bench, args, device: torch.device, all_cores: int) -> list[int | None]:
    """The torch thread counts ``bench`` runs at: ``--threads``; else 1 on CPU (and all cores too for a
    ``per_thread_count`` benchmark on a machine with more than one); torch's choice on CUDA."""
    if args.threads is not None:
        return [args.threads]
    if device.type != "cpu":
        return [None]
    return [1, all_cores] if bench.per_thread_count and all_cores > 1 else [1]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.retuning_model:
        os.environ[bench_retuning.MODEL_ENV] = args.retuning_model
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    all_cores = torch.get_num_threads()  # torch's default: the cores it may use
    names = list(BENCHMARKS) if args.bench == "all" else [args.bench]
    known = {p.name for benches in BENCHMARKS.values() for b in benches for p in b.providers}
    if args.providers and set(args.providers) - known:
        raise SystemExit(f"unknown providers {sorted(set(args.providers) - known)}; choose from {sorted(known)}")
    for bench in (b for name in names for b in BENCHMARKS[name]):
        cases = bench.cases(args.set, device.type == "cuda", args.batch)
        providers = [p for p in bench.providers if not args.providers or p.name in args.providers]
        if not cases or not providers:
            why = f"set {args.set!r} has no {bench.name} cases" if not cases else "none of --providers is its own"
            print(f"benchmarks: {bench.name}: {why}, skipped")
            continue
        modes = list(args.modes or bench.modes) if set(bench.modes) <= set(MODES) else list(bench.modes)
        timing = bench.timing
        if args.rep_ms is not None:
            timing = type(timing)(**{**vars(timing), "cuda_rep_ms": args.rep_ms, "cpu_rep_ms": args.rep_ms})
        for threads in thread_counts(bench, args, device, all_cores):
            if threads is not None:
                torch.set_num_threads(threads)
            print(f"benchmarks: {bench.name} on {device}, set {args.set!r} ({len(cases)} cases), modes {modes}, "
                  f"providers {[p.name for p in providers]}, {torch.get_num_threads()} torch thread(s)")
            results = run(bench, cases, providers, modes, device, timing=timing, set_name=args.set)
            for note in results["skipped"]:
                print(f"  note: {note}")
            for t in results["targets"]:
                if t["result"] == "not evaluated":
                    why = "no CUDA" if t["on"] == "cuda" else "a CPU target"
                    print(f"TARGET not evaluated: {why} -- {t['target']}")
                else:
                    print(f"TARGET {t['result']:<4} {t['target']}: {t['detail']}")
            tail = f"-{torch.get_num_threads()}t" if bench.per_thread_count and device.type == "cpu" else ""
            json_path, md_path = write_results(results, args.out, bench, tail)
            print(f"done in {results['runtime_s']} s; wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
