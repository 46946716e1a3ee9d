"""The two paths of the plain-PyTorch backend on CPU against the oracle: the CPU flash kernel with the method features
added on top (``flash``) and the exact chunked computation (``exact``, what every other device and shape runs).

Every feature combination runs through both, forward and every gradient (dq, dk, dv, dβ), in float32 and bf16, on
shapes that split the keys (a chunk of queries over a cache, a decode step), pad keys, and mix anchors with isolated
rows; β = 0 is the start of training, where the weight table holds no trace of the anchors but dβ must still be
right.
"""

from __future__ import annotations

import pytest
import torch

import fastattn_icl
from fastattn_icl.ops import _cpu_kernels, _torch_backend
from fastattn_icl.ops.features import isolation_limit
from fastattn_icl.reference.anchors import anchor_reweight_attention as reweight_ref
from fastattn_icl.reference.attention import attention as attention_ref
from fastattn_icl.testing import FWD_FACTOR, GRAD_FACTOR, check_close


def _no_compiled_kernels(monkeypatch):
    """The features' eager code instead of the compiled kernels (what a build without the extension runs)."""
    monkeypatch.setattr(_torch_backend, "_compiled", lambda x: False)


@pytest.fixture(params=["flash", "flash-eager", "exact"])
def path(request, monkeypatch):
    """``flash``: the CPU flash kernel with the features' compiled kernels (csrc/cpu_features.cpp); ``flash-eager``:
    the same with their eager code; ``exact``: the exact chunked computation."""
    if request.param == "flash" and not _cpu_kernels.available():
        pytest.fail("fastattn_icl._C is not built with the CPU feature kernels")
    if request.param == "flash-eager":
        _no_compiled_kernels(monkeypatch)
    if request.param == "exact":
        monkeypatch.setattr(_torch_backend, "_flash_ok", lambda *args: False)
    calls = []
    flash = _torch_backend._flash_fwd
    monkeypatch.setattr(_torch_backend, "_flash_fwd", lambda *a, **kw: calls.append(1) or flash(*a, **kw))
    yield request.param
    assert bool(calls) == (request.param != "exact"), "the test ran the other path"


CASES = [
    # B, H, Hkv, Tq, Tk, D, causal, padded
    (2, 4, 2, 33, 33, 16, True, True),  # GQA, prefill, left padding
    (2, 4, 1, 17, 50, 32, True, False),  # a chunk of queries over a cache: two key segments
    (1, 2, 2, 1, 40, 16, True, True),  # one decode step
    (2, 2, 2, 20, 31, 16, False, True),  # not causal
]


def _inputs(case, dtype, seed=0):
    B, H, Hkv, Tq, Tk, D, causal, padded = case
    g = torch.Generator().manual_seed(seed + sum(case[:6]))
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    do = torch.randn(B, H, Tq, D, generator=g)
    kpm = None
    if padded:
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[-1, : Tk // 4] = False  # left padding of the last batch row
    return [t.to(dtype) for t in (q, k, v)], do, kpm


def _compare(ours, oracle, leaves, do, names):
    def run(fn, dtype=None):
        xs = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in leaves]
        out = fn(*xs)
        return (out.detach(), *torch.autograd.grad(out, xs, do.to(out.dtype)))

    got, same, high = run(ours), run(oracle), run(oracle, torch.float64)
    for name, g, s, h in zip(("out", *names), got, same, high):
        check_close(name, g, s, h, factor=FWD_FACTOR if name == "out" else GRAD_FACTOR)
    return got


