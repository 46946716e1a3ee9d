"""Oracle for saliency and information-flow scores (docs/methods.md §4).

Per layer: ``I = | Σ_h P_h ⊙ ∂L/∂P_h |`` ``[B, Tq, Tk]``, the gradient taken w.r.t. the
**post-softmax** ``P`` and the heads summed **before** the absolute value (as the paper's code
does); the per-head variant is ``|P_h ⊙ ∂L/∂P_h|`` ``[B, H, Tq, Tk]``. Since ``O = P V``,
``∂L/∂P = dO Vᵀ``.

The paper's probe method multiplies ``P`` by a tensor of ones that requires grad; the probe's
gradient is ``P ⊙ ∂L/∂P`` (the chain rule through ``P · probe`` with ``probe = 1``), so the map is
``|Σ_h probe.grad|``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastattn_icl.reference.attention import attention_probs, check_qkv, repeat_kv

__all__ = ["saliency_map", "probe_saliency", "flow_scores", "normalise_flow"]


def saliency_map(P: torch.Tensor, dP: torch.Tensor, *, per_head: bool = False) -> torch.Tensor:
    """Saliency from post-softmax probabilities and their gradient.

    ``P``, ``dP = ∂L/∂P``: ``[B, H, Tq, Tk]``. Returns ``|Σ_h P ⊙ dP|`` ``[B, Tq, Tk]`` (heads summed
    before the absolute value) or, with ``per_head=True``, ``|P ⊙ dP|`` ``[B, H, Tq, Tk]``.
    Computed in the dtype of ``P ⊙ dP``.
    """
    for name, t in (("P", P), ("dP", dP)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor [B, H, Tq, Tk]")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, Tq, Tk], got {tuple(t.shape)}")
    if P.shape != dP.shape:
        raise ValueError(f"P and dP must have one shape, got {tuple(P.shape)} and {tuple(dP.shape)}")
    prod = P * dP
    return prod.abs() if per_head else prod.sum(dim=1).abs()


def probe_saliency(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    per_head: bool = False,
) -> torch.Tensor:
    """The paper's probe method for one attention layer.

    ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]``; ``key_padding_mask`` bool
    ``[B, Tk]`` (True = keep); bottom-right causal. ``loss_fn`` maps the attention output
    ``O [B, H, Tq, Dv]`` to a scalar. ``P`` comes from :func:`attention_probs`; ``O = (P · probe) V``
    with ``probe`` a tensor of ones; the probe's gradient (``P ⊙ ∂L/∂P``) is taken with
    ``torch.autograd.grad``, so the ``.grad`` of ``q``/``k``/``v`` is left alone.

    Returns ``|Σ_h probe.grad|`` ``[B, Tq, Tk]`` or, with ``per_head=True``, ``|probe.grad|``
    ``[B, H, Tq, Tk]``, in the accumulation dtype (float32, float64 for float64 input).
    """
    check_qkv(q, k, v)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    with torch.enable_grad():
        p = attention_probs(
            q.detach(), k.detach(), causal=causal, scale=scale, key_padding_mask=key_padding_mask
        )
        probe = torch.ones_like(p, requires_grad=True)
        out = torch.matmul((p * probe).to(q.dtype), repeat_kv(v.detach(), q.shape[1]))
        loss = loss_fn(out)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        (grad,) = torch.autograd.grad(loss.reshape(()), probe)
    return grad.abs() if per_head else grad.sum(dim=1).abs()


def _flow_inputs(I, label_positions, target):  # noqa: E741
    if not isinstance(I, torch.Tensor) or not I.is_floating_point():
        raise TypeError("I must be a floating tensor [T, T] or [B, T, T]")
    batched = I.dim() == 3
    if I.dim() not in (2, 3) or I.shape[-1] != I.shape[-2]:
        raise ValueError(f"I must be a square map [T, T] or [B, T, T] over the full sequence, got {tuple(I.shape)}")
    Ib = I if batched else I[None]
    B, T = Ib.shape[0], Ib.shape[-1]
    if isinstance(label_positions, torch.Tensor):
        if label_positions.dtype == torch.bool or label_positions.is_floating_point():
            raise TypeError(f"label_positions must be an integer tensor, got {label_positions.dtype}")
        labels = label_positions.to(device=I.device, dtype=torch.long)
    elif isinstance(label_positions, Sequence) and not batched:
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in label_positions):
            raise TypeError("label_positions must be a sequence of ints or an integer tensor")
        labels = torch.tensor(list(label_positions), dtype=torch.long, device=I.device)
    else:
        raise TypeError("label_positions must be an integer tensor ([C], or [B, C] for a batched I)")
    if isinstance(target, torch.Tensor):
        if target.dtype == torch.bool or target.is_floating_point():
            raise TypeError(f"target must be an integer tensor, got {target.dtype}")
        tgt = target.to(device=I.device, dtype=torch.long)
    elif isinstance(target, int) and not isinstance(target, bool) and not batched:
        tgt = torch.tensor(target, dtype=torch.long, device=I.device)
    else:
        raise TypeError("target must be an int (or a LongTensor [B] for a batched I)")
    if batched:
        if labels.dim() != 2 or labels.shape[0] != B:
            raise ValueError(f"label_positions must have shape [B={B}, C] (-1 = padding), got {tuple(labels.shape)}")
        if tuple(tgt.shape) != (B,):
            raise ValueError(f"target must have shape [B={B}], got {tuple(tgt.shape)}")
    else:
        if labels.dim() != 1:
            raise ValueError(f"label_positions must have shape [C], got {tuple(labels.shape)}")
        if tgt.dim() != 0:
            raise ValueError(f"target must be a single position, got shape {tuple(tgt.shape)}")
        labels, tgt = labels[None], tgt[None]
    valid = labels >= 0
    if bool((labels < -1).any()) or (not batched and not bool(valid.all())):
        raise ValueError("label_positions must be 0-based positions (batched: -1 = padding entry)")
    if bool((valid.sum(dim=1) == 0).any()):
        raise ValueError("label_positions is empty: need at least one label-word position per sample")
    if bool(((tgt < 0) | (tgt >= T)).any()):
        raise ValueError(f"target must be a position in [0, T={T}), got {tgt.tolist()}")
    if bool((valid & (labels >= tgt[:, None])).any()):
        raise ValueError("every label position must come before the target position (p_c < q)")
    srt = torch.sort(labels, dim=1).values
    if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
        raise ValueError("label_positions must not repeat a position")
    return Ib, labels, valid, tgt, batched


def flow_scores(
    I: torch.Tensor,  # noqa: E741 (docs/methods.md §4 notation)
    label_positions: torch.Tensor | Sequence[int],
    target: torch.Tensor | int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Information-flow scores ``(S_wp, S_pq, S_ww)`` of one layer's saliency map (docs/methods.md §4).

    ``I``: ``[T, T]`` or batched ``[B, T, T]`` (rows = query positions, columns = key positions,
    0-based, over the full sequence). ``label_positions``: the label-word positions ``p_c``, ``[C]``
    (ints or an integer tensor) or ``[B, C]`` with ``-1`` = padding entry when batched; each
    ``p_c < q``. ``target``: the target position ``q`` (int, or ``[B]``). With the diagonal of
    ``I`` zeroed first and ``C`` the number of label positions::

        num_wp = Σ_c Σ_{j < p_c} I[p_c, j]          S_wp = num_wp / Σ_c p_c
        num_pq = Σ_c I[q, p_c]                       S_pq = num_pq / C
        S_ww = (Σ I − num_wp − num_pq) / (q(q+1)/2 − Σ_c p_c − C)

    ``Σ I`` runs over the pairs the ``S_ww`` denominator counts, ``j < i <= q`` (the strict lower
    triangle of the first ``q + 1`` positions); for a causal model whose loss sits at ``q`` every
    other entry of ``I`` is 0, so this equals the sum of the whole map. A ratio whose set of pairs is
    empty (``0 / 0``) is 0. Returns three tensors of shape ``[]`` (or ``[B]``), in ``I``'s dtype.
    """
    Ib, labels, valid, tgt, batched = _flow_inputs(I, label_positions, target)
    B, T = Ib.shape[0], Ib.shape[-1]
    eye = torch.eye(T, dtype=torch.bool, device=I.device)
    Ib = Ib.masked_fill(eye, 0.0)
    rows = torch.arange(T, device=I.device)
    lab = labels.clamp(min=0)  # [B, C]
    bidx = torch.arange(B, device=I.device)[:, None]
    label_rows = Ib[bidx, lab]  # [B, C, T]: I[p_c, :]
    before = rows[None, None, :] < lab[:, :, None]  # [B, C, T]: j < p_c
    num_wp = (label_rows * (before & valid[:, :, None])).sum(dim=(1, 2))
    num_pq = (Ib[bidx, tgt[:, None], lab] * valid).sum(dim=1)
    lower = (rows[None, :, None] > rows[None, None, :]) & (rows[None, :, None] <= tgt[:, None, None])
    total = (Ib * lower).sum(dim=(1, 2))
    n_labels = valid.sum(dim=1).to(Ib.dtype)
    sum_p = (labels * valid).sum(dim=1).to(Ib.dtype)
    qf = tgt.to(Ib.dtype)
    den_ww = qf * (qf + 1) / 2 - sum_p - n_labels

    def ratio(num, den):
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    s_wp = ratio(num_wp, sum_p)
    s_pq = ratio(num_pq, n_labels)
    s_ww = ratio(total - num_wp - num_pq, den_ww)
    if not batched:
        return s_wp[0], s_pq[0], s_ww[0]
    return s_wp, s_pq, s_ww


def normalise_flow(
    s_wp: torch.Tensor, s_pq: torch.Tensor, s_ww: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise the three scores to sum to 1 (per layer, after averaging over samples).

    The three tensors share one (broadcastable) shape, e.g. ``[L]`` for one score per layer.
    Where all three are 0 the result is 0.
    """
    for name, t in (("s_wp", s_wp), ("s_pq", s_pq), ("s_ww", s_ww)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor")
    total = s_wp + s_pq + s_ww
    safe = torch.where(total != 0, total, torch.ones_like(total))
    zero = total == 0
    return tuple(torch.where(zero, torch.zeros_like(total), t / safe) for t in (s_wp, s_pq, s_ww))
