"""The saliency reduction of the attention backward (docs/methods.md §4), one more kernel of the family.

``I = |Σ_h P̂_h ∘ dO_h V_hᵀ|`` needs every head of a ``(query block, key block)`` tile at once (heads are summed
before the absolute value), which the per-head dk/dv and dq programs never hold, so a backward that records it
launches ``_attn_bwd_saliency_kernel``: a program owns a block of query rows and every ``N_SPLIT``-th key block,
loops over all heads per tile (recomputing ``P`` from ``lse`` and ``dP = dO Vᵀ``: two of the backward's dot
products again) and reduces ``I`` on the fly to the flow-score numerators (``PER_HEAD``: also per head;
``STORE_ROWS``: selected rows of ``I``). Partial sums go to per-program slots summed on the host: deterministic, no
atomics, memory linear in ``T``. dq, dk, dv are computed exactly as without it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .primitives import (
    block_d,
    causal_bounds,
    causal_visible,
    dot_precision,
    key_keep,
    key_weights,
    kpm_args,
    load_rows,
    log2_scale,
    method_args,
    placeholder,
    recompute_probs,
    row_features,
    row_lse,
    unit_column_stride,
)
from .tuning import bucket, candidates, launch


@triton.jit
def _add_scalar(ptr, x):
    # one float32 partial sum owned by this program (zeroed by the launcher): no atomics, deterministic
    tl.store(ptr, tl.load(ptr) + x)


@triton.jit
def _attn_bwd_saliency_kernel(Q, K, V, DO, LSE, KPM, LOGW, ROW_FROM, ISO, LABEL, TARGET, ROW_SLOT,
                              SUMS, HEAD_SUMS, ROWS,
                              stride_qb, stride_qh, stride_qm, stride_qd,
                              stride_kb, stride_kh, stride_kn, stride_kd,
                              stride_vb, stride_vh, stride_vn, stride_vd,
                              stride_dob, stride_doh, stride_dom, stride_dod,
                              stride_kpmb, stride_kpmn, stride_isob, stride_lblb, stride_slotb,
                              B, H, N_REP, T, N_SPLIT, N_ROWS, qk_scale, TQ_BUCKET, TK_BUCKET,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              IS_CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
                              HAS_ANCHORS: tl.constexpr, HAS_ISOLATION: tl.constexpr,
                              PER_HEAD: tl.constexpr, STORE_ROWS: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    # Saliency I = |Σ_h P̂_h ∘ dP_h| (dP = dO Vᵀ) of one block of query rows against every N_SPLIT-th key
    # block, all heads of a tile summed before the absolute value; reduced on the fly to the flow-score
    # numerators of this program: Σ over label rows i of Σ_(j<i) I, Σ over label columns of I[target],
    # and Σ_(j<i<=target) I. Optionally the same three per head of |P̂_h ∘ dP_h| and rows of I.
    n_m = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    split = pid % N_SPLIT
    b = (pid // N_SPLIT) % B
    pid_m = pid // (N_SPLIT * B)
    if IS_CAUSAL:  # the last query blocks see the most keys: start them first
        pid_m = n_m - 1 - pid_m
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    target = tl.load(TARGET + b)
    label_m = tl.load(LABEL + b.to(tl.int64) * stride_lblb + offs_m, mask=row_ok, other=0) != 0
    slot = offs_m * 0 - 1
    if STORE_ROWS:  # slot r >= 0: row i of I goes to ROWS[b, r]
        slot = tl.load(ROW_SLOT + b.to(tl.int64) * stride_slotb + offs_m, mask=row_ok, other=-1)
    rw, iso_lim = row_features(ROW_FROM, ISO, b, offs_m, stride_isob, T,
                               HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION)
    # named, not `_`: Triton types a loop-carried name by its first binding (an int here), and the probs'
    # isolation tile below (a bool tile) would rebind `_` inside the loop, which no CUDA target compiles
    _full_end, hi = causal_bounds(row0, T, T, BLOCK_M, BLOCK_N, IS_CAUSAL=IS_CAUSAL)
    lower_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_(j<i) I[i, j]
    label_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ over label columns j of I[i, j]
    part = (pid_m.to(tl.int64) * B + b) * N_SPLIT + split  # this program's slot in the partial sums
    for start_n in range(split * BLOCK_N, hi, N_SPLIT * BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        vis = row_ok[:, None] & (offs_n[None, :] < T)
        if IS_CAUSAL:
            vis = vis & causal_visible(offs_m[:, None], offs_n[None, :], T, T)
        if HAS_PADDING:
            vis = vis & key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, T)[None, :]
        lower = (offs_n[None, :] < offs_m[:, None]) & (offs_m[:, None] <= target)
        label_n = tl.load(LABEL + b.to(tl.int64) * stride_lblb + offs_n, mask=offs_n < T, other=0) != 0
        sal = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(0, H):
            h = tl.cast(g, tl.int64)
            hk = h // N_REP
            q = load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, row0, T,
                          stride_qm, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
            do = load_rows(DO + b.to(tl.int64) * stride_dob + h * stride_doh, row0, T,
                           stride_dom, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
            k = load_rows(K + b.to(tl.int64) * stride_kb + hk * stride_kh, start_n, T,
                          stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
            v = load_rows(V + b.to(tl.int64) * stride_vb + hk * stride_vh, start_n, T,
                          stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
            lse = row_lse(LSE, (b * H + h) * T, offs_m, T)
            p, _iso = recompute_probs(q, k, lse, iso_lim, offs_n, qk_scale, HAS_ISOLATION=HAS_ISOLATION,
                                      DOT_PRECISION=DOT_PRECISION)
            p = tl.where(vis, p, 0.0)
            if HAS_ANCHORS:  # the probe sits on the weights that multiply V: the re-weighted P̂
                wk = key_weights(LOGW + (b * H + h) * T, offs_n, T)
                p = p * tl.where(rw[:, None], wk[None, :], 1.0)
            c = p * tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            sal += c
            if PER_HEAD:
                a = tl.abs(c)
                a_lower = tl.sum(tl.where(lower, a, 0.0), 1)
                a_label = tl.sum(tl.where(label_n[None, :], a, 0.0), 1)
                hbase = HEAD_SUMS + (part * H + h) * 3
                _add_scalar(hbase, tl.sum(tl.where(label_m, a_lower, 0.0), 0))
                _add_scalar(hbase + 1, tl.sum(tl.where(offs_m == target, a_label, 0.0), 0))
                _add_scalar(hbase + 2, tl.sum(a_lower, 0))
        sal = tl.abs(sal)
        lower_sum += tl.sum(tl.where(lower, sal, 0.0), 1)
        label_sum += tl.sum(tl.where(label_n[None, :], sal, 0.0), 1)
        if STORE_ROWS:
            ptrs = ROWS + (b.to(tl.int64) * N_ROWS + slot[:, None]) * T + offs_n[None, :]
            tl.store(ptrs, sal, mask=(slot[:, None] >= 0) & (offs_n[None, :] < T))
    tl.store(SUMS + part * 3, tl.sum(tl.where(label_m, lower_sum, 0.0), 0))
    tl.store(SUMS + part * 3 + 1, tl.sum(tl.where(offs_m == target, label_sum, 0.0), 0))
    tl.store(SUMS + part * 3 + 2, tl.sum(lower_sum, 0))


def _saliency_split(q: torch.Tensor, B: int, T: int) -> int:
    """How many programs share one block of query rows (each takes every N-th key block): enough for about
    two programs per SM at the largest row block. Under the interpreter 2, so the split path is tested."""
    if q.device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(triton.cdiv(T, 16), triton.cdiv(2 * sms, B * triton.cdiv(T, 128))))


def attention_saliency(do, q, k, v, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
                       causal: bool, scale: float, label_mask, target, *, per_head: bool = False, row_slot=None,
                       rows=None):
    """Launch the saliency reduction of the backward (docs/methods.md §4) for self-attention (``Tq == Tk == T``).

    ``I = |Σ_h P̂_h ∘ (dO_h V_hᵀ)|`` is formed per tile from ``q, k, v, dO, lse`` and reduced on the fly;
    it never exists in memory unless rows of it are asked for.

    Args:
        label_mask: ``[B, T]`` uint8, nonzero at the label-word positions; target: int32 ``[B]``, the
            target row ``q`` (every label position before it).
        per_head: also return the per-head sums of ``|P̂_h ∘ dP_h|``.
        row_slot, rows: optional int32 ``[B, T]`` (``-1`` = not stored) and float32 ``[B, R, T]`` (zeros):
            row ``i`` of ``I`` is written to ``rows[b, row_slot[b, i]]``.

    Returns:
        ``sums [B, 3]`` float32: ``Σ_(label rows i) Σ_(j<i) I``, ``Σ_(label columns j) I[target, j]``,
        ``Σ_(j<i<=target) I`` (the diagonal never counts); ``head_sums [B, H, 3]`` (the same per head of
        ``|P̂_h ∘ dP_h|``) or ``None``.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    do = unit_column_stride(do)
    n_split = _saliency_split(q, B, T)
    min_bm = min(c[0] for c in candidates("saliency", block_d(D), q.element_size())) if q.is_cuda else 16
    n_parts = triton.cdiv(T, min_bm) * B * n_split
    sums = torch.zeros(n_parts, 3, dtype=torch.float32, device=q.device)
    head_sums = torch.zeros(n_parts, H, 3, dtype=torch.float32, device=q.device) if per_head else sums
    store_rows = rows is not None
    if not store_rows:
        row_slot = rows = placeholder(q.device, torch.int32)
    kpm, s_kpmb, s_kpmn = kpm_args(key_padding_mask, q)
    (logw, row_from, iso, s_isob), method_flags = method_args(key_log_weights, reweight_from, isolation_limit, q)
    launch(
        "saliency", _attn_bwd_saliency_kernel, q, lambda bm, bn: (triton.cdiv(T, bm) * B * n_split,),
        q, k, v, do, lse, kpm, logw, row_from, iso, label_mask, target, row_slot, sums, head_sums, rows,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), s_kpmb, s_kpmn, s_isob,
        label_mask.stride(0), row_slot.stride(0) if store_rows else 0,
        B, H, H // Hkv, T, n_split, rows.shape[1] if store_rows else 0, log2_scale(scale), bucket(T), bucket(T),
        HEAD_DIM=D, BLOCK_D=block_d(D), IS_CAUSAL=causal, HAS_PADDING=key_padding_mask is not None,
        PER_HEAD=per_head, STORE_ROWS=store_rows, DOT_PRECISION=dot_precision(q), **method_flags,
    )
    total = sums.view(-1, B, n_split, 3).sum(dim=(0, 2))
    return total, (head_sums.view(-1, B, n_split, H, 3).sum(dim=(0, 2)) if per_head else None)
