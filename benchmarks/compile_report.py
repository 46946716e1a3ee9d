"""Compile report: every kernel specialization compiled ahead of time for sm_80 and sm_90, one row each, no GPU
(``python -m benchmarks.compile_report [--scope ci]``; benchmarks/README.md)."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import triton


def _row(r) -> dict:
    from fastattn_icl._triton import specializations as S

    s = r.spec
    row = dict(kernel=s.kind, flags=s.flag_text, dtype=s.dtype_name, head_dim=s.head_dim, arch=r.arch,
               block_d=s.block_d, elem_size=s.dtype.itemsize, block_m=s.block_m,
               block_n=s.block_n, num_warps=s.num_warps, num_stages=s.num_stages, position=s.position,
               hot=s.hot)
    if isinstance(r, S.Failed):
        row.update(status="does not compile", error=r.error.splitlines()[0][:300] if r.error else "")
        return row
    row.update(shared=r.shared, registers=r.registers, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
               stack=r.stack, tensor_core=r.tensor_core, seconds=round(r.seconds, 2))
    return _judge(row)


def _judge(row: dict) -> dict:
    """The autotuner's estimate and the status of a compiled row (recomputed by --rerender with today's estimate)."""
    from fastattn_icl._triton import attention
    from fastattn_icl._triton import specializations as S

    estimate = (attention.smem_bytes(row["kernel"], row["block_m"], row["block_n"], row["block_d"], row["num_stages"],
                                     row["elem_size"]) if row["kernel"] in attention.TUNED_KINDS else None)
    pruned = estimate is not None and estimate > S.SMEM_LIMIT[row["arch"]]
    fits = row["shared"] <= S.SMEM_LIMIT[row["arch"]]
    row.update(smem_estimate=estimate, status="pruned" if pruned else ("fits" if fits else "over the limit"))
    return row


def _summary(rows: list[dict]) -> dict:
    count = collections.Counter(row["status"] for row in rows)
    spilling = [row for row in rows if row.get("spill_stores", 0) or row.get("spill_loads", 0)]
    return dict(specializations=len(rows), compiled=len(rows) - count["does not compile"], fits=count["fits"],
                pruned=count["pruned"], over_limit_not_pruned=count["over the limit"],
                failed=count["does not compile"], spilling=len(spilling),
                hot_first_spilling=sum(1 for row in spilling if row["hot"] and row["position"] == 0),
                cpu_seconds=round(sum(row.get("seconds", 0) for row in rows), 1))


def _markdown(arch: int, rows: list[dict], env: dict, summ: dict) -> str:
    from fastattn_icl._triton import specializations as S

    lines = [
        f"# Compile report: sm_{arch} ({'A100' if arch == 80 else 'H100/H200'})",
        "",
        f"Compiled ahead of time with Triton {env['triton']} (`triton.compile` for `GPUTarget('cuda', {arch}, 32)`, "
        f"no GPU), {env['date']}, commit {env['commit']}, scope `{env['scope']}`, on {env['machine']}. "
        f"Shared memory limit per block: {S.SMEM_LIMIT[arch]:,} B. Registers and spills are ptxas' report; "
        "`est.` is the autotuner's bound (`smem_bytes`), `pruned` = the autotuner drops the config on this "
        "target before timing it; position = place in the autotune list (0 is tried first); "
        "`hot` = forward, dq or dk/dv at fp16/bf16, d <= 128.",
        "",
        "| specializations | compiled | fit | pruned | over the limit, not pruned | failed | spilling | "
        "hot first configs spilling | compile CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summ['specializations']} | {summ['compiled']} | {summ['fits']} | {summ['pruned']} | "
        f"{summ['over_limit_not_pruned']} | {summ['failed']} | {summ['spilling']} | {summ['hot_first_spilling']} | "
        f"{summ['cpu_seconds']} |",
        "",
        "| kernel | flags | dtype | d | tile | warps | stages | pos | status | smem B | est. B | regs | "
        "spill st/ld B | stack B | tensor core | s |",
        "|---|---|---|---:|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for row in rows:
        tile = "x".join(str(b) for b in (row["block_m"], row["block_n"]) if b is not None)
        head = (f"| {row['kernel']} | {row['flags']} | {row['dtype']} | {row['head_dim']} | {tile} | "
                f"{row['num_warps']} | {row['num_stages']} | {row['position']} |")
        if row["status"] == "does not compile":
            lines.append(f"{head} **does not compile**: {row['error']} | | | | | | | |")
            continue
        spill = f"{row['spill_stores']}/{row['spill_loads']}"
        if row["spill_stores"] or row["spill_loads"]:
            spill = f"**{spill}**"
        est = f"{row['smem_estimate']:,}" if row["smem_estimate"] is not None else ""
        lines.append(f"{head} {row['status']} | {row['shared']:,} | {est} | {row['registers']} | {spill} | "
                     f"{row['stack']} | {row['tensor_core']} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


def _write(stem: Path, arch: int, rows: list[dict], env: dict) -> dict:
    """``<stem>.md`` and ``<stem>.json`` of one target; returns the summary."""
    summ = _summary(rows)
    stem.with_suffix(".md").write_text(_markdown(arch, rows, env, summ))
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, summary=summ, rows=rows), indent=1))
    return summ


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scope", choices=("full", "ci"), default="full")
    parser.add_argument("--archs", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rerender", action="store_true",
                        help="rewrite the .md/.json from the committed .json with today's estimate (no compile)")
    args = parser.parse_args(argv)
    from fastattn_icl._triton import specializations as S

    try:
        archs = tuple(int(a.strip().removeprefix("sm_").removeprefix("sm")) for a in args.archs.split(","))
    except ValueError:
        parser.error(f"--archs takes compute capabilities like 80,90 (got {args.archs!r})")
    unknown = [a for a in archs if a not in S.SMEM_LIMIT]
    if unknown:
        parser.error(f"no shared-memory limit known for sm_{unknown[0]} (known: {sorted(S.SMEM_LIMIT)})")
    if args.rerender:
        for arch in archs:
            stem = args.out / f"compile-sm{arch}"
            old = json.loads(stem.with_suffix(".json").read_text())
            rows = [row if row["status"] == "does not compile" else _judge(row) for row in old["rows"]]
            _write(stem, arch, rows, old["env"])
            print(f"sm_{arch}: re-rendered {stem}.md", file=sys.stderr)
        return 0
    spec_list = S.ci_specs() if args.scope == "ci" else S.report_specs()
    start = time.perf_counter()
    total = len(spec_list) * len(archs)
    print(f"compile_report: {len(spec_list)} specializations x {len(archs)} targets = {total} compiles, "
          f"{args.workers or os.cpu_count()} processes", file=sys.stderr)

    def progress(done, n, result):
        if done % 25 == 0 or done == n:
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (n - done)
            print(f"  {done}/{n} compiled, {elapsed:.0f} s, about {eta:.0f} s left", file=sys.stderr, flush=True)

    results = S.compile_all(spec_list, archs, workers=args.workers, progress=progress)
    env = dict(triton=triton.__version__, date=datetime.date.today().isoformat(), scope=args.scope,
               commit=os.popen("git describe --always --dirty 2>/dev/null").read().strip() or "unknown",
               machine=f"{platform.machine()}, {os.cpu_count()} cores",
               wall_seconds=round(time.perf_counter() - start, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        rows = [_row(r) for r in results if r.arch == arch]
        stem = args.out / f"compile-sm{arch}"
        summ = _write(stem, arch, rows, env)
        print(f"sm_{arch}: {summ['compiled']}/{summ['specializations']} compiled, {summ['pruned']} pruned, "
              f"{summ['spilling']} spilling, {summ['failed']} failed -> {stem}.md", file=sys.stderr)
    print(f"compile_report: {env['wall_seconds']} s", file=sys.stderr)
    return 1 if any(isinstance(r, S.Failed) for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
