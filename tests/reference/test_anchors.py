"""Anchor re-weighting oracle (docs/methods.md §2): post-softmax, numerator only, not renormalised."""

import functools
import math

import pytest
import torch

from fastattn_icl import testing
from fastattn_icl.reference import anchor_reweight_attention, attention, attention_probs
from fastattn_icl.testing import GRAD_FACTOR

# the oracle's forms are compared in float64, with the rule's float64 eps (testing.EPS64)
check_against_oracle = functools.partial(testing.check_against_oracle, dtype=torch.float64)


def _qkv(B, H, Hkv, Tq, Tk, D, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]
    return [t.requires_grad_(requires_grad) for t in ts]


def _anchors():
    """B = 2, C = 3; batch row 1 has a padding entry and two anchors of class 0."""
    pos = torch.tensor([[1, 4, 6, 8], [2, 5, 7, -1]])
    cls = torch.tensor([[0, 1, 2, 0], [2, 0, 0, 1]])
    return pos, cls


def test_hand_computed():
    # q = 0 gives uniform causal rows; the last row sees keys 0, 1, 2 with P = 1/3 each.
    q = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    k = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)
    beta = torch.tensor([[math.log(2.0)]], dtype=torch.float64)  # [H=1, C=1]
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [2 / 3, 1.0]], dtype=torch.float64)
    check_against_oracle(
        "out",
        lambda *a: anchor_reweight_attention(*a, torch.tensor([[1]]), torch.tensor([[0]]))[0, 0],
        lambda q, k, v, beta: expected.to(q.dtype),
        q,
        k,
        v,
        beta,
    )


@pytest.mark.parametrize("shape", [(2, 2, 2, 9, 9, 8), (2, 4, 1, 9, 9, 8), (2, 4, 2, 3, 9, 8), (2, 2, 1, 1, 9, 4)])
@pytest.mark.parametrize("reweight_from", [None, 0, "tensor"])
@pytest.mark.parametrize("pad", [False, True])
def test_beta_zero_is_base_attention_exactly(shape, reweight_from, pad):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v = _qkv(*shape)
    pos, cls = _anchors()
    if reweight_from == "tensor":
        reweight_from = torch.tensor([0, Tq - 1])
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    if pad:
        kpm[1, :3] = False
    for dtype in (torch.float64, torch.float32, torch.float16):
        args = [t.to(dtype) for t in (q, k, v)]
        beta = torch.zeros(H, 3)
        got = anchor_reweight_attention(*args, beta, pos, cls, reweight_from=reweight_from, key_padding_mask=kpm)
        # bit-exact: β = 0 weighs the same probabilities by exp(0) = 1 before the same P V product
        assert torch.equal(got, attention(*args, key_padding_mask=kpm))


@pytest.mark.parametrize("pos", [torch.zeros(2, 0, dtype=torch.long), torch.full((2, 3), -1)])
def test_no_anchors_is_base_attention_exactly(pos):
    q, k, v = _qkv(2, 2, 1, 5, 5, 8)
    beta = torch.randn(2, 3, dtype=torch.float64)
    got = anchor_reweight_attention(q, k, v, beta, pos, torch.zeros_like(pos), reweight_from=0)
    # bit-exact: without anchors every weight is exp(0) = 1 before the same P V product
    assert torch.equal(got, attention(q, k, v))


def test_not_renormalised():
    q, k, _ = _qkv(2, 2, 2, 9, 9, 8)
    ones = torch.ones(2, 2, 9, 1, dtype=torch.float64)  # O = row sums of P̂
    pos, cls = _anchors()
    beta = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.3, -0.7]], dtype=torch.float64)
    rowsum = anchor_reweight_attention(q, k, ones, beta, pos, cls, reweight_from=0)[..., 0]

    def expected(q, k, beta):
        p = attention_probs(q, k)
        sums = torch.ones(2, 2, 9, dtype=q.dtype)
        for b in range(2):
            for a in range(4):
                if pos[b, a] >= 0:
                    w = torch.exp(beta[:, cls[b, a]])[:, None]  # [H, 1]
                    sums[b] += (w - 1) * p[b, :, :, pos[b, a]]
        return sums

    check_against_oracle(
        "row sums",
        lambda q, k, beta: anchor_reweight_attention(q, k, ones.to(q.dtype), beta, pos, cls, reweight_from=0)[..., 0],
        expected,
        q,
        k,
        beta,
    )
    assert (rowsum[:, :, -1] - 1).abs().min() > 1e-3  # the last row sees every anchor


