"""Fused base attention as a ``torch.library`` op with an autograd formula.

``fastattn_icl::attention_fwd`` returns ``(out, lse)`` and ``fastattn_icl::attention_bwd`` returns
``(dq, dk, dv)``; only ``q, k, v, out, lse`` are saved for the backward, never ``P``. Both ops have
fake (meta) kernels, so ``torch.compile(fullgraph=True)`` traces through them.

``key_weight_columns`` (optional int64 ``[A]``, ascending, unique) names the key columns where ``key_log_weights``
may be nonzero, for a table that is a scatter of per-anchor weights (the seam, :func:`anchor_reweight_attention`):
``d key_log_weights`` is then needed, and defined, at those columns only (the plain-PyTorch backend computes it
there in ``O(Tq · A)`` instead of a dense pass over every key; the Triton backward fills every column anyway).
"""

from __future__ import annotations

import torch

from fastattn_icl.ops._validate import check_key_padding_mask, check_qkv, check_scale, output_like
from fastattn_icl.ops.backend import kernel, resolve_backend
from fastattn_icl.ops.features import anchor_key_log_weights, isolation_limit, reweight_start
from fastattn_icl.ops.saliency import Saliency
from fastattn_icl.ops.saliency import tap as saliency_tap


@torch.library.custom_op("fastattn_icl::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    key_log_weights: torch.Tensor | None,
    reweight_from: torch.Tensor | None,
    isolation_limit: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
    key_weight_columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel(backend, "attention_fwd")(
        q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal, scale,
        key_weight_columns=key_weight_columns,
    )


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal, scale, backend,
      key_weight_columns=None):
    B, H, Tq, D = q.shape
    return output_like(q), q.new_empty(B, H, Tq, dtype=torch.float32)


@torch.library.custom_op("fastattn_icl::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    key_log_weights: torch.Tensor | None,
    reweight_from: torch.Tensor | None,
    isolation_limit: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
    key_weight_columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dlogw = kernel(backend, "attention_bwd")(
        grad_out, q, k, v, out, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
        causal, scale, key_weight_columns=key_weight_columns,
    )
    return dq, dk, dv, (q.new_empty(0, dtype=torch.float32) if dlogw is None else dlogw)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal,
      scale, backend, key_weight_columns=None):
    dlogw = q.new_empty(0, dtype=torch.float32) if key_log_weights is None else torch.empty_like(key_log_weights)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dlogw


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal, scale, backend, cols = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit, cols)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit, cols = ctx.saved_tensors
    dq, dk, dv, dlogw = attention_bwd(
        grad_out, q, k, v, out, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
        ctx.causal, ctx.scale, ctx.backend, cols,
    )
    return dq, dk, dv, None, (None if key_log_weights is None else dlogw), None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_table(name: str, t: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...], device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape or t.device != device:
        layout = ", ".join(map(str, shape))
        raise TypeError(f"{name} must be a {dtype} tensor [{layout}] on {device}, got {t!r:.80}")


