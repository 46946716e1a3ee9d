"""The benchmark runner (benchmarks/harness.py) and one smoke test per benchmark declaration, on CPU: rows, gates,
refused speed-ups, OOM and error rows, results files, and the target logic on synthetic rows."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import bench_anchors, bench_attention, bench_cpu, bench_momentum, bench_saliency
from benchmarks import run as bench_run
from benchmarks.harness import (
    STATUS_ERROR,
    STATUS_INCORRECT,
    STATUS_OK,
    STATUS_OOM,
    Provider,
    TimingConfig,
    add_speedups,
    cpu_peak_memory_bytes,
    environment,
    fit_exponent,
    render_markdown,
    run,
    speedup,
    write_results,
)
from benchmarks.shapes import AnchorShape, AttnShape, attention_cases, attention_flops, prompt_tokens
from fastattn_icl import _ext

CPU = torch.device("cpu")
FAST = TimingConfig(cpu_warmup_ms=1.0, cpu_rep_ms=2.0, cpu_min_reps=2, cpu_max_reps=3)
DECLARATIONS = {b.name: b for benches in bench_run.BENCHMARKS.values() for b in benches}
NEEDS_EXT = {"gather", "compression"}  # gather_kv lives in fastattn_icl._C


def _skip_without_ext(name):
    if name in NEEDS_EXT and not _ext.has_op("gather_kv"):
        pytest.skip(f"fastattn_icl._C is not built ({_ext.load_error()}); {_ext.BUILD_HINT}")


def _run(bench, providers=None, cases=None, modes=None):
    cases = cases or bench.cases("tiny", False, None)
    return run(bench, cases, providers or bench.providers, list(modes or bench.modes), CPU, timing=FAST, progress=None)


def _by(results, provider, mode=None, case=None):
    (row,) = [r for r in results["rows"] if r["provider"] == provider and mode in (None, r["mode"])
              and case in (None, r["case"])]
    return row


def test_flop_model_and_shapes():
    assert attention_flops(1, 1, 1024, 1024, 64, causal=False, mode="fwd") == 4 * 1024 * 1024 * 64
    assert attention_flops(2, 3, 1024, 1024, 64, causal=True, mode="fwd") == 2 * 3 * 2 * 1024 * 1024 * 64
    assert attention_flops(1, 1, 64, 1024, 64, causal=True, mode="fwd") == 4 * 64 * 1024 * 64  # chunk: not halved
    fwd = attention_flops(4, 16, 4096, 4096, 128, causal=True, mode="fwd")
    assert attention_flops(4, 16, 4096, 4096, 128, causal=True, mode="bwd") == 2.5 * fwd
    assert attention_flops(4, 16, 4096, 4096, 128, causal=True, mode="fwd+bwd") == 3.5 * fwd
    with pytest.raises(ValueError):
        attention_flops(1, 1, 1, 1, 8, causal=True, mode="sideways")
    assert prompt_tokens("agnews", 16) == 1001 and prompt_tokens("sst2", 2) == 97
    gpu = attention_cases("default", True, 2)
    assert {s.group for s in gpu} == {"acceptance", "papers"} and all(s.B == 2 for s in gpu if s.group == "papers")
    assert all(s.B * s.Tq == 16384 and s.D == 128 for s in gpu if s.group == "acceptance")
    for bench in DECLARATIONS.values():  # every benchmark has GPU, CPU and tiny cases; other sets are empty
        gpu, cpu = bench.cases("default", True, None), bench.cases("default", False, None)
        assert gpu and cpu and bench.cases("tiny", False, None) and gpu != cpu, bench.name
        assert bench.cases("cpu", True, None) == cpu and len({c.name for c in gpu}) == len(gpu)
    assert DECLARATIONS["anchors"].cases("papers", True, None) == []


def test_run_writes_json_and_markdown(tmp_path):
    results = _run(bench_attention.BENCH, modes=("fwd", "fwd+bwd"))
    assert len(results["rows"]) == 3 * 2
    for r in results["rows"]:
        assert r["status"] == STATUS_OK and r["check"]["status"] == STATUS_OK, r
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["peak_mem_bytes"] >= 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
    ours, eager = _by(results, "fastattn_icl", "fwd"), _by(results, "eager", "fwd")
    assert ours["speedup_vs"]["eager"] == pytest.approx(eager["median_ms"] / ours["median_ms"])
    assert set(_by(results, "eager", "fwd+bwd")["check"]["errors"]) == {"out", "dq", "dk", "dv"}
    assert any("no CUDA" in s for s in results["skipped"]) and results["targets"] == []
    json_path, md_path = write_results(results, tmp_path, bench_attention.BENCH)
    assert json_path == tmp_path / "cpu.json" and md_path == tmp_path / "cpu.md"
    header = json.loads(json_path.read_text())["header"]
    for key in ("device", "torch", "triton", "transformers", "cuda", "git_commit", "git_dirty", "date"):
        assert key in header
    md = md_path.read_text()
    assert "| fwd+bwd | fastattn_icl | ok |" in md and "## Side by side" in md and "vs sdpa" in md
    header = environment(CPU)
    assert header["device_slug"] == "cpu" and header["date"].endswith("+00:00")
    assert 2**26 <= cpu_peak_memory_bytes(lambda: torch.ones(1 << 24).sum()) < 2**26 + 2**20  # 64 MiB made and freed


def test_incorrect_provider_speedup_is_refused():
    broken = Provider("broken", lambda shape, q, k, v: bench_attention.oracle(shape, q, k, v) * 1.01, lambda d: "")
    results = _run(bench_attention.BENCH, [bench_attention.BENCH.providers[0], broken], modes=("fwd", "fwd+bwd"))
    for mode in ("fwd", "fwd+bwd"):
        bad, ours = _by(results, "broken", mode), _by(results, "fastattn_icl", mode)
        assert bad["status"] == STATUS_INCORRECT and bad["check"]["message"] and bad["median_ms"] > 0
        assert ours["status"] == STATUS_OK and bad["speedup_vs"]["fastattn_icl"] is None
        assert ours["speedup_text"]["broken"] == "n/a (check failed)"
    md = render_markdown(results, bench_attention.BENCH)
    assert "n/a (check failed)" in md and "FAIL (" in md
    assert speedup(ours, bad) == (None, "n/a (check failed)")


def test_oom_and_error_rows():
    calls = []

    def oom_always(shape, q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    def oom_when_timed(shape, q, k, v):
        calls.append(1)
        if len(calls) > 2:  # passes the forward and gradient checks, then runs out of memory
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")
        return bench_attention.oracle(shape, q, k, v)

    def error(shape, q, k, v):
        raise ValueError("out of memory")  # not a RuntimeError: an error, not an OOM

    providers = [bench_attention.BENCH.providers[0], *(Provider(f.__name__, f, lambda d: "")
                                                       for f in (oom_always, oom_when_timed, error))]
    results = _run(bench_attention.BENCH, providers, modes=("fwd", "fwd+bwd"))
    for name, status in (("oom_always", STATUS_OOM), ("oom_when_timed", STATUS_OOM), ("error", STATUS_ERROR)):
        for mode in ("fwd", "fwd+bwd"):
            row = _by(results, name, mode)
            assert row["status"] == status and row["median_ms"] is None and row["message"], row
            assert _by(results, "fastattn_icl", mode)["speedup_text"][name] == f"n/a ({name} {status})"
    assert "oom: " in render_markdown(results)


def test_sliced_check_on_large_shapes(monkeypatch):
    # large shapes are checked on the last batch row and kv head; anchors keep every batch row (beta is shared)
    monkeypatch.setattr(bench_attention, "FULL_CHECK_SCORES", 1)
    case = AttnShape("slice", "tiny", 3, 8, 2, 33, 33, 16, dtype="fp32")
    res = _run(bench_attention.BENCH, bench_attention.BENCH.providers[:1], [case], ("fwd+bwd",))
    assert _by(res, "fastattn_icl")["check"]["scope"] == "batch 2, kv head 1 (query heads 4..7)"
    case = AnchorShape("slice", "tiny", 3, 4, 4, 40, 40, 16, dtype="fp32", variant="anchors-from", demonstrations=4)
    res = _run(bench_anchors.ANCHORS, bench_anchors.ANCHORS.providers[:2], [case], ("fwd+bwd",))
    on, off = _by(res, "fastattn_icl-anchors"), _by(res, "fastattn_icl")
    assert on["status"] == off["status"] == STATUS_OK
    assert on["check"]["scope"] == "every batch row (beta is shared), kv head 3 (query heads 3..3)"
    assert set(on["check"]["errors"]) == {"out", "dq", "dk", "dv", "dbeta"}
    assert off["check"]["scope"] == "batch 2, kv head 3 (query heads 3..3)"  # feature off: base attention's gate
    assert set(off["check"]["errors"]) == {"out", "dq", "dk", "dv"}


# one line per declaration: providers, the names its gate reports, and the mode(s)
SMOKE = {
    "attention": (["fastattn_icl", "eager", "sdpa"], {"out", "dq", "dk", "dv"}),
    "anchors": (["fastattn_icl-anchors", "fastattn_icl", "eager"], {"out", "dq", "dk", "dv", "dbeta"}),
    "isolation": (["fastattn_icl-isolation", "fastattn_icl", "eager"], {"out", "dq", "dk", "dv"}),
    "epoch": (["fastattn_icl", "eager"], {"dbeta"}),
    "saliency": (["fastattn_icl", "eager_probe"], {"S_wp", "S_pq", "S_ww"}),
    "gather": (["gather_kv", "gather_kv_unchecked", "index_select_loop", "index_select_loop_nostack"], {"K", "V"}),
    "compression": (["compressed", "full-eager", "full-sdpa", "compressed-expanded-sdpa",
                     "compressed-expanded-eager"], {"logits"}),
    "momentum": (["fastattn_icl", "base", "eager"], {"out", "dq", "dk", "dv"}),
    "deep-thinking": (["fused", "eager_loop"], {"X_hat", "m", "X_new"}),
    "cpu-targets": (["fastattn_icl", "baseline", "base"], {"out", "dq", "dk", "dv", "dbeta", "S_wp", "S_pq", "S_ww",
                                                           "X_hat", "m", "X_new", "logits", "dembeds"}),
}


@pytest.mark.parametrize("bench", [b for b in bench_run.BENCHMARKS if b != "retuning"])  # test_bench_retuning.py
def test_cli_smoke(bench, tmp_path, capsys):
    # python -m benchmarks.run --bench <bench> on the tiny set, one thread: every gate passes, files written
    _skip_without_ext(bench)
    threads = torch.get_num_threads()
    try:
        assert bench_run.main(["--bench", bench, "--set", "tiny", "--out", str(tmp_path), "--rep-ms", "2",
                               "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for decl in bench_run.BENCHMARKS[bench]:
        providers, errors = SMOKE[decl.name]
        stem = tmp_path / f"cpu{decl.suffix}{'-1t' if decl.per_thread_count else ''}"
        data, md = json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text()
        assert [p["name"] for p in data["providers"]] == providers and data["header"]["torch_threads"] == 1
        assert len(data["rows"]) == len(providers) * sum(len(decl.modes_of(c) or decl.modes)
                                                         for c in decl.cases("tiny", False, None))
        # a provider's own skip hook may refuse a case (GPT-J's sdpa rows where the installed transformers, or a class
        # attribute another test changed, gives GPT-J no sdpa; bench_cpu's base where an op has no feature to switch
        # off): skipped with the reason in the results' skipped list, no speed-up against it; the others run and pass
        checked, declared = set(), {s.split(":")[0] for s in data["skipped"]}
        rows = {(r["case"], r["mode"], r["provider"]): r for r in data["rows"]}
        for r in data["rows"]:
            if r["status"] == "skipped" and r["provider"] in declared and r["provider"] != providers[0]:
                continue
            assert r["status"] == STATUS_OK and r["median_ms"] > 0 and r["peak_mem_bytes"] >= 0, r
            assert r["check"] is None or r["check"]["status"] == STATUS_OK, r
            checked |= set(r["check"]["errors"]) if r["check"] else set()
            if r["provider"] == providers[0]:
                ran = [p for p in providers[1:] if rows[(r["case"], r["mode"], p)]["status"] == STATUS_OK]
                assert ran and all(r["speedup_vs"][p] for p in ran), r
                assert all(r["speedup_vs"][p] is None for p in providers[1:] if p not in ran), r
        assert checked == errors and "## Side by side" in md and "## All rows" in md
        assert all((t["result"] == "not evaluated") == (t["on"] == "cuda") for t in data["targets"])  # CPU: evaluated
        assert ("TARGET not evaluated: no CUDA" in printed) == any(t["on"] == "cuda" for t in data["targets"])
        assert (data["gate"] is not None) == ("correctness gate:" in md)


def _break(bench, monkeypatch):
    """Make the first provider of ``bench`` wrong; returns the declaration."""
    from benchmarks import bench_compression, bench_gather, bench_reweighting_epoch

    decl, first = DECLARATIONS[bench], DECLARATIONS[bench].providers[0]
    wrong = {
        "attention": lambda c, *xs: bench_attention.oracle(c, *xs) * 1.01,
        "anchors": lambda c, q, k, v, beta: bench_anchors.eager_anchors(c, q, k, v, beta * 1.5),
        "isolation": lambda c, q, k, v: bench_attention.oracle(c, q, k, v),  # isolation forgotten
        "saliency": lambda c, inp: bench_saliency.flow_fastattn(c, inp) * 1.5,
        "gather": lambda c, inp: tuple(x + 1 for x in bench_gather.gather(c, inp)),
        "momentum": lambda c, *xs: bench_momentum.eager_momentum(dataclasses.replace(c, eta=0.5), *xs),
        "deep-thinking": lambda c, inp: (bench_momentum.fused(c, inp), inp.work[0, 0, 0, 0, 0].add_(1.0)),
    }
    if bench in wrong:
        monkeypatch.setattr(decl, "providers", [dataclasses.replace(first, fn=wrong[bench]), *decl.providers[1:]])
    elif bench == "cpu-targets":  # its first case is base attention with padding: padding forgotten
        ps = bench_cpu.OPS["attention"].providers
        monkeypatch.setitem(ps, "fastattn_icl", dataclasses.replace(ps["fastattn_icl"], fn=bench_attention.fastattn))
    elif bench == "compression":
        real = bench_compression.serve_fn
        monkeypatch.setattr(bench_compression, "serve_fn", lambda p, *a: (
            (lambda f: lambda: f() * (1.01 if p == "compressed" else 1.0))(real(p, *a))))
    else:
        real = bench_reweighting_epoch.dbeta
        monkeypatch.setattr(bench_reweighting_epoch, "dbeta", lambda rw, ex, beta, p: real(rw, ex, beta, p) * (
            1.5 if p == "fastattn_icl" else 1.0))
    return decl


@pytest.mark.parametrize("bench", list(SMOKE))
def test_a_wrong_provider_fails_its_gate_and_its_speedups_are_refused(bench, monkeypatch):
    _skip_without_ext(bench)
    decl = _break(bench, monkeypatch)
    cases = decl.cases("tiny", False, None)[:1]
    res = _run(decl, decl.providers[:2], cases, decl.modes[-1:])
    first, second = (p.name for p in decl.providers[:2])
    bad, other = _by(res, first, case=cases[0].name), _by(res, second, case=cases[0].name)
    assert bad["status"] == STATUS_INCORRECT and bad["check"]["message"] and bad["median_ms"] > 0, bad
    assert other["status"] == STATUS_OK and other["speedup_text"][first] == "n/a (check failed)"
    assert bad["speedup_vs"][second] is None


def test_saliency_without_a_gate_is_unchecked(monkeypatch):
    # the probe runs out of memory (in the gate too): an oom row, and ours is timed but unchecked
    def oom(c, inp):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 25.00 GiB")

    decl = bench_saliency.BENCH
    monkeypatch.setattr(bench_saliency, "flow_eager_probe", oom)
    monkeypatch.setattr(decl, "providers", [decl.providers[0], dataclasses.replace(decl.providers[1], fn=oom)])
    res = _run(decl, cases=decl.cases("tiny", False, None)[:1])
    ours, probe = _by(res, "fastattn_icl"), _by(res, "eager_probe")
    assert probe["status"] == STATUS_OOM and probe["median_ms"] is None
    assert ours["status"] == "unchecked" and ours["median_ms"] > 0 and "no correctness gate: oom" in ours["message"]
    assert ours["speedup_text"]["eager_probe"] == "n/a (fastattn_icl unchecked)"
    assert any("no correctness gate could run" in s for s in res["skipped"])


def test_ulp_distance_and_the_update_gate_accepting_fused_multiply_adds():
    ulp = bench_momentum.ulp_distance
    x = torch.tensor([1.0, -1.0, 0.0, 3.5])
    assert ulp(x, x) == (0.0, 0) and ulp(x, torch.nextafter(x, torch.full_like(x, float("inf")))) == (1.0, 4)
    assert ulp(torch.tensor([0.0]), torch.tensor([-0.0])) == (0.0, 0)
    smallest = torch.nextafter(torch.tensor([0.0]), torch.tensor([1.0]))
    assert ulp(smallest, -smallest) == (2.0, 1)  # across zero: -s, 0, s
    assert ulp(x, torch.tensor([1.0, -1.0, float("nan"), 3.5]))[0] == float("inf") and ulp(x, x[:2])[0] == float("inf")

    # a kernel contracting g + βm and X̂ + ηm into FMAs is far more than 1 ulp from the loop where g and βm nearly
    # cancel, yet more accurate: the float64 rule passes it
    def fma(case, inp):
        w = inp.work.view(case.rows, 2, case.N * case.D)
        beta, eta = (float(torch.tensor(c, dtype=torch.float32)) for c in (case.beta, case.eta))
        inp.m.copy_((w[:, 1].float() - w[:, 0].float()).double() + beta * inp.m.double())
        w[:, 0].copy_((w[:, 0].double() + eta * inp.m.double()).to(w.dtype))

    decl = bench_momentum.DEEP_THINKING
    case = decl.cases("tiny", False, None)[0]
    group = dataclasses.make_dataclass("G", ["device"])(CPU)
    check = bench_momentum.update_gate(case, decl.inputs(case, group), group,
                                       [dataclasses.replace(decl.providers[0], fn=fma)])["fused"]
    assert check["status"] == STATUS_OK and not check["bitwise"], check
    assert check["ulp"]["m"]["max"] > 1 and check["criterion"]["m"].endswith("within the fastattn_icl.testing rule")


def _rows(cases, times, mode="fwd", status=STATUS_OK, mem=None):
    """Synthetic rows: ``times[provider]`` is a median or a function of the case."""
    rows = [{"case": c.name, "group": c.group, "params": c.params(), "provider": p, "mode": mode,
             "status": status if p == next(iter(times)) else STATUS_OK,
             "median_ms": t(c) if callable(t) else t, "peak_mem_bytes": mem(c, p) if mem else None}
            for c in cases for p, t in times.items()]
    add_speedups(rows, list(times))
    return rows


def test_targets_from_synthetic_rows():
    acc = attention_cases("acceptance", True)
    mem = {"fastattn_icl": lambda c: 1e6 * c.Tq * c.B, "eager": lambda c: 1e3 * c.Tq**2 * c.B,
           "sdpa": lambda c: 1e6 * c.Tq * c.B}
    rows = []
    for mode, times in (("fwd", {"fastattn_icl": 1.0, "sdpa": 0.95, "eager": 10.0}),
                        ("bwd", {"fastattn_icl": 1.0, "sdpa": 0.7, "eager": 10.0})):
        rows += _rows(acc, times, mode, mem=lambda c, p: int(mem[p](c)))
    got = {t["target"].split(" (")[0]: t for t in bench_attention.targets(rows)}
    assert got["forward >= 0.9x SDPA-flash throughput"]["result"] == "PASS"  # 0.95x
    assert got["backward >= 0.8x SDPA-flash throughput"]["result"] == "FAIL"  # 0.70x
    assert got[">= 5x eager at T = 4k"]["result"] == "PASS"
    memory = got["peak memory linear in T"]
    assert memory["result"] == "PASS" and "eager: exponent 2.00" in memory["detail"]
    assert fit_exponent([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    # anchors: +5% overhead passes, +20% fails; an incorrect kernel fails every target it is part of
    cases = [c for c in DECLARATIONS["anchors"].cases("anchors", True, None)
             if c.variant == "anchors-last" and c.H == 25 and c.Tq in (256, 2048, 16384)]
    targets = bench_anchors.targets_for("anchors")
    ok = {t["target"]: t["result"] for t in targets(_rows(cases, {"fastattn_icl-anchors": 1.05, "fastattn_icl": 1.0,
                                                                  "eager": 12.0}))}
    assert ok["anchors-last fwd: overhead vs feature off <= 10% (every T)"] == "PASS"
    assert ok["anchors-last fwd: >= 10x eager at T = 2048"] == "PASS"
    bad = targets(_rows(cases, {"fastattn_icl-anchors": 1.2, "fastattn_icl": 1.0, "eager": 8.0}, status="incorrect"))
    assert all(t["result"] == "FAIL" for t in bad) and "n/a (incorrect/ok)" in bad[0]["detail"]
    # momentum: overhead <= 5% at T >= 2k only
    llama = [c for c in DECLARATIONS["momentum"].cases("default", True, None) if c.model == "llama-7b"]
    ms = dict(zip((c.name for c in llama), (1.5, 1.04, 1.01, 1.0, 0.98)))
    (t,) = bench_momentum.momentum_targets(_rows(llama, {"fastattn_icl": lambda c: ms[c.name], "base": 1.0}))
    assert t["result"] == "PASS" and t["detail"].startswith("T2048: +4.0%, T4096: +1.0%")
    (t,) = bench_momentum.momentum_targets(_rows(llama, {"fastattn_icl": 1.06, "base": 1.0}))
    assert t["result"] == "FAIL"


def test_more_targets_from_synthetic_rows():
    from benchmarks import bench_compression, bench_gather

    gather = DECLARATIONS["gather"].cases("default", True, None)[:3]
    ms = dict(zip((c.name for c in gather), (0.5, 1.25, 1.0)))
    (t,) = bench_gather.targets(_rows(gather, {"gather_kv": lambda c: ms[c.name], "index_select_loop": 1.0}))
    assert t["result"] == "FAIL" and "below: gpt2-xl-sst2-4pc-b1 0.80x" in t["detail"] and "best 2.00x" in t["detail"]
    (t,) = bench_gather.targets(_rows(gather, {"gather_kv": 0.5, "index_select_loop": 1.0}, status="skipped"))
    assert t["result"] == "N/A"
    (t,) = bench_momentum.update_targets(_rows(bench_momentum.DEEP_THINKING.cases("default", True, None),
                                               {"fused": 0.25, "eager_loop": 1.0}))
    assert t["result"] == "FAIL" and "dt-gpt2-xl-agnews-4pc: 4.00x" in t["detail"]
    sal = [c for c in bench_saliency.BENCH.cases("default", True, None) if c.model == "gpt2-xl" and c.T <= 1024]
    rows = _rows(sal, {"fastattn_icl": 1.0, "eager_probe": 12.0},
                 mem=lambda c, p: int(1e6 * c.T ** (2 if p == "eager_probe" else 1)))
    got = {t["target"].split(" (")[0]: t["result"] for t in bench_saliency.targets(rows)}
    assert got["gpt2-xl: >= 10x faster than eager_probe at T = 1024"] == "PASS"
    assert got["gpt2-xl: peak memory linear in T"] == "PASS" and got["gpt2-xl: runs at T = 16384"] == "N/A"
    comp = [c for c in bench_compression.BENCH.cases("default", True, None) if c.model.key == "gpt2-xl"
            and (c.dataset, c.per_class, c.B) in (("sst2", 1, 1), ("agnews", 1, 1), ("agnews", 1, 64))]
    got = {t["target"].split(" (")[0]: t for t in bench_compression.targets(_rows(
        comp, {"compressed": 1.0, "full-eager": lambda c: 1.2 if c.dataset == "sst2" else 2.0 if c.B == 1 else 4.0,
               "full-sdpa": 2.0}))}
    assert got["gpt2-xl SST-2, B 1, 1 demo/class: compressed vs full-eager >= 1.1x"]["result"] == "PASS"
    assert got["gpt2-xl AGNews, B 1, 1 demo/class: compressed vs full-eager >= 2.5x"]["result"] == "FAIL"
    assert got["gpt2-xl AGNews, B 64: compressed throughput >= 3x full-eager"]["result"] == "PASS"
    sdpa = got["gpt2-xl AGNews, B 64: compressed throughput >= 3x full-sdpa"]
    assert sdpa["result"] == "FAIL" and "1/class: 2.00x (64000 vs 32000 inputs/s)" in sdpa["detail"]


def test_saliency_scores_match_the_oracle():
    # both providers agree on every layer, and with reference probe_saliency + flow_scores on the last layer
    from fastattn_icl.reference.attention import attention
    from fastattn_icl.reference.saliency import flow_scores, probe_saliency

    case = bench_saliency.BENCH.cases("tiny", False, None)[0]
    inp = bench_saliency.make_inputs(case, dataclasses.make_dataclass("G", ["device"])(CPU))
    ours = bench_saliency.flow_fastattn(case, inp)
    inp.x0.grad = None
    assert torch.allclose(ours, bench_saliency.flow_eager_probe(case, inp), rtol=1e-4, atol=1e-7)
    x = inp.x0.detach()
    for layer in range(case.layers):
        q, k, v = (torch.matmul(bench_saliency._rms_norm(x), inp.w_qkv[layer, i]) for i in range(3))
        x_in, x = x, x + attention(q, k, v, causal=True)

    def loss_fn(o):
        logits = (x_in + o)[:, :, inp.target, :].reshape(case.B, -1) @ inp.w_out
        return torch.nn.functional.cross_entropy(logits, inp.gold)

    ref = torch.stack(flow_scores(probe_saliency(q, k, v, loss_fn, causal=True), inp.labels, inp.target_rows), -1)
    assert ours.shape == (case.layers, case.B, 3) and torch.allclose(ours[-1], ref, rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("bench", list(SMOKE))
def test_declarations_on_cuda(bench):
    _skip_without_ext(bench)
    decl, cuda = DECLARATIONS[bench], torch.device("cuda")
    res = run(decl, decl.cases("tiny", False, None), decl.providers, list(decl.modes), cuda, progress=None)
    assert res["header"]["device_slug"] != "cpu" and res["header"]["cuda"]
    for row in res["rows"]:
        assert row["status"] in (STATUS_OK, "skipped") and row["peak_mem_bytes"] is not None, row
    assert all(t["result"] in ("PASS", "FAIL", "N/A") for t in res["targets"])
