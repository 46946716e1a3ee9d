"""Oracle for information-flow isolation (docs/methods.md §3): a pre-softmax knockout of logits.

For each isolated position ``p`` (a label-word position) and every head, the logits of the query
rows at absolute positions ``p .. p + window`` towards the keys ``0 .. p - 1`` are **overwritten**
with the constant ``-1e4`` (not ``-inf``, not added), after scaling and masking.

Position convention (needed when ``Tq < Tk``, e.g. a query chunk over a longer cache): ``p`` is an
absolute key position, i.e. a column index in ``[0, Tk)``. Query row ``i`` sits at absolute
position ``i + Tk - Tq`` (the bottom-right causal convention), so the overwritten rows are those
with ``p <= i + Tk - Tq <= p + window``; rows of that range outside the chunk are simply absent.
``p + window`` must stay inside the sequence, ``p + window <= Tk - 1``.

Masking wins over isolation: an entry that is already masked (``-inf``, e.g. a padded key) stays
``-inf``. Causal masking never hides the isolated block (``j < p <= i + Tk - Tq``), so this only
matters for key padding; it keeps a padded query row with no visible key at ``P = 0`` instead of
turning it into a uniform average over padded keys.
"""

from __future__ import annotations

import torch

__all__ = ["ISOLATION_VALUE", "isolation_region", "isolate_scores"]

ISOLATION_VALUE = -1e4


def _check_rows(isolation_rows, B: int, Tk: int, window, device: torch.device) -> torch.Tensor:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"isolation window must be an int >= 0, got {type(window).__name__}")
    if window < 0:
        raise ValueError(f"isolation window must be >= 0, got {window}")
    rows = isolation_rows
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"isolation_rows must be an integer tensor [B, R], got {type(rows).__name__}")
    if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"isolation_rows must be an integer tensor [B, R] (-1 = padding), got {rows.dtype}")
    if rows.dim() != 2 or rows.shape[0] != B:
        raise ValueError(f"isolation_rows must have shape [B={B}, R] (-1 = padding), got {tuple(rows.shape)}")
    if rows.device != device:
        raise ValueError(f"isolation_rows must be on {device} (as the scores), got {rows.device}")
    rows = rows.long()
    if bool((rows < -1).any()):
        raise ValueError(f"isolation_rows entries must be positions in [0, {Tk}) or -1 (padding)")
    valid = rows >= 0
    if bool((valid & (rows + window > Tk - 1)).any()):
        bad = int(rows[valid & (rows + window > Tk - 1)][0])
        raise ValueError(
            f"isolation row {bad} with window {window} runs past the sequence end: "
            f"need p + window <= Tk - 1 = {Tk - 1}"
        )
    return rows


def isolation_region(isolation_rows: torch.Tensor, Tq: int, Tk: int, window: int = 0) -> torch.Tensor:
    """Bool ``[B, Tq, Tk]``: the entries that isolation overwrites (before masking is considered).

    ``isolation_rows``: integer ``[B, R]``, absolute key positions ``p``, ``-1`` = padding entry.
    Entry ``(i, j)`` is set iff some ``p`` has ``p <= i + Tk - Tq <= p + window`` and ``j < p``.
    """
    if not isinstance(isolation_rows, torch.Tensor) or isolation_rows.dim() != 2:
        raise ValueError("isolation_rows must be an integer tensor [B, R] (-1 = padding)")
    rows = _check_rows(isolation_rows, isolation_rows.shape[0], Tk, window, isolation_rows.device)
    device = rows.device
    abs_row = torch.arange(Tq, device=device) + (Tk - Tq)  # [Tq]
    col = torch.arange(Tk, device=device)  # [Tk]
    p = rows[:, :, None, None]  # [B, R, 1, 1]
    hit = (
        (p >= 0)
        & (abs_row[None, None, :, None] >= p)
        & (abs_row[None, None, :, None] <= p + window)
        & (col[None, None, None, :] < p)
    )  # [B, R, Tq, Tk]
    return hit.any(dim=1)


def isolate_scores(S: torch.Tensor, isolation_rows: torch.Tensor | None, window: int = 0) -> torch.Tensor:
    """Overwrite isolated logits with ``-1e4`` (docs/methods.md §3); returns a new tensor.

    ``S``: scaled and masked logits ``[B, H, Tq, Tk]`` (masked entries ``-inf``); use float32 or
    float64 so that ``-1e4`` is exact (bfloat16 would round it to ``-9984``).
    ``isolation_rows``: integer ``[B, R]`` of absolute key positions ``p`` (``-1`` = padding entry;
    ``None``, ``R = 0`` or all ``-1`` leave ``S`` unchanged). For every head, entries
    ``S[b, h, i, j]`` with ``p <= i + Tk - Tq <= p + window`` and ``j < p`` become exactly ``-1e4``,
    unless already ``-inf`` (masking wins). Raises ``ValueError`` if ``p + window > Tk - 1``.
    """
    if not isinstance(S, torch.Tensor) or S.dim() != 4 or not S.is_floating_point():
        raise TypeError("S must be a floating tensor [B, H, Tq, Tk]")
    if isolation_rows is None:
        return S
    B, _, Tq, Tk = S.shape
    rows = _check_rows(isolation_rows, B, Tk, window, S.device)
    region = isolation_region(rows, Tq, Tk, window)[:, None]  # [B, 1, Tq, Tk]
    region = region & ~torch.isneginf(S)
    return torch.where(region, torch.full((), ISOLATION_VALUE, dtype=S.dtype, device=S.device), S)
