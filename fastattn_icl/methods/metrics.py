"""Loyalty metrics of the isolation and compression studies (docs/methods.md §3, §5).

- label loyalty: the fraction of examples whose predicted label (argmax over the label-word logits) is the
  same as with unmodified ICL;
- word loyalty: the mean Jaccard overlap of the top-``k`` vocabulary predictions with unmodified ICL's
  (``k = 10`` in the shallow-layer isolation study, ``k = 5`` in the compression study).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["label_loyalty", "label_predictions", "topk_jaccard", "word_loyalty"]


def _final_logits(name: str, logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() not in (2, 3):
        raise TypeError(f"{name} must be floating logits [N, V] (or [N, T, V]: the last position is used)")
    return logits[:, -1] if logits.dim() == 3 else logits


def label_predictions(logits: torch.Tensor, label_token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """int64 ``[N]``: argmax over the label words' logits (class index), from ``[N, V]`` or ``[N, T, V]``."""
    logits = _final_logits("logits", logits)
    ids = torch.as_tensor(label_token_ids, dtype=torch.long, device=logits.device)
    return logits[:, ids].argmax(-1)


def label_loyalty(predictions: torch.Tensor, reference_predictions: torch.Tensor) -> float:
    """Fraction of examples with the same predicted class as the reference (unmodified ICL)."""
    a, b = torch.as_tensor(predictions), torch.as_tensor(reference_predictions)
    if a.shape != b.shape or a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"predictions must both be non-empty [N], got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a == b.to(a.device)).float().mean().item()


def topk_jaccard(logits: torch.Tensor, reference_logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """float ``[N]``: ``|top_k(a) ∩ top_k(b)| / |top_k(a) ∪ top_k(b)|`` over the vocabulary, per example."""
    a = _final_logits("logits", logits)
    b = _final_logits("reference_logits", reference_logits)
    if a.shape != b.shape:
        raise ValueError(f"logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= a.shape[-1]:
        raise ValueError(f"k must be an int in [1, {a.shape[-1]}], got {k!r}")
    top_a = a.topk(k, dim=-1).indices  # [N, k]
    top_b = b.to(a.device).topk(k, dim=-1).indices
    inter = (top_a[:, :, None] == top_b[:, None, :]).any(-1).sum(-1).float()
    return inter / (2 * k - inter)


def word_loyalty(logits: torch.Tensor, reference_logits: torch.Tensor, k: int = 10) -> float:
    """Mean top-``k`` Jaccard overlap with the reference (unmodified ICL) logits; ``k = 10`` (isolation) or
    ``5`` (compression) in the paper."""
    return topk_jaccard(logits, reference_logits, k).mean().item()
