"""``make gpu``: everything a short, offline loan of a GPU machine should produce, in one run.

    python scripts/gpu.py [--out DIR] [--dry-run]

In order, each step with its own time budget (the whole run fits in about 8 minutes on an H100/H200):
1. the build: ``fastattn_icl._C`` must import and carry its CUDA ops (scripts/setup_env.sh, which ``make``
   runs first, rebuilds it when ``csrc/`` changed);
2. the ``gpu``-marked tests (``pytest -m gpu``), with a JUnit report;
3. each benchmark of the GPU set (``python -m benchmarks.run --bench NAME``), one process per benchmark
   under a time limit; every row is appended to ``rows-NAME.jsonl`` as it is measured
   (``$FASTATTN_ICL_BENCH_ROWS``), so a benchmark stopped by its budget still leaves what it measured;
4. one summary of every target the benchmarks evaluate: met / missed (with the figures) / not run, written
   to ``<out>/gpu-summary.md`` and ``.json`` with the device, torch, triton and commit.

Without a CUDA GPU it says so in one line and exits 2. ``--dry-run`` (any machine) prints the plan and checks
that every benchmark and test it names exists, without running them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEST_BUDGET_S = 150
# (benchmark, seconds): the GPU set of each benchmark of benchmarks/run.py, in the order of its --bench all
BENCH_BUDGETS = (
    ("attention", 60),
    ("anchors", 45),
    ("epoch", 30),
    ("saliency", 45),
    ("gather", 25),
    ("compression", 45),
    ("momentum", 45),
)
# benchmarks the GPU plan leaves out on purpose: `cpu` measures the CPU path's targets (issue 15) and loads the real
# model, which the offline GPU machine does not have; `retuning` times a ~1M-parameter model whose decoding is bound by
# Python per token (about 15 minutes, past the plan's budget, and nothing a GPU kernel changes)
NOT_ON_GPU = ("cpu", "retuning")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _environment() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "no CUDA device",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def check_plan() -> list[str]:
    """Problems with the plan: unknown benchmarks, benchmarks whose GPU set is empty, no gpu-marked test."""
    from benchmarks import run as bench_run

    problems = []
    for name, _ in BENCH_BUDGETS:
        if name not in bench_run.BENCHES:
            problems.append(f"benchmark {name!r} is not one of benchmarks.run's {bench_run.BENCHES}")
        elif not all(b.cases("default", True, None) for b in bench_run.BENCHMARKS[name]):
            problems.append(f"benchmark {name!r}: a GPU set of its declarations is empty")
    missing = set(bench_run.BENCHES) - {"all", *NOT_ON_GPU} - {name for name, _ in BENCH_BUDGETS}
    if missing:
        problems.append(f"benchmarks not in the GPU plan: {sorted(missing)}")
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    count = sum(1 for line in collected.stdout.splitlines() if "::" in line)
    if collected.returncode != 0 or count == 0:
        problems.append(f"pytest -m gpu collects no test (rc {collected.returncode}): {collected.stdout[-500:]}")
    else:
        print(f"  gpu-marked tests: {count} collected")
    return problems


def _run(cmd: list[str], budget: int, log: Path, env: dict | None = None) -> tuple[str, float]:
    """Run ``cmd`` with its output in ``log``; return (status, seconds): ok / failed (rc N) / timeout."""
    start = time.monotonic()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=budget, env=env)
            status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {budget} s"
    return status, round(time.monotonic() - start, 1)


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _targets(out: Path, started: float) -> list[dict]:
    """Every target of the results files this run wrote (newer than ``started``)."""
    found = []
    for path in sorted(out.glob("*.json")):
        if path.name.startswith("gpu-summary") or path.stat().st_mtime < started:
            continue
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for t in results.get("targets", []) if isinstance(results, dict) else []:
            found.append({"file": path.name, **t})
    return found


def _verdict(result: str) -> str:
    low = str(result).lower()
    if low in ("pass", "met", "ok", "yes"):
        return "met"
    if low in ("fail", "missed", "no"):
        return "missed"
    return "not run" if low in ("not evaluated", "n/a", "skip", "skipped") else low


def write_summary(out: Path, env: dict, steps: list[dict], targets: list[dict]) -> tuple[Path, Path]:
    summary = {"environment": env, "steps": steps, "targets": targets}
    json_path, md_path = out / "gpu-summary.json", out / "gpu-summary.md"
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# make gpu on {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}, "
        f"commit {env['commit']}, {env['date']}",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('detail', '')} |" for s in steps]
    lines += ["", "## Targets", "", "| target | verdict | detail | file |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | **{_verdict(t['result'])}** | {t['detail']} | {t['file']} |" for t in targets]
    if not targets:
        lines.append("| (no benchmark finished: no target evaluated) | not run | | |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check it, run nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    plan = ["build check: import fastattn_icl._C (CUDA ops)", f"pytest -m gpu tests (budget {TEST_BUDGET_S} s)"]
    plan += [f"python -m benchmarks.run --bench {name} --out {out} (budget {s} s)" for name, s in BENCH_BUDGETS]
    total = TEST_BUDGET_S + sum(s for _, s in BENCH_BUDGETS)
    if args.dry_run:
        print(f"make gpu would run, in order (budgets {total} s in all):")
        for step in plan:
            print(f"  {step}")
        problems = check_plan()
        for p in problems:
            print(f"  PROBLEM: {p}")
        print("dry run: plan OK" if not problems else f"dry run: {len(problems)} problem(s)")
        return 1 if problems else 0

    import torch

    if not torch.cuda.is_available():
        print("make gpu: no CUDA GPU visible to torch on this machine; nothing was run (see --dry-run)")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = _environment()
    print(f"make gpu on {env['device']} (sm_{env['capability']}), torch {env['torch']}, triton {env['triton']}")
    started = time.time()
    steps = []

    t0 = time.monotonic()
    try:
        import fastattn_icl._C  # noqa: F401

        ops = [name for name in dir(torch.ops.fastattn_icl) if not name.startswith("_")]
        steps.append({"step": "build", "status": "ok", "seconds": round(time.monotonic() - t0, 1),
                      "detail": f"fastattn_icl._C imports; ops {', '.join(sorted(ops))}"})
    except Exception as exc:  # reported, and the rest still runs (the Triton kernels need no extension)
        steps.append({"step": "build", "status": "failed", "seconds": round(time.monotonic() - t0, 1),
                      "detail": f"{type(exc).__name__}: {exc}"})
    print(f"build: {steps[-1]['status']}")

    junit = out / "gpu-tests.xml"
    status, seconds = _run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", f"--junitxml={junit}"],
        TEST_BUDGET_S,
        out / "gpu-tests.log",
    )
    counts = _junit_counts(junit)
    steps.append({"step": "pytest -m gpu", "status": status, "seconds": seconds,
                  "detail": ", ".join(f"{v} {k}" for k, v in counts.items()) or "no report (see gpu-tests.log)"})
    print(f"gpu tests: {status} in {seconds} s {counts}")

    for name, budget in BENCH_BUDGETS:
        rows = out / f"rows-{name}.jsonl"
        rows.unlink(missing_ok=True)
        status, seconds = _run(
            [sys.executable, "-m", "benchmarks.run", "--bench", name, "--out", str(out)],
            budget,
            out / f"bench-{name}.log",
            env={**os.environ, "FASTATTN_ICL_BENCH_ROWS": str(rows)},
        )
        measured = sum(1 for _ in open(rows)) if rows.exists() else 0
        steps.append({"step": f"bench {name}", "status": status, "seconds": seconds,
                      "detail": f"{measured} rows in {rows.name}"})
        print(f"bench {name}: {status} in {seconds} s, {measured} rows")

    targets = _targets(out, started)
    json_path, md_path = write_summary(out, env, steps, targets)
    print(f"\ntargets ({len(targets)}):")
    for t in targets:
        print(f"  {_verdict(t['result']):<8} {t['target']}: {t['detail']}")
    print(f"wrote {json_path} and {md_path}")
    failed = [s for s in steps if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
