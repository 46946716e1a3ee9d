"""Information-flow isolation (SPEC §3): cut what label words (or any positions) read from the text before them.

For each isolated position ``p`` and every head of the chosen layers, the pre-softmax logits of the queries
at positions ``p .. p + window`` towards keys ``0 .. p - 1`` are overwritten with ``-1e4``. The paper isolates
the label words in the first 5 or the last 5 layers (window 0) and compares with isolating the same number
of random non-label positions; :func:`random_non_label_positions` draws that control.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from fastattn_icl.integrations import routed
from fastattn_icl.integrations.controller import ICLController, IsolationState, get_controller

__all__ = ["first_layers", "isolate", "last_layers", "pad_positions", "random_non_label_positions"]


def _num_layers(model: torch.nn.Module) -> int:
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise TypeError("model must have a config with num_hidden_layers")
    return layers


def first_layers(model: torch.nn.Module, k: int) -> list[int]:
    """Indices of the first ``k`` layers (the paper's shallow setting uses ``k = 5``)."""
    L = _num_layers(model)
    if not 0 <= k <= L:
        raise ValueError(f"k must be in [0, {L}] (the model's layer count), got {k}")
    return list(range(k))


def last_layers(model: torch.nn.Module, k: int) -> list[int]:
    """Indices of the last ``k`` layers (the paper's deep setting uses ``k = 5``)."""
    L = _num_layers(model)
    if not 0 <= k <= L:
        raise ValueError(f"k must be in [0, {L}] (the model's layer count), got {k}")
    return list(range(L - k, L))


def pad_positions(positions: Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
    """int64 ``[B, R]`` from a tensor ``[R]`` / ``[B, R]`` or a list of per-row lists (padded with ``-1``)."""
    if isinstance(positions, torch.Tensor):
        if positions.dtype.is_floating_point or positions.dtype == torch.bool or positions.dim() not in (1, 2):
            raise TypeError(f"positions must be an integer tensor [R] or [B, R], got {positions.dtype} "
                            f"{tuple(positions.shape)}")
        return (positions[None] if positions.dim() == 1 else positions).long()
    rows = [list(map(int, row)) for row in positions]
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


@contextlib.contextmanager
def isolate(
    model: torch.nn.Module,
    positions: Sequence[Sequence[int]] | torch.Tensor,
    layers: Iterable[int] | None = None,
    window: int = 0,
) -> Iterator[ICLController]:
    """Isolate ``positions`` in ``layers`` for the duration of the block.

    Args:
        model: a Hugging Face model routed through the ``"fastattn_icl"`` seam (switched to it inside the
            block if needed).
        positions: absolute key positions to isolate, integer ``[B, R]`` / ``[R]`` or per-row lists
            (``-1`` = unused).
        layers: layer indices (``None`` = every layer); see :func:`first_layers` / :func:`last_layers`.
        window: also isolate the ``window`` queries after each position (int >= 0).

    The previous controller state and attention implementation are restored on exit, also on exceptions.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    rows = pad_positions(positions).to(next(model.parameters()).device)
    if bool((rows < -1).any()):
        raise ValueError("isolation positions must be >= 0 (or -1 for unused slots)")
    layers = None if layers is None else list(layers)
    controller = get_controller(model)
    with routed(model), controller.override(layers=layers, isolation=IsolationState(rows, window)):
        yield controller


def random_non_label_positions(
    label_positions: Sequence[Sequence[int]] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    seq_len: int | None = None,
    high: int | torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The random control of the isolation study: per row, as many distinct random positions as that row
    has label positions, drawn uniformly among real (non-padding) positions that are not label positions.

    Args:
        label_positions: integer ``[B, R]`` (``-1`` = unused) or per-row lists.
        attention_mask: ``[B, T]`` (1 = real token) for left-padded batches; or give ``seq_len``.
        high: draw only below this position (int or ``[B]``). Default: the last label position of the row + 1,
            i.e. from the demonstrations, never from the query.
        seed: seeds a private generator (same seed, same positions).

    Returns:
        int64 ``[B, R]``, ``-1`` where the label row has ``-1``.
    """
    labels = pad_positions(label_positions).cpu()
    B, R = labels.shape
    if attention_mask is None:
        if seq_len is None:
            raise ValueError("give attention_mask [B, T] or seq_len")
        real = torch.ones(B, seq_len, dtype=torch.bool)
    else:
        real = attention_mask.bool().cpu()
        if real.dim() != 2 or real.shape[0] != B:
            raise ValueError(f"attention_mask must have shape [B={B}, T], got {tuple(real.shape)}")
    T = real.shape[1]
    generator = torch.Generator().manual_seed(seed)
    out = torch.full((B, R), -1, dtype=torch.long)
    for b in range(B):
        used = labels[b][labels[b] >= 0]
        if used.numel() == 0:
            continue
        limit = int(used.max()) + 1 if high is None else int(torch.as_tensor(high).reshape(-1).expand(B)[b])
        candidates = real[b].clone()
        candidates[min(limit, T):] = False
        candidates[used] = False
        pool = candidates.nonzero().flatten()
        if pool.numel() < used.numel():
            raise ValueError(
                f"row {b} has {used.numel()} label positions but only {pool.numel()} non-label positions below {limit}"
            )
        pick = pool[torch.randperm(pool.numel(), generator=generator)[: used.numel()]].sort().values
        out[b, labels[b] >= 0] = pick
    return out
