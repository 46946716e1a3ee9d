"""Oracle for anchor re-weighting (docs/methods.md §2): post-softmax, numerator only, NOT renormalised.

For the re-weighted query rows ``q`` and every anchor key column ``p`` of class ``c``:
``P̂[b, h, q, p] = exp(β[h, c]) · P[b, h, q, p]``; every other entry of ``P`` is unchanged and
``O = P̂ V``. The softmax denominator stays the unweighted one, so rows of ``P̂`` do not sum to 1
when ``β ≠ 0``. ``β = 0`` (or no anchors) is exactly base attention. ``dβ`` comes from autograd and
equals ``dβ[h, c] = Σ_b Σ_{q, p ∈ anchors(c)} w P_qp (dO_q · v_p)`` with ``w = exp(β[h, c])``.
"""

from __future__ import annotations

import torch

from fastattn_icl.reference.attention import (
    attention_scores,
    check_index_tensor,
    check_qkv,
    repeat_kv,
    softmax_rows,
)

__all__ = ["anchor_log_weights", "reweighted_rows", "anchor_reweight_attention"]


def _check_anchors(anchor_positions, anchor_classes, B: int, Tk: int, C: int, device) -> tuple:
    pos = check_index_tensor("anchor_positions", anchor_positions, 2, f"[B={B}, A] (-1 = padding)")
    cls = check_index_tensor("anchor_classes", anchor_classes, 2, f"[B={B}, A] in [0, C={C})")
    if pos.shape[0] != B:
        raise ValueError(f"anchor_positions must have shape [B={B}, A], got {tuple(pos.shape)}")
    if tuple(cls.shape) != tuple(pos.shape):
        raise ValueError(
            f"anchor_classes must have the shape of anchor_positions {tuple(pos.shape)}, got {tuple(cls.shape)}"
        )
    for name, t in (("anchor_positions", pos), ("anchor_classes", cls)):
        if t.device != device:
            raise ValueError(f"{name} must be on {device} (as q), got {t.device}")
    valid = pos >= 0
    if bool((pos < -1).any()) or bool((pos >= Tk).any()):
        raise ValueError(f"anchor_positions must be key positions in [0, Tk={Tk}) or -1 (padding)")
    if bool((valid & ((cls < 0) | (cls >= C))).any()):
        raise ValueError(f"anchor_classes must be in [0, C={C}) (C = beta.shape[-1]) for every used anchor")
    srt = torch.sort(pos, dim=1).values
    if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
        raise ValueError("anchor_positions must not repeat a position within a batch row")
    return pos, cls, valid


def _check_beta(beta, B: int, H: int, device) -> torch.Tensor:
    if not isinstance(beta, torch.Tensor):
        raise TypeError(f"beta must be a floating tensor [H, C] or [B, H, C], got {type(beta).__name__}")
    if not beta.is_floating_point():
        raise TypeError(f"beta must be a floating tensor [H={H}, C] or [B={B}, H={H}, C], got {beta.dtype}")
    if beta.dim() == 2 and beta.shape[0] == H:
        beta = beta[None].expand(B, -1, -1)
    elif not (beta.dim() == 3 and tuple(beta.shape[:2]) == (B, H)):
        raise ValueError(f"beta must have shape [H={H}, C] or [B={B}, H={H}, C], got {tuple(beta.shape)}")
    if beta.shape[-1] == 0:
        raise ValueError("beta must have at least one class (C >= 1)")
    if beta.device != device:
        raise ValueError(f"beta must be on {device} (as q), got {beta.device}")
    if not bool(torch.isfinite(beta).all()):
        raise ValueError("beta must be finite")
    return beta


def reweighted_rows(reweight_from, B: int, Tq: int, device) -> torch.Tensor:
    """Bool ``[B, Tq]``: query rows ``i >= reweight_from[b]`` (query-row indices, not positions).

    ``reweight_from``: ``None`` (only the last row ``Tq - 1``), an int, or an integer tensor ``[B]``;
    each value in ``[0, Tq)``.
    """
    if reweight_from is None:
        start = torch.full((B,), Tq - 1, dtype=torch.long, device=device)
    elif isinstance(reweight_from, bool):
        raise TypeError("reweight_from must be None, an int or an integer tensor [B], got bool")
    elif isinstance(reweight_from, int):
        start = torch.full((B,), reweight_from, dtype=torch.long, device=device)
    else:
        start = check_index_tensor("reweight_from", reweight_from, 1, f"[B={B}]")
        if start.shape[0] != B:
            raise ValueError(f"reweight_from must have shape [B={B}], got {tuple(start.shape)}")
        if start.device != torch.device(device):
            raise ValueError(f"reweight_from must be on {device} (as q), got {start.device}")
    if bool(((start < 0) | (start >= Tq)).any()):
        raise ValueError(f"reweight_from must be a query row in [0, Tq={Tq}), got {start.tolist()}")
    return torch.arange(Tq, device=device)[None, :] >= start[:, None]


