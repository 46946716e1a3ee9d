"""Isolation oracle (docs/methods.md §3): logits overwritten with exactly -1e4 after scaling and masking."""

import functools

import pytest
import torch

from fastattn_icl import testing
from fastattn_icl.reference import (
    ISOLATION_VALUE,
    attention,
    attention_probs,
    attention_scores,
    isolate_scores,
    isolation_region,
)

# the oracle's forms are compared in float64, with the rule's float64 eps (testing.EPS64)
check_against_oracle = functools.partial(testing.check_against_oracle, dtype=torch.float64)


def _qkv(B, H, Hkv, Tq, Tk, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]


ROWS = torch.tensor([[2, 5], [4, -1]])  # batch row 1 has a padding entry


def _expected_region(rows, Tq, Tk, window):
    region = torch.zeros(rows.shape[0], Tq, Tk, dtype=torch.bool)
    for b in range(rows.shape[0]):
        for p in rows[b].tolist():
            if p < 0:
                continue
            for i in range(Tq):
                if p <= i + Tk - Tq <= p + window:
                    region[b, i, :p] = True
    return region


@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize("Tq", [9, 4])
def test_exact_overwrite_others_untouched(window, Tq):
    Tk = 9
    q, k, _ = _qkv(2, 3, 1, Tq, Tk, 8)
    plain = attention_scores(q, k)
    iso = attention_scores(q, k, isolation_rows=ROWS, isolation_window=window)
    region = _expected_region(ROWS, Tq, Tk, window)
    assert torch.equal(isolation_region(ROWS, Tq, Tk, window), region)
    region = region[:, None].expand_as(iso)
    assert region.any()
    assert torch.all(iso[region] == ISOLATION_VALUE) and ISOLATION_VALUE == -1e4
    assert torch.equal(iso[~region], plain[~region])


def test_window_by_hand():
    # p = 2, window = 1, square T = 5: rows 2 and 3 lose keys 0, 1; row 4 keeps them.
    region = isolation_region(torch.tensor([[2]]), 5, 5, window=1)[0]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[2:4, :2] = True
    assert torch.equal(region, expected)


def test_isolated_row_only_attends_to_itself():
    # exp(-1e4 - s) underflows to 0, so with window 0 the causal row p can only see key p.
    q, k, v = _qkv(1, 2, 2, 7, 7, 8)
    out = attention(q, k, v, isolation_rows=torch.tensor([[3]]))
    # bit-exact: the row's probabilities are exactly 1 at key 3 and 0 elsewhere, so P V copies v_3
    assert torch.equal(out[:, :, 3], v[:, :, 3])
    check_against_oracle(
        "rows after the isolated one",
        lambda *a: attention(*a, isolation_rows=torch.tensor([[3]]))[:, :, 4:],
        lambda *a: attention(*a)[:, :, 4:],
        q,
        k,
        v,
    )


def test_chunk_rows_map_to_absolute_positions():
    q, k, _ = _qkv(2, 2, 1, 9, 9, 8)
    for start in (1, 4, 8):
        check_against_oracle(  # a chunk of q: matmuls of another shape
            f"scores from row {start}",
            lambda q, k, s=start: attention_scores(q[:, :, s:], k, isolation_rows=ROWS, isolation_window=2),
            lambda q, k, s=start: attention_scores(q, k, isolation_rows=ROWS, isolation_window=2)[:, :, s:],
            q,
            k,
        )
        chunk = attention_scores(q[:, :, start:], k, isolation_rows=ROWS, isolation_window=2)
        full = attention_scores(q, k, isolation_rows=ROWS, isolation_window=2)
        assert torch.equal(chunk == ISOLATION_VALUE, full[:, :, start:] == ISOLATION_VALUE)


@pytest.mark.parametrize("rows", [None, torch.zeros(2, 0, dtype=torch.long), torch.full((2, 2), -1)])
def test_empty_isolation_list_is_base_attention_exactly(rows):
    q, k, v = _qkv(2, 2, 1, 6, 6, 8)
    assert torch.equal(attention(q, k, v, isolation_rows=rows, isolation_window=1), attention(q, k, v))


def test_masking_wins_over_isolation():
    q, k, v = _qkv(1, 1, 1, 6, 6, 8)
    kpm = torch.tensor([[False, False, False, True, True, True]])
    s = attention_scores(q, k, key_padding_mask=kpm, isolation_rows=torch.tensor([[2, 4]]))
    assert torch.all(torch.isneginf(s[..., :3]))  # padded keys stay masked
    assert torch.all(s[0, 0, 4, 3] == ISOLATION_VALUE)
    p = attention_probs(q, k, key_padding_mask=kpm, isolation_rows=torch.tensor([[2, 4]]))
    assert torch.all(p[0, 0, :3] == 0)  # padded query rows with no visible key stay zero
    out = attention(q, k, v, key_padding_mask=kpm, isolation_rows=torch.tensor([[2, 4]]))
    assert not torch.isnan(out).any() and torch.all(out[0, 0, :3] == 0)


def test_gradient_is_zero_through_overwritten_logits():
    q, k, v = [t.requires_grad_(True) for t in _qkv(1, 1, 1, 5, 5, 4)]
    out = attention(q, k, v, isolation_rows=torch.tensor([[2]]))
    out[:, :, 2].sum().backward()
    assert torch.all(q.grad[:, :, 2] == 0)  # row 2 depends on q only through its isolated logits
    assert torch.autograd.gradcheck(
        lambda *a: attention(*a, isolation_rows=torch.tensor([[1, 3]]), isolation_window=1),
        tuple(t.detach().requires_grad_(True) for t in (q, k, v)),
    )


def test_errors():
    S = torch.zeros(2, 1, 5, 5)
    with pytest.raises(ValueError, match="past the sequence end"):
        isolate_scores(S, torch.tensor([[3], [1]]), window=2)
    with pytest.raises(ValueError, match="past the sequence end"):
        isolate_scores(S, torch.tensor([[5], [1]]))
    with pytest.raises(ValueError, match="padding"):
        isolate_scores(S, torch.tensor([[-2], [1]]))
    with pytest.raises(ValueError, match=r"\[B=2, R\]"):
        isolate_scores(S, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        isolate_scores(S, torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="window"):
        isolate_scores(S, torch.tensor([[1], [2]]), window=-1)
    with pytest.raises(TypeError, match="window"):
        isolate_scores(S, torch.tensor([[1], [2]]), window=1.0)
    with pytest.raises(TypeError, match="S must"):
        isolate_scores(S[0], torch.tensor([[1], [2]]))
