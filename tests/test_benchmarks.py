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


def _run_tiny_cli(bench: str, out) -> None:
    """``python -m benchmarks.run --bench <bench>`` on the tiny set, one thread, CPU (the checks read cpu-*.json,
    on a GPU machine too); the caller's thread count is restored."""
    threads = torch.get_num_threads()
    argv = ["--bench", bench, "--set", "tiny", "--out", str(out), "--rep-ms", "2", "--threads", "1", "--device", "cpu"]
    try:
        assert bench_run.main(argv) == 0
    finally:
        torch.set_num_threads(threads)


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


# ---- anchor re-weighting and isolation benchmark (benchmarks/bench_anchors.py) ----------------------

from benchmarks import bench_anchors  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402
from benchmarks.shapes import (  # noqa: E402
    ANCHOR_VARIANTS,
    anchor_shape,
    anchors_cpu_set,
    anchors_gpu_set,
    anchors_tiny_set,
    get_anchor_set,
    icl_anchor_layout,
)


def test_anchor_layout_and_sets():
    positions, classes, query_start = icl_anchor_layout(2048)
    seg = 2048 // 17
    assert len(positions) == 16 and positions == sorted(positions) and positions[-1] < query_start < 2048
    assert positions == [(i + 1) * seg - 2 for i in range(16)]
    assert sorted(classes) == [c for c in range(4) for _ in range(4)]  # 4 classes x 4 demonstrations
    last, start = anchor_shape("anchors-last", "llama-7b", 2048), anchor_shape("anchors-from", "gpt2-xl", 2048)
    assert last.reweight_from is None and start.reweight_from == positions[0]
    assert last.feature == "anchors" and anchor_shape("isolation", "gpt2-xl", 256).feature == "isolation"
    gpu = anchors_gpu_set()
    assert {(s.H, s.D) for s in gpu} == {(25, 64), (32, 128)}
    assert {s.Tq for s in gpu} == {256, 512, 1024, 2048, 4096, 8192, 16384}
    assert {s.variant for s in gpu} == set(ANCHOR_VARIANTS) and all(s.dtype == "bf16" for s in gpu)
    cpu = anchors_cpu_set()
    assert cpu and all(s.dtype == "fp32" and s.Tq <= 512 for s in cpu)
    assert get_anchor_set("default", cuda=True) == gpu and get_anchor_set("default", cuda=False) == cpu
    assert get_anchor_set("acceptance", cuda=True) == [] and len(get_anchor_set("tiny", cuda=False)) == 3
    assert all(s.B == 4 for s in get_anchor_set("anchors", cuda=False, batch=4))


@pytest.fixture
def no_gc(monkeypatch):
    """The harness's ``free_memory`` runs ``gc.collect`` (~0.3 s each on CPU, dozens of calls); a CPU
    smoke test has nothing to free."""
    from benchmarks import harness

    monkeypatch.setattr(harness, "free_memory", lambda device: None)


def test_anchors_bench_cli_smoke(tmp_path, capsys, no_gc):
    # the CLI end to end on the tiny set: both features, three providers, fwd and fwd+bwd, files written
    # one torch thread, as a CPU benchmark run uses (2 threads on a loaded 2-core machine stall)
    _run_tiny_cli("anchors", tmp_path)
    printed = capsys.readouterr().out
    assert "TARGET not evaluated: no CUDA" in printed
    for feature in bench_anchors.FEATURES:
        data = json.loads((tmp_path / f"cpu-{feature}.json").read_text())
        md = (tmp_path / f"cpu-{feature}.md").read_text()
        names = [p["name"] for p in data["providers"]]
        assert names == [bench_anchors.ON[feature], "fastattn_icl", "eager"]
        cases = [c for c in anchors_tiny_set() if c.feature == feature]
        assert len(data["rows"]) == len(cases) * 3 * 2
        for r in data["rows"]:
            assert r["status"] == STATUS_OK and r["check"]["status"] == STATUS_OK, r
            assert r["median_ms"] > 0
        on = [r for r in data["rows"] if r["provider"] == names[0]]
        assert all(r["speedup_vs"]["fastattn_icl"] and r["speedup_vs"]["eager"] for r in on)
        grads = {r["mode"]: set(r["check"]["errors"]) for r in on}
        extra = {"dbeta"} if feature == "anchors" else set()
        assert grads == {"fwd": {"out"}, "fwd+bwd": {"out", "dq", "dk", "dv"} | extra}
        # the feature-off provider is checked against base attention, not against the feature's oracle
        off = [r for r in data["rows"] if r["provider"] == "fastattn_icl" and r["mode"] == "fwd+bwd"]
        assert all(set(r["check"]["errors"]) == {"out", "dq", "dk", "dv"} for r in off)
        assert data["targets"] and all(t["result"] == "not evaluated" for t in data["targets"])
        assert "**not evaluated**" in md and "vs fastattn_icl" in md and "no CUDA" in md


def test_anchors_incorrect_feature_speedup_is_refused(monkeypatch, no_gc):
    def broken(case, q, k, v, beta):
        return bench_anchors._eager_anchors(case, q, k, v, beta * 1.5)

    monkeypatch.setattr(bench_anchors, "_ours_anchors", broken)
    case = [c for c in anchors_tiny_set() if c.variant == "anchors-last"]
    res = bench_anchors.run_feature("anchors", case, ["fwd"], CPU, timing=FAST, progress=None)
    bad = _by(res, "fastattn_icl-anchors", "fwd")
    assert bad["status"] == STATUS_INCORRECT
    assert bad["speedup_text"] == {"fastattn_icl": "n/a (check failed)", "eager": "n/a (check failed)"}
    assert _by(res, "fastattn_icl", "fwd")["status"] == STATUS_OK


def _anchor_row(case, provider, mode, status, ms):
    return {
        "case": case.name,
        "group": case.group,
        "params": case.params(),
        "provider": provider,
        "mode": mode,
        "status": status,
        "median_ms": ms,
    }


def test_anchor_gpu_targets_from_synthetic_rows():
    rows = []
    for T in (256, 2048, 16384):
        case = anchor_shape("anchors-last", "gpt2-xl", T)
        # feature on: +5% fwd (passes); fwd+bwd +20% at T 256 only (fails); eager 12x / 8x at 2k, OOM at 16k
        for mode, on, eager in (("fwd", 1.05, 12.0), ("fwd+bwd", 1.20 if T == 256 else 1.0, 8.0)):
            rows.append(_anchor_row(case, "fastattn_icl-anchors", mode, STATUS_OK, on))
            rows.append(_anchor_row(case, "fastattn_icl", mode, STATUS_OK, 1.0))
            if T == 16384:
                rows.append(_anchor_row(case, "eager", mode, STATUS_OOM, None))
            else:
                rows.append(_anchor_row(case, "eager", mode, STATUS_OK, eager))
    from benchmarks.harness import add_speedups

    add_speedups(rows, ["fastattn_icl-anchors", "fastattn_icl", "eager"])
    got = {t["target"]: t for t in bench_anchors.targets_for(rows, "anchors")}
    assert got["anchors-last fwd: overhead vs feature off <= 10% (every T)"]["result"] == "PASS"
    fb = got["anchors-last fwd+bwd: overhead vs feature off <= 10% (every T)"]
    assert fb["result"] == "FAIL" and "gpt2-xl T256: +20.0%" in fb["detail"]
    assert got["anchors-last fwd: >= 10x eager at T = 2048"]["result"] == "PASS"
    assert got["anchors-last fwd+bwd: >= 10x eager at T = 2048"]["result"] == "FAIL"
    long = got["anchors-last: runs at T = 16384 (eager's status alongside, OOM expected)"]
    assert long["result"] == "PASS" and "eager oom" in long["detail"]
    # an incorrect kernel misses every target it is part of
    for r in rows:
        if r["provider"] == "fastattn_icl-anchors" and r["params"]["Tq"] == 16384:
            r["status"] = STATUS_INCORRECT
    add_speedups(rows, ["fastattn_icl-anchors", "fastattn_icl", "eager"])
    got = {t["target"]: t for t in bench_anchors.targets_for(rows, "anchors")}
    assert got["anchors-last: runs at T = 16384 (eager's status alongside, OOM expected)"]["result"] == "FAIL"
    assert got["anchors-last fwd: overhead vs feature off <= 10% (every T)"]["result"] == "FAIL"
    off = bench_anchors.targets_for(rows, "anchors", evaluated=False)
    assert all(t["result"] == "not evaluated" and t["detail"].startswith("no CUDA") for t in off)