def anchor_log_weights(
    beta: torch.Tensor, anchor_positions: torch.Tensor, anchor_classes: torch.Tensor, Tk: int
) -> torch.Tensor:
    """``log w [B, H, Tk]``: ``β[b, h, c]`` at each anchor key of class ``c``, 0 elsewhere.

    ``beta [B, H, C]``; ``anchor_positions``/``anchor_classes`` int64 ``[B, A]``, already validated
    (``-1`` positions are padding and contribute nothing).
    """
    valid = anchor_positions >= 0
    cls = anchor_classes.clamp(0, beta.shape[-1] - 1).masked_fill(~valid, 0)
    beta_sel = torch.gather(beta, 2, cls[:, None, :].expand(-1, beta.shape[1], -1))  # [B, H, A]
    cols = torch.arange(Tk, device=beta.device)
    onehot = ((anchor_positions[:, :, None] == cols) & valid[:, :, None]).to(beta.dtype)  # [B, A, Tk]
    return torch.einsum("bha,bak->bhk", beta_sel, onehot)


def anchor_reweight_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    anchor_positions: torch.Tensor,
    anchor_classes: torch.Tensor,
    *,
    reweight_from: int | torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    isolation_rows: torch.Tensor | None = None,
    isolation_window: int = 0,
) -> torch.Tensor:
    """Attention with anchor re-weighting after the softmax, not renormalised (docs/methods.md §2).

    Args:
        q: ``[B, H, Tq, D]``; k: ``[B, Hkv, Tk, D]``; v: ``[B, Hkv, Tk, Dv]`` (GQA: head ``h`` reads
            kv head ``h // (H // Hkv)``).
        beta: ``[H, C]`` (shared by the batch) or ``[B, H, C]``, any float dtype; gradients flow.
        anchor_positions: integer ``[B, A]`` key columns in ``[0, Tk)``; ``-1`` = padding entry.
            No position may repeat within a row. All anchors of class ``c`` share ``β[·, c]``.
        anchor_classes: integer ``[B, A]`` in ``[0, C)`` (ignored where the position is ``-1``).
        reweight_from: first re-weighted **query row** (row index, not absolute position): ``None``
            = only the last row ``Tq - 1``, an int, or an integer tensor ``[B]``.
        causal: bottom-right causal mask (row ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``).
        key_padding_mask: bool ``[B, Tk]``, True = keep.
        isolation_rows, isolation_window: the docs/methods.md §3 knockout applied to the logits first (see
            :func:`fastattn_icl.reference.attention.attention_scores`); ``None`` = none.

    Returns ``O [B, H, Tq, Dv]`` in the input dtype: ``O = P̂ V`` with
    ``P̂[b, h, i, p] = exp(β[b, h, c]) · P[b, h, i, p]`` for re-weighted rows ``i`` and anchors ``p``
    of class ``c``. Anchors that a row cannot see have ``P = 0`` and stay 0.
    """
    B, H, _, Tq, Tk, _ = check_qkv(q, k, v)
    beta = _check_beta(beta, B, H, q.device)
    pos, cls, _ = _check_anchors(anchor_positions, anchor_classes, B, Tk, beta.shape[-1], q.device)
    rows = reweighted_rows(reweight_from, B, Tq, q.device)  # [B, Tq]
    s = attention_scores(
        q, k, causal=causal, scale=scale, key_padding_mask=key_padding_mask, isolation_rows=isolation_rows,
        isolation_window=isolation_window,
    )
    p, _ = softmax_rows(s)  # [B, H, Tq, Tk], acc dtype
    logw = anchor_log_weights(beta.to(p.dtype), pos, cls, Tk)  # [B, H, Tk]
    logw = torch.where(rows[:, None, :, None], logw[:, :, None, :], torch.zeros((), dtype=p.dtype))
    p_hat = p * torch.exp(logw)
    return torch.matmul(p_hat.to(q.dtype), repeat_kv(v, H))
