"""Smoke test of the benchmark harness on CPU: one tiny shape, results written, FLOP model, the
correctness gate refusing a speed-up, OOM rows, and the GPU target logic on synthetic rows."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_attention
from benchmarks.harness import (
    STATUS_INCORRECT,
    STATUS_OK,
    STATUS_OOM,
    Provider,
    TimingConfig,
    device_slug,
    environment,
    fit_exponent,
    is_oom,
    render_markdown,
    run_suite,
    speedup,
    tflops,
    write_results,
)
from benchmarks.shapes import AttnShape, acceptance_set, attention_flops, get_set, prompt_tokens, tiny_set

CPU = torch.device("cpu")
FAST = TimingConfig(cpu_warmup_ms=1.0, cpu_rep_ms=2.0, cpu_min_reps=2, cpu_max_reps=3)


def _run(providers, modes=("fwd", "fwd+bwd"), cases=None):
    return run_suite(
        bench_attention.suite(CPU), cases or tiny_set(), providers, list(modes), CPU, timing=FAST, progress=None
    )


def _by(results, provider, mode):
    (row,) = [r for r in results["rows"] if r["provider"] == provider and r["mode"] == mode]
    return row


def test_flop_model():
    assert attention_flops(1, 1, 1024, 1024, 64, causal=False, mode="fwd") == 4 * 1024 * 1024 * 64
    assert attention_flops(2, 3, 1024, 1024, 64, causal=True, mode="fwd") == 2 * 3 * 2 * 1024 * 1024 * 64
    # causal but not square (a chunk over a cache): not halved
    assert attention_flops(1, 1, 64, 1024, 64, causal=True, mode="fwd") == 4 * 64 * 1024 * 64
    fwd = attention_flops(4, 16, 4096, 4096, 128, causal=True, mode="fwd")
    assert attention_flops(4, 16, 4096, 4096, 128, causal=True, mode="bwd") == 2.5 * fwd
    assert attention_flops(4, 16, 4096, 4096, 128, causal=True, mode="fwd+bwd") == 3.5 * fwd
    shape = AttnShape("s", "g", 4, 16, 16, 4096, 4096, 128)
    assert shape.flops("fwd") == fwd == 4 * 4 * 16 * 4096 * 4096 * 128 / 2
    assert tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert tflops(1e12, None) is None
    with pytest.raises(ValueError):
        attention_flops(1, 1, 1, 1, 8, causal=True, mode="sideways")


def test_shape_sets():
    assert prompt_tokens("agnews", 16) == 1001
    assert prompt_tokens("sst2", 2) == 97
    acc = acceptance_set()
    assert [s.Tq for s in acc] == [1024, 2048, 4096, 8192, 16384]
    assert all(s.B * s.Tq == 16384 and s.D == 128 and s.dtype == "bf16" and s.causal for s in acc)
    cpu = get_set("default", cuda=False)
    assert cpu and all(s.dtype == "fp32" for s in cpu)
    gpu = get_set("default", cuda=True, batch=2)
    assert {s.group for s in gpu} == {"acceptance", "papers"}
    assert all(s.B == 2 for s in gpu if s.group == "papers")
    assert {(s.H, s.Hkv, s.D) for s in gpu if s.group == "papers"} == {
        (25, 25, 64),
        (16, 16, 256),
        (32, 32, 128),
        (32, 8, 128),
    }


def test_harness_writes_json_and_markdown(tmp_path):
    results = _run(bench_attention.providers())
    assert len(results["rows"]) == 3 * 2
    for r in results["rows"]:
        assert r["status"] == STATUS_OK, r
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_mem_bytes"] is None  # not measured on CPU
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
    ours = _by(results, "fastattn_icl", "fwd")
    eager = _by(results, "eager", "fwd")
    assert ours["speedup_vs"]["eager"] == pytest.approx(eager["median_ms"] / ours["median_ms"])
    assert any("no CUDA" in s for s in results["skipped"])
    json_path, md_path = write_results(results, tmp_path)
    assert json_path == tmp_path / "cpu.json" and md_path == tmp_path / "cpu.md"
    data = json.loads(json_path.read_text())
    for key in ("device", "torch", "triton", "transformers", "cuda", "git_commit", "git_dirty", "date"):
        assert key in data["header"]
    assert data["header"]["device_slug"] == device_slug(CPU) == "cpu"
    md = md_path.read_text()
    assert "| fwd+bwd | fastattn_icl | ok |" in md
    assert "Triton kernel skipped: no CUDA" in md
    assert "vs eager" in md and "vs sdpa" in md


def test_incorrect_provider_speedup_is_refused():
    def broken(shape, q, k, v):
        return bench_attention._eager(shape, q, k, v) * 1.01

    providers = [bench_attention.providers()[0], Provider("broken", broken, lambda device: "wrong on purpose")]
    results = _run(providers)
    for mode in ("fwd", "fwd+bwd"):
        bad, ours = _by(results, "broken", mode), _by(results, "fastattn_icl", mode)
        assert bad["status"] == STATUS_INCORRECT and bad["check"]["message"]
        assert ours["status"] == STATUS_OK
        assert bad["speedup_vs"]["fastattn_icl"] is None
        assert ours["speedup_vs"]["broken"] is None
        assert ours["speedup_text"]["broken"] == "n/a (check failed)"
    md = render_markdown(results)
    assert "n/a (check failed)" in md
    assert "FAIL (" in md
    assert speedup(ours, bad) == (None, "n/a (check failed)")


def test_oom_is_recorded_as_a_row():
    def oom_always(shape, q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    calls = []

    def oom_when_timed(shape, q, k, v):
        calls.append(1)
        if len(calls) > 2:  # passes the forward and gradient checks, then runs out of memory
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")
        return bench_attention._eager(shape, q, k, v)

    providers = [
        bench_attention.providers()[0],
        Provider("oom_always", oom_always, lambda device: "raises OOM"),
        Provider("oom_when_timed", oom_when_timed, lambda device: "raises OOM when timed"),
    ]
    results = _run(providers)
    for name in ("oom_always", "oom_when_timed"):
        for mode in ("fwd", "fwd+bwd"):
            row = _by(results, name, mode)
            assert row["status"] == STATUS_OOM and row["median_ms"] is None and row["message"]
            assert _by(results, "fastattn_icl", mode)["speedup_text"][name] == f"n/a ({name} oom)"
    assert "oom: " in render_markdown(results)
    assert is_oom(MemoryError()) and not is_oom(ValueError("out of memory"))


def test_gpu_targets_from_synthetic_rows():
    rows = []
    for s in acceptance_set():
        per_seq = {"fastattn_icl": 1e6 * s.Tq, "eager": 1e3 * s.Tq**2, "sdpa": 1e6 * s.Tq}
        times = {"fastattn_icl": (1.0, 1.0), "sdpa": (0.95, 0.7), "eager": (10.0, 10.0)}
        for p, (t_fwd, t_bwd) in times.items():
            for mode, t in (("fwd", t_fwd), ("bwd", t_bwd)):
                rows.append(
                    {
                        "case": s.name,
                        "group": "acceptance",
                        "params": s.params(),
                        "provider": p,
                        "mode": mode,
                        "status": STATUS_OK,
                        "median_ms": t,
                        "peak_mem_bytes": int(per_seq[p] * s.B),
                    }
                )
    got = {t["target"].split(" (")[0]: t for t in bench_attention.targets(rows)}
    assert got["forward >= 0.9x SDPA-flash throughput"]["result"] == "PASS"  # 0.95x
    assert got["backward >= 0.8x SDPA-flash throughput"]["result"] == "FAIL"  # 0.70x
    assert got[">= 5x eager at T = 4k"]["result"] == "PASS"
    memory = [t for t in bench_attention.targets(rows) if t["target"].startswith("peak memory")]
    assert memory and memory[0]["result"] == "PASS"
    assert "eager: exponent 2.00" in memory[0]["detail"]
    assert fit_exponent([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)


def test_environment_header_on_cpu():
    header = environment(CPU)
    assert header["device_type"] == "cpu" and header["torch"] == torch.__version__
    assert header["date"].endswith("+00:00")


def test_sliced_check_on_large_shapes(monkeypatch):
    # large shapes are checked on the last batch row and kv head; force that path on a small one
    monkeypatch.setattr(bench_attention, "FULL_CHECK_SCORES", 1)
    case = AttnShape("slice", "tiny", 3, 8, 2, 33, 33, 16, dtype="fp32")
    results = _run(bench_attention.providers()[:1], cases=[case])
    for row in results["rows"]:
        assert row["status"] == STATUS_OK
        assert row["check"]["scope"] == "batch 2, kv head 1 (query heads 4..7)"
    assert set(_by(results, "fastattn_icl", "fwd+bwd")["check"]["errors"]) == {"out", "dq", "dk", "dv"}


@pytest.mark.gpu
def test_harness_on_cuda():
    cuda = torch.device("cuda")
    case = AttnShape("tiny-bf16", "tiny", 2, 4, 2, 256, 256, 64, dtype="bf16")
    results = run_suite(
        bench_attention.suite(cuda), [case], bench_attention.providers(), ["fwd", "bwd"], cuda, progress=None
    )
    assert results["header"]["device_slug"] != "cpu" and results["header"]["cuda"]
    for row in results["rows"]:
        assert row["status"] == STATUS_OK, row
        assert row["median_ms"] > 0 and row["peak_mem_bytes"] > 0
    assert "FLASH_ATTENTION" in results["providers"][2]["description"]
    assert "Triton" in results["providers"][0]["description"]