@pytest.mark.gpu
def test_anchors_bench_on_cuda():
    from benchmarks.shapes import AnchorShape

    cuda = torch.device("cuda")
    for variant in ANCHOR_VARIANTS:
        case = AnchorShape(f"gpu-{variant}", "tiny", 2, 4, 4, 256, 256, 64, dtype="bf16", variant=variant)
        res = bench_anchors.run_feature(case.feature, [case], ["fwd", "fwd+bwd"], cuda, progress=None)
        assert "Triton" in res["providers"][0]["description"]
        for row in res["rows"]:
            assert row["status"] == STATUS_OK, row
            assert row["median_ms"] > 0 and row["peak_mem_bytes"] > 0
        assert res["targets"] and all(t["result"] in ("PASS", "FAIL", "N/A") for t in res["targets"])


def test_anchors_sliced_check_on_large_shapes(monkeypatch, no_gc):
    # large shapes (every GPU case from T = 1k) are checked on one head; beta [H, C] is shared by the
    # batch, so every batch row of that head (a one-row slice would get dbeta wrong); force that path
    from benchmarks.shapes import AnchorShape

    monkeypatch.setattr(bench_attention, "FULL_CHECK_SCORES", 1)
    case = AnchorShape("slice", "tiny", 3, 4, 4, 40, 40, 16, dtype="fp32", variant="anchors-from", demonstrations=4)
    res = bench_anchors.run_feature(
        "anchors", [case], ["fwd+bwd"], CPU, timing=FAST, progress=None, provider_names=["fastattn_icl-anchors"]
    )
    (row,) = res["rows"]
    assert row["status"] == STATUS_OK, row
    assert row["check"]["scope"] == "every batch row (beta is shared), kv head 3 (query heads 3..3)"
    assert set(row["check"]["errors"]) == {"out", "dq", "dk", "dv", "dbeta"}
    iso = AnchorShape("slice-iso", "tiny", 3, 4, 4, 40, 40, 16, dtype="fp32", variant="isolation", demonstrations=4)
    res = bench_anchors.run_feature("isolation", [iso], ["fwd+bwd"], CPU, timing=FAST, progress=None)
    for row in res["rows"]:
        assert row["status"] == STATUS_OK and row["check"]["scope"] == "batch 2, kv head 3 (query heads 3..3)", row


def test_reweighting_epoch_bench_cli_smoke(tmp_path, capsys, monkeypatch, no_gc):
    # one AnchorReweighting.fit epoch per provider on the tiny set through the CLI, files written; then a
    # seam whose dbeta is off by 1.5x fails the gate and its speed-up is refused
    from benchmarks import bench_reweighting_epoch as epoch

    _run_tiny_cli("epoch", tmp_path)
    assert "wrote" in capsys.readouterr().out
    data = json.loads((tmp_path / "cpu-epoch.json").read_text())
    md = (tmp_path / "cpu-epoch.md").read_text()
    assert [p["name"] for p in data["providers"]] == ["fastattn_icl", "eager"]
    assert len(data["rows"]) == 2 * 2
    for r in data["rows"]:
        assert r["status"] == STATUS_OK and r["check"]["status"] == STATUS_OK, r
        assert r["median_ms"] > 0 and r["mode"] == "epoch" and r["peak_mem_bytes"] is None
        assert set(r["check"]["errors"]) == {"dbeta"}
    ours = [r for r in data["rows"] if r["provider"] == "fastattn_icl"]
    assert all(r["speedup_vs"]["eager"] for r in ours)
    assert "correctness gate" in md and "vs eager" in md

    real = epoch._dbeta
    monkeypatch.setattr(
        epoch, "_dbeta", lambda rw, ex, beta, p: real(rw, ex, beta, p) * (1.5 if p == epoch.OURS else 1.0)
    )
    res = epoch.run_epoch_bench(epoch.epoch_set("tiny", cuda=False)[:1], CPU, timing=FAST, progress=None)
    by = {r["provider"]: r for r in res["rows"]}
    assert by["fastattn_icl"]["status"] == STATUS_INCORRECT and by["eager"]["status"] == STATUS_OK
    assert by["fastattn_icl"]["speedup_text"]["eager"] == "n/a (check failed)"
    assert by["eager"]["speedup_vs"]["fastattn_icl"] is None


# ---- information-flow saliency of a stack (benchmarks/bench_saliency.py) --------------------------

from benchmarks import bench_saliency  # noqa: E402
from benchmarks.shapes import (  # noqa: E402
    get_saliency_set,
    saliency_case,
    saliency_cpu_set,
    saliency_gpu_set,
    saliency_tiny_set,
)


@pytest.fixture
def no_gc_saliency(monkeypatch, no_gc):
    """``no_gc`` for the saliency benchmark, which holds its own reference to ``free_memory``."""
    monkeypatch.setattr(bench_saliency, "free_memory", lambda device: None)


def test_saliency_sets():
    gpu = saliency_gpu_set()
    assert {(s.model, s.layers, s.H, s.D) for s in gpu} == {("gpt2-xl", 48, 25, 64), ("llama-7b", 1, 32, 128)}
    assert sorted({s.T for s in gpu}) == [256, 1024, 2048, 4096, 8192, 16384]
    assert all(s.dtype == "fp16" and s.B == 1 for s in gpu)
    cpu = saliency_cpu_set()
    assert cpu and all(s.dtype == "fp32" and s.T <= 512 for s in cpu)
    assert get_saliency_set("default", cuda=True) == gpu and get_saliency_set("default", cuda=False) == cpu
    assert get_saliency_set("saliency", cuda=False) == gpu and get_saliency_set("papers", cuda=True) == []
    assert all(s.B == 4 for s in get_saliency_set("all", cuda=True, batch=4))
    assert get_anchor_set("saliency", cuda=True) == []
    case = saliency_case("gpt2-xl", 1024)
    positions, _, _ = case.layout()
    assert len(positions) == 16 and positions[-1] < case.T - 1
    assert case.flops("flow") == 48 * attention_flops(1, 25, 1024, 1024, 64, causal=True, mode="fwd+bwd")


