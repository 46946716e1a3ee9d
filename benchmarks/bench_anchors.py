"""Anchor re-weighting and isolation (results ``-anchors``, ``-isolation``); benchmarks/README.md."""

from __future__ import annotations

import functools
import zlib

import torch

from benchmarks import bench_attention as attn
from benchmarks.harness import STATUS_OK, Benchmark, CheckViews, Provider, find, ratio_target, tensor_op, verdict
from benchmarks.shapes import anchor_cases

OVERHEAD_TARGET, EAGER_TARGET, EAGER_TARGET_T, LONG_T = 1.10, 10.0, 2048, 16384
BETA_STD = 0.5  # trained betas of the paper are O(1); any non-zero value exercises the same code
ON = {"anchors": "fastattn_icl-anchors", "isolation": "fastattn_icl-isolation"}
OFF, EAGER = "fastattn_icl", "eager"


@functools.lru_cache(maxsize=64)
def _layout_tensors(case, B: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``anchor_positions``, ``anchor_classes`` int64 ``[B, A]``, built once so no copy lands in a timed call."""
    positions, classes, _ = case.layout()
    return tuple(torch.tensor(x, dtype=torch.long, device=device)[None].expand(B, -1).contiguous()
                 for x in (positions, classes))


def _layout(case, q):
    return _layout_tensors(case, q.shape[0], str(q.device))


def make_inputs(case, group) -> list[torch.Tensor]:
    """``q, k, v`` as the attention benchmark's, plus ``beta [H, C]`` float32 (bf16-exact values) for anchors."""
    q, k, v = attn.make_inputs(case, group.device)
    if case.feature != "anchors":
        return [q, k, v]
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 1)
    beta = (BETA_STD * torch.randn(case.H, case.classes, generator=gen)).to(torch.bfloat16).float()
    return [q, k, v, beta.to(group.device)]


def check_views(case) -> CheckViews:
    """The attention views; for anchors a large case keeps every batch row of one kv head (``beta`` is shared by
    the batch rows, so ``dbeta`` of a head sums over all of them)."""
    views = attn.check_views(case)
    if case.feature != "anchors":
        return views
    names = (*views.names, "dbeta")
    if views.output is Ellipsis:
        return CheckViews([*views.inputs, Ellipsis], Ellipsis, views.scope, names)
    heads, kv_heads = views.inputs[0][1], views.inputs[1][1]
    qs, kvs = (slice(None), heads), (slice(None), kv_heads)
    scope = f"every batch row (beta is shared), kv head {kv_heads.start} (query heads {heads.start}..{heads.stop - 1})"
    return CheckViews([qs, kvs, kvs, (heads,)], qs, scope, names)


def ours_anchors(case, q, k, v, beta):
    import fastattn_icl

    pos, cls = _layout(case, q)
    return fastattn_icl.anchor_reweight_attention(q, k, v, beta, pos, cls, reweight_from=case.reweight_from,
                                                  causal=case.causal, backend="auto")


def ours_isolation(case, q, k, v):
    import fastattn_icl

    return fastattn_icl.attention(q, k, v, causal=case.causal, isolation_rows=_layout(case, q)[0], isolation_window=0,
                                  backend="auto")


def eager_anchors(case, q, k, v, beta):
    from fastattn_icl.reference.anchors import anchor_reweight_attention

    pos, cls = _layout(case, q)
    return anchor_reweight_attention(q, k, v, beta, pos, cls, reweight_from=case.reweight_from, causal=case.causal)


def eager_isolation(case, q, k, v):
    return attn.reference_attention(q, k, v, causal=case.causal, isolation_rows=_layout(case, q)[0],
                                    isolation_window=0)


def _short(row) -> str:
    """``"gpt2-xl T2048"`` from ``"anchors-last-gpt2-xl-T2048"``."""
    p = row["params"]
    name, prefix = p["name"], f"{p['variant']}-"
    return f"{(name[len(prefix):] if name.startswith(prefix) else name).rsplit('-T', 1)[0]} T{p['Tq']}"


