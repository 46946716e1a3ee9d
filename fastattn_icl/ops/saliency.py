"""Information-flow saliency (docs/methods.md §4) computed inside the backward pass, never stored as a map.

The paper's probe method multiplies every layer's ``[B, H, T, T]`` attention by a probe tensor and reads
its gradient ``P ⊙ ∂L/∂P``. Since ``O = P V``, ``∂L/∂P = dO Vᵀ``: a fused backward kernel forms both per
tile, sums the heads, takes the absolute value and reduces the map on the fly to the three flow-score
numerators. Memory stays linear in ``T``.

Usage::

    sal = Saliency(label_positions, target)            # [B, C] (-1 = unused), [B]
    out = attention(q, k, v, saliency=sal)             # any fused attention op takes saliency=
    loss_fn(out).backward()                            # dq, dk, dv are unchanged by the request
    s_wp, s_pq, s_ww = sal.result.scores()             # [B] each

The request holds its results (one per attention call key: ``None`` for a direct call, the layer index
when the Hugging Face seam runs it). ``per_head=True`` adds the per-head sums of ``|P_h ⊙ dP_h|``;
``rows="labels"`` stores the label rows ``I[p_c, :]`` and the target row ``I[q, :]``; ``rows="all"``
stores the whole head-summed ``[T, T]`` map (for plotting short prompts).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from fastattn_icl.ops._validate import any_each, check_index_tensor
from fastattn_icl.ops.backend import kernel

__all__ = ["Saliency", "SaliencyResult"]

_ROWS = (None, "labels", "all")


@torch.library.custom_op("fastattn_icl::attention_saliency", mutates_args=("rows",))
def _attention_saliency(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    key_log_weights: torch.Tensor | None,
    reweight_from: torch.Tensor | None,
    isolation_limit: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
    label_mask: torch.Tensor,
    target: torch.Tensor,
    per_head: bool,
    row_slot: torch.Tensor | None,
    rows: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    sums, head_sums = kernel(backend, "attention_saliency")(
        grad_out, q, k, v, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal, scale,
        label_mask, target, per_head=per_head, row_slot=row_slot, rows=rows,
    )
    return sums, (q.new_empty(0, dtype=torch.float32) if head_sums is None else head_sums)


@_attention_saliency.register_fake
def _(grad_out, q, k, v, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal, scale,
      backend, label_mask, target, per_head, row_slot, rows):
    B, H = q.shape[:2]
    head_sums = q.new_empty(B, H, 3, dtype=torch.float32) if per_head else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(B, 3, dtype=torch.float32), head_sums


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (an empty set of pairs, an all-zero layer); broadcasts."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


@dataclass
class SaliencyResult:
    """What the backward of one attention call measured.

    Attributes:
        sums: float32 ``[B, 3]``: the numerators ``num_wp = Σ_c Σ_(j<p_c) I[p_c, j]``,
            ``num_pq = Σ_c I[q, p_c]`` and the total ``Σ_(j<i<=q) I`` of the head-summed map
            ``I = |Σ_h P_h ⊙ ∂L/∂P_h|`` (the diagonal never counts).
        head_sums: float32 ``[B, H, 3]``, the same of the per-head maps ``|P_h ⊙ ∂L/∂P_h|``, or ``None``.
        label_rows: float32 ``[B, C, T]``: ``I[p_c, :]`` (zeros for unused label slots), or ``None``.
        target_row: float32 ``[B, T]``: ``I[q, :]``, or ``None``.
        map: float32 ``[B, T, T]``: the whole ``I``, or ``None``.
        denominators: float32 ``[B, 3]``: ``Σ_c p_c``, ``C`` and ``q(q+1)/2 - Σ_c p_c - C``, positions
            counted from the first token of each row (``start``).
    """

    sums: torch.Tensor
    denominators: torch.Tensor
    head_sums: torch.Tensor | None = None
    label_rows: torch.Tensor | None = None
    target_row: torch.Tensor | None = None
    map: torch.Tensor | None = None

    def scores(self, *, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(S_wp, S_pq, S_ww)`` of docs/methods.md §4, ``[B]`` each (``[B, H]`` with ``per_head=True``)."""
        sums = self.sums
        den = self.denominators
        if per_head:
            if self.head_sums is None:
                raise ValueError("per-head scores need a Saliency request made with per_head=True")
            sums, den = self.head_sums, den[:, None, :]
        num_wp, num_pq, total = sums.unbind(-1)
        return (
            ratio(num_wp, den[..., 0]),
            ratio(num_pq, den[..., 1]),
            ratio(total - num_wp - num_pq, den[..., 2]),
        )


