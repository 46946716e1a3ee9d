"""Oracle for Deep-Thinking, iterative forward tuning (docs/methods.md §7).

State per layer: ``X̂ ∈ {K̂_l, V̂_l}``, ``[1, Hkv, N, d]`` (any ``[..]`` shape works: the update is
element-wise). Step ``t >= 2`` re-runs the ``N`` demonstration tokens with ``X̂`` as past:

* attention mask: bottom-right causal over ``2N`` keys, i.e. ``visible_mask(N, 2N, causal=True)``:
  new row ``i`` (absolute position ``N + i``) sees all ``N`` old keys and new keys ``N .. N + i``;
* the new tokens' position ids are ``N .. 2N − 1`` (``"appended"``, docs/methods.md §7 as written, the authors' code on
  GPT-2's learned absolute positions) or ``0 .. N − 1`` (``"stored"``, the positions of the state's keys: right for
  rotary models, whose keys carry their position as a rotation; the mask is the same);
* then per element: ``g = X_new − X̂``; ``m = g`` (first update) else ``g + β m``;
  ``X̂ ← X̂ + η m``. ``β = 0`` is the gate form ``X̂ ← η X_new + (1 − η) X̂``.

The arithmetic is done in float32 (float64 for float64 input); ``X̂`` is returned in its own dtype
and the momentum buffer ``m`` in the accumulation dtype, so that many small ``η`` steps do not round
away in a half-precision buffer.
"""

from __future__ import annotations

import math

import torch

from fastattn_icl.reference.attention import acc_dtype, visible_mask

__all__ = [
    "deep_thinking_update",
    "gate_update",
    "deep_thinking_mask",
    "deep_thinking_position_ids",
]


def _check_coef(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    if math.isnan(x) or math.isinf(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")
    return x


def _check_pair(x_hat, x_new) -> None:
    for name, t in (("x_hat", x_hat), ("x_new", x_new)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor [1, Hkv, N, d]")
    if x_hat.shape != x_new.shape:
        raise ValueError(f"x_new must have the shape of x_hat {tuple(x_hat.shape)}, got {tuple(x_new.shape)}")
    if x_hat.device != x_new.device:
        raise ValueError(f"x_new must be on {x_hat.device} (as x_hat), got {x_new.device}")


def deep_thinking_update(
    x_hat: torch.Tensor,
    x_new: torch.Tensor,
    m: torch.Tensor | None,
    *,
    eta: float = 0.01,
    beta: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Deep-Thinking step on one cache tensor.

    ``x_hat``: the current state ``[1, Hkv, N, d]`` (``K̂_l`` or ``V̂_l``); ``x_new``: the K/V of the
    re-run demonstration tokens, same shape; ``m``: momentum buffer of that shape, or ``None`` for
    the first update (then ``m = g``). Returns ``(x_hat_new, m_new)`` with ``g = x_new − x_hat``,
    ``m_new = g + β m`` (or ``g``), ``x_hat_new = x_hat + η m_new``; ``x_hat_new`` in ``x_hat``'s
    dtype, ``m_new`` in float32 (float64 when any input is float64).
    """
    _check_pair(x_hat, x_new)
    eta = _check_coef("eta", eta)
    beta = _check_coef("beta", beta)
    dtypes = [x_hat.dtype, x_new.dtype]
    if m is not None:
        if not isinstance(m, torch.Tensor) or not m.is_floating_point():
            raise TypeError("m must be None (first update) or a floating tensor shaped like x_hat")
        if m.shape != x_hat.shape:
            raise ValueError(f"m must have the shape of x_hat {tuple(x_hat.shape)}, got {tuple(m.shape)}")
        if m.device != x_hat.device:
            raise ValueError(f"m must be on {x_hat.device} (as x_hat), got {m.device}")
        dtypes.append(m.dtype)
    acc = torch.float64 if torch.float64 in dtypes else acc_dtype(x_hat.dtype)
    xh = x_hat.to(acc)
    g = x_new.to(acc) - xh
    m_new = g if m is None else g + beta * m.to(acc)
    return (xh + eta * m_new).to(x_hat.dtype), m_new


def gate_update(x_hat: torch.Tensor, x_new: torch.Tensor, eta: float) -> torch.Tensor:
    """Gate form ``η X_new + (1 − η) X̂`` (what :func:`deep_thinking_update` does with ``β = 0``).

    ``x_hat``, ``x_new``: same shape, e.g. ``[1, Hkv, N, d]``. Computed in float32 (float64 for
    float64 input), returned in ``x_hat``'s dtype.
    """
    _check_pair(x_hat, x_new)
    eta = _check_coef("eta", eta)
    acc = torch.float64 if torch.float64 in (x_hat.dtype, x_new.dtype) else acc_dtype(x_hat.dtype)
    return (eta * x_new.to(acc) + (1.0 - eta) * x_hat.to(acc)).to(x_hat.dtype)


def deep_thinking_mask(N: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[1, 1, N, 2N]``: the re-run's mask, True = visible.

    Columns ``0 .. N−1`` are the ``N`` old (``X̂``) positions, columns ``N .. 2N−1`` the new ones;
    new row ``i`` sits at absolute position ``N + i`` and sees keys ``j <= N + i``: all old keys and
    the new ones causally. This is ``visible_mask(N, 2N, causal=True)``.
    """
    if isinstance(N, bool) or not isinstance(N, int):
        raise TypeError(f"N must be an int, got {type(N).__name__}")
    if N < 1:
        raise ValueError(f"N (demonstration tokens) must be >= 1, got {N}")
    return visible_mask(N, 2 * N, causal=True, device=device)


def deep_thinking_position_ids(
    N: int, *, rerun_positions: str = "appended", device: torch.device | str | None = None
) -> torch.Tensor:
    """LongTensor ``[1, N]``: position ids of the re-run demonstration tokens, ``N .. 2N−1`` for
    ``rerun_positions="appended"`` (docs/methods.md §7) or ``0 .. N−1`` for ``"stored"`` (those of the state's keys)."""
    if isinstance(N, bool) or not isinstance(N, int):
        raise TypeError(f"N must be an int, got {type(N).__name__}")
    if N < 1:
        raise ValueError(f"N (demonstration tokens) must be >= 1, got {N}")
    if rerun_positions not in ("appended", "stored"):
        raise ValueError(f"rerun_positions must be 'appended' or 'stored', got {rerun_positions!r}")
    start = N if rerun_positions == "appended" else 0
    return torch.arange(start, start + N, device=device)[None]