def test_reweight_from_semantics():
    q, k, v = _qkv(2, 2, 1, 9, 9, 8)
    pos, cls = _anchors()
    beta = torch.full((2, 3), 0.8, dtype=torch.float64)
    base = attention(q, k, v)
    last = anchor_reweight_attention(q, k, v, beta, pos, cls)  # None: only row Tq - 1
    # bit-exact here and below: rows before reweight_from are weighed by exp(0) = 1 in the same P V product
    assert torch.equal(last[:, :, :-1], base[:, :, :-1])
    assert (last[:, :, -1] - base[:, :, -1]).abs().max() > 1e-3
    r = torch.tensor([3, 6])
    per_row = anchor_reweight_attention(q, k, v, beta, pos, cls, reweight_from=r)
    for b in range(2):
        assert torch.equal(per_row[b, :, : r[b]], base[b, :, : r[b]])
        diff = (per_row[b, :, r[b] :] - base[b, :, r[b] :]).abs().amax(dim=(0, 2))
        assert (diff > 1e-6).all()  # every later row sees an anchor (positions 1 and 2)
    as_int = anchor_reweight_attention(q, k, v, beta, pos, cls, reweight_from=3)
    assert torch.equal(as_int[0], per_row[0])  # same code path: an int is a per-row tensor


def test_anchor_a_row_cannot_see_stays_zero():
    # Anchor at key 5 is invisible to causal rows 0..4: those rows must equal base attention.
    q, k, v = _qkv(1, 1, 1, 7, 7, 4)
    beta = torch.tensor([[3.0]], dtype=torch.float64)
    check_against_oracle(
        "rows 0..4",
        lambda q, k, v, beta: anchor_reweight_attention(
            q, k, v, beta, torch.tensor([[5]]), torch.tensor([[0]]), reweight_from=0
        )[:, :, :5],
        lambda q, k, v, beta: attention(q, k, v)[:, :, :5],
        q,
        k,
        v,
        beta,
    )


def _spec_backward(q, k, v, beta, pos, cls, rows, do):
    """docs/methods.md §2 backward written out: dβ, dV, dS -> dQ, dK."""
    B, H, Tq, D = q.shape
    G = H // k.shape[1]
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    p = attention_probs(q, k)
    w = torch.ones_like(p)
    for b in range(B):
        for a in range(pos.shape[1]):
            if pos[b, a] >= 0:
                w[b, :, rows[b], pos[b, a]] = torch.exp(beta[:, cls[b, a]])[:, None]
    o = (w * p) @ vr
    dvr = (w * p).transpose(-1, -2) @ do
    dp = w * (do @ vr.transpose(-1, -2))
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    scale = D**-0.5
    dq = scale * ds @ kr
    dkr = scale * ds.transpose(-1, -2) @ q
    dbeta = torch.zeros_like(beta)
    for b in range(B):
        for a in range(pos.shape[1]):
            if pos[b, a] >= 0:
                c, j = cls[b, a], pos[b, a]
                dot = (do[b][:, rows[b]] * vr[b][:, j][:, None, :]).sum(-1)  # [H, rows]: dO_q · v_k
                dbeta[:, c] += (w[b, :, rows[b], j] * p[b, :, rows[b], j] * dot).sum(-1)
    fold = lambda t: t.reshape(B, k.shape[1], G, *t.shape[2:]).sum(2)  # noqa: E731
    return dq, fold(dkr), fold(dvr), dbeta


