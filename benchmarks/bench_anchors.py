"""Anchor re-weighting (SPEC.md §2) and information-flow isolation (SPEC.md §3) benchmark.

Two result sets, one per feature, each with three providers measured case by case in one run:

* ours with the feature on: ``fastattn_icl-anchors`` = ``fastattn_icl.anchor_reweight_attention``
  (``beta [H, C]`` non-zero, 16 label-word anchors), ``fastattn_icl-isolation`` =
  ``fastattn_icl.attention(isolation_rows=<the 16 label positions>, isolation_window=0)``;
* ours with the feature off: ``fastattn_icl`` = ``fastattn_icl.attention`` on the same q, k, v;
* ``eager``: the seed-style implementation, which is also the oracle:
  ``fastattn_icl.reference.anchors.anchor_reweight_attention`` (materialises ``P``, multiplies by the
  weights) and ``fastattn_icl.reference.attention.attention(isolation_rows=...)``.

Every provider passes the harness's correctness gate against the float64 oracle of *what it
computes*: the feature-on and eager providers against the feature's oracle (for ``fwd+bwd`` the
gradients include ``dbeta``), the feature-off provider against base attention. Each provider is
therefore run as its own :func:`benchmarks.harness.run_suite` call on one case, and the rows of a
case are merged and given their speed-ups together (same process, same inputs, back to back).

Variants (``benchmarks.shapes.ANCHOR_VARIANTS``, prompt geometry in ``shapes.icl_anchor_layout``):
``anchors-last`` (re-weight the last row, the paper), ``anchors-from`` (every row from the first label
word on: the decoding generalisation at its most expensive), ``isolation`` (the 16 label rows,
window 0).

Targets (CUDA only; on CPU they are printed as "not evaluated: no CUDA", with the CPU ratios for
information): per variant and mode, feature-on time <= 1.10x feature-off time at every measured T;
>= 10x the eager implementation at T = 2k; and ours runs at T = 16k (eager's status, normally an
``oom`` row, is shown next to it).
"""

from __future__ import annotations

import functools
import time
import zlib
from pathlib import Path

import torch

from benchmarks import bench_attention
from benchmarks.harness import (
    STATUS_OK,
    CheckViews,
    Provider,
    Suite,
    TimingConfig,
    add_speedups,
    case_entries,
    format_progress,
    run_suite,
    speedup,
    targets_not_evaluated,
)
from benchmarks.harness import write_results as harness_write_results

OVERHEAD_TARGET = 1.10  # feature-on median <= 1.10 x feature-off median
EAGER_TARGET = 10.0
EAGER_TARGET_T = 2048
LONG_T = 16384
BETA_STD = 0.5  # trained betas of the paper are O(1); any non-zero value exercises the same code

FEATURES = ("anchors", "isolation")
ON = {"anchors": "fastattn_icl-anchors", "isolation": "fastattn_icl-isolation"}
OFF = "fastattn_icl"
EAGER = "eager"


