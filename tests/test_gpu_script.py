"""``make gpu``'s plumbing (scripts/gpu.py), on any machine: the dry run checks its own plan, a bad plan is
reported, no GPU is one line and a non-zero exit, and benchmark rows stream to a file as they are measured."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_script", ROOT / "scripts" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_and_checks_the_plan():
    proc = subprocess.run([sys.executable, "scripts/gpu.py", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gpu = _gpu_module()
    for name, budget in gpu.BENCH_BUDGETS:
        assert f"--bench {name} " in proc.stdout and f"(budget {budget} s)" in proc.stdout
    assert "pytest -m gpu" in proc.stdout and "dry run: plan OK" in proc.stdout


def test_a_plan_naming_a_missing_benchmark_is_reported(monkeypatch):
    gpu = _gpu_module()
    monkeypatch.setattr(gpu, "BENCH_BUDGETS", (*gpu.BENCH_BUDGETS[1:], ("no-such-bench", 5)))
    problems = gpu.check_plan()
    assert any("no-such-bench" in p for p in problems)
    assert any("attention" in p and "not in the GPU plan" in p for p in problems)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: make gpu would run")
def test_without_a_gpu_it_says_so_in_one_line_and_fails():
    proc = subprocess.run([sys.executable, "scripts/gpu.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA GPU" in proc.stdout


def test_rows_stream_to_the_file_as_they_are_emitted(tmp_path, monkeypatch):
    from benchmarks import harness

    stream = tmp_path / "rows.jsonl"
    monkeypatch.setenv(harness.ROWS_ENV, str(stream))
    rows, lines = [], []
    emit = harness.row_emitter(rows, 2, lines.append, line=lambda row: row["case"])
    emit({"case": "a", "median_ms": float("nan")})
    assert [json.loads(x) for x in stream.read_text().splitlines()] == [{"case": "a", "median_ms": None}]
    emit({"case": "b", "median_ms": 1.5})
    assert len(stream.read_text().splitlines()) == 2 and lines == ["[1/2] a", "[2/2] b"] and len(rows) == 2