def attention_from_tables(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    key_padding_mask: torch.Tensor | None = None,
    key_log_weights: torch.Tensor | None = None,
    reweight_from: torch.Tensor | None = None,
    isolation_limit: torch.Tensor | None = None,
    saliency: Saliency | None = None,
    saliency_key=None,
    backend: str | None = None,
    key_weight_columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the fused attention on the kernel's dense method inputs (built by
    :mod:`fastattn_icl.ops.features`). Shapes, dtypes and devices are checked on the host; values are not, so
    nothing waits for the device: the entry of callers that validated their method state once (the Hugging
    Face seam). The public ops below check the values of their arguments and then call it.

    Args:
        q, k, v, causal, scale, key_padding_mask, saliency, backend: as in :func:`attention`.
        key_log_weights: ``None`` or float32 ``[B, H, Tk]``, ``log w`` per key (0 = not re-weighted).
        reweight_from: int32 ``[B]`` in ``[0, Tq)``, the first re-weighted query row; with ``key_log_weights``.
        isolation_limit: ``None`` or int32 ``[B, Tq]``: row ``i``'s keys ``j < limit`` are isolated.
        saliency_key: the key of ``saliency.results`` this call records into (the seam: the layer index).
        key_weight_columns: ``None`` or int64 ``[A]`` ascending, unique key positions in ``[0, Tk)`` outside which
            ``key_log_weights`` is 0; the CPU path then forms the re-weighting's forward term and the gradient of
            ``key_log_weights`` at these columns only (the gradient is defined there only; see the module
            docstring). With ``key_log_weights`` only. Like the tables' values, not checked (so no call waits for
            the device): a set that misses a nonzero weight gives a wrong output.
    """
    (B, H, Hkv, Tq, Tk, D), scale = _check_call(q, k, v, causal, scale, key_padding_mask)
    if (key_log_weights is None) != (reweight_from is None):
        raise ValueError("key_log_weights and reweight_from go together: give both or neither")
    _check_table("key_log_weights", key_log_weights, torch.float32, (B, H, Tk), q.device)
    _check_table("reweight_from", reweight_from, torch.int32, (B,), q.device)
    _check_table("isolation_limit", isolation_limit, torch.int32, (B, Tq), q.device)
    if key_weight_columns is not None:
        if key_log_weights is None:
            raise ValueError("key_weight_columns goes with key_log_weights")
        if not isinstance(key_weight_columns, torch.Tensor) or key_weight_columns.dtype != torch.int64 \
                or key_weight_columns.dim() != 1 or key_weight_columns.device != q.device:
            raise TypeError(f"key_weight_columns must be an int64 tensor [A] on {q.device}, got "
                            f"{key_weight_columns!r:.80}")
    # the seam hands one new mask object to every layer of a forward: its saliency checks a mask object once
    return _run(q, k, v, causal, scale, key_padding_mask, key_log_weights, reweight_from, isolation_limit, saliency,
                saliency_key, backend, once_per_mask=True, columns=key_weight_columns)


def _check_call(q, k, v, causal, scale, key_padding_mask) -> tuple[tuple[int, ...], float]:
    dims = check_qkv(q, k, v)
    check_key_padding_mask(key_padding_mask, dims[0], dims[4], q.device)
    scale = check_scale(scale, dims[5])
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return dims, scale


def _run(q, k, v, causal, scale, key_padding_mask, logw, row_from, limit, saliency, saliency_key, backend,
         once_per_mask=False, columns=None):
    backend = resolve_backend(backend, q.device)
    out, lse = attention_fwd(q, k, v, key_padding_mask, logw, row_from, limit, causal, scale, backend, columns)
    if saliency is not None:
        out = saliency_tap(out, q, k, v, lse, key_padding_mask, logw, row_from, limit, causal, scale, backend,
                           saliency, saliency_key, once_per_mask)
    return out, lse


def _checked(q, k, v, *, causal, scale, key_padding_mask, backend, beta=None, anchor_positions=None,
             anchor_classes=None, reweight_from=None, isolation_rows=None, isolation_window=0, saliency=None):
    """``(out, lse)`` from the public ops' method arguments, every value checked."""
    (B, H, Hkv, Tq, Tk, D), scale = _check_call(q, k, v, causal, scale, key_padding_mask)
    logw = row_from = limit = columns = None
    if beta is not None:
        if isinstance(beta, torch.Tensor) and beta.device != q.device:
            raise ValueError(f"beta must be on {q.device} (as q), got {beta.device}")
        logw, columns = anchor_key_log_weights(beta, anchor_positions, anchor_classes, B, H, Tk)
        row_from = reweight_start(reweight_from, B, Tq, q.device)
    if isolation_rows is not None:
        limit = isolation_limit(isolation_rows, isolation_window, B, Tq, Tk, q.device)
    return _run(q, k, v, causal, scale, key_padding_mask, logw, row_from, limit, saliency, None, backend,
                columns=columns)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    isolation_rows: torch.Tensor | None = None,
    isolation_window: int = 0,
    saliency: Saliency | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`attention`, also returning ``lse [B, H, Tq]`` (float32, natural log, ``-inf`` on
    rows that see no key)."""
    return _checked(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, backend=backend,
                    isolation_rows=isolation_rows, isolation_window=isolation_window, saliency=saliency)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    isolation_rows: torch.Tensor | None = None,
    isolation_window: int = 0,
    saliency: Saliency | None = None,
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
        isolation_rows: optional integer ``[B, R]`` absolute positions ``p`` (``-1`` = unused) whose
            information flow is cut (docs/methods.md §3): for query rows at positions ``p .. p + isolation_window``
            the logits of keys ``0 .. p - 1`` are overwritten with ``-1e4`` after scaling and masking
            (a masked key stays masked).
        saliency: optional :class:`~fastattn_icl.ops.saliency.Saliency` request: the backward of this call
            records the information-flow saliency of docs/methods.md §4 into it (``Tq == Tk`` only).
        backend: ``"auto"`` (default: Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``;
            see :mod:`fastattn_icl.ops.backend`.

    Returns:
        ``[B, H, Tq, D]`` in the dtype of ``q``, laid out as ``q`` when ``q`` is contiguous (as SDPA), else as
        ``[B, Tq, H, D]`` in memory (so ``out.transpose(1, 2)`` is contiguous for a Hugging Face model's ``q``;
        :func:`~fastattn_icl.ops._validate.output_like`). A row with no visible key is 0. fp16/bf16 inputs
        accumulate in fp32. Differentiable w.r.t. ``q``, ``k``, ``v``.
    """
    out, _ = attention_with_lse(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, isolation_rows=isolation_rows,
        isolation_window=isolation_window, saliency=saliency, backend=backend,
    )
    return out


