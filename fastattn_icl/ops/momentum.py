"""Momentum attention (docs/methods.md §6, MoAttn) as a ``torch.library`` op with an autograd formula.

``O_t = Σ_j P_tj v_j + M_t`` with ``M_t = Σ_{i<t} η^{t-i} v_i``: base attention plus a causal, unnormalised,
decayed sum of the earlier values of the query's kv head. ``M`` comes from a memory-bound chunked scan
accumulated in float32 (Triton on CUDA; the plain-PyTorch backend on CPU) and is added in the attention
kernel's epilogue. The backward is the base attention's (on the attention part of the output, which the forward
keeps for it) plus the momentum term's ``dV_j += Σ_{i>j} η^{i-j} dO_i`` (summed over the kv head's query heads),
another scan over the reversed sequence.

Positions are absolute from the first key: query row ``i`` of a chunk of ``Tq`` queries over ``Tk`` keys sits at
``t = i + Tk - Tq``, so a chunk over a cache gives the rows of one full pass. Padded keys count as zero values
(the decay still counts their positions).
"""

from __future__ import annotations

import math

import torch

from fastattn_icl.ops._validate import check_key_padding_mask, check_qkv, check_scale, output_like
from fastattn_icl.ops.attention import attention
from fastattn_icl.ops.backend import kernel, resolve_backend

__all__ = ["check_eta", "momentum_attention", "momentum_attention_with_state"]


def check_eta(eta) -> float:
    """η as a float in ``[0, 1)``; ``TypeError``/``ValueError`` otherwise (the term grows like ``1 / (1 - η)``)."""
    if isinstance(eta, torch.Tensor):
        if eta.numel() != 1:
            raise TypeError(f"eta must be a float in [0, 1), got a tensor of shape {tuple(eta.shape)}")
        eta = eta.item()
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float in [0, 1), got {type(eta).__name__}")
    eta = float(eta)
    if math.isnan(eta) or not 0.0 <= eta < 1.0:
        raise ValueError(f"eta must be in [0, 1) (the momentum term grows like 1 / (1 - eta)), got {eta}")
    return eta


def _momentum_rows(v, eta: float, Tq: int, key_padding_mask, m0, term, carry_on):
    """``(M [B, Hkv, Tq, D], state [B, Hkv, D])`` float32 for the last ``Tq`` positions of ``v [B, Hkv, Tk, D]``:
    from the carried state ``m0`` (``M`` at position ``Tk - Tq``) over those positions only, or (``m0`` None) from
    all of ``v``; ``state`` is ``M`` at position ``Tk`` (``m_(t+1) = η (m_t + v_t)``). ``term``/``carry_on`` are
    the backend's ``momentum_term``/``momentum_continue``."""
    B, Hkv, Tk, D = v.shape
    first = Tk - Tq
    if m0 is not None:
        kpm = None if key_padding_mask is None else key_padding_mask[:, first:]
        rows = carry_on(v[:, :, first:], eta, m0, kpm)
        return rows[:, :, :Tq], rows[:, :, Tq]
    start = max(first, 0)
    lo = min(start, max(Tk - 1, 0))  # one row more than asked when Tq = 0: the state needs M at Tk - 1
    rows = term(v, eta, lo, key_padding_mask)  # positions lo .. Tk - 1
    last = v[:, :, -1].float() if Tk else v.new_zeros(B, Hkv, D, dtype=torch.float32)
    if key_padding_mask is not None and Tk:
        last = last * key_padding_mask[:, -1, None, None]
    state = eta * ((rows[:, :, -1] if Tk else torch.zeros_like(last)) + last)  # m_(t+1) = η (m_t + v_t)
    mom = rows[:, :, start - lo :]
    if first < 0:  # query rows before the first key (Tq > Tk) get no momentum
        mom = torch.cat([mom.new_zeros(B, Hkv, -first, D), mom], dim=2)
    return mom, state


@torch.library.custom_op("fastattn_icl::momentum_attention_fwd", mutates_args=())
def _momentum_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    eta: float,
    causal: bool,
    scale: float,
    store_attn: bool,
    backend: str,
    m0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fused = kernel(backend, "momentum_attention_fwd_fused") if m0 is None else None
    served = None if fused is None else fused(q, k, v, key_padding_mask, causal, scale, eta, store_attn)
    if served is not None:
        return served
    term, carry_on = kernel(backend, "momentum_term"), kernel(backend, "momentum_continue")
    mom, state = _momentum_rows(v, eta, q.shape[2], key_padding_mask, m0, term, carry_on)
    fwd = kernel(backend, "momentum_attention_fwd")
    return (*fwd(q, k, v, key_padding_mask, causal, scale, mom, store_attn), state)


@_momentum_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, eta, causal, scale, store_attn, backend, m0=None):
    B, H, Tq, D = q.shape
    out = output_like(q)
    out_attn = output_like(q) if store_attn else q.new_empty(0)
    state = q.new_empty(B, k.shape[1], D, dtype=torch.float32)
    return out, q.new_empty(B, H, Tq, dtype=torch.float32), out_attn, state


