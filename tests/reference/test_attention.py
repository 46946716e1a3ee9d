"""The base-attention oracle (docs/methods.md §1) against PyTorch SDPA, and its mask conventions."""

import functools

import pytest
import torch
import torch.nn.functional as F

from fastattn_icl import testing
from fastattn_icl.reference import attention, attention_probs, attention_scores, visible_mask
from fastattn_icl.testing import GRAD_FACTOR

# the oracle's forms are compared in float64, with the rule's float64 eps (testing.EPS64)
check_against_oracle = functools.partial(testing.check_against_oracle, dtype=torch.float64)


def _qkv(B, H, Hkv, Tq, Tk, D, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _padding(B, Tk, seed=0):
    """Left padding of a different length per batch row (row 0 unpadded)."""
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    for b in range(1, B):
        kpm[b, : min(Tk - 1, 2 * b + seed)] = False
    return kpm


def _sdpa(q, k, v, mask, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


SHAPES = [
    # B, H, Hkv, Tq, Tk, D
    (1, 1, 1, 1, 1, 8),
    (2, 2, 2, 17, 17, 16),
    (2, 4, 1, 17, 17, 8),  # GQA 4:1
    (2, 4, 2, 5, 17, 8),  # bottom-right causal chunk, Tq < Tk
    (1, 2, 1, 1, 63, 16),  # decode row
    (2, 3, 3, 13, 7, 4),  # Tq > Tk: the first rows see nothing under causal
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pad", [False, True])
def test_matches_sdpa_with_explicit_mask(shape, causal, pad):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v = _qkv(*shape)
    kpm = _padding(B, Tk) if pad else None
    out, lse = attention(q, k, v, causal=causal, key_padding_mask=kpm, return_lse=True)
    mask = visible_mask(Tq, Tk, causal=causal, key_padding_mask=kpm).expand(B, 1, Tq, Tk)
    rows = mask.any(-1).expand(B, H, Tq)  # rows with at least one visible key
    assert out.shape == (B, H, Tq, D) and out.dtype == q.dtype
    check_against_oracle(
        "out",
        lambda *a: attention(*a, causal=causal, key_padding_mask=kpm)[rows],
        lambda *a: _sdpa(*a, mask)[rows],
        q,
        k,
        v,
    )
    assert torch.all(out[~rows] == 0)
    assert torch.all(torch.isneginf(lse[~rows])) and torch.all(torch.isfinite(lse[rows]))

    def from_lse(q, k, v):
        """exp(s - lse) weighs v: the output SDPA gives only if lse is the log of the softmax denominator"""
        _, lse = attention(q, k, v, causal=causal, key_padding_mask=kpm, return_lse=True)
        s = (q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * D**-0.5
        p = torch.where(mask, torch.exp(s - lse.masked_fill(~rows, 0)[..., None]), 0.0)
        return (p @ v.repeat_interleave(H // Hkv, 1))[rows]

    check_against_oracle("softmax rebuilt from lse", from_lse, lambda *a: _sdpa(*a, mask)[rows], q, k, v)


@pytest.mark.parametrize("T", [1, 17, 63])
def test_square_causal_matches_is_causal(T):
    q, k, v = _qkv(2, 3, 3, T, T, 16, seed=T)
    check_against_oracle("out", attention, lambda *a: F.scaled_dot_product_attention(*a, is_causal=True), q, k, v)


def test_gqa_reads_kv_head_h_over_group():
    q, k, v = _qkv(2, 8, 2, 9, 9, 8)
    for h in range(8):
        kv = slice(h // 4, h // 4 + 1)
        # one head against all heads: different matmul shapes, so the tolerance rule, not bits
        check_against_oracle(
            f"head {h}",
            lambda q, k, v, h=h: attention(q, k, v)[:, h : h + 1],
            lambda q, k, v, h=h, kv=kv: attention(q[:, h : h + 1], k[:, kv], v[:, kv]),
            q,
            k,
            v,
        )


def test_custom_scale():
    q, k, v = _qkv(1, 2, 1, 6, 6, 8)
    mask = visible_mask(6, 6, causal=True)
    check_against_oracle("out", lambda *a: attention(*a, scale=0.3), lambda *a: _sdpa(*a, mask, scale=0.3), q, k, v)


def test_visible_mask_bottom_right_by_hand():
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible_mask(2, 4, causal=True)[0, 0], expected)
    assert torch.equal(visible_mask(3, 2, causal=True)[0, 0], torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.bool))
    kpm = torch.tensor([[False, True, True, True]])
    got = visible_mask(2, 4, causal=True, key_padding_mask=kpm)
    assert got.shape == (1, 1, 2, 4) and torch.equal(got[0, 0], expected & kpm)
    assert visible_mask(2, 4, causal=False).all()


def test_fully_masked_row_is_zero_not_nan_with_finite_grads():
    q, k, v = _qkv(2, 2, 1, 4, 6, 8, requires_grad=True)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1] = False  # batch row 1: no visible key at all
    kpm[0, :3] = False  # causal row 0 of batch 0 sees keys 0..2: all padded
    out, lse = attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert not torch.isnan(out).any()
    assert torch.all(out[1] == 0) and torch.all(out[0, :, 0] == 0)
    assert torch.all(torch.isneginf(lse[1])) and torch.all(torch.isneginf(lse[0, :, 0]))
    p = attention_probs(q, k, key_padding_mask=kpm)
    assert torch.all(p[1] == 0)
    check_against_oracle(
        "row sums",
        lambda q, k: attention_probs(q, k, key_padding_mask=kpm)[0, :, 1:].sum(-1),
        lambda q, k: torch.ones(2, 3, dtype=q.dtype),
        q,
        k,
    )
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[1] == 0)


def test_scores_are_scaled_logits_with_minus_inf_masks():
    q, k, _ = _qkv(1, 2, 1, 3, 5, 4)
    kpm = torch.tensor([[True, False, True, True, True]])
    s = attention_scores(q, k, causal=True, key_padding_mask=kpm, scale=0.5)
    vis = visible_mask(3, 5, causal=True, key_padding_mask=kpm).expand_as(s)
    check_against_oracle(
        "visible scores",
        lambda q, k: attention_scores(q, k, causal=True, key_padding_mask=kpm, scale=0.5)[vis],
        lambda q, k: (0.5 * q @ k.repeat_interleave(2, 1).transpose(-1, -2))[vis],
        q,
        k,
    )
    assert torch.all(torch.isneginf(s[~vis]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_keeps_dtype_and_is_close(dtype):
    q, k, v = _qkv(2, 4, 2, 17, 17, 16)
    out, lse = attention(q.to(dtype), k.to(dtype), v.to(dtype), return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    sdpa = lambda *a: F.scaled_dot_product_attention(*a, is_causal=True, enable_gqa=True)  # noqa: E731
    check_against_oracle("out", attention, sdpa, q, k, v, dtype=dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_fp64(causal):
    q, k, v = _qkv(2, 4, 2, 4, 6, 3, requires_grad=True)
    kpm = _padding(2, 6)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: attention(q_, k_, v_, causal=causal, key_padding_mask=kpm), (q, k, v)
    )


def test_backward_matches_sdpa():
    q, k, v = _qkv(2, 4, 1, 9, 12, 8, requires_grad=True)
    do = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    mask = visible_mask(9, 12, causal=True)

    def grads(f):
        def run(q, k, v, do):
            leaves = [t.requires_grad_() for t in (q, k, v)]
            return torch.autograd.grad(f(*leaves), leaves, do)

        return run

    check_against_oracle(
        "dq, dk, dv", grads(attention), grads(lambda *a: _sdpa(*a, mask)), q, k, v, do, factor=GRAD_FACTOR
    )


def test_bad_input_gets_typed_errors():
    q, k, v = _qkv(1, 4, 2, 3, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k[:, :1].expand(1, 3, 3, 8), v[:, :1].expand(1, 3, 3, 8))
    with pytest.raises(ValueError, match="4 dims"):
        attention(q[0], k, v)
    with pytest.raises(TypeError, match="dtype"):
        attention(q.float(), k, v)
    with pytest.raises(TypeError):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="batch"):
        attention(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="v must have shape"):
        attention(q, k, v[:, :, :2])
    with pytest.raises(TypeError, match="bool"):
        attention(q, k, v, key_padding_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="int"):
        visible_mask(2.0, 3, causal=True)
