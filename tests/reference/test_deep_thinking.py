"""Deep-Thinking oracle (docs/methods.md §7): the element-wise K/V update and the re-run's mask."""

import functools

import pytest
import torch

from fastattn_icl import testing
from fastattn_icl.reference import (
    deep_thinking_mask,
    deep_thinking_position_ids,
    deep_thinking_update,
    gate_update,
    visible_mask,
)

# the oracle's forms are compared in float64, with the rule's float64 eps (testing.EPS64)
check_against_oracle = functools.partial(testing.check_against_oracle, dtype=torch.float64)


def _pair(shape=(1, 2, 5, 4), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]


def test_first_update():
    x_hat, x_new = _pair()
    check_against_oracle(
        "x_hat, m",
        lambda x_hat, x_new: deep_thinking_update(x_hat, x_new, None, eta=0.1, beta=0.9),
        lambda x_hat, x_new: (x_hat + 0.1 * (x_new - x_hat), x_new - x_hat),
        x_hat,
        x_new,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_beta_zero_is_the_gate_form(dtype):
    x_hat, x_new = _pair(dtype=dtype)
    _, m_prev = deep_thinking_update(*_pair(seed=1, dtype=dtype), None)
    check_against_oracle(
        "x_hat",
        lambda x_hat, x_new, m_prev: deep_thinking_update(x_hat, x_new, m_prev, eta=0.3, beta=0.0)[0],
        lambda x_hat, x_new, m_prev: gate_update(x_hat, x_new, 0.3),
        x_hat,
        x_new,
        m_prev,
        dtype=dtype,
    )


def test_multi_step_sequence_matches_a_hand_loop():
    eta, beta, steps = 0.01, 0.9, 15
    x0 = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    news = [torch.randn(1, 2, 3, 2, dtype=torch.float64) for _ in range(steps)]
    x_hat, m = x0, None
    for x_new in news:
        x_hat, m = deep_thinking_update(x_hat, x_new, m, eta=eta, beta=beta)
    flat0, flat_news = x0.flatten().tolist(), [n.flatten().tolist() for n in news]
    for e in range(len(flat0)):
        xh, mm = flat0[e], None
        for step in range(steps):
            g = flat_news[step][e] - xh
            mm = g if mm is None else g + beta * mm
            xh = xh + eta * mm
        assert abs(x_hat.flatten()[e].item() - xh) < 1e-14


def test_half_precision_state_keeps_a_float32_momentum():
    x_hat, x_new = _pair(dtype=torch.float16)
    got, m = deep_thinking_update(x_hat, x_new, None)
    assert got.dtype == torch.float16 and m.dtype == torch.float32
    got2, m2 = deep_thinking_update(got, x_new, m)
    assert got2.dtype == torch.float16 and m2.dtype == torch.float32
    assert gate_update(x_hat, x_new, 0.5).dtype == torch.float16


def test_rerun_mask_and_positions():
    mask = deep_thinking_mask(3)
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 3, 6) and torch.equal(mask[0, 0], expected)
    assert torch.equal(mask, visible_mask(3, 6, causal=True))
    assert torch.equal(deep_thinking_position_ids(3), torch.tensor([[3, 4, 5]]))
    assert torch.equal(deep_thinking_position_ids(3, rerun_positions="appended"), torch.tensor([[3, 4, 5]]))
    assert torch.equal(deep_thinking_position_ids(3, rerun_positions="stored"), torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="rerun_positions"):
        deep_thinking_position_ids(3, rerun_positions="auto")  # needs a model: resolved by the workflow


def test_errors():
    x_hat, x_new = _pair()
    with pytest.raises(ValueError, match="shape"):
        deep_thinking_update(x_hat, x_new[:, :, :4], None)
    with pytest.raises(ValueError, match="shape"):
        deep_thinking_update(x_hat, x_new, x_new[:, :1])
    with pytest.raises(ValueError, match="eta"):
        deep_thinking_update(x_hat, x_new, None, eta=-0.1)
    with pytest.raises(ValueError, match="beta"):
        deep_thinking_update(x_hat, x_new, None, beta=float("nan"))
    with pytest.raises(TypeError, match="floating"):
        deep_thinking_update(x_hat.long(), x_new, None)
    with pytest.raises(TypeError, match="eta"):
        gate_update(x_hat, x_new, None)
    with pytest.raises(ValueError, match="N"):
        deep_thinking_mask(0)