@torch.library.custom_op("fastattn_icl::momentum_attention_bwd", mutates_args=())
def _momentum_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_attn: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    eta: float,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``: the base attention's backward on the attention part of the output, plus the momentum term's
    ``dV`` (one op, so a training step pays one dispatch for both)."""
    dq, dk, dv, _ = kernel(backend, "attention_bwd")(grad_out, q, k, v, out_attn, lse, key_padding_mask, None, None,
                                                     None, causal, scale)
    dv_momentum = kernel(backend, "momentum_value_grad")(grad_out, eta, k.shape[1], k.shape[2], key_padding_mask)
    if dv.dtype == torch.float32:  # dv has v's layout (attention_bwd's contract): the sum lands in it
        return dq, dk, dv.add_(dv_momentum)
    return dq, dk, dv.copy_(dv.float() + dv_momentum)  # summed in float32, rounded once


@_momentum_attention_bwd.register_fake
def _(grad_out, q, k, v, out_attn, lse, key_padding_mask, eta, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, eta, causal, scale, store_attn, backend, m0 = inputs
    _, lse, out_attn, state = output
    ctx.save_for_backward(q, k, v, out_attn, lse, key_padding_mask)
    ctx.eta, ctx.causal, ctx.scale, ctx.backend, ctx.store_attn = eta, causal, scale, backend, store_attn
    ctx.mark_non_differentiable(lse, out_attn, state)


def _backward(ctx, grad_out, grad_lse, grad_out_attn, grad_state):
    q, k, v, out_attn, lse, key_padding_mask = ctx.saved_tensors
    if not ctx.store_attn:
        raise RuntimeError("momentum_attention: the forward ran without keeping the attention part for a backward")
    dq, dk, dv = _momentum_attention_bwd(grad_out, q, k, v, out_attn, lse, key_padding_mask, ctx.eta, ctx.causal,
                                         ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None


_momentum_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def momentum_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: float,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Momentum attention (docs/methods.md §6): ``attention(q, k, v) + M`` with ``M_t = Σ_{i<t} η^{t-i} v_i``.

    See :func:`momentum_attention_with_state` for the decode form that carries ``M`` in O(d) state.

    Args:
        q: ``[B, H, Tq, D]`` queries (any strides).
        k, v: ``[B, Hkv, Tk, D]``, every key from absolute position 0 (with a KV cache: the whole cache); query
            head ``h`` reads kv head ``h // (H // Hkv)`` and adds that kv head's ``M``.
        eta: η in ``[0, 1)``; ``0`` is exactly :func:`fastattn_icl.attention`.
        causal: the bottom-right causal mask of the attention part (the momentum term is always causal and
            excludes the current position).
        scale: logit scale, default ``D ** -0.5``.
        key_padding_mask: optional bool ``[B, Tk]`` (True = keep): padded keys are hidden from the attention and
            count as zero values in ``M`` (their positions still count in the decay).
        backend: as in :func:`fastattn_icl.attention`.

    Returns:
        ``[B, H, Tq, D]`` in the dtype of ``q``, laid out as :func:`fastattn_icl.attention`'s output; query row ``i``
        is at absolute position ``i + Tk - Tq``. Differentiable w.r.t. ``q``, ``k``, ``v``; ``M`` is accumulated in
        float32.

    Raises:
        ValueError: η outside ``[0, 1)``; the shape checks of :func:`fastattn_icl.attention`.
    """
    eta = check_eta(eta)
    if eta == 0.0:  # exactly base attention: the term is never computed
        return attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, backend=backend)
    return _momentum_forward(q, k, v, eta, None, causal, scale, key_padding_mask, backend)[0]


def momentum_attention_with_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: float,
    state: torch.Tensor | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`momentum_attention` that also returns the running state, and can start from one.

    Args:
        q, k, v, eta, causal, scale, key_padding_mask, backend: as in :func:`momentum_attention` (``k``/``v`` the
            whole cache from position 0; ``η > 0``).
        state: ``None`` (``M`` from all of ``v``) or the carried state ``[B, Hkv, D]`` float32, ``M`` at position
            ``Tk - Tq`` (what the previous call returned): then only the last ``Tq`` values are read, O(Tq·d) per
            call instead of O(Tk·d). Inference only (no gradient flows into or through it).

    Returns:
        ``(out [B, H, Tq, D], state [B, Hkv, D])``: the output and ``M`` at position ``Tk`` (``m_(t+1) = η (m_t +
        v_t)``), for the next call.
    """
    eta = check_eta(eta)
    if eta == 0.0:
        raise ValueError("momentum_attention_with_state needs eta > 0 (eta = 0 is plain attention, with no state)")
    return _momentum_forward(q, k, v, eta, state, causal, scale, key_padding_mask, backend)


def _momentum_forward(q, k, v, eta: float, state, causal, scale, key_padding_mask, backend):
    """The two public functions after their check of η (``eta`` a float in ``(0, 1)``): every other argument is
    checked here, once."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    check_key_padding_mask(key_padding_mask, B, Tk, q.device)
    scale = check_scale(scale, D)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    backend = resolve_backend(backend, q.device)
    store_attn = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if state is not None:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.float32 or tuple(state.shape) != (B, Hkv, D):
            raise TypeError(f"state must be a float32 tensor [B={B}, Hkv={Hkv}, D={D}], got {state!r:.80}")
        if state.device != q.device:
            raise ValueError(f"state must be on {q.device} (as q), got {state.device}")
        if Tq > Tk:
            raise ValueError(f"a carried state needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
        if store_attn:
            raise RuntimeError("momentum_attention_with_state: a carried state is for inference; run under no_grad")
    out, _, _, new_state = _momentum_attention_fwd(q, k, v, key_padding_mask, eta, causal, scale, store_attn, backend,
                                                   state)
    return out, new_state
