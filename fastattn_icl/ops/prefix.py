"""Attention over a shared prefix plus each row's own keys: serving a compressed demonstration cache (docs/methods.md
§5).

A batch of test inputs that all continue one prefix (the kept anchor positions of the demonstrations' cache)
attends to ``[prefix keys, own keys]``. Materialising the prefix per row (``prefix.expand(B, ...)`` then
``torch.cat`` with the row's keys, as a Hugging Face cache does) copies it ``B`` times in every layer and
every decoding step. Here the kernel reads the prefix through its own strides instead: one
``[1, Hkv, Tp, D]`` copy, batch stride 0, in the same online softmax as the row's keys (the ``HAS_PREFIX``
flag of the forward kernel), so the result is attention over the concatenation, with no copy and no
second pass.

Forward only: it is an inference path (the gradient w.r.t. a shared prefix would sum over the batch, and
no workflow needs it), and it raises when autograd would need a backward.
"""

from __future__ import annotations

import torch

from fastattn_icl.ops._validate import check_key_padding_mask, check_qkv, check_scale, output_like
from fastattn_icl.ops.backend import kernel, resolve_backend

__all__ = ["shared_prefix_attention"]


@torch.library.custom_op("fastattn_icl::shared_prefix_attention_fwd", mutates_args=())
def _shared_prefix_attention_fwd(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel(backend, "attention_fwd")(
        q, k, v, key_padding_mask, None, None, None, causal, scale, prefix=(prefix_k, prefix_v)
    )


@_shared_prefix_attention_fwd.register_fake
def _(q, prefix_k, prefix_v, k, v, key_padding_mask, causal, scale, backend):
    B, H, Tq, D = q.shape
    return output_like(q), q.new_empty(B, H, Tq, dtype=torch.float32)


def _check_prefix(prefix_k: torch.Tensor, prefix_v: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    B, Hkv, _, D = k.shape
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor [1 or B, Hkv, Tp, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [1 or B={B}, Hkv={Hkv}, Tp, D={D}], got {tuple(t.shape)}")
        if t.dtype != k.dtype or t.device != k.device:
            raise TypeError(f"{name} must be {k.dtype} on {k.device} (as k), got {t.dtype} on {t.device}")
        if t.shape[0] not in (1, B) or t.shape[1] != Hkv or t.shape[3] != D:
            raise ValueError(f"{name} must have shape [1 or B={B}, Hkv={Hkv}, Tp, D={D}], got {tuple(t.shape)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} must have one shape")
    if prefix_k.shape[2] == 0:
        raise ValueError("the shared prefix is empty (Tp = 0); call fastattn_icl.attention instead")
    # batch 1 -> a stride-0 view over the batch: the kernel reads the one copy for every row
    return prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)


def shared_prefix_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q`` over the keys ``[prefix_k, k]`` without materialising the prefix per row.

    Args:
        q: ``[B, H, Tq, D]`` queries.
        prefix_k, prefix_v: ``[1, Hkv, Tp, D]`` (one prefix shared by the batch, read with batch stride 0) or
            ``[B, Hkv, Tp, D]``; ``Tp >= 1``. Every query row sees every prefix key.
        k, v: ``[B, Hkv, Tk, D]`` each row's own keys after the prefix (GQA: ``H % Hkv == 0``); ``Tk >= Tq``
            when causal.
        causal: bottom-right causal over ``k`` (row ``i`` sees ``k[j]`` iff ``j <= i + Tk - Tq``), i.e. the
            queries are the last ``Tq`` positions of ``[prefix, k]``.
        scale: logit scale, default ``D ** -0.5``.
        key_padding_mask: optional bool ``[B, Tk]`` over ``k`` (True = keep); the prefix is never masked.
        backend: as in :func:`fastattn_icl.attention`.

    Returns:
        ``[B, H, Tq, D]`` in the dtype of ``q`` (laid out as :func:`attention`'s): exactly attention over the
        concatenated keys ``[prefix, k]`` with mask ``[ones(Tp), key_padding_mask]``.

    Raises:
        RuntimeError: autograd would need a backward (an input requires grad with grad mode on): this is a
            forward-only inference path.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    prefix_k, prefix_v = _check_prefix(prefix_k, prefix_v, k)
    check_key_padding_mask(key_padding_mask, B, Tk, q.device)
    scale = check_scale(scale, D)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and Tq > Tk:
        raise ValueError(
            f"causal shared-prefix attention needs Tq <= Tk (the queries are the last Tq of the row's own Tk keys), "
            f"got Tq={Tq}, Tk={Tk}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, prefix_k, prefix_v, k, v)):
        raise RuntimeError(
            "shared_prefix_attention is forward-only (an inference path): run it under torch.no_grad() or "
            "torch.inference_mode(), or use fastattn_icl.attention on the concatenated keys for gradients"
        )
    backend = resolve_backend(backend, q.device)
    out, _ = _shared_prefix_attention_fwd(q, prefix_k, prefix_v, k, v, key_padding_mask, causal, scale, backend)
    return out
