"""Method arguments -> the fused kernel's dense inputs, with the checks users' input needs.

The kernels take per-key and per-row tables rather than lists, so one code path serves every method:

- anchor re-weighting (docs/methods.md §2) -> ``key_log_weights [B, H, Tk]`` float32, ``β[b, h, c]`` at each anchor
  position of class ``c`` and 0 elsewhere, built with differentiable ops so autograd carries the kernel's
  ``d key_log_weights`` back to ``β``; plus ``reweight_from [B]`` int32, the first re-weighted query row.
- isolation (docs/methods.md §3) -> ``isolation_limit [B, Tq]`` int32: query row ``i`` (absolute position
  ``i + Tk - Tq``) has keys ``j < limit[b, i]`` overwritten with ``-1e4``; ``limit`` is the largest
  isolated position ``p`` with ``p <= i + Tk - Tq <= p + window`` (0 = row not isolated).
"""

from __future__ import annotations

import torch

from fastattn_icl.ops._validate import check_index_tensor

ISOLATION_VALUE = -1e4  # docs/methods.md §3: isolated logits are overwritten with this constant (not -inf, not added)


def anchor_key_log_weights(
    beta: torch.Tensor,
    anchor_positions: torch.Tensor,
    anchor_classes: torch.Tensor,
    B: int,
    H: int,
    Tk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(key_log_weights, columns)``: ``[B, H, Tk]`` float32 log-weights, ``beta[b, h, anchor_classes[b, a]]`` at
    ``anchor_positions[b, a]``, and the ops' ``key_weight_columns`` (:func:`anchor_columns`: ``None`` off the CPU).

    Args:
        beta: ``[H, C]`` or ``[B, H, C]`` floating (one weight per head and class; all occurrences of
            class ``c``'s label word share it).
        anchor_positions: integer ``[B, A]`` key positions in ``[0, Tk)``, ``-1`` = unused slot; no
            position twice in a row.
        anchor_classes: integer ``[B, A]`` class ids in ``[0, C)`` for the used slots.
    """
    if not isinstance(beta, torch.Tensor) or not beta.is_floating_point():
        raise TypeError(f"beta must be a floating tensor [H={H}, C] or [B={B}, H={H}, C], got {beta!r:.60}")
    device = beta.device
    if beta.dim() == 2 and beta.shape[0] == H:
        beta = beta[None].expand(B, H, beta.shape[1])
    elif not (beta.dim() == 3 and tuple(beta.shape[:2]) == (B, H)):
        raise ValueError(f"beta must have shape [H={H}, C] or [B={B}, H={H}, C], got {tuple(beta.shape)}")
    C = beta.shape[-1]
    if C == 0:
        raise ValueError("beta must have at least one class (C >= 1)")
    pos = check_index_tensor("anchor_positions", anchor_positions, 2, f"[B={B}, A] (-1 = unused)", device)
    cls = check_index_tensor("anchor_classes", anchor_classes, 2, f"[B={B}, A] in [0, C={C})", device)
    if pos.shape[0] != B or tuple(cls.shape) != tuple(pos.shape):
        raise ValueError(
            f"anchor_positions and anchor_classes must both have shape [B={B}, A], got "
            f"{tuple(pos.shape)} and {tuple(cls.shape)}"
        )
    # one read of the values to the host (a few ints per prompt; on a GPU one sync), checked there: a dozen small
    # tensor ops cost more than the attention they guard on a short prompt
    positions, classes = torch.stack([pos, cls]).tolist()
    used = [[(p, c) for p, c in zip(*row) if p >= 0] for row in zip(positions, classes)]
    if not any(used):
        raise ValueError("anchor_positions is empty: give at least one anchor position (use -1 only for padding)")
    bad = next((p for row in positions for p in row if p < -1 or p >= Tk), None)
    if bad is not None:
        raise ValueError(f"anchor_positions must be key positions in [0, Tk={Tk}) or -1 (unused), got {bad}")
    if any(not 0 <= c < C for row in used for _, c in row):
        raise ValueError(f"anchor_classes must be in [0, C={C}) (C = beta.shape[-1]) for every used anchor")
    if any(len({p for p, _ in row}) != len(row) for row in used):
        raise ValueError("anchor_positions must not repeat a position within a batch row")
    columns = None if device.type != "cpu" else \
        torch.tensor(sorted({p for row in used for p, _ in row}), dtype=torch.int64, device="cpu")
    every_slot_used = all(len(row) == len(pos_row) for row, pos_row in zip(used, positions))
    return key_log_weight_table(beta, pos, cls, Tk, every_slot_used=every_slot_used), columns


def key_log_weight_table(beta: torch.Tensor, positions: torch.Tensor, classes: torch.Tensor, Tk: int, *,
                         every_slot_used: bool = False) -> torch.Tensor:
    """:func:`anchor_key_log_weights` without its checks (no device-to-host sync), for callers that validated the
    anchors once: ``beta [B, H, C]`` floating, ``positions``/``classes`` int64 ``[B, A]``; a position outside
    ``[0, Tk)`` is an unused slot, a class is clamped to ``[0, C)``. ``every_slot_used``: the caller checked that
    every position is in ``[0, Tk)`` and every class in ``[0, C)``, so the table is one gather and one scatter (a
    short prompt's call pays for each small op)."""
    B, H, C = beta.shape
    if every_slot_used:
        values = torch.gather(beta.float(), 2, classes[:, None, :].expand(B, H, -1))  # [B, H, A]
        table = torch.zeros(B, H, Tk, dtype=torch.float32, device=beta.device)
        return table.scatter_(2, positions[:, None, :].expand(B, H, -1), values)
    used = (positions >= 0) & (positions < Tk)
    # unused slots scatter into an extra column Tk that is dropped
    slot = torch.where(used, positions, Tk)
    values = torch.gather(beta.float(), 2, classes.clamp(0, C - 1)[:, None, :].expand(B, H, -1))  # [B, H, A]
    table = torch.zeros(B, H, Tk + 1, dtype=torch.float32, device=beta.device)
    table = table.scatter(2, slot[:, None, :].expand(B, H, -1), values)
    return table[:, :, :Tk].contiguous()


def anchor_columns(positions: torch.Tensor, Tk: int) -> torch.Tensor | None:
    """int64 ``[A]``: the distinct key columns in ``[0, Tk)`` among the anchor ``positions`` (``[B, A]``), ascending,
    for the ops' ``key_weight_columns``; ``None`` off the CPU, where finding them would wait for the device (the
    Triton backward does not need them)."""
    if positions.device.type != "cpu":
        return None
    return torch.unique(positions[(positions >= 0) & (positions < Tk)].long())


def reweight_start(reweight_from, B: int, Tq: int, device: torch.device) -> torch.Tensor:
    """``[B]`` int32 first re-weighted query row: ``None`` = the last row only, an int, or ``[B]``."""
    if reweight_from is None:
        return torch.full((B,), max(Tq - 1, 0), dtype=torch.int32, device=device)
    if isinstance(reweight_from, bool):
        raise TypeError("reweight_from must be None, an int or an integer tensor [B], got bool")
    if isinstance(reweight_from, int):  # checked on the host: no device sync
        if not 0 <= reweight_from < Tq:
            raise ValueError(f"reweight_from must be a query row in [0, Tq={Tq}), got {reweight_from}")
        return torch.full((B,), reweight_from, dtype=torch.int32, device=device)
    start = check_index_tensor("reweight_from", reweight_from, 1, f"[B={B}]", device)
    if start.shape[0] != B:
        raise ValueError(f"reweight_from must have shape [B={B}], got {tuple(start.shape)}")
    if bool(((start < 0) | (start >= Tq)).any()):
        raise ValueError(f"reweight_from must be a query row in [0, Tq={Tq}), got {start.tolist()}")
    return start.to(torch.int32)


def isolation_limit(isolation_rows, window: int, B: int, Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    """``[B, Tq]`` int32 per-row column limit of docs/methods.md §3 isolation (see the module docstring).

    Args:
        isolation_rows: integer ``[B, R]`` absolute positions ``p`` to isolate, ``-1`` = unused slot.
        window: rows ``p .. p + window`` are isolated; ``p + window`` must stay inside the sequence.
    """
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"isolation_window must be an int >= 0, got {type(window).__name__}")
    if window < 0:
        raise ValueError(f"isolation_window must be >= 0, got {window}")
    rows = check_index_tensor("isolation_rows", isolation_rows, 2, f"[B={B}, R] (-1 = unused)", device)
    if rows.shape[0] != B:
        raise ValueError(f"isolation_rows must have shape [B={B}, R] (-1 = unused), got {tuple(rows.shape)}")
    nested = rows.tolist()  # one read, checked on the host (anchor_key_log_weights)
    host = [p for row in nested for p in row]
    if any(p < -1 or p >= Tk for p in host):
        raise ValueError(f"isolation_rows entries must be positions in [0, Tk={Tk}) or -1 (unused)")
    if any(p >= 0 and p + window > Tk - 1 for p in host):
        raise ValueError(
            f"isolation window runs past the sequence: position + window ({window}) must be <= {Tk - 1}"
        )
    if device.type == "cpu" and (window + 1) * sum(p >= 0 for p in host) <= HOST_LIMIT_PAIRS:
        return _isolation_limit_from_host(nested, window, Tq, Tk)
    return isolation_limit_table(rows, window, Tq, Tk)


HOST_LIMIT_PAIRS = 4096  # (row, isolated position) pairs up to which the CPU limit table is built from the host list


def _isolation_limit_from_host(host_rows: list[list[int]], window: int, Tq: int, Tk: int) -> torch.Tensor:
    """:func:`isolation_limit_table` from the checked host copy of the rows: the few covered (batch row, query row)
    entries are set by one index_put, where the tensor path takes a dozen small ops over ``[B, Tq, R]``."""
    best: dict[tuple[int, int], int] = {}
    for b, row in enumerate(host_rows):
        for p in row:
            if p <= 0:  # -1: an unused slot; 0: no key before it to hide
                continue
            for i in range(max(p - (Tk - Tq), 0), min(p + window - (Tk - Tq) + 1, Tq)):
                if best.get((b, i), 0) < p:
                    best[(b, i)] = p
    limit = torch.zeros(len(host_rows), Tq, dtype=torch.int32, device="cpu")
    if best:
        index = torch.tensor(list(best), dtype=torch.int64, device="cpu")
        limit[index[:, 0], index[:, 1]] = torch.tensor(list(best.values()), dtype=torch.int32, device="cpu")
    return limit


def isolation_limit_table(rows: torch.Tensor, window: int, Tq: int, Tk: int) -> torch.Tensor:
    """:func:`isolation_limit` without its checks (no device-to-host sync), for callers that validated the rows
    once: ``rows`` int64 ``[B, R]``, a position outside ``[0, Tk)`` is an unused slot."""
    B, device = rows.shape[0], rows.device
    if rows.shape[1] == 0:
        return torch.zeros(B, Tq, dtype=torch.int32, device=device)
    used = (rows >= 0) & (rows < Tk)
    absolute = torch.arange(Tq, device=device) + (Tk - Tq)  # [Tq]
    p = rows[:, None, :]  # [B, 1, R]
    covered = used[:, None, :] & (absolute[None, :, None] >= p) & (absolute[None, :, None] <= p + window)
    return torch.where(covered, p, 0).amax(dim=2).clamp(min=0).to(torch.int32)