def _anchors(B, Tk, padded):
    pos = torch.tensor([[Tk // 2, Tk // 2 + 3, Tk - 2, -1]] * B)
    if padded:
        pos[-1, 0] = Tk - 5  # keep anchors out of the padded columns
    cls = torch.tensor([[0, 1, 0, 0]] * B)
    return pos, cls


def _isolated(B, Tq, Tk, window):
    """Two isolated positions among the query rows (one for a single row), ``window`` rows before the end."""
    first = Tk - Tq  # absolute position of query row 0
    rows = torch.tensor([[first + Tq // 2, first + Tq - 3 if Tq > 3 else -1]] * B)
    return torch.where(rows >= 0, rows.clamp(max=Tk - 1 - window), -1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_attention(path, case, dtype):
    (q, k, v), do, kpm = _inputs(case, dtype)
    causal = case[6]
    _compare(lambda *t: fastattn_icl.attention(*t, causal=causal, key_padding_mask=kpm, backend="torch"),
             lambda *t: attention_ref(*t, causal=causal, key_padding_mask=kpm), [q, k, v], do, ("dq", "dk", "dv"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("reweight_from", [None, 0, "mid"])
@pytest.mark.parametrize("beta_scale", [0.8, 0.0], ids=["beta", "beta0"])
@pytest.mark.parametrize("isolation", [False, True], ids=["", "isolated"])
def test_anchors_and_isolation(path, case, reweight_from, beta_scale, isolation):
    B, H, Hkv, Tq, Tk = case[:5]
    (q, k, v), do, kpm = _inputs(case, torch.float32)
    causal = case[6]
    start = Tq // 2 if reweight_from == "mid" else reweight_from
    pos, cls = _anchors(B, Tk, case[7])
    beta = torch.randn(H, 2, generator=torch.Generator().manual_seed(3)) * beta_scale
    iso = dict(isolation_rows=_isolated(B, Tq, Tk, 1), isolation_window=1) if isolation else {}

    def ours(q_, k_, v_, b_):
        return fastattn_icl.anchor_reweight_attention(q_, k_, v_, b_, pos, cls, reweight_from=start, causal=causal,
                                                      key_padding_mask=kpm, backend="torch", **iso)

    def oracle(q_, k_, v_, b_):
        return reweight_ref(q_, k_, v_, b_, pos, cls, reweight_from=start, causal=causal, key_padding_mask=kpm, **iso)

    got = _compare(ours, oracle, [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))
    assert got[-1].abs().max() > 0, "dβ is zero: the anchors' gradient was lost"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("window", [0, 2])
def test_isolation_alone(path, case, window):
    B, H, Hkv, Tq, Tk = case[:5]
    (q, k, v), do, kpm = _inputs(case, torch.float32, seed=5)
    rows = _isolated(B, Tq, Tk, window)
    causal = case[6]
    kw = dict(causal=causal, key_padding_mask=kpm, isolation_rows=rows, isolation_window=window)
    _compare(lambda *t: fastattn_icl.attention(*t, backend="torch", **kw), lambda *t: attention_ref(*t, **kw),
             [q, k, v], do, ("dq", "dk", "dv"))


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("columns", [False, True], ids=["dense", "columns"])
@pytest.mark.parametrize("beta_scale", [0.8, 0.0], ids=["beta", "beta0"])
def test_weight_table_with_and_without_columns(path, case, columns, beta_scale):
    """The seam's entry on a differentiable weight table: ``d key_log_weights`` of every key (no columns: the dense
    pass) or at the anchor columns only; either way dβ, which reads the anchor columns, matches the oracle."""
    from fastattn_icl.ops.attention import attention_from_tables
    from fastattn_icl.ops.features import anchor_columns, key_log_weight_table

    B, H, Hkv, Tq, Tk = case[:5]
    (q, k, v), do, kpm = _inputs(case, torch.float32, seed=7)
    causal = case[6]
    pos, cls = _anchors(B, Tk, case[7])
    beta = torch.randn(H, 2, generator=torch.Generator().manual_seed(4)) * beta_scale
    start = torch.full((B,), Tq // 3, dtype=torch.int32)
    cols = anchor_columns(pos, Tk) if columns else None
    assert cols is None or cols.tolist() == sorted(set(pos[pos >= 0].tolist()))

    def ours(q_, k_, v_, b_):
        table = key_log_weight_table(b_[None].expand(B, -1, -1), pos, cls, Tk)
        return attention_from_tables(q_, k_, v_, causal=causal, scale=None, key_padding_mask=kpm,
                                     key_log_weights=table, reweight_from=start, backend="torch",
                                     key_weight_columns=cols)[0]

    def oracle(q_, k_, v_, b_):
        return reweight_ref(q_, k_, v_, b_, pos, cls, reweight_from=start, causal=causal, key_padding_mask=kpm)

    got = _compare(ours, oracle, [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))
    assert got[-1].abs().max() > 0


@pytest.mark.parametrize("unused_slot", [False, True], ids=["every-slot-used", "an-unused-slot"])
def test_weight_table_fast_path_for_checked_anchors(monkeypatch, unused_slot):
    """``anchor_key_log_weights`` builds the table with one gather and one scatter when its host check saw every slot
    used, and the general way (unused slots dropped) otherwise. The tables are compared bit-exactly on purpose: each
    entry is a copy of one β value either way, no arithmetic; dβ (sums over the slots of a class) by the rule."""
    from fastattn_icl.ops import features
    from fastattn_icl.testing import GRAD_FACTOR, check_close

    B, H, C, Tk = 2, 3, 4, 29
    pos = torch.tensor([[3, 9, 17, 28], [0, 5, 11, 20]])
    cls = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 1]])
    if unused_slot:
        pos[1, 2] = -1
    beta = torch.randn(B, H, C, generator=torch.Generator().manual_seed(2), requires_grad=True)
    seen = []
    table_fn = features.key_log_weight_table
    monkeypatch.setattr(features, "key_log_weight_table", lambda *a, **kw: seen.append(kw) or table_fn(*a, **kw))
    table, _ = features.anchor_key_log_weights(beta, pos, cls, B, H, Tk)
    assert seen == [{"every_slot_used": not unused_slot}]
    general = table_fn(beta, pos, cls, Tk)
    torch.testing.assert_close(table, general, rtol=0, atol=0)
    assert int((table != 0).sum()) == H * int((pos >= 0).sum())
    w = torch.randn(B, H, Tk, generator=torch.Generator().manual_seed(3))
    (g_fast,) = torch.autograd.grad((table * w).sum(), beta)
    (g_general,) = torch.autograd.grad((general * w).sum(), beta)
    beta64 = beta.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad((table_fn(beta64, pos, cls, Tk) * w.double()).sum(), beta64)
    check_close("dbeta", g_fast, g_general, g64, factor=GRAD_FACTOR)
    assert g_fast.abs().sum() > 0


FOLD_CASES = {  # the first re-weighted position (None: the last row; "row-0"; else relative to the first anchor, per
    # batch row for a list) and whether the re-weighting rides in the values
    "from-the-first-anchor": (0, True),  # the rows before it see keys before the first anchor only
    "from-row-0": ("row-0", True),
    "per-batch-row": ([-2, 0], True),
    "one-row-sees-an-anchor": (1, False),  # the row at the first anchor is not re-weighted and sees it
    "one-batch-row-sees-an-anchor": ([0, 1], False),  # the latest start decides, not the earliest
    "last-row": (None, False),
}


def _count_folds(monkeypatch) -> list:
    """One entry per forward or backward that folds the re-weighting into its flash pass (its key weights or weighted
    values: :func:`_torch_backend._folded_weights` gave weights)."""
    folded = []
    weights = _torch_backend._folded_weights

    def spy(*a):
        w = weights(*a)
        if w is not None:
            folded.append(1)
        return w

    monkeypatch.setattr(_torch_backend, "_folded_weights", spy)
    return folded


@pytest.mark.parametrize("case", [(2, 4, 4, 33, 33, 16, True, True), (2, 4, 4, 20, 36, 16, True, True)],
                         ids=["square", "chunk-over-cache"])
@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_anchors_ride_in_the_values(monkeypatch, case, name):
    """``P̂ V = P (w ⊙ V)`` when no row before ``reweight_from`` sees an anchor: the flash pass over weighted values is
    the whole forward (and its backward gives dβ); it is taken exactly then, and agrees with the oracle (padding, a
    chunk of queries over a cache)."""
    B, H, Hkv, Tq, Tk = case[:5]
    (q, k, v), do, kpm = _inputs(case, torch.float32, seed=9)
    pos, cls = _anchors(B, Tk, case[7])
    at, folds = FOLD_CASES[name]
    first_row = Tk // 2 - (Tk - Tq)  # the query row at the first anchor column
    start = {None: None, "row-0": torch.zeros(B, dtype=torch.long)}.get(at) if at in (None, "row-0") else \
        first_row + torch.tensor(at if isinstance(at, list) else [at] * B)
    assert start is None or 0 <= int(start.min()) <= int(start.max()) < Tq
    beta = torch.randn(H, 2, generator=torch.Generator().manual_seed(5))
    folded = _count_folds(monkeypatch)
    kw = dict(reweight_from=start, causal=True, key_padding_mask=kpm)
    got = _compare(lambda *t: fastattn_icl.anchor_reweight_attention(*t, pos, cls, backend="torch", **kw),
                   lambda *t: reweight_ref(*t, pos, cls, **kw), [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))
    assert len(folded) == (2 if folds else 0), "forward and backward took different paths, or the wrong one"
    assert got[-1].abs().max() > 0


@pytest.mark.parametrize("case", [(2, 4, 4, 33, 33, 16, True, False), (2, 4, 4, 20, 36, 16, True, False),
                                  (2, 4, 4, 128, 128, 32, True, True)],
                         ids=["square", "chunk-over-cache", "left-padded-runs"])
def test_folded_weights_scale_p_in_the_compiled_kernel(monkeypatch, case):
    """Without a key mask, and for a left-padded batch taken run by run, the folded re-weighting reaches the compiled
    flash forward as key weights (its ``P``'s columns scaled in ``P V``; no weighted copy of ``V``), each run with its
    rows' and keys' share of them; the forward and backward agree with the oracle."""
    if not _cpu_kernels.available():
        pytest.skip("fastattn_icl._C lacks the CPU kernels")
    B, H, Hkv, Tq, Tk = case[:5]
    (q, k, v), do, kpm = _inputs(case, torch.float32, seed=4)
    pos, cls = _anchors(B, Tk, case[7])
    beta = torch.randn(H, 2, generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(_torch_backend, "_CALL_SCORES", 0)  # the left-padded rows unpadded at any size
    calls = []
    plain = _torch_backend._flash_fwd_plain
    monkeypatch.setattr(_torch_backend, "_flash_fwd_plain",
                        lambda q_, k_, v_, c, s, w=None: calls.append(None if w is None else tuple(w.shape))
                        or plain(q_, k_, v_, c, s, w))
    kw = dict(reweight_from=0, causal=True, key_padding_mask=kpm)
    got = _compare(lambda *t: fastattn_icl.anchor_reweight_attention(*t, pos, cls, backend="torch", **kw),
                   lambda *t: reweight_ref(*t, pos, cls, **kw), [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))
    pad = Tk // 4
    assert calls == ([(B, H, Tk)] if kpm is None else [(1, H, Tk), (1, H, Tk - pad)]), calls
    assert got[-1].abs().max() > 0


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_isolation_table_without_isolated_rows_is_plain_attention(padded):
    """An isolation table of zeros (no row isolated): the forward hands it to the key windows, which serve nothing,
    and the backward takes the plain pass; both equal plain attention's oracle."""
    from fastattn_icl.ops.attention import attention_from_tables

    case = (2, 4, 2, 33, 33, 16, True, padded)
    (q, k, v), do, kpm = _inputs(case, torch.float32, seed=12)
    limit = torch.zeros(2, 33, dtype=torch.int32)
    got = _compare(lambda *t: attention_from_tables(*t, causal=True, scale=None, key_padding_mask=kpm,
                                                    isolation_limit=limit, backend="torch")[0],
                   lambda *t: attention_ref(*t, causal=True, key_padding_mask=kpm), [q, k, v], do,
                   ("dq", "dk", "dv"))
    assert got[0].abs().max() > 0


@pytest.mark.parametrize("why", ["not-causal", "bf16", "grouped-heads", "decode-step", "isolation"])
def test_anchors_from_row_0_fold_where_it_pays(monkeypatch, why):
    """Re-weighting from row 0 could always ride in the values; it does without a causal mask and in bf16, and keeps the
    correction where the values' copy costs more (grouped heads would need K and V repeated per query head; a decode
    step re-weights one row) or isolated rows need their own pass. Every case agrees with the oracle."""
    case = {"grouped-heads": (2, 4, 2, 33, 33, 16, True, True), "decode-step": (2, 4, 4, 1, 40, 16, True, True),
            "not-causal": (2, 4, 4, 20, 31, 16, False, True)}.get(why, (2, 4, 4, 33, 33, 16, True, True))
    B, H, Hkv, Tq, Tk = case[:5]
    dtype = torch.bfloat16 if why == "bf16" else torch.float32
    (q, k, v), do, kpm = _inputs(case, dtype, seed=2)
    pos, cls = _anchors(B, Tk, case[7])
    beta = torch.randn(H, 2, generator=torch.Generator().manual_seed(6))
    folded = _count_folds(monkeypatch)
    kw = dict(reweight_from=0, causal=case[6], key_padding_mask=kpm)
    if why == "isolation":
        kw.update(isolation_rows=_isolated(B, Tq, Tk, 0))
    _compare(lambda *t: fastattn_icl.anchor_reweight_attention(*t, pos, cls, backend="torch", **kw),
             lambda *t: reweight_ref(*t, pos, cls, **kw), [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))
    assert len(folded) == (2 if why in ("not-causal", "bf16") else 0), folded


def test_unsorted_weight_columns_raise(monkeypatch):
    """``key_weight_columns`` must be ascending and distinct: the fold does not take a set out of order (it would read
    the wrong first anchor); the correction's kernel raises, as before the fold existed."""
    from fastattn_icl.ops.attention import attention_from_tables

    q, k, v = (torch.randn(1, 2, 12, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    table = torch.zeros(1, 2, 12)
    table[..., [4, 10]] = 0.7
    start = torch.zeros(1, dtype=torch.int32)  # from row 0: the sorted set rides in the values
    kw = dict(causal=True, scale=None, key_log_weights=table, reweight_from=start, backend="torch")
    folded = _count_folds(monkeypatch)
    attention_from_tables(q, k, v, key_weight_columns=torch.tensor([4, 10]), **kw)
    assert folded == [1]
    with pytest.raises(RuntimeError, match="ascending, distinct"):
        attention_from_tables(q, k, v, key_weight_columns=torch.tensor([10, 4]), **kw)


def test_weight_columns_bad_input():
    from fastattn_icl.ops.attention import attention_from_tables

    q = k = v = torch.randn(1, 2, 8, 16)
    table = torch.zeros(1, 2, 8)
    start = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="goes with key_log_weights"):
        attention_from_tables(q, k, v, causal=True, scale=None, key_weight_columns=torch.tensor([1]))
    with pytest.raises(TypeError, match="int64 tensor"):
        attention_from_tables(q, k, v, causal=True, scale=None, key_log_weights=table, reweight_from=start,
                              key_weight_columns=torch.tensor([1], dtype=torch.int32))


@pytest.mark.parametrize("columns", [False, True], ids=["dense", "columns"])
def test_a_large_weight_lifts_a_far_key(path, columns):
    """A key 78 logits below the row's best, weighted by e^80: the product is about e^2, not 0 (the cut-off of
    tiny exponentials must leave room for the weights)."""
    from fastattn_icl.ops.attention import attention_from_tables

    q = torch.zeros(1, 1, 2, 8)
    q[..., 0] = 1.0  # head dim 8, the logits come from the first coordinate
    k, v = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    k[0, 0, :, 0] = torch.tensor([0.0, 0.0, -78.0, 0.0])
    v[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    table = torch.zeros(1, 1, 4)
    table[0, 0, 2] = 80.0
    start = torch.zeros(1, dtype=torch.int32)
    out = attention_from_tables(q, k, v, causal=False, scale=1.0, key_log_weights=table, reweight_from=start,
                                backend="torch", key_weight_columns=torch.tensor([2]) if columns else None)[0]
    s = (q.double() @ k.double().transpose(-1, -2))[0, 0]
    p = torch.softmax(s, -1) * table.double()[0].exp()
    want = p @ v.double()[0, 0]
    assert want[0, 0] > 9  # the weighted far key dominates
    check_close("out", out[0, 0], (p.float() @ v[0, 0]), want, factor=FWD_FACTOR)


def test_attention_probs_is_differentiable():
    """The seam's output_attentions come from attention_probs; gradients must flow through them."""
    (q, k, _), _, kpm = _inputs(CASES[0], torch.float32, seed=11)
    B, H, Hkv, Tq, Tk = CASES[0][:5]
    r = torch.randn(B, H, Tq, Tk, generator=torch.Generator().manual_seed(12))

    def probs(q_, k_, ours=True):
        if ours:
            return _torch_backend.attention_probs(q_, k_, kpm, None, None, None, True, 0.25)
        s = q_ @ k_.repeat_interleave(H // Hkv, 1).transpose(-1, -2) * 0.25
        vis = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)[None, None] & kpm[:, None, None, :]
        return torch.softmax(s.masked_fill(~vis, float("-inf")), -1)

    def grads(ours, dtype):
        xs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k)]
        p = probs(*xs, ours=ours)
        return (p.detach(), *torch.autograd.grad((p * r.to(dtype)).sum(), xs))

    for name, g, s_, h in zip(("p", "dq", "dk"), grads(True, torch.float32), grads(False, torch.float32),
                              grads(False, torch.float64)):
        check_close(name, g, s_, h, factor=FWD_FACTOR if name == "p" else GRAD_FACTOR)


@pytest.fixture
def isolation_paths(monkeypatch):
    """Counts the calls of the two ways the flash path serves isolated rows: the key windows (the compiled kernels;
    forwards that served the rows, and backwards) and the exact rows over query chunks."""
    ran = {"window": 0, "exact": 0}
    for name, key in (("_exact_rows_fwd", "exact"), ("_exact_rows_bwd", "exact")):
        fn = getattr(_torch_backend, name)
        monkeypatch.setattr(_torch_backend, name,
                            lambda *a, _fn=fn, _key=key, **kw: ran.__setitem__(_key, ran[_key] + 1) or _fn(*a, **kw))

    def count(fn):
        def counted(*args):
            served = fn(*args)
            ran["window"] += served is not False
            return served
        return counted

    for name in ("_window_forward", "_window_backward"):
        monkeypatch.setattr(_torch_backend, name, count(getattr(_torch_backend, name)))
    return ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [0, 3, 20], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("served_by", ["window", "exact"])
def test_isolation_windows_per_batch_row(isolation_paths, monkeypatch, dtype, window, served_by):
    """Rows isolated in one batch row and not in another, GQA, left padding: the key windows (forward and backward;
    up to 21 keys wide) agree with the oracle, as do the exact rows they replace (what runs without the compiled
    kernels)."""
    if served_by == "exact":
        _no_compiled_kernels(monkeypatch)
    case = (3, 4, 2, 40, 40, 16, True, True)
    (q, k, v), do, kpm = _inputs(case, dtype, seed=11)
    rows = torch.tensor([[5, 15, -1], [15, -1, -1], [12, 14, 39 - window]])
    kw = dict(causal=True, key_padding_mask=kpm, isolation_rows=rows, isolation_window=window)
    _compare(lambda *t: fastattn_icl.attention(*t, backend="torch", **kw), lambda *t: attention_ref(*t, **kw),
             [q, k, v], do, ("dq", "dk", "dv"))
    assert isolation_paths[served_by] == 2 and sum(isolation_paths.values()) == 2, isolation_paths


@pytest.mark.parametrize("why", ["row-sees-no-key", "row-sees-only-isolated-keys", "logits-at-the-isolation-value"])
def test_isolation_windows_step_aside(isolation_paths, why):
    """Where the window does not hold, the exact rows serve the call, forward and backward equal the oracle, and no
    gradient is NaN: a row whose own keys are all padding (it sees nothing); a row whose own keys are padding but
    whose isolated keys are visible (they take the whole probability); a row whose own logits are about -1e4, so that
    its isolated keys keep real probability. The last two have ``lse`` near -1e4, which float32 holds to ±5e-4: the
    exact backward normalises such rows by their own max and sum (the flash backward once recomputed ``exp(s − lse)``
    for a row it does not own and gave ``e^10050 · 0``)."""
    case = (2, 2, 2, 12, 12, 8, True, True)
    (q, k, v), do, kpm = _inputs(case, torch.float32, seed=3)  # the last batch row's keys 0 .. 2 are padding
    rows, scale = torch.tensor([[6, -1], [6, -1]]), 0.5
    if why == "row-sees-no-key":
        rows[1, 0] = 1  # keys 0 and 1 are padding: row 1 sees no key at all
    elif why == "row-sees-only-isolated-keys":
        kpm = torch.ones(2, 12, dtype=torch.bool)
        kpm[1, 5:7] = False  # row 6's own key is a hole; keys 0 .. 4, isolated, stay visible
    else:
        q[0, :, 6], k[0, :, 6] = torch.tensor([100.0] + [0] * 7), torch.tensor([-200.0] + [0] * 7)  # 100·-200·0.5
    kw = dict(causal=True, key_padding_mask=kpm, isolation_rows=rows, scale=scale)
    got = _compare(lambda *t: fastattn_icl.attention(*t, backend="torch", **kw), lambda *t: attention_ref(*t, **kw),
                   [q, k, v], do, ("dq", "dk", "dv"))
    assert isolation_paths == {"window": 0, "exact": 2}
    assert all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("isolated", [False, True], ids=["plain", "isolated"])
@pytest.mark.parametrize("way", ["flash", "flash-exact-rows", "exact"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "left-padded"])
def test_float64_through_the_backend(monkeypatch, isolated, way, padded):
    """The public ops take fp16/bf16/fp32; the backend itself runs float64 inputs in float64, with the op's float32
    ``lse`` (so the backward, which recomputes ``P`` from it, is float32-accurate): forward and backward run, and
    agree with the float64 oracle within the rule against the float32 oracle, on the flash path (isolated rows as
    key windows, or as exact rows) and on the exact path."""
    if way == "flash-exact-rows":
        _no_compiled_kernels(monkeypatch)
    elif way == "exact":
        monkeypatch.setattr(_torch_backend, "_flash_ok", lambda *args: False)
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(2, 4 if i in (0, 3) else 2, 24, 16, generator=g, dtype=torch.float64) for i in range(4))
    rows = torch.tensor([[6, 15], [9, -1]]) if isolated else None
    limit = None if rows is None else isolation_limit(rows, 1, 2, 24, 24, q.device)
    kpm = _left_padded(2, 24, [0, 5]) if padded else None
    monkeypatch.setattr(_torch_backend, "_CALL_SCORES", 0)  # the left-padded rows unpadded at any size
    out, lse = _torch_backend.attention_fwd(q, k, v, kpm, None, None, limit, True, 0.25)
    grads = _torch_backend.attention_bwd(do, q, k, v, out, lse, kpm, None, None, limit, True, 0.25)[:3]
    assert out.dtype == torch.float64 and lse.dtype == torch.float32

    def oracle(dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        want = attention_ref(*leaves, causal=True, scale=0.25, isolation_rows=rows, isolation_window=1,
                             key_padding_mask=kpm)
        return (want.detach(), *torch.autograd.grad(want, leaves, do.to(dtype)))

    for name, a, same, high in zip(("out", "dq", "dk", "dv"), (out, *grads), oracle(torch.float32),
                                   oracle(torch.float64)):
        check_close(name, a, same, high, factor=FWD_FACTOR if name == "out" else GRAD_FACTOR)


def test_without_compiled_kernels_warns_once(monkeypatch):
    """A build without the CPU feature kernels runs their eager code, correct, and says so once per process."""
    import warnings

    monkeypatch.setattr(_cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(_cpu_kernels, "_warned", False)
    (q, k, v), do, kpm = _inputs((2, 4, 2, 33, 33, 16, True, True), torch.float32, seed=5)
    pos, cls = _anchors(2, 33, True)
    beta = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    kw = dict(causal=True, key_padding_mask=kpm, reweight_from=20)
    with pytest.warns(RuntimeWarning, match="compiled kernels are missing"):
        got = fastattn_icl.anchor_reweight_attention(q, k, v, beta, pos, cls, backend="torch", **kw)
    want = reweight_ref(q, k, v, beta, pos, cls, **kw)
    check_close("out", got, want, reweight_ref(*(t.double() for t in (q, k, v, beta)), pos, cls, **kw),
                factor=FWD_FACTOR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastattn_icl.attention(q, k, v, causal=True, isolation_rows=torch.tensor([[20], [25]]), backend="torch")


def _left_padded(B, Tk, pads):
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    for b, p in enumerate(pads):
        kpm[b, :p] = False
    return kpm


UNPAD_CASES = {  # B, H, Hkv, Tq, Tk, causal, the key mask
    "runs": (4, 4, 2, 24, 24, True, _left_padded(4, 24, [0, 5, 5, 24])),  # equal pads share a call; a row sees nothing
    "chunk-over-cache": (2, 2, 1, 8, 30, True, _left_padded(2, 30, [0, 26])),  # the padded row's first 4 rows see none
    "decode-step": (2, 2, 2, 1, 20, True, _left_padded(2, 20, [3, 0])),
    "not-causal": (2, 2, 2, 12, 20, False, _left_padded(2, 20, [0, 7])),
    "right-padding": (2, 2, 2, 16, 16, True, torch.tensor([[True] * 16, [True] * 12 + [False] * 4])),
    "a-hole": (2, 2, 2, 16, 16, False, torch.tensor([[True] * 16, [True] * 5 + [False] * 2 + [True] * 9])),
}


def _spy_masks(monkeypatch) -> list:
    """The key mask each flash pass of the CPU path is given (``None``: the kernel reads no mask; the compiled
    passes, ``_flash_fwd_plain`` and ``_flash_bwd_plain``, take none)."""
    masks = []
    where = {"_flash_fwd_masked": 3, "_flash_fwd_plain": None, "_flash_bwd_masked": 6, "_flash_bwd_plain": None}
    for fn, at in where.items():
        real = getattr(_torch_backend, fn)
        monkeypatch.setattr(_torch_backend, fn, lambda *a, _real=real, _at=at: masks.append(
            None if _at is None else a[_at]) or _real(*a))
    return masks


@pytest.mark.parametrize("name", list(UNPAD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_left_padding_runs_unpadded(monkeypatch, name, dtype):
    """A left-padded batch runs through the flash kernel without a mask, the padded rows sliced to their kept keys and
    the rows that see them (runs of equal padding in one call); any other mask goes to the kernel as an additive one.
    Both agree with the oracle, forward and every gradient, and rows that see no key give 0 and lse -inf. (Every
    call is let pay for itself here: when it does is the next test.)"""
    monkeypatch.setattr(_torch_backend, "_CALL_SCORES", 0)
    B, H, Hkv, Tq, Tk, causal, kpm = UNPAD_CASES[name]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, T, 16, generator=g, dtype=dtype) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    do = torch.randn(B, H, Tq, 16, generator=g, dtype=dtype)
    masks = _spy_masks(monkeypatch)
    got = _compare(lambda *t: fastattn_icl.attention(*t, causal=causal, key_padding_mask=kpm, backend="torch"),
                   lambda *t: attention_ref(*t, causal=causal, key_padding_mask=kpm), [q, k, v], do,
                   ("dq", "dk", "dv"))
    left = name not in ("right-padding", "a-hole")
    assert masks and all((m is None) == left for m in masks), "the left-padded batch took the mask, or the other way"
    if name == "runs":
        assert len(masks) == 2 * 2, "one flash call per run of equal padding (the fully padded row needs none)"
        assert got[0][3].abs().max() == 0 and got[0][1, :, :5].abs().max() == 0
        assert got[1][3].abs().max() == 0 and got[2][1:3, :, :5].abs().max() == 0
        _, lse = fastattn_icl.attention_with_lse(q, k, v, causal=causal, key_padding_mask=kpm, backend="torch")
        hidden = torch.zeros(B, Tq, dtype=torch.bool)
        hidden[3], hidden[1:3, :5] = True, True
        assert torch.isneginf(lse[hidden[:, None].expand(-1, H, -1)]).all()
        assert torch.isfinite(lse[~hidden[:, None].expand(-1, H, -1)]).all()


@pytest.mark.parametrize("shape", ["decode-batch-padded-row-by-row", "tiny", "prefill-one-row-padded"])
def test_left_padding_unpadded_where_it_pays(monkeypatch, shape):
    """One kernel call per run of equal padding pays only where the skipped scores outweigh the calls: a prefill, not
    a decode step of a batch whose rows are padded each to its own length, nor a call too small to split."""
    B, Tq, Tk, pads = {"decode-batch-padded-row-by-row": (32, 1, 128, [b + 1 for b in range(32)]),
                       "tiny": (2, 8, 8, [0, 2]), "prefill-one-row-padded": (2, 256, 256, [0, 32])}[shape]
    kpm = _left_padded(B, Tk, pads)
    q, k, v = torch.randn(B, 8, Tq, 64), torch.randn(B, 8, Tk, 64), torch.randn(B, 8, Tk, 64)
    masks = _spy_masks(monkeypatch)
    out = fastattn_icl.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="torch")
    check_close("out", out, attention_ref(q, k, v, causal=True, key_padding_mask=kpm),
                attention_ref(*(t.double() for t in (q, k, v)), causal=True, key_padding_mask=kpm))
    unpadded = shape == "prefill-one-row-padded"
    assert masks == [None] * 2 if unpadded else len(masks) == 1 and masks[0] is kpm


def test_no_keys_with_a_mask():
    """``Tk = 0`` (not causal) with a key mask: every row sees no key, output 0 and lse -inf."""
    q, k = torch.randn(2, 2, 4, 16, requires_grad=True), torch.randn(2, 2, 0, 16, requires_grad=True)
    kpm = torch.ones(2, 0, dtype=torch.bool)
    out, lse = fastattn_icl.attention_with_lse(q, k, k, causal=False, key_padding_mask=kpm, backend="torch")
    assert out.shape == q.shape and out.abs().max() == 0 and torch.isneginf(lse).all()
    out.sum().backward()
    assert q.grad.abs().max() == 0


def test_left_pad_runs():
    assert _torch_backend._left_pad_runs(_left_padded(5, 6, [0, 0, 2, 2, 6]), 5) == [(0, 2, 0), (2, 4, 2), (4, 5, 6)]
    assert _torch_backend._left_pad_runs(_left_padded(2, 6, [1, 0]), 2) == [(0, 1, 1), (1, 2, 0)]
    assert _torch_backend._left_pad_runs(torch.tensor([[False, True, False]]), 1) is None
    assert _torch_backend._left_pad_runs(torch.tensor([[True, True, False]]), 1) is None


@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize("Tq", [23, 9, 1], ids=lambda t: f"Tq{t}")
def test_isolation_limit_from_the_host_list(monkeypatch, window, Tq):
    """A CPU call builds the isolation limit table from its checked host copy of the rows when few pairs are covered;
    it equals the tensor path's (integers, so exactly) with unused slots, position 0, overlapping windows, rows
    repeated across the batch and a chunk of queries over a longer cache; past ``HOST_LIMIT_PAIRS`` the tensor path
    serves."""
    from fastattn_icl.ops import features

    B, Tk = 3, 23
    rows = torch.tensor([[4, 6, -1, 19], [0, 11, 9, -1], [-1, -1, -1, -1]])  # row 1 unsorted: the largest wins
    rows[0, 3] = Tk - 1 - window
    expected = features.isolation_limit_table(rows, window, Tq, Tk)
    got = features.isolation_limit(rows, window, B, Tq, Tk, torch.device("cpu"))
    assert got.dtype == expected.dtype == torch.int32 and got.shape == (B, Tq)
    assert torch.equal(got, expected)
    assert Tq < 4 or int(got.count_nonzero()) > 0
    monkeypatch.setattr(features, "HOST_LIMIT_PAIRS", 0)
    tensor_path = []
    table = features.isolation_limit_table
    monkeypatch.setattr(features, "isolation_limit_table", lambda *a: tensor_path.append(1) or table(*a))
    assert torch.equal(features.isolation_limit(rows, window, B, Tq, Tk, torch.device("cpu")), expected)
    assert tensor_path == [1]
