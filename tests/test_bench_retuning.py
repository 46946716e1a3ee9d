"""The Re-Tuning benchmark (benchmarks/bench_retuning.py): the CLI smoke test of tests/test_benchmarks.py (that file is
at its 400-line limit, so the declaration's entries live here), a wrong provider, a missing model and the targets."""

from __future__ import annotations

import dataclasses

import tests.test_benchmarks as tb
from benchmarks import bench_retuning as rt
from benchmarks.harness import STATUS_INCORRECT, STATUS_OK, add_speedups

SMOKE = (["fastattn_icl", "baseline"], {"answers", "texts"})


def test_cli_smoke(tmp_path, capsys, monkeypatch):
    # python -m benchmarks.run --bench retuning --set tiny: the scripted tiny model recurses, both loops agree
    monkeypatch.setitem(tb.SMOKE, "retuning", SMOKE)
    tb.test_cli_smoke("retuning", tmp_path, capsys)
    rows = tb.json.loads((tmp_path / "cpu-retuning.json").read_text())["rows"]
    ours = [r for r in rows if r["provider"] == rt.OURS]
    assert all(r["check"]["correct"] == r["params"]["B"] and r["check"]["calls_per_problem"] == 2 for r in ours)
    # 3 digits, KV reuse: prompt + (newline + return) per level above one digit, vs the whole text again
    assert [r["check"]["prefilled_per_problem"] for r in rows] == [125, 187, 125, 187]


def test_a_wrong_driver_fails_the_gate(monkeypatch):
    real = rt.solve

    def wrong(name, group, inp):
        results = real(name, group, inp)
        if name == rt.OURS:
            results[0].tree.children[0].text += "!"
        return results

    monkeypatch.setattr(rt, "solve", wrong)
    res = tb._run(rt.BENCH, cases=rt.BENCH.cases("tiny", False, None)[:1])
    bad, base = tb._by(res, rt.OURS), tb._by(res, rt.BASELINE)
    assert bad["status"] == STATUS_INCORRECT and "problem 0 node 1" in bad["check"]["message"]
    assert bad["check"]["errors"]["texts"]["error"] == 1 and bad["check"]["errors"]["answers"]["error"] == 0
    assert base["status"] == STATUS_OK and base["speedup_text"][rt.OURS] == "n/a (check failed)"


def test_without_the_trained_model_rows_are_skipped_with_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setenv(rt.MODEL_ENV, str(tmp_path / "nowhere"))
    case = rt.BENCH.cases("cpu", False, None)[0]
    res = tb._run(rt.BENCH, cases=[case])
    assert {r["status"] for r in res["rows"]} == {"skipped"}
    assert any(rt.TRAIN_COMMAND in s and "nowhere" in s for s in res["skipped"])


def test_targets_from_synthetic_rows():
    case = next(c for c in rt.BENCH.cases("cpu", False, None) if (c.digits, c.B) == (16, 32))

    def rows(ours_ms, ours_prefill, status=STATUS_OK):
        out = [{"case": case.name, "provider": p, "mode": "solve", "status": status if p == rt.OURS else STATUS_OK,
                "median_ms": ms, "ms_per_problem": ms / 32, "params": dataclasses.asdict(case),
                "check": {"prefilled_per_problem": prefill}}
               for p, ms, prefill in ((rt.OURS, ours_ms, ours_prefill), (rt.BASELINE, 900.0, 1981.0))]
        add_speedups(out, [rt.OURS, rt.BASELINE])
        return {t["target"].split(":")[1].split(" than")[0].strip(): t for t in rt.cpu_targets(out)}

    got = rows(100.0, 1126.0)
    assert got[">= 3x fewer prefilled tokens per problem"]["result"] == "FAIL"
    assert got[">= 3x fewer prefilled tokens per problem"]["detail"].startswith("1.76x (1126.0 vs 1981.0")
    assert got[">= 3x less time per problem"]["result"] == "PASS"
    assert got[">= 3x less time per problem"]["detail"].endswith("9.00x (3.125 vs 28.12 ms per problem)")
    got = rows(100.0, 600.0, STATUS_INCORRECT)  # a driver whose results differ misses both
    assert {t["result"] for t in got.values()} == {"FAIL"}
    assert {t["result"] for t in rt.cpu_targets([])} == {"N/A"}
