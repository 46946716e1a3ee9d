"""The CPU feature kernels of csrc/cpu_features.cpp and csrc/cpu_saliency.cpp, called directly: the anchor correction
and its backward, the isolation key windows (forward, check, backward), the saliency reduction of a chunk of rows.

Each is compared with a dense float64 computation of what it adds (the tolerance rule of ``fastattn_icl.testing``
against the same computation in float32), on grouped heads, left padding, per-batch-row re-weighting starts, a chunk
of queries over a cache (``Tq < Tk``) and strided inputs; float64 inputs too. The AVX2 + FMA bodies run on a machine
that has them; a subprocess with ``ATEN_CPU_CAPABILITY=default`` runs the baseline bodies through the public ops.
End to end (the backend with and without these kernels against the oracle) is tests/ops/test_cpu_paths.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastattn_icl.ops import _cpu_kernels
from fastattn_icl.testing import FWD_FACTOR, GRAD_FACTOR, check_close

pytestmark = pytest.mark.skipif(not _cpu_kernels.available(), reason="fastattn_icl._C lacks the CPU feature kernels")
OPS = torch.ops.fastattn_icl
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALE = 0.3


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _setup(B=2, Hkv=2, G=2, Tq=24, Tk=24, D=24, seed=0, dtype=torch.float32):
    """Grouped ``q [B, Hkv, G, Tq, D]``, ``k``, ``v``, output gradient, key mask (the last batch row left-padded),
    anchor columns with log-weights (one of them large), per-batch-row re-weighting starts."""
    q, do = _randn(B, Hkv, G, Tq, D, seed=seed, dtype=dtype), _randn(B, Hkv, G, Tq, D, seed=seed + 1, dtype=dtype)
    k, v = _randn(B, Hkv, Tk, D, seed=seed + 2, dtype=dtype), _randn(B, Hkv, Tk, D, seed=seed + 3, dtype=dtype)
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    kpm[-1, :3] = False
    cols = torch.tensor(sorted({0, 5, Tk - Tq + 2, Tk - 4, Tk - 1}))
    logw = torch.zeros(B, Hkv, G, Tk)
    logw[..., cols] = _randn(B, Hkv, G, len(cols), seed=seed + 4).float()
    logw[0, 0, 0, cols[1]] = 3.0
    rf = torch.tensor([Tq // 3] + [1] * (B - 1), dtype=torch.int32)
    return q, k, v, do, kpm, logw, rf, cols


def _dense_terms(q, k, v, lse, kpm, logw, rf, cols, causal, iso=None):
    """``Σ_a (w_a − 1) · P[i, a] · v_a`` of every row (0 before ``rf`` and on isolated rows), ``P = exp(s − lse)``
    with ``lse`` a constant: what the correction adds, differentiable in q, k, v and logw."""
    B, Hkv, G, Tq, D = q.shape
    Tk = k.shape[2]
    p = torch.exp(torch.einsum("bhgid,bhjd->bhgij", q, k) * SCALE - lse[..., None].to(q.dtype))
    keep = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        keep = torch.arange(Tk)[None] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    keep = keep[None] & kpm[:, None, :] & (torch.arange(Tq)[None, :, None] >= rf[:, None, None].long())
    if iso is not None:
        keep = keep & (iso <= 0)[:, :, None]
    at_cols = torch.zeros(Tk, dtype=torch.bool)
    at_cols[cols] = True
    gain = torch.where(at_cols, torch.expm1(logw.to(q.dtype)), 0.0)
    return (torch.where(keep[:, None, None], p, 0.0) * gain[..., None, :]) @ v[:, :, None]


def _lse(q, k, kpm):
    s = torch.einsum("bhgid,bhjd->bhgij", q.double(), k.double()) * SCALE
    return s.masked_fill(~kpm[:, None, None, None], float("-inf")).logsumexp(-1).float()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(24, 24), (7, 30)], ids=["square", "chunk-over-cache"])
def test_anchor_correction(causal, shape):
    q, k, v, _, kpm, logw, rf, cols = _setup(Tq=shape[0], Tk=shape[1])
    lse = _lse(q, k, kpm)
    o0 = _randn(*q.shape, seed=9)
    o = o0.clone()
    OPS.anchor_correction_(o, q, k, v, lse, kpm, logw, rf, cols, causal, SCALE)
    same = o0 + _dense_terms(q, k, v, lse, kpm, logw, rf, cols, causal)
    high = o0.double() + _dense_terms(q.double(), k.double(), v.double(), lse, kpm, logw, rf, cols, causal)
    check_close("o", o, same, high, factor=FWD_FACTOR)
    assert torch.equal(o[1, :, :, :0], o0[1, :, :, :0]) and torch.equal(o[0, :, :, : rf[0]], o0[0, :, :, : rf[0]])


@pytest.mark.parametrize("isolated", [False, True], ids=["plain", "with-isolated-rows"])
def test_anchor_backward(isolated):
    q, k, v, do, kpm, logw, rf, cols = _setup(seed=5)
    lse = _lse(q, k, kpm)
    iso = None
    if isolated:
        iso = torch.zeros(q.shape[0], q.shape[3], dtype=torch.int32)
        iso[0, 12:14] = 10  # rows the exact rows carry
    start = [_randn(*t.shape, seed=20 + n) for n, t in enumerate((q, k, v))] + [torch.zeros_like(logw)]
    got = [t.clone() for t in start]
    OPS.anchor_backward_(*got, q, k, v, do, lse, kpm, logw, rf, iso, cols, True, SCALE)

    def want(dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)] + [logw.double().requires_grad_(True)]
        terms = _dense_terms(*leaves[:3], lse, kpm, leaves[3], rf, cols, True, iso)
        grads = torch.autograd.grad((terms * do.to(dtype)).sum(), leaves)
        return [s.to(dtype) + g.to(dtype) for s, g in zip(start, grads)]

    for name, g, same, high in zip(("dq", "dk", "dv", "dlogw"), got, want(torch.float32), want(torch.float64)):
        check_close(name, g, same, high, factor=GRAD_FACTOR)
    others = torch.ones(k.shape[2], dtype=torch.bool)
    others[cols] = False
    assert not got[3][..., others].any(), "d log w is written at the anchor columns only"


def _window_setup(seed=7, dtype=torch.float32):
    q, k, v, do, kpm, *_ = _setup(B=3, Tq=30, Tk=30, seed=seed, dtype=dtype)
    limit = torch.zeros(3, 30, dtype=torch.int32)
    limit[0, 10:14] = 10  # a row isolated at 10 with window 3
    limit[1, 20] = 20  # window 0
    limit[2, 6:29] = 6  # a 23-key window
    return q, k, v, do, kpm, limit


def _window_ref(q, k, v, kpm, limit):
    """Attention of each row over its keys ``limit .. i`` (every row, for simplicity; only rows with a limit count)."""
    Tq, Tk = q.shape[3], k.shape[2]
    j, i = torch.arange(Tk)[None, None], torch.arange(Tq)[None, :, None]
    keep = (j <= i) & (j >= limit[:, :, None].long()) & kpm[:, None, :]
    s = (torch.einsum("bhgid,bhjd->bhgij", q, k) * SCALE).masked_fill(~keep[:, None, None], float("-inf"))
    return torch.softmax(s, -1) @ v[:, :, None], s.logsumexp(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_isolation_window_forward_and_backward(dtype):
    q, k, v, do, kpm, limit = _window_setup(dtype=dtype)
    rows = (limit > 0)[:, None, None, :]
    o0, lse0 = _randn(*q.shape, seed=3, dtype=dtype), torch.full(q.shape[:4], 5.0)
    o, lse = o0.clone(), lse0.clone()
    assert bool(OPS.isolation_window_ok(q, k, kpm, limit, SCALE))
    assert bool(OPS.isolation_window_fwd_(o, lse, q, k, v, kpm, limit, SCALE))
    (same_o, same_lse), (high_o, high_lse) = _window_ref(q.float(), k.float(), v.float(), kpm, limit), \
        _window_ref(q.double(), k.double(), v.double(), kpm, limit)
    check_close("o", o, torch.where(rows[..., None], same_o.to(dtype), o0), torch.where(rows[..., None], high_o, o0),
                factor=FWD_FACTOR)
    check_close("lse", lse, torch.where(rows, same_lse, lse0), torch.where(rows, high_lse, lse0), factor=FWD_FACTOR)

    start = [_randn(*t.shape, seed=30 + n, dtype=dtype) for n, t in enumerate((q, k, v))]
    got = [t.clone() for t in start]
    OPS.isolation_window_bwd_(*got, q, k, v, do, o, lse, kpm, limit, SCALE)

    def want(wdtype):
        leaves = [t.to(wdtype).requires_grad_(True) for t in (q, k, v)]
        out = _window_ref(*leaves, kpm, limit)[0]
        grads = torch.autograd.grad((torch.where(rows[..., None], out, 0.0) * do.to(wdtype)).sum(), leaves)
        return [s.to(wdtype) + g for s, g in zip(start, grads)]

    for name, g, same, high in zip(("dq", "dk", "dv"), got, want(torch.float32), want(torch.float64)):
        check_close(name, g, same, high, factor=GRAD_FACTOR)


def test_isolation_window_writes_nothing_when_a_row_fails():
    """A row whose window keys are all padding fails the check: nothing is written (the exact rows serve the call)."""
    q, k, v, _, kpm, limit = _window_setup()
    kpm[1, 20] = False  # row 20 of batch row 1 sees only its own key (window 0), now padding
    o, lse = torch.zeros(q.shape), torch.zeros(q.shape[:4])
    assert not bool(OPS.isolation_window_ok(q, k, kpm, limit, SCALE))
    assert not bool(OPS.isolation_window_fwd_(o, lse, q, k, v, kpm, limit, SCALE))
    assert not o.any() and not lse.any()


def test_strided_inputs():
    """Views with a unit stride along D only (o laid out [B, Tq, H, D], q a slice of a wider buffer) give the result of
    contiguous copies."""
    q, k, v, _, kpm, logw, rf, cols = _setup(seed=11)
    B, Hkv, G, Tq, D = q.shape
    wide = torch.zeros(B, Hkv, G, Tq, D + 5)
    wide[..., :D] = q
    lse = _lse(q, k, kpm)
    o_bthd = torch.zeros(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)
    o_flat = torch.zeros(q.shape)
    OPS.anchor_correction_(o_bthd, wide[..., :D], k, v, lse, kpm, logw, rf, cols, True, SCALE)
    OPS.anchor_correction_(o_flat, q, k, v, lse, kpm, logw, rf, cols, True, SCALE)
    check_close("o", o_bthd, o_flat, o_flat.double(), factor=FWD_FACTOR)


@pytest.mark.parametrize("why", ["limit-past-the-row", "nan-logit"])
def test_isolation_window_declines(why):
    """A row whose limit is past its own position (no window), or whose window logits hold a NaN, fails the check:
    nothing is written, and the exact rows (which keep the NaN, as the oracle does) serve the call."""
    q, k, v, _, kpm, limit = _window_setup()
    if why == "limit-past-the-row":
        limit[0, 4] = 9
    else:
        k[0, 1, 12, 0] = float("nan")  # a key inside row 13's window (keys 10 .. 13) of batch row 0
    o, lse = torch.zeros(q.shape), torch.zeros(q.shape[:4])
    assert not bool(OPS.isolation_window_ok(q, k, kpm, limit, SCALE))
    assert not bool(OPS.isolation_window_fwd_(o, lse, q, k, v, kpm, limit, SCALE))
    assert not o.any() and not lse.any()


def test_weight_tables_of_any_layout():
    """The backend hands the kernels a weight table of any layout (transposed, expanded): the result and gradients of a
    contiguous one; a direct call with a table that is not unit-strided along Tk is refused."""
    from fastattn_icl.ops.attention import attention_from_tables

    g = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(4))
    kw = dict(causal=True, scale=None, reweight_from=torch.tensor([0], dtype=torch.int32), backend="torch")
    table = torch.zeros(1, 8, 2)
    table[:, 3] = 2.0

    def run(weights):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, _ = attention_from_tables(*leaves, key_log_weights=weights, **kw)
        return (out.detach(), *torch.autograd.grad(out, leaves, do))

    for layout in (table.transpose(1, 2), torch.full((1, 2, 1), 0.5).expand(1, 2, 8)):
        for name, got, want in zip(("out", "dq", "dk", "dv"), run(layout), run(layout.contiguous())):
            check_close(name, got, want, want.double(), factor=FWD_FACTOR if name == "out" else GRAD_FACTOR)
    qg, kk, vv, _, kpm, logw, rf, cols = _setup()
    strided = torch.zeros(*logw.shape[:3], 2 * logw.shape[3])[..., ::2]  # stride 2 along Tk
    with pytest.raises(RuntimeError, match="unit stride along its last dimension"):
        OPS.anchor_correction_(torch.zeros(qg.shape), qg, kk, vv, _lse(qg, kk, kpm), kpm, strided, rf, cols, True,
                               SCALE)


@pytest.mark.parametrize("bad", ["dtype", "shape", "columns-order", "columns-range", "stride"])
def test_bad_input_raises(bad):
    q, k, v, _, kpm, logw, rf, cols = _setup()
    lse = _lse(q, k, kpm)
    o = torch.zeros(q.shape)
    args = dict(dtype=(o, q.half(), k, v), shape=(o, q, k[:, :1], v), stride=(o, q.transpose(-1, -2), k, v))
    if bad in args:
        match = {"dtype": "float32 or float64", "shape": "k and v", "stride": "unit stride"}[bad]
        with pytest.raises(RuntimeError, match=match):
            OPS.anchor_correction_(*args[bad], lse, kpm, logw, rf, cols, True, SCALE)
        return
    cols = cols.flip(0) if bad == "columns-order" else torch.tensor([0, q.shape[3]])
    with pytest.raises(RuntimeError, match="ascending, distinct key positions"):
        OPS.anchor_correction_(o, q, k, v, lse, kpm, logw, rf, cols, True, SCALE)


def _saliency_setup(B=2, H=3, T=20, n=7, row0=9, Tc=16, seed=0, dtype=torch.float32):
    """One chunk of the saliency pass: ``p`` (probability-like) and ``dp`` ``[B, H, n, Tc]`` of rows ``row0 ..``, the
    key mask (the last batch row left-padded), label positions, targets (one inside the chunk), row slots (some rows
    in the chunk, one outside) and the rows ``[B, R, T]``, filled with a sentinel the op must leave where it writes
    nothing."""
    p = _randn(B, H, n, Tc, seed=seed, dtype=dtype).abs()
    dp = _randn(B, H, n, Tc, seed=seed + 1, dtype=dtype)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[-1, :3] = False
    label = torch.zeros(B, T, dtype=torch.uint8)
    label[:, [2, 5, row0 + 1]] = 1
    target = torch.tensor([T - 2] + [row0 + 3] * (B - 1), dtype=torch.int32)
    slot = torch.full((B, T), -1, dtype=torch.int32)
    slot[:, row0 + 1], slot[:, row0 + 4], slot[0, 1] = 0, 2, 1
    rows = torch.full((B, 3, T), 7.0)
    return p, dp, kpm, label, target, slot, rows


def _saliency_dense(p, dp, kpm, label, target, row0, causal, per_head, p_min):
    """What ``saliency_reduce`` computes, as dense tensor ops: ``(sums [B, 1 + H·per_head, 3], I [B, n, Tc])``."""
    B, H, n, Tc = p.shape
    i, j = row0 + torch.arange(n), torch.arange(Tc)
    seen = (j[None] <= i[:, None]) if causal else torch.ones(n, Tc, dtype=torch.bool)
    seen = seen[None] & kpm[:, None, :Tc]
    c = torch.where(seen[:, None] & (p > p_min), p * dp, 0.0)
    I = c.sum(1).abs()  # noqa: E741
    lower = (j[None, None] < i[None, :, None]) & (i[None, :, None] <= target[:, None, None].long())
    lab = label[:, :Tc].bool()[:, None, :]
    label_row, target_row = label[:, i].bool(), i[None] == target[:, None].long()

    def reduce(a):  # [B, ..., n, Tc] -> [B, ..., 3]
        extra = [1] * (a.dim() - 3)
        lo = (a * lower.view(B, *extra, n, Tc)).sum(-1)
        la = (a * lab.view(B, *extra, 1, Tc)).sum(-1)
        return torch.stack([(lo * label_row.view(B, *extra, n)).sum(-1), (la * target_row.view(B, *extra, n)).sum(-1),
                            lo.sum(-1)], -1)

    parts = [reduce(I)[:, None]] + ([reduce(c.abs())] if per_head else [])
    return torch.cat(parts, 1), I


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "sums"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_saliency_reduce(causal, per_head, dtype):
    """The chunk's sums and rows against the dense computation (float64, and float32 for the rule); the entries the
    rows do not see hold inf and NaN (the backend never masks them) and are not read; a value at the floor counts 0."""
    row0, n, T = 9, 7, 20
    p, dp, kpm, label, target, slot, rows = _saliency_setup(row0=row0, n=n, T=T, dtype=dtype)
    Tc = p.shape[-1]
    p_min = 1e-3
    p[..., 0, 3] = p_min  # at the floor: 0
    unseen = ~kpm[:, None, None, :Tc] | ((torch.arange(Tc)[None] > row0 + torch.arange(n)[:, None]) if causal else
                                         torch.zeros(n, Tc, dtype=torch.bool))
    dense_p = p.clone()
    p = p.masked_fill(unseen, float("inf"))
    dp = dp.masked_fill(unseen, float("nan"))
    got = OPS.saliency_reduce(p, dp, kpm, label, target, row0, causal, per_head, slot, rows, p_min)
    want = [_saliency_dense(dense_p.to(t), dp.nan_to_num().to(t), kpm, label, target, row0, causal, per_head, p_min)
            for t in (dtype, torch.float64)]
    assert got.dtype == torch.float64 and got.shape == (2, 1 + 3 * per_head, 3)
    check_close("sums", got.to(dtype), want[0][0], want[1][0], factor=FWD_FACTOR)
    assert (want[1][0] != 0).any(0).all(), "a sum is 0 in every batch row: the case would not test its terms"
    for b in range(2):
        for i, s_ in ((row0 + 1, 0), (row0 + 4, 2)):
            check_close("row", rows[b, s_, :Tc], want[0][1][b, i - row0].float(), want[1][1][b, i - row0],
                        factor=FWD_FACTOR)  # rows are float32 whatever the compute dtype
            assert (rows[b, s_, Tc:] == 0).all()
        assert (rows[b, 1] == 7.0).all(), "a row outside the chunk was written"


def test_saliency_reduce_bad_input():
    p, dp, kpm, label, target, slot, rows = _saliency_setup()
    ok = (p, dp, kpm, label, target, 9, True, False, slot, rows, 0.0)
    OPS.saliency_reduce(*ok)
    cases = {
        "not contiguous": ((p.transpose(2, 3),), "contiguous CPU float32 or float64"),
        "dtype": ((p, dp.double()), "like p"),
        "target": ((p, dp, kpm, label, torch.tensor([20, 3], dtype=torch.int32)), r"target must be a position"),
        "rows past": ((p, dp, kpm, label, target, 15), "must lie in the 20 positions"),
        "slot": ((p, dp, kpm, label, target, 9, True, False, slot.masked_fill(slot == 2, 3)), "is past the 3 rows"),
        "half": ((p, dp, kpm, label, target, 9, True, False, slot, None), "go together"),
        "row0": ((p, dp, kpm, label, target, -1), "must lie in the 20 positions"),
        "short mask": ((p, dp, kpm[:, :10]), "fewer than the 16 read"),
        "label dtype": ((p, dp, kpm, label.bool()), "label must be a CPU Byte"),
    }
    for head, match in cases.values():
        with pytest.raises(RuntimeError, match=match):
            OPS.saliency_reduce(*head, *ok[len(head):])


@pytest.mark.parametrize("name", _cpu_kernels.OPS)
def test_opcheck(name):
    q, k, v, do, kpm, logw, rf, cols = _setup(B=1, Tq=10, Tk=12, D=8)
    lse = _lse(q, k, kpm)
    limit = torch.zeros(1, 10, dtype=torch.int32)
    limit[0, 6:8] = 8
    sal = _saliency_setup()
    args = {
        "anchor_correction_": (torch.zeros(q.shape), q, k, v, lse, kpm, logw, rf, cols, True, SCALE),
        "anchor_backward_": (torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(k.shape), torch.zeros(logw.shape),
                             q, k, v, do, lse, kpm, logw, rf, limit, cols, True, SCALE),
        "isolation_window_ok": (q, k, kpm, limit, SCALE),
        "isolation_window_fwd_": (torch.zeros(q.shape), lse.clone(), q, k, v, kpm, limit, SCALE),
        "isolation_window_bwd_": (torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(k.shape), q, k, v, do,
                                  torch.zeros(q.shape), lse, kpm, limit, SCALE),
        "momentum_scan": (_randn(2, 9, 20, seed=1), 0.9, True),
        "momentum_add_": (torch.zeros(q.shape), v, kpm, 0.9),
        "saliency_reduce": (*sal[:5], 9, True, True, *sal[5:], 1e-30),
        "flash_attention_fwd": (q.flatten(1, 2), k, v, True, SCALE),
        "flash_attention_bwd": (do.flatten(1, 2), q.flatten(1, 2), k, v, torch.zeros(q.flatten(1, 2).shape),
                                lse.flatten(1, 2), True, SCALE),
    }[name]
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_baseline_bodies():
    """With ``ATEN_CPU_CAPABILITY=default`` the kernels run their baseline (SSE2) bodies: anchors and isolated rows
    (served by the key windows) through the public ops agree with the oracle, forward and backward, the momentum
    scan with the sum of powers, and the saliency reduction with its dense computation."""
    script = textwrap.dedent("""
        import torch, fastattn_icl
        from fastattn_icl.ops import _cpu_kernels
        from fastattn_icl.reference.anchors import anchor_reweight_attention as ref
        from fastattn_icl.testing import FWD_FACTOR, GRAD_FACTOR, check_close
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT" and _cpu_kernels.available()
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(2, h, 33, 24, generator=g) for h in (4, 2, 2, 4))
        beta = torch.randn(4, 2, generator=g)
        pos, cls = torch.tensor([[4, 11, 20, -1], [3, 9, 17, 30]]), torch.tensor([[0, 1, 0, 0], [1, 0, 1, 0]])
        kw = dict(reweight_from=torch.tensor([8, 2]), causal=True, isolation_rows=torch.tensor([[25], [12]]))
        def run(fn, dtype):
            leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v, beta)]
            out = fn(*leaves, pos, cls, **kw)
            return (out.detach(), *torch.autograd.grad(out, leaves, do.to(dtype)))
        def ours(*t, **kw_):
            return fastattn_icl.anchor_reweight_attention(*t, backend="torch", **kw_)
        for name, a, s, h in zip(("out", "dq", "dk", "dv", "dbeta"), run(ours, torch.float32),
                                 run(ref, torch.float32), run(ref, torch.float64)):
            check_close(name, a, s, h, factor=FWD_FACTOR if name == "out" else GRAD_FACTOR)
        iso = dict(causal=True, isolation_rows=torch.tensor([[25, 5], [12, -1]]), isolation_window=2)
        from fastattn_icl.reference.attention import attention as aref
        def run2(fn, dtype):
            leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
            out = fn(*leaves, **iso)
            return (out.detach(), *torch.autograd.grad(out, leaves, do.to(dtype)))
        def ours2(*t, **kw_):
            return fastattn_icl.attention(*t, backend="torch", **kw_)
        for name, a, s, h in zip(("out", "dq", "dk", "dv"), run2(ours2, torch.float32), run2(aref, torch.float32),
                                 run2(aref, torch.float64)):
            check_close(name, a, s, h, factor=FWD_FACTOR if name == "out" else GRAD_FACTOR)
        limit = torch.zeros(2, 33, dtype=torch.int32)
        limit[0, 25:28], limit[1, 12:15] = 25, 12
        qg = q.reshape(2, 2, 2, 33, 24)
        assert bool(torch.ops.fastattn_icl.isolation_window_ok(qg, k, None, limit, 24 ** -0.5)), "window not served"
        x = torch.randn(3, 40, 37, generator=g)
        lag = torch.arange(40)[:, None] - torch.arange(40)[None, :]
        w = torch.where(lag > 0, torch.tensor(0.9, dtype=torch.float64) ** lag.clamp(min=0), 0.0)
        check_close("scan", torch.ops.fastattn_icl.momentum_scan(x, 0.9, False), (w.float() @ x), w @ x.double(),
                    factor=FWD_FACTOR)
        o = torch.zeros(3, 1, 1, 40, 37)
        torch.ops.fastattn_icl.momentum_add_(o, x[:, None], None, 0.9)
        check_close("scan-add", o[:, 0, 0], (w.float() @ x), w @ x.double(), factor=FWD_FACTOR)
        from tests.csrc.test_cpu_features import _saliency_dense, _saliency_setup
        p, dp, kpm, label, target, slot, rows = _saliency_setup()
        got = torch.ops.fastattn_icl.saliency_reduce(p, dp, kpm, label, target, 9, True, True, slot, rows, 1e-30)
        want = [_saliency_dense(p.to(t), dp.to(t), kpm, label, target, 9, True, True, 1e-30)[0]
                for t in (torch.float32, torch.float64)]
        check_close("saliency", got.float(), *want, factor=FWD_FACTOR)
        print("ok")
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", [(3, 40, 37), (1, 1, 16), (2, 70, 5), (1, 0, 4)], ids=str)
def test_momentum_scan(dtype, reverse, shape):
    """``y_t = Σ_{i<t} η^(t−i) x_i`` (reverse: over ``i > t``) against the float64 sum of powers, on column counts
    that are and are not multiples of the 16-column vector body."""
    x = _randn(*shape, seed=shape[1], dtype=dtype)
    eta = 0.9
    y = OPS.momentum_scan(x, eta, reverse)
    T = shape[1]
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # t − i
    if reverse:
        lag = -lag
    weights = torch.where(lag > 0, torch.tensor(eta, dtype=torch.float64) ** lag.clamp(min=0), 0.0)
    high = weights @ x.double()
    check_close("y", y, (weights.to(dtype) @ x).to(dtype), high, factor=FWD_FACTOR)
    assert y.dtype == dtype and y.shape == x.shape