# ---------------------------------------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=64)
def _layout_tensors(case, B: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``anchor_positions``, ``anchor_classes`` int64 ``[B, A]`` (the same prompt layout in every batch
    row), built once per case so no host-to-device copy lands in a timed call."""
    positions, classes, _ = case.layout()
    pos = torch.tensor(positions, dtype=torch.long, device=device)[None].expand(B, -1).contiguous()
    cls = torch.tensor(classes, dtype=torch.long, device=device)[None].expand(B, -1).contiguous()
    return pos, cls


def _layout(case, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _layout_tensors(case, q.shape[0], str(q.device))


def make_inputs(case, device: torch.device) -> list[torch.Tensor]:
    """``q, k, v`` as the attention benchmark makes them, plus ``beta [H, C]`` float32 for the anchors
    feature (values exactly representable in bf16, so the same-dtype oracle sees the same beta)."""
    q, k, v = bench_attention.make_inputs(case, device)
    if case.feature != "anchors":
        return [q, k, v]
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 1)
    beta = (BETA_STD * torch.randn(case.H, case.classes, generator=gen)).to(torch.bfloat16).float()
    return [q, k, v, beta.to(device)]


def check_views(case) -> CheckViews:
    """The attention benchmark's views (the whole problem, or the last batch row and kv head when
    large). For the anchors feature, ``beta [H, C]`` is shared by the batch rows, so ``dbeta`` of one
    head sums over all of them: a large case is checked on the last kv head's query heads in every
    batch row (the same cost at the default batch 1), with ``beta``'s rows of those heads."""
    views = bench_attention.check_views(case)
    if case.feature != "anchors":
        return views
    names = (*views.names, "dbeta")
    if views.output is Ellipsis:
        return CheckViews([*views.inputs, Ellipsis], Ellipsis, views.scope, names)
    heads, kv_heads = views.inputs[0][1], views.inputs[1][1]
    qs, kvs = (slice(None), heads), (slice(None), kv_heads)
    scope = f"every batch row (beta is shared), kv head {kv_heads.start} (query heads {heads.start}..{heads.stop - 1})"
    return CheckViews([qs, kvs, kvs, (heads,)], qs, scope, names)


# ---------------------------------------------------------------------------------------------- providers


def _ours_anchors(case, q, k, v, beta):
    import fastattn_icl

    pos, cls = _layout(case, q)
    return fastattn_icl.anchor_reweight_attention(
        q, k, v, beta, pos, cls, reweight_from=case.reweight_from, causal=case.causal, backend="auto"
    )


def _ours_isolation(case, q, k, v):
    import fastattn_icl

    pos, _ = _layout(case, q)
    return fastattn_icl.attention(q, k, v, causal=case.causal, isolation_rows=pos, isolation_window=0, backend="auto")


def _ours_off(case, q, k, v):
    import fastattn_icl

    return fastattn_icl.attention(q, k, v, causal=case.causal, backend="auto")


def _eager_anchors(case, q, k, v, beta):
    from fastattn_icl.reference.anchors import anchor_reweight_attention

    pos, cls = _layout(case, q)
    return anchor_reweight_attention(q, k, v, beta, pos, cls, reweight_from=case.reweight_from, causal=case.causal)


def _eager_isolation(case, q, k, v):
    pos, _ = _layout(case, q)
    return bench_attention.reference_attention()(q, k, v, causal=case.causal, isolation_rows=pos, isolation_window=0)


def _describe(call: str, what: str = ""):
    def describe(device: torch.device) -> str:
        text = bench_attention._fastattn_describe(device)
        return text.replace("fastattn_icl.attention(backend='auto')", f"{call}(backend='auto'){what}", 1)

    return describe


def providers(feature: str) -> list[Provider]:
    """``[feature on, feature off, eager]`` for ``feature`` (``"anchors"`` or ``"isolation"``)."""
    if feature == "anchors":
        on = Provider(ON[feature], _ours_anchors, _describe("fastattn_icl.anchor_reweight_attention"))
        eager = Provider(
            EAGER,
            _eager_anchors,
            lambda device: (
                "fastattn_icl.reference.anchors.anchor_reweight_attention (seed-style: materialised P "
                "times the weights; the oracle)"
            ),
        )
    elif feature == "isolation":
        on = Provider(
            ON[feature],
            _ours_isolation,
            _describe("fastattn_icl.attention", ", isolation_rows = the label positions, window 0"),
        )
        eager = Provider(
            EAGER,
            _eager_isolation,
            lambda device: (
                "fastattn_icl.reference.attention.attention(isolation_rows=...) (seed-style: materialised "
                "S overwritten with -1e4, then P; the oracle)"
            ),
        )
    else:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    off = Provider(OFF, _ours_off, _describe("fastattn_icl.attention", ", feature off (base attention)"))
    return [on, off, eager]


# ---------------------------------------------------------------------------------------------- suites


def _feature_oracle(case, *xs):
    return _eager_anchors(case, *xs) if case.feature == "anchors" else _eager_isolation(case, *xs)