def anchor_reweight_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    anchor_positions: torch.Tensor,
    anchor_classes: torch.Tensor,
    *,
    reweight_from: int | torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    isolation_rows: torch.Tensor | None = None,
    isolation_window: int = 0,
    saliency: Saliency | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention with the anchor re-weighting of docs/methods.md §2, fused: post-softmax, numerator only.

    ``P̂[b, h, i, p] = exp(beta[.., h, c]) · P[b, h, i, p]`` for anchor key ``p`` of class ``c`` and the
    re-weighted query rows ``i``; the softmax denominator stays unweighted (no renormalisation) and
    ``O = P̂ V``. With ``beta = 0`` the result is bit-for-bit :func:`attention`'s.

    Args:
        q, k, v, causal, scale, key_padding_mask, isolation_rows, isolation_window, saliency, backend: as in
            :func:`attention` (the saliency sees the re-weighted ``P̂``).
        beta: ``[H, C]`` or ``[B, H, C]`` floating; differentiable (its gradient comes from the fused
            backward).
        anchor_positions: integer ``[B, A]`` key positions of the label words, ``-1`` = unused slot (rows
            may have different numbers of anchors); at least one, none repeated within a row.
        anchor_classes: integer ``[B, A]`` class id in ``[0, C)`` of each anchor.
        reweight_from: the first re-weighted query row: ``None`` = only the last row ``Tq - 1`` (the
            paper's setting), an int, or an integer tensor ``[B]``; every row from it on is re-weighted
            (so decoded tokens keep the re-weighting).

    Returns:
        ``[B, H, Tq, D]`` as :func:`attention`. Differentiable w.r.t. ``q``, ``k``, ``v`` and ``beta``.
    """
    out, _ = _checked(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, backend=backend, beta=beta,
        anchor_positions=anchor_positions, anchor_classes=anchor_classes, reweight_from=reweight_from,
        isolation_rows=isolation_rows, isolation_window=isolation_window, saliency=saliency,
    )
    return out