def _momentum_add_oracle(o, v, kpm, eta, dtype):
    """``o + M`` at the last ``Tq`` positions for every query head, and the state after the last key, in ``dtype``
    (float64: the oracle): the sum of powers over ``v`` with padded keys as zero values."""
    B, Hkv, G, Tq, D = o.shape
    Tk = v.shape[2]
    lag = torch.arange(Tk + 1)[:, None] - torch.arange(Tk)[None, :]  # rows: positions 0 .. Tk (the state)
    w = torch.where(lag > 0, torch.tensor(eta, dtype=torch.float64) ** lag.clamp(min=0), 0.0).to(dtype)
    vk = v.to(dtype) if kpm is None else v.to(dtype) * kpm[:, None, :, None]
    m = w @ vk  # [B, Hkv, Tk + 1, D]
    return o.to(dtype) + m[:, :, None, Tk - Tq : Tk], m[:, :, Tk]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("geometry", [(2, 2, 3, 30, 41, 37, True), (1, 3, 1, 40, 40, 16, False),
                                      (2, 1, 2, 1, 9, 5, True), (1, 2, 1, 0, 6, 16, False)],
                         ids=["gqa-chunk-padded-37cols", "square-16cols", "decode-row-5cols", "no-rows"])
def test_momentum_add(dtype, geometry):
    """``o += M`` of ``v`` at the last ``Tq`` positions for every query head of a kv head, and the state after the
    last key, against the float64 sum of powers: GQA, a chunk of rows over a longer cache, padded keys (zero values),
    column counts on and off the 16-column vector body, an ``o`` that is a strided view (``[B, Tq, H, D]`` memory)."""
    B, Hkv, G, Tq, Tk, D, padded = geometry
    v = _randn(B, Hkv, Tk, D, seed=Tk, dtype=dtype)
    o0 = _randn(B, Tq, Hkv * G, D, seed=D, dtype=dtype)
    kpm = None
    if padded:
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[-1, :3] = False
        kpm[0, Tk // 2] = False
    o = o0.clone().transpose(1, 2).reshape(B, Hkv, G, Tq, D) if Tq else torch.zeros(B, Hkv, G, 0, D, dtype=dtype)
    start = o.clone()
    state = OPS.momentum_add_(o, v, kpm, 0.9)
    want, want_state = _momentum_add_oracle(start, v, kpm, 0.9, dtype)
    high, high_state = _momentum_add_oracle(start, v, kpm, 0.9, torch.float64)
    check_close("o", o, want, high, factor=FWD_FACTOR)
    check_close("state", state, want_state, high_state, factor=FWD_FACTOR)
    assert state.shape == (B, Hkv, D) and state.dtype == dtype
    assert state.abs().sum() > 0


def test_momentum_add_bad_input():
    v = torch.zeros(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="Tk >= Tq"):
        OPS.momentum_add_(torch.zeros(1, 2, 1, 6, 16), v, None, 0.5)
    with pytest.raises(RuntimeError, match="out's dtype"):
        OPS.momentum_add_(torch.zeros(1, 2, 1, 5, 16), v.double(), None, 0.5)
    with pytest.raises(RuntimeError, match="unit stride along D"):
        OPS.momentum_add_(torch.zeros(1, 2, 1, 5, 16).transpose(3, 4).contiguous().transpose(3, 4), v, None, 0.5)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        OPS.momentum_add_(torch.zeros(1, 2, 1, 5, 16), v, torch.ones(1, 4, dtype=torch.bool), 0.5)
    with pytest.raises(RuntimeError, match="internal overlap|single memory location"):
        OPS.momentum_add_(torch.zeros(1, 2, 1, 5, 16).expand(1, 2, 3, 5, 16), v, None, 0.5)


@pytest.mark.parametrize("columns", [16, 5], ids=["vector-body", "scalar-columns"])
def test_momentum_add_propagates_nan(columns):
    """A NaN value reaches every later position's output and the state, also at a padded key (its value times 0 is
    NaN, as in the Python term)."""
    v = torch.zeros(1, 1, 8, columns)
    v[0, 0, 2, 0] = float("nan")
    kpm = torch.ones(1, 8, dtype=torch.bool)
    kpm[0, 2] = False
    o = torch.zeros(1, 1, 1, 8, columns)
    state = OPS.momentum_add_(o, v, kpm, 0.5)
    assert o[0, 0, 0, :3, 0].eq(0).all() and o[0, 0, 0, 3:, 0].isnan().all() and state[0, 0, 0].isnan()
    assert not o[..., 1:].isnan().any()


@pytest.mark.parametrize("columns", [16, 5], ids=["vector-body", "scalar-columns"])
def test_momentum_scan_propagates_nan_and_inf(columns):
    """A NaN or an infinity in the values reaches every later position (the flush of tiny values must not clear it)."""
    x = torch.zeros(1, 8, columns)
    x[0, 2, 0], x[0, 4, 1] = float("nan"), float("inf")
    y = OPS.momentum_scan(x, 0.5, False)
    assert y[0, :3, 0].eq(0).all() and y[0, 3:, 0].isnan().all()
    assert y[0, :5, 1].eq(0).all() and y[0, 5:, 1].isinf().all()


def test_momentum_scan_flushes_denormals():
    """A decayed value below float32's smallest normal number is stored as 0, never as a denormal."""
    x = torch.zeros(1, 60, 20)
    x[0, 0] = 1.0
    y = OPS.momentum_scan(x, 0.1, False)  # 0.1^t: below 1.2e-38 from t = 38 on
    assert y[0, 37, 0] > 0 and (y[0, 38:] == 0).all()
    assert not ((y != 0) & (y.abs() < torch.finfo(torch.float32).tiny)).any()