def test_backward_matches_spec_closed_form():
    B, H, Hkv, T, D = 2, 4, 2, 9, 8
    q, k, v = _qkv(B, H, Hkv, T, T, D, requires_grad=True)
    beta = torch.randn(H, 3, dtype=torch.float64, requires_grad=True)
    pos, cls = _anchors()
    r = torch.tensor([4, 7])
    do = torch.randn(B, H, T, D, dtype=torch.float64)
    rows = [torch.arange(int(r[b]), T) for b in range(B)]

    def autograd(q, k, v, beta, do):
        leaves = [t.requires_grad_() for t in (q, k, v, beta)]
        out = anchor_reweight_attention(*leaves, pos, cls, reweight_from=r)
        return torch.autograd.grad(out, leaves, do)

    check_against_oracle(
        "dq, dk, dv, dbeta",
        autograd,
        lambda q, k, v, beta, do: _spec_backward(q, k, v, beta, pos, cls, rows, do),
        q,
        k,
        v,
        beta,
        do,
        factor=GRAD_FACTOR,
    )


def test_batched_beta_equals_per_sample_runs():
    q, k, v = _qkv(2, 2, 1, 9, 9, 8)
    pos, cls = _anchors()
    beta = torch.randn(2, 2, 3, dtype=torch.float64)  # [B, H, C]
    for b in range(2):
        one = slice(b, b + 1)
        check_against_oracle(  # batch 1 vs 2: other BLAS calls, so the rule, not bits
            f"batch row {b}",
            lambda q, k, v, beta, one=one: anchor_reweight_attention(q, k, v, beta, pos, cls, reweight_from=2)[one],
            lambda q, k, v, beta, one=one, b=b: anchor_reweight_attention(
                q[one], k[one], v[one], beta[b], pos[one], cls[one], reweight_from=2
            ),
            q,
            k,
            v,
            beta,
        )


def test_gradcheck_fp64():
    q, k, v = _qkv(2, 2, 1, 5, 9, 3, requires_grad=True)
    pos, cls = _anchors()
    beta = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, :2] = False
    assert torch.autograd.gradcheck(
        lambda *a: anchor_reweight_attention(*a, pos, cls, reweight_from=torch.tensor([1, 3]), key_padding_mask=kpm),
        (q, k, v, beta),
    )


def test_bad_input_gets_typed_errors():
    q, k, v = _qkv(2, 2, 1, 5, 9, 4)
    pos, cls = _anchors()
    beta = torch.zeros(2, 3)
    call = lambda **kw: anchor_reweight_attention(  # noqa: E731
        q, k, v, kw.get("beta", beta), kw.get("pos", pos), kw.get("cls", cls), reweight_from=kw.get("r")
    )
    with pytest.raises(ValueError, match=r"\[0, Tk=9\)"):
        call(pos=torch.tensor([[1, 4, 6, 9], [2, 5, 7, -1]]))
    with pytest.raises(ValueError, match="padding"):
        call(pos=torch.tensor([[1, 4, 6, -2], [2, 5, 7, -1]]))
    with pytest.raises(ValueError, match="repeat"):
        call(pos=torch.tensor([[1, 4, 4, 8], [2, 5, 7, -1]]))
    with pytest.raises(ValueError, match="anchor_classes"):
        call(cls=torch.tensor([[0, 1, 3, 0], [2, 0, 0, 1]]))
    with pytest.raises(ValueError, match="anchor_classes"):
        call(cls=cls[:, :3])
    with pytest.raises(TypeError, match="integer"):
        call(pos=pos.float())
    with pytest.raises(ValueError, match="beta"):
        call(beta=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="beta"):
        call(beta=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        call(beta=torch.full((2, 3), float("inf")))
    with pytest.raises(ValueError, match="reweight_from"):
        call(r=5)
    with pytest.raises(ValueError, match="reweight_from"):
        call(r=torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="reweight_from"):
        call(r=True)