def test_saliency_bench_cli_smoke(tmp_path, capsys, no_gc_saliency):
    # both providers on the tiny set through the CLI: the gate runs on the first case and the second inherits it
    _run_tiny_cli("saliency", tmp_path)
    assert "TARGET not evaluated: no CUDA" in capsys.readouterr().out
    data = json.loads((tmp_path / "cpu-saliency.json").read_text())
    md = (tmp_path / "cpu-saliency.md").read_text()
    assert [p["name"] for p in data["providers"]] == ["fastattn_icl", "eager_probe"]
    assert len(data["rows"]) == len(saliency_tiny_set()) * 2
    for r in data["rows"]:
        assert r["status"] == STATUS_OK and r["check"]["status"] == STATUS_OK, r
        assert r["median_ms"] > 0 and r["mode"] == "flow" and r["peak_mem_bytes"] is None
        assert set(r["check"]["errors"]) == {"S_wp", "S_pq", "S_ww"}
    scopes = [r["check"]["scope"] for r in data["rows"] if r["provider"] == "fastattn_icl"]
    assert scopes[0].startswith("gate on tiny-T40") and scopes[1].startswith("inherited from the gate on tiny-T40")
    assert all(r["speedup_vs"]["eager_probe"] for r in data["rows"] if r["provider"] == "fastattn_icl")
    assert "## Time and peak memory" in md and "vs eager_probe" in md and "correctness gate:" in md


def test_saliency_scores_match_the_oracle():
    # the benchmark's two providers agree on every layer, and with the reference probe_saliency + flow_scores
    # on the last layer (whose loss is a function of that layer's output alone)
    from fastattn_icl.reference.attention import attention
    from fastattn_icl.reference.saliency import flow_scores, probe_saliency

    case = saliency_tiny_set()[0]
    inp = bench_saliency.make_inputs(case, CPU)
    ours = bench_saliency.flow_fastattn(case, inp)
    inp.x0.grad = None
    eager = bench_saliency.flow_eager_probe(case, inp)
    assert ours.shape == (case.layers, case.B, 3) and torch.allclose(ours, eager, rtol=1e-4, atol=1e-7)

    x = inp.x0.detach()
    for layer in range(case.layers):
        q, k, v = (torch.matmul(bench_saliency._rms_norm(x), inp.w_qkv[layer, i]) for i in range(3))
        x_in, x = x, x + attention(q, k, v, causal=True)

    def loss_fn(o):
        logits = (x_in + o)[:, :, inp.target, :].reshape(case.B, -1) @ inp.w_out
        return torch.nn.functional.cross_entropy(logits, inp.gold)

    saliency = probe_saliency(q, k, v, loss_fn, causal=True)
    ref = torch.stack(flow_scores(saliency, inp.labels, inp.target_rows), dim=-1)
    assert torch.allclose(ours[-1], ref, rtol=1e-4, atol=1e-7)


def test_saliency_incorrect_and_unchecked_speedups_are_refused(monkeypatch, no_gc_saliency):
    case = saliency_tiny_set()[:1]
    real = bench_saliency.flow_fastattn
    monkeypatch.setitem(bench_saliency.PROVIDER_FNS, "fastattn_icl", lambda c, inp: real(c, inp) * 1.5)
    res = bench_saliency.run_saliency_bench(case, CPU, timing=FAST, progress=None)
    by = {r["provider"]: r for r in res["rows"]}
    assert by["fastattn_icl"]["status"] == STATUS_INCORRECT and by["eager_probe"]["status"] == STATUS_OK
    assert by["fastattn_icl"]["speedup_text"]["eager_probe"] == "n/a (check failed)"

    # the probe runs out of memory (in the gate too): an oom row, and ours is timed but unchecked
    def oom(c, inp):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 25.00 GiB")

    monkeypatch.setitem(bench_saliency.PROVIDER_FNS, "fastattn_icl", real)
    monkeypatch.setitem(bench_saliency.PROVIDER_FNS, "eager_probe", oom)
    monkeypatch.setattr(bench_saliency, "flow_eager_probe", oom)
    res = bench_saliency.run_saliency_bench(case, CPU, timing=FAST, progress=None)
    by = {r["provider"]: r for r in res["rows"]}
    assert by["eager_probe"]["status"] == STATUS_OOM and by["eager_probe"]["median_ms"] is None
    ours = by["fastattn_icl"]
    assert ours["status"] == "unchecked" and ours["median_ms"] > 0 and "no correctness gate: oom" in ours["message"]
    assert ours["speedup_text"]["eager_probe"] == "n/a (fastattn_icl unchecked)"
    assert any("no correctness gate could run" in s for s in res["skipped"])


def test_saliency_gpu_targets_from_synthetic_rows():
    from benchmarks.harness import add_speedups

    def rows_for(eager_ms_at_1k, ours_exponent):
        rows = []
        for T in (256, 1024, 16384):
            case = saliency_case("gpt2-xl", T)
            for provider, status, ms, mem in (
                ("fastattn_icl", STATUS_OK, 1.0, int(1e6 * T**ours_exponent)),
                ("eager_probe", STATUS_OOM if T == 16384 else STATUS_OK, eager_ms_at_1k, int(1e3 * T**2)),
            ):
                rows.append(
                    {
                        "case": case.name,
                        "group": case.group,
                        "params": case.params(),
                        "provider": provider,
                        "mode": "flow",
                        "status": status,
                        "median_ms": None if status == STATUS_OOM else ms,
                        "peak_mem_bytes": None if status == STATUS_OOM else mem,
                    }
                )
        add_speedups(rows, ["fastattn_icl", "eager_probe"])
        return {t["target"].split(" (")[0]: t for t in bench_saliency.targets(rows)}

    got = rows_for(12.0, 1.0)
    assert got["gpt2-xl: >= 10x faster than eager_probe at T = 1024"]["result"] == "PASS"
    memory = got["gpt2-xl: peak memory linear in T"]
    assert memory["result"] == "PASS" and "eager_probe: exponent 2.00" in memory["detail"]
    long = got["gpt2-xl: runs at T = 16384"]
    assert long["result"] == "PASS" and "eager_probe oom" in long["detail"]
    got = rows_for(5.0, 1.5)
    assert got["gpt2-xl: >= 10x faster than eager_probe at T = 1024"]["result"] == "FAIL"
    assert got["gpt2-xl: peak memory linear in T"]["result"] == "FAIL"


@pytest.mark.gpu
def test_saliency_bench_on_cuda():
    from benchmarks.shapes import SaliencyCase

    cuda = torch.device("cuda")
    case = SaliencyCase("gpu-small", "tiny", "small", 2, 4, 64, 256, 1, "fp16")
    res = bench_saliency.run_saliency_bench([case], cuda, progress=None)
    assert "Triton" in res["providers"][0]["description"]
    for row in res["rows"]:
        assert row["status"] == STATUS_OK and row["check"]["status"] == STATUS_OK, row
        assert row["median_ms"] > 0 and row["peak_mem_bytes"] > 0
    assert res["targets"] and all(t["result"] in ("PASS", "FAIL", "N/A") for t in res["targets"])


# ---- KV-cache gather of anchor compression (benchmarks/bench_gather.py) ----------------------------

from benchmarks import bench_gather  # noqa: E402
from benchmarks.harness import STATUS_SKIPPED  # noqa: E402
from fastattn_icl import _ext  # noqa: E402

needs_gather_ext = pytest.mark.skipif(
    not _ext.has_op("gather_kv"), reason=f"fastattn_icl._C is not built ({_ext.load_error()}); {_ext.BUILD_HINT}"
)


