"""Fused base attention as a ``torch.library`` op with an autograd formula.

``fastattn_icl::attention_fwd`` returns ``(out, lse)`` and ``fastattn_icl::attention_bwd`` returns
``(dq, dk, dv)``; only ``q, k, v, out, lse`` are saved for the backward, never ``P``. Both ops have
fake (meta) kernels, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import torch

from fastattn_icl.ops._validate import check_key_padding_mask, check_qkv, check_scale
from fastattn_icl.ops.backend import resolve_backend


def _impl(backend: str):
    if backend == "triton":
        from fastattn_icl._triton import attention as impl
    else:
        from fastattn_icl.ops import _torch_backend as impl
    return impl


@torch.library.custom_op("fastattn_icl::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend).attention_fwd(q, k, v, key_padding_mask, causal, scale)


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, causal, scale, backend):
    B, H, Tq, D = q.shape
    out = q.new_empty(B, Tq, H, D).transpose(1, 2)
    lse = q.new_empty(B, H, Tq, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastattn_icl::attention_bwd", mutates_args=())
def _attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(backend).attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(
        grad_out, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`attention`, also returning ``lse [B, H, Tq]`` (float32, natural log, ``-inf`` on
    rows that see no key)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    check_key_padding_mask(key_padding_mask, B, Tk, q.device)
    scale = check_scale(scale, D)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return _attention_fwd(q, k, v, key_padding_mask, causal, scale, resolve_backend(backend, q.device))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention ``softmax(scale · q kᵀ + mask) v``, fused and memory-linear in ``T``.

    Args:
        q: ``[B, H, Tq, D]`` queries (any strides: a ``[B, Tq, H, D]`` tensor's ``.transpose(1, 2)``
            view works without a copy).
        k, v: ``[B, Hkv, Tk, D]``; query head ``h`` reads kv head ``h // (H // Hkv)`` (GQA), K/V are
            never repeated.
        causal: bottom-right aligned causal mask: row ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``,
            so a chunk of queries over a longer cache is correct.
        scale: logit scale, default ``D ** -0.5``.
        key_padding_mask: optional bool ``[B, Tk]``, True = keep.
        backend: ``"auto"`` (default: Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``;
            see :mod:`fastattn_icl.ops.backend`.

    Returns:
        ``[B, H, Tq, D]`` in the dtype of ``q``, laid out as ``[B, Tq, H, D]`` in memory (so
        ``out.transpose(1, 2)`` is contiguous). A row with no visible key is 0. fp16/bf16 inputs
        accumulate in fp32. Differentiable w.r.t. ``q``, ``k``, ``v``.
    """
    out, _ = attention_with_lse(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, backend=backend
    )
    return out
