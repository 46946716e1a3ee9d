"""The attention forward: ``O = softmax(scale · Q Kᵀ) V`` and ``lse`` per row, with the family's method flags.

The online softmax walks a row block's keys in blocks of ``BLOCK_N``: first the blocks every row sees in full
(no mask), then the blocks that straddle the causal diagonal or the sequence end (masked).

- ``HAS_ANCHORS`` (docs/methods.md §2): on re-weighted rows the numerator is multiplied by ``W = exp(logw)`` per key
  after the softmax; the denominator ``l`` stays unweighted, so ``O = (W ∘ P) V``.
- ``HAS_ISOLATION`` (docs/methods.md §3): keys ``j < limit[row]`` get the logit ``-1e4`` after scaling and masking.
- Shared prefix (``HAS_PREFIX``, docs/methods.md §5 serving of a compressed demonstration cache; method features off):
  keys ``PK/PV [B, Hkv, Tp, D]`` logically precede ``K/V`` and every query row sees all of them (no causal or padding
  mask: causality is bottom-right over ``K`` alone, which puts every query after the prefix). They are read
  through their own strides, so a prefix shared by the whole batch is one ``[1, Hkv, Tp, D]`` copy expanded with
  batch stride 0: a batch of test inputs never materialises it ``B`` times. The online softmax runs over the
  prefix blocks first, then over ``K``, so the result is attention over the concatenation.
- Momentum epilogue (``HAS_MOMENTUM``, docs/methods.md §6; method features off): ``O = attention + M`` with
  ``M [B, Hkv, Tq, D]`` (float32, from the decayed-sum scan in ``momentum.py``) added per kv head before the
  store; ``STORE_ATTN`` also stores the attention part, which the backward uses as its ``o``
  (``D = rowsum(dO ∘ O_attn)``; ``O - M`` rounded to the output dtype would lose the attention part under a
  large ``M``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .primitives import (
    ISOLATION_LOG2,
    LN2,
    block_d,
    block_ids,
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
    row_features,
    store_rows,
)
from .tuning import bucket, launch


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, LOGWh, b, offs_m, rw, iso_lim, lo, hi,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmb, stride_kpmn,
                    Tq, Tk, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_PADDING: tl.constexpr, HAS_ANCHORS: tl.constexpr, HAS_ISOLATION: tl.constexpr,
                    MASK_BOUNDS: tl.constexpr, MASK_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Key blocks lo .. hi; MASK_BOUNDS: they may reach past Tk, MASK_CAUSAL: they straddle the causal diagonal
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K, start_n, Tk, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BOUNDS=MASK_BOUNDS)
        v = load_rows(V, start_n, Tk, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BOUNDS=MASK_BOUNDS)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASK_BOUNDS or MASK_CAUSAL:  # both masks in one select
            vis = offs_n[None, :] < Tk
            if MASK_CAUSAL:
                vis = vis & causal_visible(offs_m[:, None], offs_n[None, :], Tq, Tk)
            s = tl.where(vis, s, float("-inf"))
        if HAS_PADDING:
            s = tl.where(key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, Tk)[None, :], s, float("-inf"))
        if HAS_ISOLATION:  # overwrite (not add) after scaling and masking; a masked key stays masked
            s = tl.where((offs_n[None, :] < iso_lim[:, None]) & (s != float("-inf")), ISOLATION_LOG2, s)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator stays unweighted
        if HAS_ANCHORS:  # post-softmax re-weighting of the numerator only
            p = p * tl.where(rw[:, None], key_weights(LOGWh, offs_n, Tk)[None, :], 1.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KPM, LOGW, ROW_FROM, ISO, PK, PV, MOM, OA,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_om, stride_od,
                     stride_kpmb, stride_kpmn, stride_isob,
                     stride_pkb, stride_pkh, stride_pkn, stride_pkd,
                     stride_pvb, stride_pvh, stride_pvn, stride_pvd,
                     stride_mb, stride_mh, stride_mm, stride_md,
                     stride_oab, stride_oah, stride_oam, stride_oad,
                     H, N_REP, Tq, Tk, Tp, qk_scale, TQ_BUCKET, TK_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
                     HAS_ANCHORS: tl.constexpr, HAS_ISOLATION: tl.constexpr,
                     HAS_PREFIX: tl.constexpr, HAS_MOMENTUM: tl.constexpr, STORE_ATTN: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    pid_m, pid_bh = block_ids(tl.cdiv(Tq, BLOCK_M), HEAVY_FIRST=IS_CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // N_REP
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    LOGWh = LOGW + pid_bh.to(tl.int64) * Tk  # [B, H, Tk] contiguous; only read with HAS_ANCHORS

    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    q = load_rows(Q, row0, Tq, stride_qm, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
    rw, iso_lim = row_features(ROW_FROM, ISO, b, offs_m, stride_isob, Tq,
                               HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_PREFIX:
        # shared prefix keys 0 .. Tp - 1 come before every key of K and are visible to every query row (no
        # causal or padding mask; only the tail block is bounds-masked); PK/PV may have batch stride 0, so a
        # batch reads one copy of the prefix
        PKb = PK + b.to(tl.int64) * stride_pkb + hk.to(tl.int64) * stride_pkh
        PVb = PV + b.to(tl.int64) * stride_pvb + hk.to(tl.int64) * stride_pvh
        p_full = Tp // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, PKb, PVb, KPM, LOGWh, b, offs_m, rw, iso_lim, 0, p_full,
                                        stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                                        stride_kpmb, stride_kpmn, Tq, Tp, qk_scale,
                                        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                                        HAS_PADDING=False, HAS_ANCHORS=False, HAS_ISOLATION=False,
                                        MASK_BOUNDS=False, MASK_CAUSAL=False, DOT_PRECISION=DOT_PRECISION)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, PKb, PVb, KPM, LOGWh, b, offs_m, rw, iso_lim, p_full, Tp,
                                        stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                                        stride_kpmb, stride_kpmn, Tq, Tp, qk_scale,
                                        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                                        HAS_PADDING=False, HAS_ANCHORS=False, HAS_ISOLATION=False,
                                        MASK_BOUNDS=True, MASK_CAUSAL=False, DOT_PRECISION=DOT_PRECISION)
    full_end, hi = causal_bounds(row0, Tq, Tk, BLOCK_M, BLOCK_N, IS_CAUSAL=IS_CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, LOGWh, b, offs_m, rw, iso_lim, 0, full_end,
                                    stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                                    HAS_PADDING=HAS_PADDING, HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION,
                                    MASK_BOUNDS=False, MASK_CAUSAL=False, DOT_PRECISION=DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, LOGWh, b, offs_m, rw, iso_lim, full_end, hi,
                                    stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                                    HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                                    HAS_PADDING=HAS_PADDING, HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION,
                                    MASK_BOUNDS=True, MASK_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION)

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    if HAS_MOMENTUM:
        # MoAttn epilogue: O = attention + M (M [B, Hkv, Tq, D] float32, shared by the kv head's query heads); the
        # attention part alone is kept for the backward when STORE_ATTN
        if STORE_ATTN:
            OA += b.to(tl.int64) * stride_oab + h.to(tl.int64) * stride_oah
            store_rows(OA, row0, Tq, stride_oam, stride_oad, o, BLOCK_M, HEAD_DIM, BLOCK_D)
        MOM += b.to(tl.int64) * stride_mb + hk.to(tl.int64) * stride_mh
        o = o + load_rows(MOM, row0, Tq, stride_mm, stride_md, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
    store_rows(O, row0, Tq, stride_om, stride_od, o, BLOCK_M, HEAD_DIM, BLOCK_D)
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


def attention_fwd(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal: bool,
                  scale: float, *, prefix=None, key_weight_columns=None):
    """Launch the forward. Returns ``o`` (``[B, H, Tq, D]``, laid out as :func:`_output_like`) and
    ``lse [B, H, Tq]`` float32 (contiguous). Method inputs (``None`` = feature off): see :func:`method_args`;
    ``key_weight_columns`` is not needed here (the kernel reads the weight of every key it loads).
    ``prefix``: ``None`` or the shared prefix ``(pk, pv)``, each ``[B, Hkv, Tp, D]`` with any strides (batch stride 0
    for one copy), whose keys come before ``k`` and are visible to every query row (method features must be off)."""
    out, lse, _ = _forward(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal, scale,
                           prefix=prefix)
    return out, lse


def momentum_attention_fwd(q, k, v, key_padding_mask, causal: bool, scale: float, momentum: torch.Tensor,
                           store_attn: bool):
    """``(out, lse, out_attn)``: the forward kernel with ``momentum [B, Hkv, Tq, D]`` (float32, from the
    decayed-sum scan of :mod:`fastattn_icl._triton.momentum`) added in its epilogue; ``out_attn`` holds the attention
    part when ``store_attn`` (the backward's ``o``), else it is an empty tensor."""
    out, lse, out_attn = _forward(q, k, v, key_padding_mask, None, None, None, causal, scale, momentum=momentum,
                                  store_attn=store_attn)
    return out, lse, (out_attn if store_attn else q.new_empty(0))


def _output_like(q):
    """The layout the ops promise (``fastattn_icl.ops._validate.output_like``, which kernels may not import): ``q``'s
    when ``q`` is contiguous, else ``[B, Tq, H, D]`` memory."""
    B, H, Tq, D = q.shape
    if q.is_contiguous():
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    return torch.empty(B, Tq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)


def _forward(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal: bool, scale: float,
             *, prefix=None, momentum=None, store_attn: bool = False):
    # (out, lse, out_attn): out_attn is like out and holds the attention part alone when store_attn, else None
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = _output_like(q)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    out_attn = _output_like(q) if store_attn else None
    if Tq == 0:
        return out, lse, out_attn
    kpm, s_kpmb, s_kpmn = kpm_args(key_padding_mask, q)
    (logw, row_from, iso, s_isob), method_flags = method_args(key_log_weights, reweight_from, isolation_limit, q)
    pk, pv = prefix if prefix is not None else (k, v)  # never read without HAS_PREFIX
    Tp = pk.shape[2] if prefix is not None else 0
    mom = momentum if momentum is not None else placeholder(q.device, torch.float32).view(1, 1, 1, 1)
    oa = out_attn if store_attn else out  # never written without STORE_ATTN
    launch(
        "fwd", _attn_fwd_kernel, q, lambda bm, bn: (triton.cdiv(Tq, bm) * B * H,),
        q, k, v, out, lse, kpm, logw, row_from, iso, pk, pv, mom, oa,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), s_kpmb, s_kpmn, s_isob, *pk.stride(), *pv.stride(),
        *mom.stride(), *oa.stride(),
        H, H // Hkv, Tq, Tk, Tp, log2_scale(scale), bucket(Tq), bucket(Tp + Tk),  # tuned on all the keys read
        HEAD_DIM=D, BLOCK_D=block_d(D), IS_CAUSAL=causal, HAS_PADDING=key_padding_mask is not None,
        HAS_PREFIX=prefix is not None, HAS_MOMENTUM=momentum is not None, STORE_ATTN=store_attn,
        DOT_PRECISION=dot_precision(q), **method_flags,
    )
    return out, lse, out_attn