@pytest.fixture
def no_gc_gather(monkeypatch, no_gc):
    """``no_gc`` for the gather benchmark, which holds its own reference to ``free_memory``."""
    monkeypatch.setattr(bench_gather, "free_memory", lambda device: None)


def test_gather_sets():
    gpu = bench_gather.gather_gpu_set()
    assert {(c.model, c.layers, c.Hkv, c.D) for c in gpu} == {("gpt2-xl", 48, 25, 64), ("gpt-j", 28, 16, 256)}
    assert {c.dataset for c in gpu} == {"sst2", "trec", "agnews", "emoc"} and {c.per_class for c in gpu} == {1, 4}
    assert all(c.dtype == "fp16" for c in gpu) and sorted({c.B for c in gpu}) == [1, 16]
    assert len(gpu) == 2 * 4 * 2 + 4 and len({c.name for c in gpu}) == len(gpu)
    assert len(bench_gather.gather_gpu_set(batch=16)) == 2 * 4 * 2  # the batched cases are not repeated
    cpu = bench_gather.gather_cpu_set()
    assert cpu and all(c.dtype == "fp32" and c.model == "gpt2-xl" and c.B == 1 for c in cpu)
    assert all(c.layers == 24 and c.name.endswith("-L24") and (c.Hkv, c.D) == (25, 64) for c in cpu)
    assert max(c.bytes_moved // 4 for c in cpu) < 32 * 2**20  # one output, under glibc's mmap ceiling
    assert bench_gather.gather_set("default", cuda=True) == gpu and bench_gather.gather_set("all", cuda=False) == cpu
    assert bench_gather.gather_set("saliency", cuda=True) == [] and bench_gather.gather_set("papers", cuda=False) == []
    assert bench_gather.gather_set("tiny", cuda=True) == bench_gather.gather_tiny_set()
    assert all(c.B == 4 for c in bench_gather.gather_set("cpu", cuda=False, batch=4))
    # SST-2, 4 demonstrations per class: 8 demonstrations of ceil(20 * 1.3) + 7 = 33 tokens, no test input
    case = bench_gather.gather_case("gpt-j", "sst2", 4)
    assert case.demonstrations == 8 and case.T == 8 * 33 == prompt_tokens("sst2", 8) - prompt_tokens("sst2", 0)
    assert case.M == 8 * 7 and case.bytes_moved == 4 * 28 * 1 * 16 * 56 * 256 * 2
    pos = case.positions()
    assert len(pos) == len(set(pos)) == case.M and pos == sorted(pos) and pos[-1] == case.T - 1
    assert pos[:7] == [0, 1, 28, 29, 30, 31, 32] and pos[7:9] == [33, 34]  # first 2, last 5 of each demonstration


@needs_gather_ext
def test_gather_bench_cli_smoke(tmp_path, capsys, no_gc_gather):
    # all four providers on the tiny set through the CLI: every gate passes bit-exactly, files written
    _run_tiny_cli("gather", tmp_path)
    assert "TARGET not evaluated: no CUDA" in capsys.readouterr().out
    data = json.loads((tmp_path / "cpu-gather.json").read_text())
    md = (tmp_path / "cpu-gather.md").read_text()
    assert [p["name"] for p in data["providers"]] == list(bench_gather.PROVIDERS)
    assert len(data["rows"]) == len(bench_gather.gather_tiny_set()) * len(bench_gather.PROVIDERS)
    for r in data["rows"]:
        assert r["status"] == STATUS_OK and r["check"]["status"] == STATUS_OK, r
        assert r["check"]["errors"] == {"K": {"error": 0.0, "tolerance": 0.0}, "V": {"error": 0.0, "tolerance": 0.0}}
        assert r["median_ms"] > 0 and r["mode"] == "gather" and r["peak_mem_bytes"] is None
        assert r["gb_per_s"] == pytest.approx(r["bytes_moved"] / (r["median_ms"] * 1e-3) / 1e9)
    ours = [r for r in data["rows"] if r["provider"] == "gather_kv"]
    assert all(r["speedup_vs"]["index_select_loop"] and r["speedup_vs"]["index_select_loop_nostack"] for r in ours)
    assert data["targets"] and all(t["result"] == "not evaluated" for t in data["targets"])
    assert "## Time, bytes moved and bandwidth" in md and "correctness gate:" in md
    assert "gather_kv vs index_select_loop_nostack" in md and "**not evaluated**" in md


def test_gather_incorrect_provider_speedup_is_refused(monkeypatch, no_gc_gather):
    # one element one ulp off (a value check with a tolerance could miss it; the bitwise gate does not)
    def off_by_one_ulp(case, inp):
        k, v = bench_gather._index_select_loop(case, inp)
        k[0, 0, 0, 0, 0] = torch.nextafter(k[0, 0, 0, 0, 0], torch.tensor(float("inf")))
        return k, v

    monkeypatch.setitem(bench_gather.PROVIDER_FNS, "index_select_loop", off_by_one_ulp)
    names = ["index_select_loop", "index_select_loop_nostack"]
    if _ext.has_op("gather_kv"):
        names.insert(0, "gather_kv")
    res = bench_gather.run_gather_bench(
        bench_gather.gather_tiny_set()[:1], CPU, timing=FAST, progress=None, provider_names=names
    )
    by = {r["provider"]: r for r in res["rows"]}
    bad = by["index_select_loop"]
    assert bad["status"] == STATUS_INCORRECT and "K: not bit-exact" in bad["message"] and bad["median_ms"] > 0
    assert bad["check"]["errors"]["K"]["error"] > 0 and bad["check"]["errors"]["V"]["error"] == 0.0
    assert by["index_select_loop_nostack"]["status"] == STATUS_OK
    assert by["index_select_loop_nostack"]["speedup_text"]["index_select_loop"] == "n/a (check failed)"
    assert set(bad["speedup_text"].values()) == {"n/a (check failed)"}
    if "gather_kv" in by:
        assert by["gather_kv"]["status"] == STATUS_OK
        assert by["gather_kv"]["speedup_vs"]["index_select_loop"] is None
        assert by["gather_kv"]["speedup_vs"]["index_select_loop_nostack"] > 0
        assert "n/a (check failed)" in bench_gather.side_by_side(res)
    # a wrong shape (a list of per-batch-row tensors stacked the wrong way) fails too
    monkeypatch.setitem(
        bench_gather.PROVIDER_FNS,
        "index_select_loop",
        lambda case, inp: tuple(x.transpose(0, 1) for x in bench_gather._index_select_loop(case, inp)),
    )
    res = bench_gather.run_gather_bench(
        bench_gather.gather_tiny_set()[:1], CPU, timing=FAST, progress=None, provider_names=["index_select_loop"]
    )
    (row,) = res["rows"]
    assert row["status"] == STATUS_INCORRECT and row["check"]["errors"]["K"]["error"] == float("inf")


def test_gather_gpu_targets_from_synthetic_rows():
    from benchmarks.harness import add_speedups

    def rows_for(ours_ms, ours_status=STATUS_OK):
        rows = []
        for case, ms in zip(bench_gather.gather_gpu_set()[:3], ours_ms):
            for provider, status, t in (("gather_kv", ours_status, ms), ("index_select_loop", STATUS_OK, 1.0)):
                rows.append(
                    {
                        "case": case.name,
                        "group": case.group,
                        "params": case.params(),
                        "provider": provider,
                        "mode": "gather",
                        "status": status,
                        "median_ms": t,
                    }
                )
        add_speedups(rows, ["gather_kv", "index_select_loop"])
        (target,) = bench_gather.targets(rows)
        return target

    target = rows_for([0.5, 0.25, 1.0])
    assert target["result"] == "PASS" and "3/3 compared cases" in target["detail"] and "best 4.00x" in target["detail"]
    target = rows_for([0.5, 1.25, 1.0])
    assert target["result"] == "FAIL" and "below: gpt2-xl-sst2-4pc-b1 0.80x" in target["detail"]
    assert rows_for([0.5, 0.5, 0.5], STATUS_INCORRECT)["result"] == "FAIL"
    assert rows_for([0.5, 0.5, 0.5], STATUS_SKIPPED)["result"] == "N/A"
    rows = []
    (off,) = bench_gather.targets(rows, evaluated=False)
    assert off["result"] == "not evaluated" and off["detail"].startswith("no CUDA")


@pytest.mark.gpu
@needs_gather_ext
def test_gather_bench_on_cuda():
    cuda = torch.device("cuda")
    case = bench_gather.gather_case("gpt2-xl", "sst2", 1, B=2)
    res = bench_gather.run_gather_bench([case], cuda, progress=None)
    assert "one CUDA launch" in res["providers"][0]["description"]
    for row in res["rows"]:
        assert row["status"] == STATUS_OK and row["check"]["status"] == STATUS_OK, row
        assert row["median_ms"] > 0 and row["peak_mem_bytes"] > 0 and row["gb_per_s"] > 0
    assert res["targets"] and all(t["result"] in ("PASS", "FAIL", "N/A") for t in res["targets"])


# ---- anchor compression end to end (benchmarks/bench_compression.py) -------------------------------

import dataclasses  # noqa: E402

from benchmarks import bench_compression  # noqa: E402

needs_compression_ext = pytest.mark.skipif(
    not _ext.has_op("gather_kv"), reason=f"fastattn_icl._C is not built ({_ext.load_error()}); {_ext.BUILD_HINT}"
)


@pytest.fixture
def no_gc_compression(monkeypatch, no_gc):
    """``no_gc`` for the compression benchmark, which holds its own reference to ``free_memory``."""
    monkeypatch.setattr(bench_compression, "free_memory", lambda device: None)


def test_compression_sets():
    gpu = bench_compression.compression_gpu_set()
    specs = {(c.model.key, c.model.family, c.model.layers, c.model.d_model, c.model.heads) for c in gpu}
    assert specs == {("gpt2-xl", "gpt2", 48, 1600, 25), ("gpt-j", "gptj", 28, 4096, 16)}
    assert {c.model.vocab for c in gpu} == {50257, 50400} and all(c.model.dtype == "fp16" for c in gpu)
    assert {c.dataset for c in gpu} == {"sst2", "trec", "agnews", "emoc"} and {c.per_class for c in gpu} == {1, 4}
    assert sorted({c.B for c in gpu}) == [1, 16, 64] and len(gpu) == 2 * 4 * 2 * 3 == len({c.name for c in gpu})
    # every full prompt fits the model's context (GPT2-XL: 1024 positions; AGNews 4/class is 1001 tokens)
    assert all(c.T_demo + c.S <= c.model.positions for c in gpu)
    assert max(c.T_demo + c.S for c in gpu) == prompt_tokens("agnews", 16) == 1001
    cpu = bench_compression.compression_cpu_set()
    assert cpu and all(c.model.dtype == "fp32" and c.model.layers == 4 and c.model.d_model == 256 for c in cpu)
    assert {c.model.family for c in cpu} == {"gpt2", "gptj"} and sorted({c.B for c in cpu}) == [1, 8]
    assert {c.dataset for c in cpu} == {"sst2", "agnews"}
    assert bench_compression.compression_set("default", cuda=True) == gpu
    assert bench_compression.compression_set("all", cuda=False) == cpu
    assert bench_compression.compression_set("tiny", cuda=True) == bench_compression.compression_tiny_set()
    assert bench_compression.compression_set("papers", cuda=True) == []
    assert {c.B for c in bench_compression.compression_set("cpu", cuda=False, batch=4)} == {4}
    # SST-2, 1 demonstration per class: 2 demonstrations of ceil(20 * 1.3) + 7 = 33 tokens, test input 26 + 5
    case = bench_compression.serve_case("gpt2-xl", "sst2", 1, 16)
    assert case.demonstrations == 2 and case.T_demo == 66 and case.S == 31 and case.M == 14
    assert case.T_demo + case.S == prompt_tokens("sst2", 2)
    pos = case.positions()
    assert len(pos) == len(set(pos)) == case.M and pos == sorted(pos) and pos[-1] == case.T_demo - 1
    assert pos[:9] == [0, 1, 28, 29, 30, 31, 32, 33, 34]  # position 0 kept; first 2, last 5 of each demo
    params = case.params()
    assert (params["model_key"], params["family"], params["B"], params["T_full"]) == ("gpt2-xl", "gpt2", 16, 97)


@needs_compression_ext
def test_compression_bench_cli_smoke(tmp_path, capsys, no_gc_compression):
    # every provider on the tiny set (both families) through the CLI: gates pass, GPT-J's sdpa rows are skipped
    _run_tiny_cli("compression", tmp_path)
    assert "TARGET not evaluated: no CUDA" in capsys.readouterr().out
    data = json.loads((tmp_path / "cpu-compression.json").read_text())
    md = (tmp_path / "cpu-compression.md").read_text()
    assert [p["name"] for p in data["providers"]] == list(bench_compression.PROVIDERS)
    tiny = bench_compression.compression_tiny_set()
    assert len(data["rows"]) == len(tiny) * len(bench_compression.PROVIDERS)
    sdpa = (bench_compression.FULL_SDPA, bench_compression.EXPANDED_SDPA)
    from fastattn_icl.integrations.gptj import routes_attention_interface as gptj_routed  # sdpa from 5.24 on

    for r in data["rows"]:
        if r["params"]["family"] == "gptj" and r["provider"] in sdpa and not gptj_routed():
            assert r["status"] == STATUS_SKIPPED and "no sdpa attention" in r["message"], r
            continue
        assert r["status"] == STATUS_OK and r["check"]["status"] == STATUS_OK, r
        assert "float64 copy" in r["check"]["scope"]
        assert r["median_ms"] > 0 and r["mode"] == "serve" and r["peak_mem_bytes"] is None
        assert r["ms_per_input"] == pytest.approx(r["median_ms"] / r["params"]["B"])
        assert r["inputs_per_s"] == pytest.approx(r["params"]["B"] / (r["median_ms"] * 1e-3))
    ours = [r for r in data["rows"] if r["provider"] == bench_compression.OURS]
    assert all(r["speedup_vs"]["full-eager"] and r["speedup_vs"]["compressed-expanded-eager"] for r in ours)
    assert [e["geometry"] for e in data["compress"]] == ["gpt2-tiny-sst2-1pc", "gptj-tiny-sst2-1pc"]
    assert all(e["status"] == STATUS_OK and e["median_ms"] > 0 and e["M"] == 14 for e in data["compress"])
    assert all(e["prefix_bytes"] == 2 * 2 * 4 * 14 * 16 * 4 for e in data["compress"])  # K+V, L 2, H 4, M 14, d 16
    assert data["targets"] and all(t["result"] == "not evaluated" for t in data["targets"])
    assert "## Compression (once per geometry" in md and "## Time per test input" in md
    assert "correctness gate:" in md and "compressed vs full-eager" in md and "**not evaluated**" in md


@needs_compression_ext
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_compression_incorrect_speedup_is_refused(monkeypatch, no_gc_compression, dtype):
    # compressed serves with the values of one kept position zeroed: the logits move by ~0.5% of their largest,
    # which the gate catches against the higher-precision copy (float64 for fp32, float32 for fp16)
    real = bench_compression.serve_fn

    def one_position_lost(provider, model, comp, inp, B):
        if provider == bench_compression.OURS:
            values = comp.values.clone().index_fill_(3, torch.tensor([comp.num_kept - 1]), 0.0)
            comp = dataclasses.replace(comp, values=values)
        return real(provider, model, comp, inp, B)

    monkeypatch.setattr(bench_compression, "serve_fn", one_position_lost)
    spec = dataclasses.replace(bench_compression.MODEL_SPECS["gpt2-tiny"], dtype=dtype)
    case = bench_compression.ServeCase("tiny-b2", "tiny", spec, "sst2", 1, 2)
    res = bench_compression.run_compression_bench([case], CPU, timing=FAST, progress=None)
    by = {r["provider"]: r for r in res["rows"]}
    bad = by[bench_compression.OURS]
    assert bad["status"] == STATUS_INCORRECT and bad["median_ms"] > 0 and "logits: max error" in bad["message"]
    assert set(bad["speedup_text"].values()) == {"n/a (check failed)"}
    for p in ("full-eager", "full-sdpa", "compressed-expanded-sdpa", "compressed-expanded-eager"):
        assert by[p]["status"] == STATUS_OK, by[p]
        assert by[p]["speedup_vs"][bench_compression.OURS] is None
    assert "n/a (check failed)" in bench_compression.side_by_side(res)


def test_compression_gpu_targets_from_synthetic_rows():
    from benchmarks.harness import add_speedups

    providers = list(bench_compression.PROVIDERS)

    def rows_for(model, times, status=STATUS_OK):
        """``times[(dataset, n, B)] = {provider: ms}``; a missing provider is a skipped row."""
        rows = []
        for (ds, n, B), per in times.items():
            case = bench_compression.serve_case(model, ds, n, B)
            for p in providers:
                ms = per.get(p)
                st = STATUS_SKIPPED if ms is None else (status if p == bench_compression.OURS else STATUS_OK)
                rows.append(
                    {
                        "case": case.name,
                        "group": case.group,
                        "params": case.params(),
                        "provider": p,
                        "mode": "serve",
                        "status": st,
                        "median_ms": ms,
                    }
                )
        return rows

    full = {"full-eager": 4.0, "full-sdpa": 2.0, "compressed-expanded-eager": 1.5, "compressed-expanded-sdpa": 1.2}
    gpt2 = rows_for(
        "gpt2-xl",
        {
            ("sst2", 1, 1): {"compressed": 1.0, "full-eager": 1.2},  # 1.2x >= 1.1x
            ("agnews", 1, 1): {"compressed": 1.0, "full-eager": 2.0},  # 2.0x < 2.5x
            ("agnews", 1, 64): {"compressed": 1.0, **full},  # 4x full-eager, 2x full-sdpa
            ("agnews", 4, 64): {"compressed": 1.0, **full},
        },
    )
    gptj = rows_for(
        "gpt-j",
        {
            ("emoc", 1, 1): {"compressed": 1.0, "full-eager": 2.0},  # 2.0x >= 1.9x
            ("agnews", 1, 64): {"compressed": 1.0, "full-eager": 3.5, "compressed-expanded-eager": 1.1},
        },
    )
    rows = gpt2 + gptj
    add_speedups(rows, providers)
    got = {t["target"].split(" (")[0]: t for t in bench_compression.targets(rows)}
    assert got["gpt2-xl SST-2, B 1, 1 demo/class: compressed vs full-eager >= 1.1x"]["result"] == "PASS"
    fail = got["gpt2-xl AGNews, B 1, 1 demo/class: compressed vs full-eager >= 2.5x"]
    assert fail["result"] == "FAIL" and fail["detail"].startswith("2.00x")
    assert got["gpt2-xl AGNews, B 64: compressed throughput >= 3x full-eager"]["result"] == "PASS"
    sdpa = got["gpt2-xl AGNews, B 64: compressed throughput >= 3x full-sdpa"]
    assert sdpa["result"] == "FAIL" and "1/class: 2.00x (64000 vs 32000 inputs/s)" in sdpa["detail"]
    assert got["gpt-j EmoC, B 1, 1 demo/class: compressed vs full-eager >= 1.9x"]["result"] == "PASS"
    assert got["gpt-j AGNews, B 1, 1 demo/class: compressed vs full-eager >= 2.9x"]["result"] == "N/A"
    assert got["gpt-j AGNews, B 64: compressed throughput >= 3x full-eager"]["result"] == "PASS"
    no_sdpa = got["gpt-j AGNews, B 64: compressed throughput >= 3x full-sdpa"]
    assert no_sdpa["result"] == "N/A" and "full-sdpa skipped" in no_sdpa["detail"]
    # an incorrect compressed row fails every target it is part of
    rows = rows_for("gpt2-xl", {("sst2", 1, 1): {"compressed": 1.0, "full-eager": 5.0}}, STATUS_INCORRECT)
    add_speedups(rows, providers)
    (target,) = bench_compression.targets(rows)
    assert target["result"] == "FAIL" and "n/a (check failed)" in target["detail"]
    off = bench_compression.targets(rows, evaluated=False)
    assert off[0]["result"] == "not evaluated" and off[0]["detail"].startswith("no CUDA")


@pytest.mark.gpu
@needs_compression_ext
def test_compression_bench_on_cuda():
    cuda = torch.device("cuda")
    spec = dataclasses.replace(bench_compression.MODEL_SPECS["gpt2-tiny"], key="gpt2-small-fp16", dtype="fp16")
    cases = [bench_compression.ServeCase(f"gpu-b{B}", "tiny", spec, "agnews", 1, B) for B in (1, 4)]
    res = bench_compression.run_compression_bench(cases, cuda, progress=None)
    assert "Triton" in res["providers"][0]["description"]
    for row in res["rows"]:
        assert row["status"] == STATUS_OK and row["check"]["status"] == STATUS_OK, row
        assert "float32 copy" in row["check"]["scope"]
        assert row["median_ms"] > 0 and row["peak_mem_bytes"] > 0
    assert res["targets"] and all(t["result"] in ("PASS", "FAIL", "N/A") for t in res["targets"])


# ---- momentum attention and the Deep-Thinking update (benchmarks/bench_momentum.py) ----------------

from benchmarks import bench_momentum  # noqa: E402


@pytest.fixture
def no_gc_momentum(monkeypatch, no_gc):
    """``no_gc`` for the momentum benchmark, which holds its own reference to ``free_memory``."""
    monkeypatch.setattr(bench_momentum, "free_memory", lambda device: None)


def _parts(cases):
    attn = [c for c in cases if isinstance(c, bench_momentum.MomentumShape)]
    return attn, [c for c in cases if isinstance(c, bench_momentum.UpdateCase)]


def test_momentum_sets():
    gpu = bench_momentum.momentum_set("default", cuda=True)
    attn, upd = _parts(gpu)
    assert len(attn) + len(upd) == len(gpu) == len({c.name for c in gpu}) == 10 + 4
    assert {(c.H, c.Hkv, c.D) for c in attn} == {(32, 32, 128), (32, 8, 128)}
    assert sorted({c.Tq for c in attn}) == [1024, 2048, 4096, 8192, 16384]
    assert all(c.B * c.Tq == 16384 and c.Tq == c.Tk and c.dtype == "bf16" and c.causal and c.eta == 0.9 for c in attn)
    assert {(c.model, c.layers, c.Hkv, c.D) for c in upd} == {("gpt2-xl", 48, 25, 64), ("llama-7b", 32, 32, 128)}
    assert all(c.dtype == "fp16" and (c.eta, c.beta) == (0.01, 0.9) and c.per_class == 4 for c in upd)
    # N = the demonstrations' tokens: SST-2 8 demos of ceil(20 * 1.3) + 7 = 33, AGNews 16 of ceil(40 * 1.3) + 7 = 59
    assert {c.dataset: c.N for c in upd} == {"sst2": 264, "agnews": 944}
    assert all(c.N == prompt_tokens(c.dataset, c.demonstrations) - prompt_tokens(c.dataset, 0) for c in upd)
    case = bench_momentum.update_case("llama-7b", "agnews")
    assert case.rows == 2 * 32 * 32 and case.bytes_moved == 2 * 32 * 32 * 944 * 128 * (3 * 2 + 8)
    cpu = bench_momentum.momentum_set("cpu", cuda=True)
    assert cpu == bench_momentum.momentum_set("default", cuda=False) == bench_momentum.momentum_set("all", cuda=False)
    attn, upd = _parts(cpu)
    assert [c.Tq for c in attn] == [128, 256, 512]
    assert all((c.B, c.H, c.Hkv, c.D, c.dtype) == (1, 4, 4, 64, "fp32") for c in attn)
    assert all(c.dtype == "fp32" and c.layers == bench_momentum.CPU_LAYERS for c in upd) and len(upd) == 4
    for name in ("acceptance", "papers", "anchors", "saliency"):
        assert bench_momentum.momentum_set(name, cuda=True) == []
    attn, upd = _parts(bench_momentum.momentum_set("tiny", cuda=True))
    assert len(attn) == 1 and attn[0].Hkv < attn[0].H and {c.dtype for c in upd} == {"fp32", "fp16"}


def test_ulp_distance():
    inf = float("inf")
    x = torch.tensor([1.0, -1.0, 0.0, 3.5])
    assert bench_momentum.ulp_distance(x, x) == (0.0, 0)
    assert bench_momentum.ulp_distance(x, torch.nextafter(x, torch.full_like(x, inf))) == (1.0, 4)
    assert bench_momentum.ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])) == (0.0, 0)
    smallest = torch.nextafter(torch.tensor([0.0]), torch.tensor([1.0]))
    assert bench_momentum.ulp_distance(smallest, -smallest) == (2.0, 1)  # across zero: -s, 0, s
    h = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16)
    h3 = (h.view(torch.int16) + torch.tensor([3, 0, 0], dtype=torch.int16)).view(torch.float16)
    assert bench_momentum.ulp_distance(h, h3) == (3.0, 1)
    assert bench_momentum.ulp_distance(x, torch.tensor([1.0, -1.0, float("nan"), 3.5]))[0] == inf
    assert bench_momentum.ulp_distance(x, x[:2])[0] == inf


