"""Run the benchmark suite: ``python -m benchmarks.run`` (what ``make bench`` calls).

    python -m benchmarks.run [--bench all|attention|anchors|epoch|saliency|gather|compression|momentum]
                             [--set default|acceptance|papers|anchors|saliency|cpu|all|tiny]
                             [--modes fwd bwd fwd+bwd]
                             [--providers fastattn_icl eager sdpa ...] [--batch N] [--threads N]
                             [--rep-ms MS] [--device cuda|cpu] [--out benchmarks/results]

``--bench all`` (the default) runs the base attention benchmark, then the anchor re-weighting and
isolation benchmark (``benchmarks/bench_anchors.py``), then one anchor re-weighting training epoch end to
end (``benchmarks/bench_reweighting_epoch.py``: ``default``/``all`` is its GPT2-XL-shaped set on a GPU,
its small CPU set otherwise; ``cpu`` and ``tiny`` name its CPU and smoke-test sets, the other sets have no
epoch cases; ``--modes``, ``--providers`` and ``--batch`` do not apply to it), then the information-flow
saliency of a whole stack (``benchmarks/bench_saliency.py``: ``default``/``all`` is its GPU set on a GPU, a
GPT2-XL-shaped stack and a Llama-7B-shaped layer at T = 256 ... 16k, its small CPU set otherwise;
``saliency`` names its GPU set, ``cpu`` and ``tiny`` its CPU and smoke-test sets, the other sets have no
saliency cases; ``--providers fastattn_icl eager_probe`` and ``--batch`` apply, ``--modes`` does not),
then the KV-cache gather of anchor compression (``benchmarks/bench_gather.py``: ``gather_kv``, one op for
all layers, vs a per-layer ``index_select`` loop with and without ``torch.stack``; ``default``/``all`` is
its GPU set on a GPU, GPT2-XL and GPT-J fp16 caches of SST-2, TREC, AGNews and EmoC demonstrations, its
small CPU set otherwise; ``cpu`` and ``tiny`` name its CPU and smoke-test sets, the other sets have no
gather cases; ``--providers gather_kv gather_kv_unchecked index_select_loop index_select_loop_nostack`` and
``--batch`` apply, ``--modes`` does not), then anchor compression end to end (``benchmarks/bench_compression.py``:
time per test input and peak memory of serving test inputs over the compressed demonstrations, ``compressed``
through the seam with one shared prefix, vs the full prompts with eager and sdpa attention and vs the expanded
Hugging Face cache; ``default``/``all`` is its GPU set on a GPU, fp16 GPT2-XL- and GPT-J-shaped random-weight
models on SST-2, TREC, AGNews and EmoC geometries at B = 1, 16, 64, its small CPU set otherwise; ``cpu`` and
``tiny`` name its CPU and smoke-test sets, the other sets have no compression cases; ``--providers compressed
full-eager full-sdpa compressed-expanded-sdpa compressed-expanded-eager`` applies, ``--batch`` replaces its
batch sizes, ``--modes`` does not), then momentum attention and the Deep-Thinking update
(``benchmarks/bench_momentum.py``, two parts in one results file: A, ``momentum_attention`` vs the same kernel
without momentum, its overhead, and vs eager, fwd and fwd+bwd, Llama-7B-like and GQA bf16 at T = 1k ... 16k with
B·T = 16k on a GPU; B, one Deep-Thinking step's state update over all layers, the fused op vs a per-tensor eager
loop, GPT2-XL- and Llama-7B-shaped fp16 states of SST-2 and AGNews demonstrations on a GPU; ``default``/``all``
are its GPU sets on a GPU, its small CPU sets otherwise; ``cpu`` and ``tiny`` name its CPU and smoke-test sets,
the other sets have no momentum cases; ``--providers fastattn_icl base eager fused eager_loop`` and ``--modes``
(part A, default fwd fwd+bwd) apply, ``--batch`` does not).
``default`` is the acceptance set plus the papers' model shapes on a GPU, the small CPU set otherwise
(for the anchors benchmark: its GPU set, T = 256 ... 16k, or its CPU set; ``anchors`` names its GPU
set, which the attention benchmark does not have, and ``acceptance``/``papers`` have no anchor cases).
A CPU run uses one torch thread unless ``--threads`` says otherwise: with two or more, another
process on a small machine stalls every parallel region and times jump by 10-100x, while one thread
keeps the ratios between providers steady.

Writes ``<out>/<device-slug>.json`` and ``.md`` (attention) and ``<out>/<device-slug>-anchors.json``/``.md``
and ``<out>/<device-slug>-isolation.json``/``.md`` (anchors benchmark), ``<out>/<device-slug>-epoch.json``/``.md``
(epoch benchmark), ``<out>/<device-slug>-saliency.json``/``.md`` (saliency benchmark),
``<out>/<device-slug>-gather.json``/``.md`` (gather benchmark), ``<out>/<device-slug>-compression.json``/``.md``
(compression benchmark), ``<out>/<device-slug>-momentum.json``/``.md`` (momentum benchmark, both parts), and
prints one line per measured row, then the targets and where the results went.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import (
    bench_anchors,
    bench_attention,
    bench_compression,
    bench_gather,
    bench_momentum,
    bench_reweighting_epoch,
    bench_saliency,
)
from benchmarks.harness import RESULTS_DIR, TimingConfig, run_suite, write_results
from benchmarks.shapes import ANCHOR_MODES, MODES, get_anchor_set, get_saliency_set, get_set

BENCHES = ("all", "attention", "anchors", "epoch", "saliency", "gather", "compression", "momentum")
ONLY_SETS = ("anchors", "saliency")  # sets of one benchmark: the attention benchmark has no cases in them


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="all", choices=BENCHES, help="which benchmark (default: all of them)")
    ap.add_argument(
        "--set",
        default="default",
        choices=("default", "acceptance", "papers", "anchors", "saliency", "cpu", "all", "tiny"),
    )
    ap.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=MODES,
        help="default: all three (attention), fwd fwd+bwd (anchors, momentum)",
    )
    ap.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="subset of fastattn_icl, eager, sdpa (attention) and fastattn_icl-anchors, fastattn_icl-isolation, "
        "fastattn_icl, eager (anchors), fastattn_icl, eager_probe (saliency), gather_kv, gather_kv_unchecked, "
        "index_select_loop, index_select_loop_nostack (gather), compressed, full-eager, full-sdpa, "
        "compressed-expanded-sdpa, compressed-expanded-eager (compression), fastattn_icl, base, eager, fused, "
        "eager_loop (momentum)",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size of the papers, anchors and saliency sets and of the gather set's B = 1 cases (default 1); "
        "the compression set's only batch size (default 1, 16, 64 on a GPU, 1, 8 on CPU)",
    )
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
    if args.providers:
        known = {p.name for p in bench_attention.providers()}
        known |= {p.name for f in bench_anchors.FEATURES for p in bench_anchors.providers(f)}
        known |= set(bench_saliency.PROVIDERS) | set(bench_gather.PROVIDERS)
        known |= set(bench_compression.PROVIDERS) | set(bench_momentum.PROVIDERS)
        unknown = set(args.providers) - known
        if unknown:
            raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {sorted(known)}")
    timing = TimingConfig()
    if args.rep_ms is not None:
        timing.cuda_rep_ms = timing.cpu_rep_ms = args.rep_ms
    if args.bench in ("all", "attention"):
        if args.set in ONLY_SETS:
            print(f"benchmarks: attention: set {args.set!r} has no attention cases, skipped")
        else:
            run_attention(args, device, timing)
    if args.bench in ("all", "anchors"):
        run_anchors(args, device, timing)
    if args.bench in ("all", "epoch"):
        run_epoch(args, device)
    if args.bench in ("all", "saliency"):
        run_saliency(args, device)
    if args.bench in ("all", "gather"):
        run_gather(args, device, timing)
    if args.bench in ("all", "compression"):
        run_compression(args, device)
    if args.bench in ("all", "momentum"):
        run_momentum(args, device, timing)
    return 0


def run_attention(args, device: torch.device, timing: TimingConfig) -> None:
    cases = get_set(args.set, cuda=device.type == "cuda", batch=args.batch)
    providers = bench_attention.providers()
    if args.providers:
        providers = [p for p in providers if p.name in args.providers]
        if not providers:
            print("benchmarks: attention: none of --providers is one of its providers, skipped")
            return
    modes = args.modes or list(MODES)
    suite = bench_attention.suite(device)
    print(f"benchmarks: attention on {device}, set {args.set!r} ({len(cases)} shapes), modes {modes}")
    for note in suite.notes:
        print(f"  note: {note}")
    results = run_suite(suite, cases, providers, modes, device, timing=timing, set_name=args.set)
    for t in results["targets"]:
        print(f"TARGET {t['result']:<4} {t['target']}: {t['detail']}")
    json_path, md_path = write_results(results, args.out)
    print(f"done in {results['runtime_s']} s; wrote {json_path} and {md_path}")


# ---- anchor re-weighting and isolation (benchmarks/bench_anchors.py) ---------------------------------


def run_anchors(args, device: torch.device, timing: TimingConfig) -> None:
    cases = get_anchor_set(args.set, cuda=device.type == "cuda", batch=args.batch)
    if not cases:
        print(f"benchmarks: anchors: set {args.set!r} has no anchor / isolation cases, skipped")
        return
    modes = args.modes or list(ANCHOR_MODES)
    for feature in bench_anchors.FEATURES:
        fcases = [c for c in cases if c.feature == feature]
        names = {p.name for p in bench_anchors.providers(feature)}
        if not fcases or (args.providers and not names & set(args.providers)):
            continue
        print(f"benchmarks: {feature} on {device}, set {args.set!r} ({len(fcases)} shapes), modes {modes}")
        for note in bench_anchors.platform_notes(device):
            print(f"  note: {note}")
        results = bench_anchors.run_feature(
            feature, fcases, modes, device, timing=timing, set_name=args.set, provider_names=args.providers
        )
        _print_targets(results)
        json_path, md_path = bench_anchors.write_results(results, feature, args.out)
        print(f"done in {results['runtime_s']} s; wrote {json_path} and {md_path}")


# ---- one anchor re-weighting training epoch (benchmarks/bench_reweighting_epoch.py) ------------------


def run_epoch(args, device: torch.device) -> None:
    cases = bench_reweighting_epoch.epoch_set(args.set, cuda=device.type == "cuda")
    if not cases:
        print(f"benchmarks: epoch: set {args.set!r} has no epoch cases, skipped")
        return
    print(f"benchmarks: re-weighting epoch on {device}, set {args.set!r} ({len(cases)} cases)")
    results = bench_reweighting_epoch.run_epoch_bench(
        cases, device, timing=bench_reweighting_epoch.epoch_timing(args.rep_ms), set_name=args.set
    )
    for note in results["skipped"]:
        print(f"  note: {note}")
    json_path, md_path = bench_reweighting_epoch.write_results(results, args.out)
    print(f"done in {results['runtime_s']} s; wrote {json_path} and {md_path}")


def _print_targets(results: dict) -> None:
    for t in results["targets"]:
        if t["result"] == "not evaluated":
            print(f"TARGET not evaluated: no CUDA -- {t['target']}")
        else:
            print(f"TARGET {t['result']:<4} {t['target']}: {t['detail']}")


def _run_provider_bench(name: str, module, cases, args, device: torch.device, run) -> None:
    """The runner of the benchmarks with a ``PROVIDERS`` list, ``platform_notes`` and ``write_results`` (saliency,
    gather, compression): filter the providers, print the notes, ``run(cases, providers)``, targets, files."""
    if not cases:
        print(f"benchmarks: {name}: set {args.set!r} has no {name} cases, skipped")
        return
    providers = [p for p in module.PROVIDERS if not args.providers or p in args.providers]
    if not providers:
        print(f"benchmarks: {name}: none of --providers is one of its providers, skipped")
        return
    print(f"benchmarks: {name} on {device}, set {args.set!r} ({len(cases)} cases), providers {providers}")
    for note in module.platform_notes(device):
        print(f"  note: {note}")
    results = run(cases, providers)
    _print_targets(results)
    json_path, md_path = module.write_results(results, args.out)
    print(f"done in {results['runtime_s']} s; wrote {json_path} and {md_path}")


# ---- information-flow saliency of a stack (benchmarks/bench_saliency.py) -----------------------------


def run_saliency(args, device: torch.device) -> None:
    cases = get_saliency_set(args.set, cuda=device.type == "cuda", batch=args.batch)
    timing = bench_saliency.saliency_timing(args.rep_ms)
    _run_provider_bench("saliency", bench_saliency, cases, args, device, lambda c, p: bench_saliency.run_saliency_bench(
        c, device, timing=timing, set_name=args.set, provider_names=p))


# ---- KV-cache gather of anchor compression (benchmarks/bench_gather.py) ------------------------------


def run_gather(args, device: torch.device, timing: TimingConfig) -> None:
    cases = bench_gather.gather_set(args.set, cuda=device.type == "cuda", batch=args.batch)
    _run_provider_bench("gather", bench_gather, cases, args, device, lambda c, p: bench_gather.run_gather_bench(
        c, device, timing=timing, set_name=args.set, provider_names=p))


# ---- anchor compression end to end (benchmarks/bench_compression.py) ---------------------------------


def run_compression(args, device: torch.device) -> None:
    cases = bench_compression.compression_set(args.set, cuda=device.type == "cuda", batch=args.batch)
    timing = bench_compression.compression_timing(args.rep_ms)
    _run_provider_bench("compression", bench_compression, cases, args, device,
                        lambda c, p: bench_compression.run_compression_bench(
                            c, device, timing=timing, set_name=args.set, provider_names=p))


# ---- momentum attention and the Deep-Thinking update (benchmarks/bench_momentum.py) ------------------


def run_momentum(args, device: torch.device, timing: TimingConfig) -> None:
    cases = bench_momentum.momentum_set(args.set, cuda=device.type == "cuda")
    modes = list(args.modes or bench_momentum.ATTN_MODES)
    _run_provider_bench("momentum", bench_momentum, cases, args, device,
                        lambda c, p: bench_momentum.run_momentum_bench(
                            c, device, modes=modes, timing=timing, set_name=args.set, provider_names=p))


if __name__ == "__main__":
    sys.exit(main())
