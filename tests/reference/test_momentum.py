"""Momentum attention oracle (docs/methods.md §6)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from fastattn_icl import testing
from fastattn_icl.reference import attention, momentum_attention, momentum_recurrent, momentum_term, visible_mask
from fastattn_icl.testing import GRAD_FACTOR, check_close

# the oracle's forms are compared in float64, with the rule's float64 eps (testing.EPS64)
check_against_oracle = functools.partial(testing.check_against_oracle, dtype=torch.float64)


def _qkv(B, H, Hkv, Tq, Tk, D, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]
    return [t.requires_grad_(requires_grad) for t in ts]


def test_hand_computed():
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).reshape(1, 1, 3, 1)
    # M_0 = 0, M_1 = .5·1, M_2 = .5·2 + .25·1
    expected = torch.tensor([0.0, 0.5, 1.25], dtype=torch.float64).reshape(1, 1, 3, 1)
    assert torch.equal(momentum_term(v, 0.5), expected)
    assert torch.equal(momentum_recurrent(v, 0.5), expected)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 0.999])
def test_closed_form_equals_recurrence(eta):
    v = torch.randn(2, 3, 33, 8, dtype=torch.float64)
    kpm = torch.ones(2, 33, dtype=torch.bool)
    kpm[1, :5] = False
    for mask in (None, kpm):
        check_against_oracle(
            f"padding {mask is not None}",
            lambda v, mask=mask: momentum_term(v, eta, key_padding_mask=mask),
            lambda v, mask=mask: momentum_recurrent(v, eta, key_padding_mask=mask),
            v,
        )


def test_chunked_start_consistent_with_full_pass():
    eta = 0.7
    q, k, v = _qkv(2, 4, 2, 17, 17, 8)
    for s in (1, 9, 16):
        # two matmuls of different shapes: BLAS may round them differently (MKL's AVX-512 path: 4.4e-16)
        full_term = lambda v, s=s: momentum_term(v, eta)[:, :, s:]  # noqa: E731
        check_against_oracle(f"term from {s}", lambda v, s=s: momentum_term(v, eta, start=s), full_term, v)
        check_against_oracle(
            f"rows from {s}",  # query row i sits at absolute s + i
            lambda q, k, v, s=s: momentum_attention(q[:, :, s:], k, v, eta),
            lambda q, k, v, s=s: momentum_attention(q, k, v, eta)[:, :, s:],
            q,
            k,
            v,
        )

        def carried(v, s=s):
            """recurrent decode: carry m over the first s positions, continue on the rest"""
            _, state = momentum_recurrent(v[:, :, :s], eta, return_state=True)
            return momentum_recurrent(v[:, :, s:], eta, m0=state)

        check_against_oracle(f"recurrence carried over {s}", carried, full_term, v)
    assert momentum_term(v, eta, start=17).shape == (2, 2, 0, 8)


def test_gqa_momentum_shared_by_query_heads():
    eta = 0.5
    q, k, v = _qkv(2, 8, 2, 9, 9, 8)
    for h in range(8):
        check_against_oracle(
            f"head {h}",
            lambda q, k, v, h=h: (momentum_attention(q, k, v, eta) - attention(q, k, v))[:, h],
            lambda q, k, v, h=h: momentum_term(v, eta)[:, h // 4],
            q,
            k,
            v,
        )


@pytest.mark.parametrize("shape", [(2, 2, 2, 17, 17, 8), (2, 4, 1, 5, 17, 8), (1, 2, 1, 9, 4, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_eta_zero_is_base_attention_exactly(shape, dtype):
    q, k, v = [t.to(dtype) for t in _qkv(*shape)]
    kpm = torch.ones(shape[0], shape[4], dtype=torch.bool)
    kpm[-1, :2] = False
    for causal in (True, False):
        got = momentum_attention(q, k, v, 0.0, causal=causal, key_padding_mask=kpm)
        assert got.dtype == dtype
        # bit-exact: the same attention call, plus a momentum term of exact zeros
        assert torch.equal(got, attention(q, k, v, causal=causal, key_padding_mask=kpm))
    if dtype == torch.float64:
        B, _, _, Tq, Tk, _ = shape
        mask = visible_mask(Tq, Tk, causal=True, key_padding_mask=kpm)
        rows = mask.any(-1).expand(B, shape[1], Tq)
        check_against_oracle(
            "eta = 0",
            lambda q, k, v: momentum_attention(q, k, v, 0.0, key_padding_mask=kpm)[rows],
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[rows],
            q,
            k,
            v,
        )


def test_left_padding_gives_the_unpadded_result():
    eta = 0.8
    q, k, v = _qkv(1, 2, 1, 6, 6, 8)
    pad = 3
    left_pad = lambda t: torch.cat([torch.randn(*t.shape[:2], pad, t.shape[3], dtype=t.dtype), t], 2)  # noqa: E731
    kpm = torch.ones(1, 6 + pad, dtype=torch.bool)
    kpm[:, :pad] = False
    check_against_oracle(
        "unpadded rows",
        lambda *a: momentum_attention(*[left_pad(t) for t in a], eta, key_padding_mask=kpm)[:, :, pad:],
        lambda *a: momentum_attention(*a, eta),
        q,
        k,
        v,
    )


def test_fp32_accumulation_near_one():
    eta = 0.999
    v = torch.ones(1, 1, 512, 8, dtype=torch.float16)
    got = momentum_term(v, eta)
    assert got.dtype == torch.float32
    t = torch.arange(512, dtype=torch.float64)
    expected = eta * (1 - eta**t) / (1 - eta)  # geometric sum Σ_{l=1..t} η^l
    # the same-dtype oracle is the exact sum rounded once: float16 accumulation would miss it by ~ulp·t
    check_close("float32 sum", got[0, 0, :, 0], expected.float(), expected)
    q, k = torch.zeros(1, 1, 512, 8, dtype=torch.float16), torch.zeros(1, 1, 512, 8, dtype=torch.float16)
    out = momentum_attention(q, k, v, eta)
    assert out.dtype == torch.float16
    check_close("float16 output", out[0, 0, :, 0], (1 + expected).half(), 1 + expected)


def test_gradcheck_fp64():
    q, k, v = _qkv(2, 4, 2, 4, 6, 3, requires_grad=True)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1, :2] = False
    assert torch.autograd.gradcheck(lambda *a: momentum_attention(*a, 0.7, key_padding_mask=kpm), (q, k, v))


def test_backward_adds_only_the_anticausal_decayed_sum_to_dv():
    eta, G = 0.6, 2
    q, k, v = _qkv(2, 4, 2, 7, 11, 8, requires_grad=True)
    do = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    g_mom = torch.autograd.grad(momentum_attention(q, k, v, eta), (q, k, v), do)
    g_base = torch.autograd.grad(attention(q, k, v), (q, k, v), do)
    # bit-exact: q and k reach the output only through the same attention call, M depends on v alone
    assert torch.equal(g_mom[0], g_base[0]) and torch.equal(g_mom[1], g_base[1])

    def extra_dv(q, k, v, do):
        leaves = [t.requires_grad_() for t in (q, k, v)]
        g_mom = torch.autograd.grad(momentum_attention(*leaves, eta), leaves, do)
        g_base = torch.autograd.grad(attention(*leaves), leaves, do)
        return g_mom[2] - g_base[2]

    def decayed_sum(q, k, v, do):
        """dV_j += Σ_{i>j} η^{i−j} dO_i over absolute positions (query row r is at r + Tk − Tq), summed
        over the query heads of the kv head."""
        Tq, Tk = 7, 11
        do_abs = do.new_zeros(2, 4, Tk, 8)
        do_abs[:, :, Tk - Tq :] = do
        do_kv = do_abs.reshape(2, 2, G, Tk, 8).sum(2)
        expected = do.new_zeros(2, 2, Tk, 8)
        for j in range(Tk):
            for i in range(j + 1, Tk):
                expected[:, :, j] += eta ** (i - j) * do_kv[:, :, i]
        return expected

    check_against_oracle("dv - dv of attention", extra_dv, decayed_sum, q, k, v, do, factor=GRAD_FACTOR)


@pytest.mark.parametrize("eta", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_eta_out_of_range_is_value_error(eta):
    q, k, v = _qkv(1, 1, 1, 3, 3, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        momentum_attention(q, k, v, eta)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        momentum_term(v, eta)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        momentum_recurrent(v, eta)


def test_other_bad_input():
    q, k, v = _qkv(1, 1, 1, 3, 3, 8)
    with pytest.raises(TypeError, match="eta"):
        momentum_attention(q, k, v, "0.5")
    with pytest.raises(TypeError, match="eta"):
        momentum_attention(q, k, v, True)
    with pytest.raises(ValueError, match="start"):
        momentum_term(v, 0.5, start=4)
    with pytest.raises(ValueError, match="m0"):
        momentum_recurrent(v, 0.5, m0=torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        momentum_term(v, 0.5, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