def test_momentum_bench_cli_smoke(tmp_path, capsys, no_gc_momentum):
    # both parts on the tiny set through the CLI: every gate passes, files written
    _run_tiny_cli("momentum", tmp_path)
    assert "TARGET not evaluated: no CUDA" in capsys.readouterr().out
    data = json.loads((tmp_path / "cpu-momentum.json").read_text())
    md = (tmp_path / "cpu-momentum.md").read_text()
    a, b = data["momentum"], data["deep_thinking"]
    # part A: three providers, fwd and fwd+bwd, each gated (base against base attention's oracle)
    assert [p["name"] for p in a["providers"]] == ["fastattn_icl", "base", "eager"]
    assert len(a["rows"]) == 3 * 2 and a["modes"] == ["fwd", "fwd+bwd"]
    for r in a["rows"]:
        assert r["status"] == STATUS_OK and r["check"]["status"] == STATUS_OK, r
        assert r["median_ms"] > 0 and r["peak_mem_bytes"] is None
        grads = {"fwd": {"out"}, "fwd+bwd": {"out", "dq", "dk", "dv"}}[r["mode"]]
        assert set(r["check"]["errors"]) == grads
    for mode in ("fwd", "fwd+bwd"):
        ours, base = _by(a, "fastattn_icl", mode), _by(a, "base", mode)
        assert ours["speedup_vs"]["eager"] > 0 and ours["speedup_vs"]["base"] > 0
        assert ours["overhead_vs_base"] == pytest.approx(ours["median_ms"] / base["median_ms"] - 1)
    # part B: the fused update bitwise equal to the loop on CPU, GB/s from the bytes moved
    assert [p["name"] for p in b["providers"]] == ["fused", "eager_loop"]
    assert len(b["rows"]) == 2 * 2
    for r in b["rows"]:
        assert r["status"] == STATUS_OK and r["mode"] == "update" and r["median_ms"] > 0, r
        assert r["gb_per_s"] == pytest.approx(r["bytes_moved"] / (r["median_ms"] * 1e-3) / 1e9)
        if r["provider"] == "fused":
            check = r["check"]
            assert check["status"] == STATUS_OK and check["bitwise"], check
            assert check["criterion"] == {"X_hat": "bitwise", "m": "bitwise"}
            assert check["errors"]["X_new"] == {"error": 0.0, "tolerance": 0.0}
            assert r["speedup_vs"]["eager_loop"] > 0
        else:
            assert r["check"] is None
    assert len(data["targets"]) == 3 and all(t["result"] == "not evaluated" for t in data["targets"])
    assert "## Part A" in md and "## Part B" in md and md.count("correctness gate:") == 2
    assert "overhead vs base" in md and "| bitwise | bitwise |" in md and "**not evaluated**" in md