@dataclass
class Saliency:
    """A request for the information-flow saliency of attention calls; it also holds their results.

    Args:
        label_positions: integer ``[B, C]`` (or ``[C]`` for ``B = 1``) 0-based query/key positions of the
            label words, ``-1`` = unused slot; at least one per row, none repeated, each before ``target``.
        target: the target position ``q`` (the row whose logits the loss reads): an int or an integer
            tensor ``[B]``.
        per_head: also sum the per-head maps ``|P_h ⊙ dP_h|`` (``SaliencyResult.head_sums``).
        rows: ``None``; ``"labels"`` to keep the label rows and the target row of ``I``; ``"all"`` to
            keep the whole ``[B, T, T]`` map (memory ``B·T²`` floats: for plots of short prompts).
        start: the position of each row's first token (``int`` or ``[B]``, default 0): with left padding,
            the number of pad tokens. The score denominators count positions from it.
    """

    label_positions: Any
    target: Any
    per_head: bool = False
    rows: str | None = None
    start: Any = 0
    results: dict[Any, SaliencyResult] = field(default_factory=dict, repr=False)
    _tables: dict[Any, tuple] = field(default_factory=dict, repr=False)
    # the last mask the seam's path checked (see _dense): not an argument, not shown, not compared
    _checked_mask: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.per_head, bool):
            raise TypeError(f"per_head must be a bool, got {self.per_head!r}")
        if self.rows not in _ROWS:
            raise ValueError(f"rows must be one of {_ROWS}, got {self.rows!r}")

    @property
    def result(self) -> SaliencyResult:
        """The result of a direct (non-seam) attention call, once its backward has run."""
        if None not in self.results:
            raise RuntimeError(
                "no saliency recorded yet: the saliency is computed by the backward pass; call backward() (or "
                "torch.autograd.grad) on a loss of the attention output first"
            )
        return self.results[None]

    def clear(self) -> None:
        """Forget recorded results (the request can be used again)."""
        self.results.clear()

    def _dense(self, B: int, T: int, device: torch.device, key_padding_mask: torch.Tensor | None,
               once_per_mask: bool = False):
        """Validated kernel inputs for ``B`` rows of length ``T``: ``label_mask`` uint8 ``[B, T]``, ``target``
        int32 ``[B]``, ``row_slot`` int32 ``[B, T]`` or ``None``, number of stored rows, denominators.

        The padding mask is checked on every call, since a caller may change a mask in place between calls;
        ``once_per_mask`` (the Hugging Face seam, which gets a new mask object per forward and hands it to every
        layer) checks a mask object once."""
        cache_key = (B, T, device)
        if cache_key in self._tables:
            tables = self._tables[cache_key]
            self._check_mask(key_padding_mask, tables[4], tables[1].long(), once_per_mask)
            return tables
        labels = self.label_positions
        if isinstance(labels, (list, tuple)):
            labels = torch.tensor(labels, dtype=torch.long)
        if isinstance(labels, torch.Tensor):
            labels = labels.to(device)
            if labels.dim() == 1:
                labels = labels[None]
        labels = check_index_tensor("Saliency: label_positions", labels, 2, "[B, C]", device)
        if labels.shape[0] == 1 and B != 1:
            labels = labels.expand(B, -1)
        if labels.shape[0] != B or labels.shape[1] == 0:
            raise ValueError(f"Saliency: label_positions must have shape [B={B}, C >= 1], got {tuple(labels.shape)}")
        target = _as_rows("target", self.target, B, device)
        start = _as_rows("start", self.start, B, device)
        used = labels >= 0
        slot_taken = torch.zeros(B, T, dtype=torch.int32, device=device)
        slot_taken.scatter_add_(1, labels.clamp(min=0), used.int())
        checks = [
            labels < -1,
            labels >= T,
            ~used.any(dim=1),
            (target < 0) | (target >= T),
            used & (labels >= target[:, None]),
            slot_taken > 1,
            (start < 0) | (start > target),
            used & (labels < start[:, None]),
        ]
        bad = any_each(*checks)
        messages = [
            "label_positions must be >= 0 (or -1 for an unused slot)",
            f"label_positions must be < T={T}",
            "no label positions: every row needs at least one label-word position",
            f"target must be a position in [0, T={T})",
            "every label position must come before the target row (p_c < q)",
            "label_positions must not repeat a position within a row",
            "start must be in [0, target]",
            "a label position comes before its row's start (the first token)",
        ]
        _raise_first(bad, messages, labels, target)
        self._check_mask(key_padding_mask, labels, target, once_per_mask)
        label_mask = slot_taken.to(torch.uint8)
        row_slot, n_rows = None, 0
        if self.rows == "labels":  # slots 0..C-1: the label rows in order, slot C: the target row
            n_rows = labels.shape[1] + 1
            row_slot = torch.full((B, T), -1, dtype=torch.int32, device=device)
            b_idx, c_idx = torch.nonzero(used, as_tuple=True)
            row_slot[b_idx, labels[b_idx, c_idx]] = c_idx.int()
            row_slot[torch.arange(B, device=device), target] = n_rows - 1
        elif self.rows == "all":
            n_rows = T
            row_slot = torch.arange(T, dtype=torch.int32, device=device).expand(B, T).contiguous()
        rel = (labels - start[:, None]) * used
        n_labels = used.sum(dim=1).float()
        sum_p = rel.sum(dim=1).float()
        qf = (target - start).float()
        denominators = torch.stack([sum_p, n_labels, qf * (qf + 1) / 2 - sum_p - n_labels], dim=1)
        tables = (label_mask, target.int(), row_slot, n_rows, labels, denominators)
        self._tables = {cache_key: tables}  # one entry: the seam reuses it for every layer of a forward
        return tables

    def _check_mask(self, key_padding_mask, labels: torch.Tensor, target: torch.Tensor, once_per_mask: bool):
        """:func:`_check_padding`; with ``once_per_mask``, skipped for the mask object checked last."""
        if key_padding_mask is None:
            return
        if once_per_mask and self._checked_mask is not None and self._checked_mask() is key_padding_mask:
            return
        _check_padding(key_padding_mask, labels, target)
        self._checked_mask = weakref.ref(key_padding_mask) if once_per_mask else None