def _base_oracle(case, q, k, v):
    return bench_attention.reference_attention()(q, k, v, causal=case.causal)


def feature_suite() -> Suite:
    """Inputs, oracle and views of the feature (on and eager providers)."""
    return Suite(op="anchors/isolation", make_inputs=make_inputs, oracle=_feature_oracle, check_views=check_views)


def base_suite() -> Suite:
    """Base attention on the same ``q, k, v`` (the feature-off provider)."""
    return Suite(
        op="attention",
        make_inputs=bench_attention.make_inputs,
        oracle=_base_oracle,
        check_views=bench_attention.check_views,
    )


def platform_notes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    return [
        "Triton kernel skipped: no CUDA; the `fastattn_icl*` rows are its CPU path (backend 'torch')",
        "peak memory not measured: no CUDA (reported as null)",
        "targets (overhead vs feature off, speed-up vs eager at T = 2k, T = 16k) not evaluated: no CUDA",
    ]


# ---------------------------------------------------------------------------------------------- targets


def _find(rows, case, mode, provider):
    for r in rows:
        if (r["case"], r["mode"], r["provider"]) == (case, mode, provider):
            return r
    return None


def _short(row) -> str:
    """``"gpt2-xl T2048"`` from ``"anchors-last-gpt2-xl-T2048"``."""
    p = row["params"]
    name, prefix = p["name"], f"{p['variant']}-"
    model = (name[len(prefix) :] if name.startswith(prefix) else name).rsplit("-T", 1)[0]
    return f"{model} T{p['Tq']}"


def _verdict(verdicts: list) -> str:
    if not verdicts:
        return "N/A"
    if False in verdicts:
        return "FAIL"
    return "N/A" if None in verdicts else "PASS"


def _ratio_check(ours, base) -> tuple[float | None, bool | None]:
    """``(base / ours, verdict-able?)``: a failed or incorrect kernel misses a target (``False``),
    a baseline that did not run leaves it open (``None``)."""
    ratio, _ = speedup(ours, base)
    if ratio is not None:
        return ratio, True
    return None, (False if ours["status"] != STATUS_OK else None)