def _fused_then(change):
    def fused(case, inp):
        bench_momentum._fused(case, inp)
        change(inp.work)

    return fused


def test_momentum_incorrect_speedups_are_refused(monkeypatch, no_gc_momentum):
    # part A: the momentum op with the wrong eta fails its gate; base and eager are unaffected
    def wrong_eta(case, q, k, v):
        return bench_momentum._eager_momentum(dataclasses.replace(case, eta=0.5), q, k, v)

    monkeypatch.setattr(bench_momentum, "_momentum", wrong_eta)
    tiny = bench_momentum.momentum_tiny_set()
    res = bench_momentum.run_attention_part(tiny, CPU, timing=FAST, progress=None)
    for mode in ("fwd", "fwd+bwd"):
        bad = _by(res, "fastattn_icl", mode)
        assert bad["status"] == STATUS_INCORRECT and bad["check"]["message"] and bad["median_ms"] > 0
        assert bad["speedup_text"] == {"base": "n/a (check failed)", "eager": "n/a (check failed)"}
        assert bad["overhead_vs_base"] is None and bad["overhead_text"] == "n/a (check failed)"
        assert _by(res, "base", mode)["status"] == _by(res, "eager", mode)["status"] == STATUS_OK
    assert "n/a (check failed)" in bench_momentum.attention_side_by_side(res)
    # part B: a fused update one unit off in one element of X̂ (no tolerance rule lets that through) ...
    upd = bench_momentum.update_tiny_set()
    monkeypatch.setitem(bench_momentum.UPDATE_FNS, "fused", _fused_then(lambda w: w[0, 0, 0, 0, 0].add_(1.0)))
    res = bench_momentum.run_update_part(upd, CPU, timing=FAST, progress=None)
    for case in upd:
        bad, loop = (_find_row(res, case.name, p) for p in ("fused", "eager_loop"))
        assert bad["status"] == STATUS_INCORRECT and "X_hat" in bad["message"] and bad["median_ms"] > 0
        assert bad["check"]["criterion"]["X_hat"] == "failed" and bad["check"]["criterion"]["m"] == "bitwise"
        assert bad["speedup_vs"]["eager_loop"] is None and loop["speedup_text"]["fused"] == "n/a (check failed)"
        assert loop["status"] == STATUS_OK
    assert "FAIL" in bench_momentum.update_side_by_side(res)
    # ... and one that writes into X_new
    monkeypatch.setitem(bench_momentum.UPDATE_FNS, "fused", _fused_then(lambda w: w[1, 0, 0, 1, 0].mul_(2.0)))
    res = bench_momentum.run_update_part(upd[:1], CPU, timing=FAST, progress=None, provider_names=["fused"])
    (row,) = res["rows"]
    assert row["status"] == STATUS_INCORRECT and "X_new: changed" in row["message"]