def _raise_first(bad: list[bool], messages: list[str], labels: torch.Tensor, target: torch.Tensor) -> None:
    for is_bad, message in zip(bad, messages):
        if is_bad:
            raise ValueError(f"Saliency: {message}; label_positions={labels.tolist()}, target={target.tolist()}")


def _check_padding(key_padding_mask: torch.Tensor | None, labels: torch.Tensor, target: torch.Tensor) -> None:
    """The target row and the label positions must be real tokens (checked on every call: masks change)."""
    if key_padding_mask is None:
        return
    used = labels >= 0
    bad = any_each(
        ~key_padding_mask.gather(1, target[:, None])[:, 0], used & ~key_padding_mask.gather(1, labels.clamp(min=0))
    )
    messages = [
        "the target row is padding (key_padding_mask is False there)",
        "a label position is padding (key_padding_mask is False there)",
    ]
    _raise_first(bad, messages, labels, target)


def _as_rows(name: str, value: Any, B: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise TypeError(f"Saliency: {name} must be an int or an integer tensor [B], got {value!r:.60}")
    t = torch.as_tensor(value, device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"Saliency: {name} must be an integer tensor, got {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        return t.expand(B)
    if t.numel() != B:
        raise ValueError(f"Saliency: {name} must be an int or have shape [B={B}], got {tuple(t.shape)}")
    return t


class _SaliencyTap(torch.autograd.Function):
    """Identity on the attention output whose backward runs the saliency kernel with ``dO``; the gradient
    passes through unchanged, so the attention op's own backward (dq, dk, dv) is untouched."""

    @staticmethod
    def forward(ctx, out, q, k, v, lse, kpm, logw, row_from, limit, causal, scale, backend, request, key, tables):
        ctx.save_for_backward(q, k, v, lse, kpm, logw, row_from, limit)
        ctx.args = (causal, scale, backend, request, key, tables)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lse, kpm, logw, row_from, limit = ctx.saved_tensors
        causal, scale, backend, request, key, tables = ctx.args
        label_mask, target, row_slot, n_rows, labels, denominators = tables
        B, _, T, _ = q.shape
        rows = None if row_slot is None else torch.zeros(B, n_rows, T, dtype=torch.float32, device=q.device)
        sums, head_sums = _attention_saliency(
            grad_out,
            q,
            k,
            v,
            lse,
            kpm,
            logw.detach() if logw is not None else None,
            row_from,
            limit,
            causal,
            scale,
            backend,
            label_mask,
            target,
            request.per_head,
            row_slot,
            rows,
        )
        result = SaliencyResult(sums=sums, denominators=denominators, head_sums=head_sums if request.per_head else None)
        if request.rows == "labels":
            used = (labels >= 0)[:, :, None]
            result.label_rows = rows[:, :-1] * used
            result.target_row = rows[:, -1]
        elif request.rows == "all":
            result.map = rows
        request.results[key] = result
        return (grad_out, *([None] * 14))


def tap(out, q, k, v, lse, kpm, logw, row_from, limit, causal, scale, backend, request: Saliency, key=None,
        once_per_mask: bool = False):
    """Attach a saliency request to a fused attention output (called by the ops that take ``saliency=``;
    ``once_per_mask``: see :meth:`Saliency._dense`)."""
    if not isinstance(request, Saliency):
        raise TypeError(f"saliency must be a fastattn_icl.ops.Saliency, got {type(request).__name__}")
    B, _, Tq, _ = q.shape
    if k.shape[2] != Tq:
        raise ValueError(
            f"saliency needs self-attention over the whole sequence (Tq == Tk), got Tq={Tq}, Tk={k.shape[2]}: "
            "run the prompt in one forward without a KV cache"
        )
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "saliency is computed in the backward pass, but gradients are disabled (torch.no_grad / "
            "inference_mode): run the forward with torch.enable_grad()"
        )
    if not (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "saliency is computed in the backward pass, but no input of this attention call requires grad, so "
            "there will be none: make the model's input embeddings (or q, k, v) require grad"
        )
    tables = request._dense(B, Tq, q.device, kpm, once_per_mask)
    return _SaliencyTap.apply(
        out, q, k, v, lse, kpm, logw, row_from, limit, causal, scale, backend, request, key, tables
    )