def targets_for(rows: list[dict], feature: str, *, evaluated: bool = True) -> list[dict]:
    """PASS / FAIL / N/A per variant and mode; with ``evaluated=False`` (no CUDA) every result is
    ``not evaluated`` and the detail carries the measured ratios for information only."""
    on = ON[feature]
    out = []
    variants = list(dict.fromkeys(r["params"]["variant"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for variant in variants:
        cases = list(dict.fromkeys(r["case"] for r in rows if r["params"]["variant"] == variant))
        for mode in modes:
            # 1. overhead of the feature vs the same kernel with the feature off, every T
            parts, verdicts = [], []
            for case in cases:
                ours, base = _find(rows, case, mode, on), _find(rows, case, mode, OFF)
                if ours is None or base is None:
                    continue
                ratio, ok = _ratio_check(ours, base)
                if ratio is None:
                    verdicts.append(ok)
                    parts.append(f"{_short(ours)}: n/a ({ours['status']}/{base['status']})")
                    continue
                overhead = 1.0 / ratio
                verdicts.append(overhead <= OVERHEAD_TARGET)
                parts.append(f"{_short(ours)}: {100 * (overhead - 1):+.1f}%")
            out.append(
                {
                    "target": f"{variant} {mode}: overhead vs feature off <= {100 * (OVERHEAD_TARGET - 1):.0f}% "
                    "(every T)",
                    "result": _verdict(verdicts),
                    "detail": ", ".join(parts) or "not measured",
                }
            )
            # 2. speed-up vs eager at T = 2k
            parts, verdicts = [], []
            for case in cases:
                ours, eager = _find(rows, case, mode, on), _find(rows, case, mode, EAGER)
                if ours is None or eager is None or ours["params"]["Tq"] != EAGER_TARGET_T:
                    continue
                ratio, ok = _ratio_check(ours, eager)
                verdicts.append(ok if ratio is None else ratio >= EAGER_TARGET)
                text = ours["speedup_text"].get(EAGER, "n/a") if ratio is None else f"{ratio:.1f}x"
                parts.append(f"{_short(ours)}: {text}")
            out.append(
                {
                    "target": f"{variant} {mode}: >= {EAGER_TARGET:g}x eager at T = {EAGER_TARGET_T}",
                    "result": _verdict(verdicts),
                    "detail": ", ".join(parts) or f"no T = {EAGER_TARGET_T} case in this set",
                }
            )
        # 3. runs at T = 16k (every mode); eager's status alongside
        parts, verdicts = [], []
        for case in cases:
            for mode in modes:
                ours, eager = _find(rows, case, mode, on), _find(rows, case, mode, EAGER)
                if ours is None or ours["params"]["Tq"] != LONG_T:
                    continue
                verdicts.append(ours["status"] == STATUS_OK)
                mine = f"{ours['median_ms']:.3g} ms" if ours["median_ms"] is not None else ours["status"]
                theirs = "not run" if eager is None else eager["status"]
                if eager is not None and eager["median_ms"] is not None:
                    theirs += f" {eager['median_ms']:.3g} ms"
                parts.append(f"{_short(ours)} {mode}: ours {mine}, eager {theirs}")
        out.append(
            {
                "target": f"{variant}: runs at T = {LONG_T} (eager's status alongside, OOM expected)",
                "result": _verdict(verdicts),
                "detail": "; ".join(parts) or f"no T = {LONG_T} case in this set",
            }
        )
    return out if evaluated else targets_not_evaluated(out)


# ---------------------------------------------------------------------------------------------- running


def run_feature(
    feature: str,
    cases,
    modes,
    device: torch.device,
    *,
    timing: TimingConfig | None = None,
    progress=print,
    set_name: str = "",
    provider_names=None,
) -> dict:
    """Check and time ``feature``'s providers on ``cases`` (those of that feature), case by case;
    returns a results dict in the harness's format (``render_markdown`` and the JSON writer take it)."""
    t_start = time.perf_counter()
    cases = [c for c in cases if c.feature == feature]
    provs = [p for p in providers(feature) if provider_names is None or p.name in provider_names]
    fsuite, bsuite = feature_suite(), base_suite()
    rows, skipped, header, timing_text, memory_text, flop_text = [], [], None, None, None, None
    total = len(cases) * len(provs) * len(modes)
    for case in cases:
        for p in provs:
            res = run_suite(
                bsuite if p.name == OFF else fsuite,
                [case],
                [p],
                list(modes),
                device,
                timing=timing,
                progress=None,
                set_name=set_name,
            )
            header = header or res["header"]
            timing_text, memory_text, flop_text = res["timing"], res["memory"], res["flop_model"]
            skipped += [s for s in res["skipped"] if s not in skipped]
            for row in res["rows"]:
                rows.append(row)
                if progress is not None:
                    progress(f"[{len(rows)}/{total}] {format_progress(row)}")
    add_speedups(rows, [p.name for p in provs])
    if header is None:  # no case: still a valid (empty) result
        header = run_suite(fsuite, [], [], list(modes), device, progress=None)["header"]
    return {
        "op": f"{feature} ({'anchor_reweight_attention' if feature == 'anchors' else 'attention(isolation_rows)'})",
        "set": set_name,
        "modes": list(modes),
        "header": header,
        "timing": timing_text or (timing or TimingConfig()).describe(device),
        "memory": memory_text or "",
        "flop_model": (flop_text or "") + "; the re-weighting / isolation is counted as no extra FLOPs",
        "providers": [{"name": p.name, "description": p.describe(device)} for p in provs],
        "cases": case_entries(cases),
        "skipped": platform_notes(device) + skipped,
        "rows": rows,
        "targets": targets_for(rows, feature, evaluated=device.type == "cuda"),
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }


def write_results(results: dict, feature: str, out_dir=None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<device-slug>-<feature>.json`` and ``.md``; return both paths."""
    return harness_write_results(results, out_dir, suffix=f"-{feature}")