def _find_row(results, case, provider):
    (row,) = [r for r in results["rows"] if (r["case"], r["provider"]) == (case, provider)]
    return row


def test_momentum_update_gate_accepts_fused_multiply_adds(monkeypatch):
    # what a Triton kernel that contracts g + βm and X̂ + ηm into FMAs returns (one rounding instead of two):
    # far more than 1 ulp from the loop where g and βm nearly cancel, yet more accurate; the float64 rule passes it
    def fma(case, inp):
        w = inp.work.view(case.rows, 2, case.N * case.D)
        x_hat, x_new = w[:, 0], w[:, 1]
        beta, eta = (float(torch.tensor(c, dtype=torch.float32)) for c in (case.beta, case.eta))
        g = x_new.float() - x_hat.float()
        inp.m.copy_(g.double() + beta * inp.m.double())
        x_hat.copy_((x_hat.double() + eta * inp.m.double()).to(x_hat.dtype))

    monkeypatch.setitem(bench_momentum.UPDATE_FNS, "fused", fma)
    case = bench_momentum.update_tiny_set()[0]
    check = bench_momentum.update_gate(case, bench_momentum.make_update_inputs(case, CPU))
    assert check["status"] == STATUS_OK and not check["bitwise"], check
    assert check["ulp"]["m"]["max"] > 1 and check["criterion"]["m"].endswith("within the fastattn_icl.testing rule")
    assert check["errors"]["m"]["error"] <= check["errors"]["m"]["tolerance"]


