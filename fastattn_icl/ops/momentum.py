"""Momentum attention (SPEC §6, MoAttn) as a ``torch.library`` op with an autograd formula.

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

from fastattn_icl.ops._validate import check_key_padding_mask, check_qkv, check_scale
from fastattn_icl.ops.attention import _attention_bwd, _fused
from fastattn_icl.ops.backend import resolve_backend

__all__ = ["check_eta", "momentum_attention"]


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


def _momentum_impl(backend: str):
    if backend == "triton":
        from fastattn_icl._triton import attention as attn
        from fastattn_icl._triton import momentum as scan

        return attn.momentum_attention_fwd, scan.momentum_value_grad
    from fastattn_icl.ops import _torch_backend as impl

    return impl.momentum_attention_fwd, impl.momentum_value_grad


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _momentum_impl(backend)[0](q, k, v, key_padding_mask, causal, scale, eta, store_attn)


@_momentum_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, eta, causal, scale, store_attn, backend):
    B, H, Tq, D = q.shape
    out = q.new_empty(B, Tq, H, D).transpose(1, 2)
    out_attn = q.new_empty(B, Tq, H, D).transpose(1, 2) if store_attn else q.new_empty(0)
    return out, q.new_empty(B, H, Tq, dtype=torch.float32), out_attn


@torch.library.custom_op("fastattn_icl::momentum_value_grad", mutates_args=())
def _momentum_value_grad(
    grad_out: torch.Tensor, eta: float, num_kv_heads: int, Tk: int, key_padding_mask: torch.Tensor | None, backend: str
) -> torch.Tensor:
    return _momentum_impl(backend)[1](grad_out, eta, num_kv_heads, Tk, key_padding_mask)


@_momentum_value_grad.register_fake
def _(grad_out, eta, num_kv_heads, Tk, key_padding_mask, backend):
    B, _, _, D = grad_out.shape
    return grad_out.new_empty(B, num_kv_heads, Tk, D, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, eta, causal, scale, store_attn, backend = inputs
    _, lse, out_attn = output
    ctx.save_for_backward(q, k, v, out_attn, lse, key_padding_mask)
    ctx.eta, ctx.causal, ctx.scale, ctx.backend, ctx.store_attn = eta, causal, scale, backend, store_attn
    ctx.mark_non_differentiable(lse, out_attn)


def _backward(ctx, grad_out, grad_lse, grad_out_attn):
    q, k, v, out_attn, lse, key_padding_mask = ctx.saved_tensors
    if not ctx.store_attn:
        raise RuntimeError("momentum_attention: the forward ran without keeping the attention part for a backward")
    dq, dk, dv, _ = _attention_bwd(grad_out, q, k, v, out_attn, lse, key_padding_mask, None, None, None, ctx.causal,
                                   ctx.scale, ctx.backend)
    dv_momentum = _momentum_value_grad(grad_out, ctx.eta, k.shape[1], k.shape[2], key_padding_mask, ctx.backend)
    return dq, dk, (dv.float() + dv_momentum).to(dv.dtype), None, None, None, None, None, None


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
    """Momentum attention (SPEC §6): ``attention(q, k, v) + M`` with ``M_t = Σ_{i<t} η^{t-i} v_i``.

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
        ``[B, H, Tq, D]`` in the dtype of ``q`` (laid out as ``[B, Tq, H, D]``); query row ``i`` is at absolute
        position ``i + Tk - Tq``. Differentiable w.r.t. ``q``, ``k``, ``v``; ``M`` is accumulated in float32.

    Raises:
        ValueError: η outside ``[0, 1)``; the shape checks of :func:`fastattn_icl.attention`.
    """
    eta = check_eta(eta)
    if eta == 0.0:  # exactly base attention: the term is never computed
        out, _ = _fused(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, backend=backend)
        return out
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    check_key_padding_mask(key_padding_mask, B, Tk, q.device)
    scale = check_scale(scale, D)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    backend = resolve_backend(backend, q.device)
    store_attn = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out, _, _ = _momentum_attention_fwd(q, k, v, key_padding_mask, eta, causal, scale, store_attn, backend)
    return out
