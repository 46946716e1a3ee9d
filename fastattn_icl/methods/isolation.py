"""Information-flow isolation (docs/methods.md §3): cut what label words (or any positions) read from the text before
them.

For each isolated position ``p`` and every head of the chosen layers, the pre-softmax logits of the queries
at positions ``p .. p + window`` towards keys ``0 .. p - 1`` are overwritten with ``-1e4``. The paper isolates
the label words in the first 5 or the last 5 layers (window 0) and compares with isolating the same number
of random non-label positions; :func:`random_non_label_positions` draws that control.

Positions are key positions of the sequence as the model receives it. In a left-padded batch a prompt padded by
``pad`` tokens has its own position ``p`` at ``p + pad``: :func:`~fastattn_icl.methods.anchors.collate`'s
``anchor_positions`` are in that convention, :class:`~fastattn_icl.methods.anchors.ICLExample`'s are not. Pass the
examples (or ``collate``'s batch) to :func:`isolate` and it shifts them itself; raw positions that land on padding
are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from fastattn_icl.integrations import routed
from fastattn_icl.integrations.controller import ICLController, IsolationState, get_controller
from fastattn_icl.methods.anchors import ICLExample, collate

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


def _rows_and_mask(
    positions: Sequence[ICLExample] | Mapping[str, torch.Tensor] | Sequence[Sequence[int]] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, R]`` rows in the padded sequence's positions, and the batch's attention mask when the input says it."""
    if isinstance(positions, Mapping):
        missing = [k for k in ("anchor_positions", "attention_mask") if k not in positions]
        if missing:
            raise TypeError(f"a batch given as positions must be collate()'s dict; it lacks {missing}")
        rows, mask = pad_positions(positions["anchor_positions"]), positions["attention_mask"]
        source = "the batch"
    elif (isinstance(positions, Sequence) and not isinstance(positions, (str, bytes)) and len(positions) > 0
          and all(isinstance(e, ICLExample) for e in positions)):
        batch = collate(positions)  # the layout the caller's forward must use: left padding to the longest prompt
        rows, mask = batch["anchor_positions"], batch["attention_mask"]
        source = "examples"
    else:
        if isinstance(positions, Sequence) and any(isinstance(e, ICLExample) for e in positions):
            raise TypeError("positions mixes ICLExample objects with other entries: give all examples or none")
        return pad_positions(positions), None
    empty = [b for b in range(rows.shape[0]) if not bool((rows[b] >= 0).any())]
    if empty:
        raise ValueError(
            f"{source} {empty} have no label words (zero-shot prompts?): isolating label words needs "
            "demonstrations in every prompt"
        )
    return rows, mask


def _check_not_on_padding(rows: torch.Tensor, attention_mask: Any, where: str) -> None:
    """Raise when a used position of ``rows [B, R]`` is a padding key of ``attention_mask [B, T]`` (0 = padding);
    positions past ``T`` are keys of a later call (cached decoding) and are not checked here."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    mask = attention_mask.detach().bool().cpu()
    B, T = mask.shape
    cpu_rows = rows.cpu()
    if cpu_rows.shape[0] not in (1, B):
        raise ValueError(f"isolation positions have {cpu_rows.shape[0]} rows but {where} has {B}")
    cpu_rows = cpu_rows.expand(B, -1)
    inside = (cpu_rows >= 0) & (cpu_rows < T)
    on_pad = inside & ~mask.gather(1, cpu_rows.clamp(0, T - 1))
    if bool(on_pad.any()):
        bad = {int(b): cpu_rows[b][on_pad[b]].tolist() for b in on_pad.any(dim=1).nonzero().flatten()}
        raise ValueError(
            f"isolation positions land on padding of {where} (row: positions {bad}): positions index the padded "
            "sequence, so shift each prompt's own positions by its left padding (collate()'s anchor_positions "
            "do), or pass the ICLExample objects or collate()'s batch to isolate()"
        )


def _forward_attention_mask(args: tuple, kwargs: dict[str, Any]) -> Any:
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    return args[1] if len(args) > 1 else None  # forward(input_ids, attention_mask, ...)


@contextlib.contextmanager
def isolate(
    model: torch.nn.Module,
    positions: Sequence[ICLExample] | Mapping[str, torch.Tensor] | Sequence[Sequence[int]] | torch.Tensor,
    layers: Iterable[int] | None = None,
    window: int = 0,
    *,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[ICLController]:
    """Isolate ``positions`` in ``layers`` for the duration of the block.

    Args:
        model: a Hugging Face model routed through the ``"fastattn_icl"`` seam (switched to it inside the
            block if needed).
        positions: what to isolate, one of
            - a sequence of :class:`~fastattn_icl.methods.anchors.ICLExample`: their label words, for the batch
              ``collate(examples)`` builds (left-padded to the longest prompt; run the model on that batch);
            - ``collate``'s dict: its ``anchor_positions`` (already shifted) checked against its
              ``attention_mask``;
            - integer ``[B, R]`` / ``[R]`` or per-row lists (``-1`` = unused): key positions **in the sequence as
              the model receives it**, left padding counted (a prompt padded by ``pad`` tokens has its own position
              ``p`` at ``p + pad``; ``ICLExample.anchor_positions`` are a prompt's own positions, not these).
        layers: layer indices (``None`` = every layer); see :func:`first_layers` / :func:`last_layers`.
        window: also isolate the ``window`` queries after each position (int >= 0).
        attention_mask: optional ``[B, T]`` (1 = real token) of the batch the block runs, to check raw positions
            before any forward (examples and ``collate``'s dict bring their own).

    Inside the block every forward of ``model`` checks the positions against the ``attention_mask`` it is given:
    a position on a padding key raises ``ValueError`` (unshifted positions of a left-padded prompt). The previous
    controller state and attention implementation are restored on exit, also on exceptions.

    Raises:
        ValueError: a negative window, positions below ``-1``, positions on padding, or examples without label
            words (zero-shot prompts).
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    rows, batch_mask = _rows_and_mask(positions)
    if bool((rows < -1).any()):
        raise ValueError("isolation positions must be >= 0 (or -1 for unused slots)")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise TypeError(f"attention_mask must be a [B, T] tensor of 0/1, got {attention_mask!r:.80}")
        if batch_mask is not None and not torch.equal(attention_mask.cpu().bool(), batch_mask.cpu().bool()):
            raise ValueError("attention_mask differs from the padding of the examples given as positions")
        batch_mask = attention_mask
    if batch_mask is not None:
        too_far = rows >= batch_mask.shape[1]
        if bool(too_far.any()):
            raise ValueError(f"isolation positions {rows[too_far].tolist()} lie past the batch's "
                             f"{batch_mask.shape[1]} positions")
        _check_not_on_padding(rows, batch_mask, "the attention mask")
    rows = rows.to(next(model.parameters()).device)
    layers = None if layers is None else list(layers)
    controller = get_controller(model)

    def check_forward(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        _check_not_on_padding(rows, _forward_attention_mask(args, kwargs), "the forward's attention_mask")

    handle = model.register_forward_pre_hook(check_forward, with_kwargs=True)
    try:
        with routed(model), controller.override(layers=layers, isolation=IsolationState(rows, window)):
            yield controller
    finally:
        handle.remove()


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