def _momentum_row(case, provider, mode, ms, status=STATUS_OK):
    return {
        "case": case.name,
        "group": case.group,
        "params": case.params(),
        "provider": provider,
        "mode": mode,
        "status": status,
        "median_ms": ms,
    }


def test_momentum_gpu_targets_from_synthetic_rows():
    from benchmarks.harness import add_speedups

    providers = ["fastattn_icl", "base", "eager"]
    llama = [c for c in bench_momentum.momentum_gpu_set() if c.model == "llama-7b"]

    def targets(ours_ms, status=STATUS_OK, base_status=STATUS_OK):
        rows = []
        for case, ms in zip(llama, ours_ms):
            for mode in ("fwd", "fwd+bwd"):
                rows.append(_momentum_row(case, "fastattn_icl", mode, ms, status if case.Tq == 8192 else STATUS_OK))
                rows.append(_momentum_row(case, "base", mode, 1.0, base_status))
                rows.append(_momentum_row(case, "eager", mode, 10.0))
        add_speedups(rows, providers)
        return bench_momentum.attention_targets(rows)

    fwd, both = targets([1.5, 1.04, 1.01, 1.0, 0.98])  # T = 1k is outside the target
    assert [t["result"] for t in (fwd, both)] == ["PASS", "PASS"]
    assert fwd["target"].startswith("llama-7b fwd:") and fwd["detail"].startswith("T2048: +4.0%, T4096: +1.0%")
    assert "T1024" not in fwd["detail"]
    assert targets([1.0, 1.0, 1.06, 1.0, 1.0])[0]["result"] == "FAIL"
    failed = targets([1.0] * 5, status=STATUS_INCORRECT)[0]
    assert failed["result"] == "FAIL" and "T8192: n/a (check failed)" in failed["detail"]
    assert targets([1.0] * 5, base_status="oom")[0]["result"] == "N/A"
    off = bench_momentum.attention_targets([], evaluated=False)
    assert off == []
    rows = [_momentum_row(llama[2], p, "fwd", ms) for p, ms in (("fastattn_icl", 1.0), ("base", 1.0))]
    add_speedups(rows, providers)
    (off,) = bench_momentum.attention_targets(rows, evaluated=False)
    assert off["result"] == "not evaluated" and off["detail"].startswith("no CUDA")
    # part B: fused >= 5x the loop on every case
    upd = bench_momentum.update_gpu_set()

    def update_target(fused_ms, status=STATUS_OK):
        rows = []
        for case, ms in zip(upd, fused_ms):
            rows.append(_momentum_row(case, "fused", "update", ms, status))
            rows.append(_momentum_row(case, "eager_loop", "update", 1.0))
        add_speedups(rows, ["fused", "eager_loop"])
        (t,) = bench_momentum.update_targets(rows)
        return t

    assert update_target([0.1, 0.05, 0.2, 0.1])["result"] == "PASS"
    low = update_target([0.1, 0.25, 0.2, 0.1])
    assert low["result"] == "FAIL" and "dt-gpt2-xl-agnews-4pc: 4.00x" in low["detail"]
    assert update_target([0.1] * 4, STATUS_INCORRECT)["result"] == "FAIL"
    assert update_target([0.1] * 4, STATUS_SKIPPED)["result"] == "N/A"


@pytest.mark.gpu
def test_momentum_bench_on_cuda():
    cuda = torch.device("cuda")
    attn = bench_momentum.MomentumShape("gpu-gqa", "gpu", 2, 8, 2, 512, 512, 64, True, "bf16", eta=0.9, model="gpu")
    upd = bench_momentum.UpdateCase("gpu-dt", "gpu", "gpu", 4, 4, 64, "sst2", 4, "fp16")
    res = bench_momentum.run_momentum_bench([attn, upd], cuda, progress=None)
    a, b = res["momentum"], res["deep_thinking"]
    assert "Triton" in a["providers"][0]["description"] and "Triton" in b["providers"][0]["description"]
    for row in a["rows"] + b["rows"]:
        assert row["status"] == STATUS_OK and row["median_ms"] > 0, row
        assert row["check"] is None or row["check"]["status"] == STATUS_OK, row
    assert all(r["peak_mem_bytes"] is not None for r in a["rows"] + b["rows"])
    assert res["targets"] and all(t["result"] in ("PASS", "FAIL", "N/A") for t in res["targets"])
