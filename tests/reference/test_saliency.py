"""Saliency and information-flow oracle (docs/methods.md §4)."""

import functools

import pytest
import torch

from fastattn_icl import testing
from fastattn_icl.reference import attention, attention_probs, flow_scores, normalise_flow, probe_saliency, saliency_map

# the oracle's forms are compared in float64, with the rule's float64 eps (testing.EPS64)
check_against_oracle = functools.partial(testing.check_against_oracle, dtype=torch.float64)


def _qkv(B, H, Hkv, Tq, Tk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]


def _loss_fn(shape, seed=1):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda o: (o * w.to(o.dtype)).sum() + 0.1 * o[:, :, -1].pow(2).sum()


@pytest.mark.parametrize("shape", [(2, 2, 2, 7, 7, 8), (2, 4, 1, 7, 7, 8), (1, 4, 2, 3, 9, 8)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_head", [False, True])
def test_probe_equals_sum_over_heads_of_p_times_do_vt(shape, causal, per_head):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v = _qkv(*shape)
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    kpm[-1, :2] = False
    loss_fn = _loss_fn((B, H, Tq, D))
    got = probe_saliency(q, k, v, loss_fn, causal=causal, key_padding_mask=kpm, per_head=per_head)
    assert got.shape == ((B, H, Tq, Tk) if per_head else (B, Tq, Tk))

    def expected(q, k, v):
        out = attention(q, k, v, causal=causal, key_padding_mask=kpm).requires_grad_(True)
        (do,) = torch.autograd.grad(loss_fn(out), out)
        dp = do @ v.repeat_interleave(H // Hkv, 1).transpose(-1, -2)  # ∂L/∂P = dO Vᵀ
        p = attention_probs(q, k, causal=causal, key_padding_mask=kpm)
        return (p * dp).abs() if per_head else (p * dp).sum(1).abs()

    check_against_oracle(
        "saliency",
        lambda *a: probe_saliency(*a, loss_fn, causal=causal, key_padding_mask=kpm, per_head=per_head),
        expected,
        q,
        k,
        v,
    )


def test_heads_are_summed_before_abs():
    P = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    dP = torch.tensor([1.0, -1.0], dtype=torch.float64)[None, :, None, None].expand(1, 2, 2, 2)
    assert torch.all(saliency_map(P, dP) == 0)
    assert torch.all(saliency_map(P, dP, per_head=True) == 1)


def test_probe_leaves_input_grads_alone():
    q, k, v = [t.requires_grad_(True) for t in _qkv(1, 2, 1, 4, 4, 8)]
    with torch.no_grad():
        sal = probe_saliency(q, k, v, lambda o: o.sum())
    assert sal.shape == (1, 4, 4)
    assert q.grad is None and k.grad is None and v.grad is None


def test_saliency_map_errors():
    P = torch.ones(1, 2, 3, 3)
    with pytest.raises(ValueError, match="one shape"):
        saliency_map(P, torch.ones(1, 2, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        saliency_map(P[0], P[0])
    with pytest.raises(TypeError):
        saliency_map(P.long(), P)
    q, k, v = _qkv(1, 2, 1, 3, 3, 8)
    with pytest.raises(ValueError, match="scalar"):
        probe_saliency(q, k, v, lambda o: o)
    with pytest.raises(TypeError, match="callable"):
        probe_saliency(q, k, v, None)


# A hand example: T = 5, target q = 4, label words at p = 1 and p = 3 (C = 2).
I_HAND = torch.tensor(
    [
        [5.0, 0, 0, 0, 0],
        [1, 7, 0, 0, 0],
        [2, 3, 9, 0, 0],
        [4, 5, 6, 9, 0],
        [1, 2, 3, 4, 9],
    ],
    dtype=torch.float64,
)


def test_flow_scores_by_hand():
    # Diagonal zeroed. num_wp = I[1,0] + I[3,0] + I[3,1] + I[3,2] = 1 + 15 = 16, Σ p_c = 4.
    # num_pq = I[4,1] + I[4,3] = 6, C = 2. Σ I (j < i <= 4) = 1 + 5 + 15 + 10 = 31,
    # S_ww = (31 - 16 - 6) / (4·5/2 - 4 - 2) = 9 / 4.
    s_wp, s_pq, s_ww = flow_scores(I_HAND, [1, 3], 4)
    assert s_wp.shape == () and float(s_wp) == 4.0
    assert float(s_pq) == 3.0
    assert float(s_ww) == 2.25
    same = flow_scores(I_HAND, torch.tensor([3, 1]), torch.tensor(4))
    assert [float(x) for x in same] == [4.0, 3.0, 2.25]


def test_flow_scores_ignore_pairs_outside_the_counted_set():
    # Rows after the target and keys at or after each row are not among the pairs the
    # denominators count; for a causal model with the loss at q they are 0 anyway.
    noisy = I_HAND.clone() + torch.triu(torch.full((5, 5), 100.0, dtype=torch.float64), diagonal=1)
    bigger = torch.zeros(6, 6, dtype=torch.float64)
    bigger[:5, :5] = noisy
    bigger[5] = 50.0
    assert [float(x) for x in flow_scores(bigger, [1, 3], 4)] == [4.0, 3.0, 2.25]


def test_flow_scores_batched_with_padding_equals_per_sample():
    g = torch.Generator().manual_seed(0)
    I = torch.rand(3, 8, 8, generator=g, dtype=torch.float64).tril()  # noqa: E741
    labels = torch.tensor([[1, 4, -1], [2, 3, 5], [0, 6, -1]])
    target = torch.tensor([6, 7, 7])
    got = flow_scores(I, labels, target)
    assert all(t.shape == (3,) for t in got)
    for b in range(3):
        check_against_oracle(
            f"sample {b}",
            lambda flow, b=b: [x[b] for x in flow_scores(flow, labels, target)],
            lambda flow, b=b: flow_scores(flow[b], labels[b][labels[b] >= 0], int(target[b])),
            I,
        )


def test_flow_scores_single_label_at_zero_gives_zero_not_nan():
    s_wp, s_pq, s_ww = flow_scores(I_HAND[:2, :2], [0], 1)  # Σ p_c = 0 and no "other" pairs
    assert float(s_wp) == 0 and float(s_ww) == 0 and float(s_pq) == 1.0


def test_flow_scores_errors():
    with pytest.raises(ValueError, match="empty"):
        flow_scores(I_HAND, [], 4)
    with pytest.raises(ValueError, match="empty"):
        flow_scores(I_HAND[None], torch.tensor([[-1, -1]]), torch.tensor([4]))
    with pytest.raises(ValueError, match="before the target"):
        flow_scores(I_HAND, [1, 4], 4)
    with pytest.raises(ValueError, match="before the target"):
        flow_scores(I_HAND, [1, 3], 2)
    with pytest.raises(ValueError, match="target"):
        flow_scores(I_HAND, [1, 3], 5)
    with pytest.raises(ValueError, match="repeat"):
        flow_scores(I_HAND, [1, 1], 4)
    with pytest.raises(ValueError, match="0-based"):
        flow_scores(I_HAND, [-1, 3], 4)
    with pytest.raises(ValueError, match="square"):
        flow_scores(I_HAND[:4], [1, 3], 3)
    with pytest.raises(ValueError, match=r"\[B=1, C\]"):
        flow_scores(I_HAND[None], torch.tensor([1, 3]), torch.tensor([4]))
    with pytest.raises(TypeError):
        flow_scores(I_HAND, [1.0, 3.0], 4)
    with pytest.raises(TypeError):
        flow_scores(I_HAND.long(), [1, 3], 4)


def test_normalise_flow_sums_to_one_per_layer():
    s = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 2.0]), torch.tensor([4.0, 0.0, 0.0])]
    by_hand = [[1 / 8, 0.0, 2 / 4], [3 / 8, 0.0, 2 / 4], [4 / 8, 0.0, 0.0]]  # a position with no flow stays 0
    check_against_oracle("shares", normalise_flow, lambda *s: [torch.tensor(n, dtype=s[0].dtype) for n in by_hand], *s)