def targets_for(feature: str):
    def targets(rows: list[dict]) -> list[dict]:
        """Per variant and mode: overhead vs feature off, speed-up vs eager at T = 2k; per variant: runs at 16k."""
        on, out = ON[feature], []
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        for variant in dict.fromkeys(r["params"]["variant"] for r in rows):
            cases = list(dict.fromkeys(r["case"] for r in rows if r["params"]["variant"] == variant))
            for mode in modes:
                pairs = [(_short(o), o, b) for o, b in ((find(rows, c, on, mode), find(rows, c, OFF, mode))
                                                       for c in cases) if o is not None and b is not None]
                out.append(ratio_target(
                    f"{variant} {mode}: overhead vs feature off <= {100 * (OVERHEAD_TARGET - 1):.0f}% (every T)", pairs,
                    lambda r: 1 / r <= OVERHEAD_TARGET, lambda o, b, r, t: f"n/a ({o['status']}/{b['status']})"
                    if r is None else f"{100 * (1 / r - 1):+.1f}%", empty="not measured"))
                pairs = [(_short(o), o, e) for o, e in ((find(rows, c, on, mode), find(rows, c, EAGER, mode))
                                                       for c in cases)
                         if o is not None and e is not None and o["params"]["Tq"] == EAGER_TARGET_T]
                out.append(ratio_target(f"{variant} {mode}: >= {EAGER_TARGET:g}x eager at T = {EAGER_TARGET_T}", pairs,
                                        lambda r: r >= EAGER_TARGET, lambda o, b, r, t: t if r is None else f"{r:.1f}x",
                                        empty=f"no T = {EAGER_TARGET_T} case in this set"))
            parts, verdicts = [], []
            for c in cases:
                for mode in modes:
                    ours, eager = find(rows, c, on, mode), find(rows, c, EAGER, mode)
                    if ours is None or ours["params"]["Tq"] != LONG_T:
                        continue
                    verdicts.append(ours["status"] == STATUS_OK)
                    mine = f"{ours['median_ms']:.3g} ms" if ours["median_ms"] is not None else ours["status"]
                    theirs = "not run" if eager is None else eager["status"]
                    if eager is not None and eager["median_ms"] is not None:
                        theirs += f" {eager['median_ms']:.3g} ms"
                    parts.append(f"{_short(ours)} {mode}: ours {mine}, eager {theirs}")
            out.append({"target": f"{variant}: runs at T = {LONG_T} (eager's status alongside, OOM expected)",
                        "result": verdict(verdicts), "detail": "; ".join(parts) or f"no T = {LONG_T} case in this set"})
        return out

    return targets


def _declare(feature: str, on_fn, eager_fn, on_what: str, eager_text: str) -> Benchmark:
    call = "fastattn_icl.anchor_reweight_attention" if feature == "anchors" else "fastattn_icl.attention"
    return Benchmark(
        name=feature, suffix=f"-{feature}", modes=("fwd", "fwd+bwd"),
        op=f"{feature} ({'anchor_reweight_attention' if feature == 'anchors' else 'attention(isolation_rows)'})",
        cases=lambda name, cuda, batch=None: [c for c in anchor_cases(name, cuda, batch) if c.feature == feature],
        inputs=make_inputs, **tensor_op(oracle=lambda case, *xs: eager_fn(case, *xs), views=check_views),
        providers=[
            Provider(ON[feature], on_fn, attn.describe_ours(call, on_what)),
            Provider(OFF, attn.fastattn, attn.describe_ours(what=", feature off (base attention)"),
                     oracle=attn.oracle, views=attn.check_views),
            Provider(EAGER, eager_fn, lambda device: eager_text),
        ],
        flop_model="4·B·H·Tq·Tk·d per forward, halved when causal and Tq == Tk; bwd 2.5x, fwd+bwd 3.5x; the "
        "re-weighting / isolation is counted as no extra FLOPs",
        cpu_path="the `fastattn_icl*` rows are its CPU path (backend 'torch')", targets=targets_for(feature),
    )


ANCHORS = _declare("anchors", ours_anchors, eager_anchors, "",
                   "fastattn_icl.reference.anchors.anchor_reweight_attention (seed-style: materialised P times the "
                   "weights; the oracle)")
ISOLATION = _declare("isolation", ours_isolation, eager_isolation, ", isolation_rows = the label positions, window 0",
                     "fastattn_icl.reference.attention.attention(isolation_rows=...) (seed-style: materialised S "
                     "overwritten with -1e4, then P; the oracle)")
BENCHES = [ANCHORS, ISOLATION]
