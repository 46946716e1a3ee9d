"""The attention backward: ``dQ``, ``dK``, ``dV`` and the anchors' ``d logw`` from ``q, k, v, o, lse`` and ``dO``.

Math (``O`` is the re-weighted output, ``D = rowsum(dO ∘ O)``, ``W = 1`` without anchors)::

    dV = P̂ᵀ dO     dP = dO Vᵀ     dS = P ∘ (W ∘ dP - D)     dQ = scale · dS K     dK = scale · dSᵀ Q
    d logw[k] = Σ_(re-weighted rows i) P̂_ik dP_ik     (summed over the batch per class into dβ by autograd)
    dS = 0 on isolated entries (their logits are constants)

``_attn_bwd_preprocess_kernel`` computes ``D``. ``_attn_bwd_dkdv_kernel`` owns one block of keys of one kv head and
loops over the ``N_REP`` query heads that read it, so GQA needs neither repeated K/V nor atomics;
``_attn_bwd_dq_kernel`` owns one block of query rows. Only ``q, k, v, o, lse`` are saved; ``P`` is recomputed per
tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .primitives import (
    ISOLATION_LOG2,
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
    recompute_probs,
    row_features,
    row_lse,
    store_rows,
    unit_column_stride,
)
from .tuning import PREPROCESS_BLOCK_M, bucket, launch


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA,
                                stride_ob, stride_oh, stride_om, stride_od,
                                stride_dob, stride_doh, stride_dom, stride_dod,
                                H, Tq,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # D = rowsum(dO ∘ O) with the (re-weighted) output O
    pid_m, pid_bh = block_ids(tl.cdiv(Tq, BLOCK_M), HEAVY_FIRST=False)
    b = pid_bh // H
    h = pid_bh % H
    row0 = pid_m * BLOCK_M
    o = load_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, row0, Tq,
                  stride_om, stride_od, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
    do = load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, row0, Tq,
                   stride_dom, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _row_stats(LSE, DELTA, row_base, offs_m, Tq):
    lse = row_lse(LSE, row_base, offs_m, Tq)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Tq, other=0.0)
    return lse, delta


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, dlw, k, v, wk, Qh, DOh, LSE, DELTA, ROW_FROM, ISO, b, row_base, offs_n, lo, hi,
                         stride_qm, stride_qd, stride_dom, stride_dod, stride_isob, Tq, Tk, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_ANCHORS: tl.constexpr, HAS_ISOLATION: tl.constexpr,
                         MASK_BOUNDS: tl.constexpr, MASK_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Row blocks lo .. hi; MASK_BOUNDS: they may reach past Tq, MASK_CAUSAL: they straddle the causal diagonal.
    # Keys past Tk and padded keys are not masked here: each only feeds its own row of dk / dv / dlogw,
    # which the caller drops (past Tk) or zeroes (padded), so the per-iteration mask is unnecessary.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(Qh, start_m, Tq, stride_qm, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=MASK_BOUNDS)
        do = load_rows(DOh, start_m, Tq, stride_dom, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=MASK_BOUNDS)
        lse, delta = _row_stats(LSE, DELTA, row_base, offs_m, Tq)
        rw, iso_lim = row_features(ROW_FROM, ISO, b, offs_m, stride_isob, Tq,
                                   HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        if HAS_ISOLATION:
            iso_t = offs_n[:, None] < iso_lim[None, :]
            s_t = tl.where(iso_t, ISOLATION_LOG2, s_t)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASK_CAUSAL:
            p_t = tl.where(causal_visible(offs_m[None, :], offs_n[:, None], Tq, Tk), p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_ANCHORS:
            w_t = tl.where(rw[None, :], wk[:, None], 1.0)
            pw_t = p_t * w_t
            dlw += tl.sum(tl.where(rw[None, :], pw_t * dp_t, 0.0), 1)
            ds_t = p_t * (w_t * dp_t - delta[None, :])
        else:
            pw_t = p_t
            ds_t = p_t * (dp_t - delta[None, :])
        if HAS_ISOLATION:  # the overwritten logits are constants: no gradient flows through them
            ds_t = tl.where(iso_t, 0.0, ds_t)
        dv += tl.dot(pw_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv, dlw


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KPM, LOGW, DLOGW, ROW_FROM, ISO,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_dom, stride_dod,
                          stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                          stride_kpmb, stride_kpmn, stride_isob,
                          H, HKV, N_REP, Tq, Tk, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          IS_CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
                          HAS_ANCHORS: tl.constexpr, HAS_ISOLATION: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    pid_n, pid_bhk = block_ids(tl.cdiv(Tk, BLOCK_N), HEAVY_FIRST=False)  # causal: block 0 sees the most rows
    b = pid_bhk // HKV
    hk = pid_bhk % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_rows(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh, n0, Tk,
                  stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
    v = load_rows(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh, n0, Tk,
                  stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    keep = offs_n < Tk
    if HAS_PADDING:
        keep = key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, Tk)

    # Row blocks [lo, mid) need the causal mask (and bounds-checked loads), [mid, full_end) no mask at all, and
    # [max(mid, full_end), Tq) only bounds-checked loads. lo: first row that sees key n0;
    # mid: first row block whose rows all see key n0 + BLOCK_N - 1.
    if IS_CAUSAL:
        lo = tl.maximum(n0 - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - (Tk - Tq), 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), tl.maximum(Tq, lo))
    else:
        lo = 0
        mid = 0
    full_end = tl.maximum(Tq // BLOCK_M * BLOCK_M, mid)
    for g in range(0, N_REP):
        h = hk * N_REP + g
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        row_base = (b * H + h).to(tl.int64) * Tq
        dlw = tl.zeros([BLOCK_N], dtype=tl.float32)
        wk = dlw + 1.0
        if HAS_ANCHORS:
            wk = key_weights(LOGW + (b * H + h).to(tl.int64) * Tk, offs_n, Tk)
        dk, dv, dlw = _attn_bwd_dkdv_inner(dk, dv, dlw, k, v, wk, Qh, DOh, LSE, DELTA, ROW_FROM, ISO, b, row_base,
                                           offs_n, lo, mid, stride_qm, stride_qd, stride_dom, stride_dod,
                                           stride_isob, Tq, Tk, qk_scale,
                                           HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                                           HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION,
                                           MASK_BOUNDS=True, MASK_CAUSAL=True, DOT_PRECISION=DOT_PRECISION)
        dk, dv, dlw = _attn_bwd_dkdv_inner(dk, dv, dlw, k, v, wk, Qh, DOh, LSE, DELTA, ROW_FROM, ISO, b, row_base,
                                           offs_n, mid, full_end, stride_qm, stride_qd, stride_dom, stride_dod,
                                           stride_isob, Tq, Tk, qk_scale,
                                           HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                                           HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION,
                                           MASK_BOUNDS=False, MASK_CAUSAL=False, DOT_PRECISION=DOT_PRECISION)
        dk, dv, dlw = _attn_bwd_dkdv_inner(dk, dv, dlw, k, v, wk, Qh, DOh, LSE, DELTA, ROW_FROM, ISO, b, row_base,
                                           offs_n, full_end, Tq, stride_qm, stride_qd, stride_dom, stride_dod,
                                           stride_isob, Tq, Tk, qk_scale,
                                           HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
                                           HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION,
                                           MASK_BOUNDS=True, MASK_CAUSAL=False, DOT_PRECISION=DOT_PRECISION)
        if HAS_ANCHORS:
            tl.store(DLOGW + (b * H + h).to(tl.int64) * Tk + offs_n, tl.where(keep, dlw, 0.0), mask=offs_n < Tk)
    if HAS_PADDING:
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    store_rows(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh, n0, Tk, stride_dkn, stride_dkd,
               dk * sm_scale, BLOCK_N, HEAD_DIM, BLOCK_D)
    store_rows(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh, n0, Tk, stride_dvn, stride_dvd,
               dv, BLOCK_N, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, rw, iso_lim, K, V, KPM, LOGWh, b, offs_m, lo, hi,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_PADDING: tl.constexpr, HAS_ANCHORS: tl.constexpr, HAS_ISOLATION: tl.constexpr,
                       MASK_BOUNDS: tl.constexpr, MASK_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Key blocks lo .. hi; MASK_BOUNDS: they may reach past Tk, MASK_CAUSAL: they straddle the causal diagonal.
    # Keys past Tk load as 0 and so add 0 to dq: only the causal and padding masks matter here.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K, start_n, Tk, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BOUNDS=MASK_BOUNDS)
        v = load_rows(V, start_n, Tk, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BOUNDS=MASK_BOUNDS)
        p, iso = recompute_probs(q, k, lse, iso_lim, offs_n, qk_scale, HAS_ISOLATION=HAS_ISOLATION,
                                 DOT_PRECISION=DOT_PRECISION)
        if MASK_CAUSAL:
            p = tl.where(causal_visible(offs_m[:, None], offs_n[None, :], Tq, Tk), p, 0.0)
        if HAS_PADDING:
            p = tl.where(key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, Tk)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_ANCHORS:
            ds = p * (tl.where(rw[:, None], key_weights(LOGWh, offs_n, Tk)[None, :], 1.0) * dp - delta[:, None])
        else:
            ds = p * (dp - delta[:, None])
        if HAS_ISOLATION:
            ds = tl.where(iso, 0.0, ds)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KPM, LOGW, ROW_FROM, ISO,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                        stride_kpmb, stride_kpmn, stride_isob,
                        H, N_REP, Tq, Tk, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
                        HAS_ANCHORS: tl.constexpr, HAS_ISOLATION: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    pid_m, pid_bh = block_ids(tl.cdiv(Tq, BLOCK_M), HEAVY_FIRST=IS_CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // N_REP
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    LOGWh = LOGW + pid_bh.to(tl.int64) * Tk
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    q = load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, row0, Tq,
                  stride_qm, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
    do = load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, row0, Tq,
                   stride_dom, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_BOUNDS=True)
    lse, delta = _row_stats(LSE, DELTA, pid_bh.to(tl.int64) * Tq, offs_m, Tq)
    rw, iso_lim = row_features(ROW_FROM, ISO, b, offs_m, stride_isob, Tq,
                               HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = causal_bounds(row0, Tq, Tk, BLOCK_M, BLOCK_N, IS_CAUSAL=IS_CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, rw, iso_lim, K, V, KPM, LOGWh, b, offs_m, 0, full_end,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                            HAS_PADDING=HAS_PADDING, HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION,
                            MASK_BOUNDS=False, MASK_CAUSAL=False, DOT_PRECISION=DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, rw, iso_lim, K, V, KPM, LOGWh, b, offs_m, full_end, hi,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                            HAS_PADDING=HAS_PADDING, HAS_ANCHORS=HAS_ANCHORS, HAS_ISOLATION=HAS_ISOLATION,
                            MASK_BOUNDS=True, MASK_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION)
    store_rows(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, row0, Tq, stride_dqm, stride_dqd,
               dq * sm_scale, BLOCK_M, HEAD_DIM, BLOCK_D)


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
                  causal: bool, scale: float, key_weight_columns=None):
    """Launch the backward. Returns ``dq, dk, dv`` with the shapes (and strides) of ``q, k, v`` and
    ``dlogw [B, H, Tk]`` float32 (``None`` without anchors), every column of it (``key_weight_columns``, the
    columns the caller needs, is not used: the dk/dv kernel forms each column's sum at no extra cost)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    do = unit_column_stride(do)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # every element is written by the dkdv kernel
    dlogw = None if key_log_weights is None else torch.empty(B, H, Tk, dtype=torch.float32, device=q.device)
    if Tk == 0:
        return dq.zero_(), dk, dv, dlogw
    if Tq == 0:
        return dq, dk.zero_(), dv.zero_(), None if dlogw is None else dlogw.zero_()
    BLOCK_D = block_d(D)
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Tq, PREPROCESS_BLOCK_M) * B * H,)](
        o, do, delta, *o.stride(), *do.stride(), H, Tq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=PREPROCESS_BLOCK_M,
    )
    kpm, s_kpmb, s_kpmn = kpm_args(key_padding_mask, q)
    (logw, row_from, iso, s_isob), method_flags = method_args(key_log_weights, reweight_from, isolation_limit, q)
    flags = dict(
        HEAD_DIM=D, BLOCK_D=BLOCK_D, IS_CAUSAL=causal, HAS_PADDING=key_padding_mask is not None,
        DOT_PRECISION=dot_precision(q), **method_flags,
    )
    launch(
        "dkdv", _attn_bwd_dkdv_kernel, q, lambda bm, bn: (triton.cdiv(Tk, bn) * B * Hkv,),
        q, k, v, do, dk, dv, lse, delta, kpm, logw, logw if dlogw is None else dlogw, row_from, iso,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), s_kpmb, s_kpmn, s_isob,
        H, Hkv, H // Hkv, Tq, Tk, log2_scale(scale), scale, bucket(Tq), bucket(Tk), **flags,
    )
    launch(
        "dq", _attn_bwd_dq_kernel, q, lambda bm, bn: (triton.cdiv(Tq, bm) * B * H,),
        q, k, v, do, dq, lse, delta, kpm, logw, row_from, iso,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), s_kpmb, s_kpmn, s_isob,
        H, H // Hkv, Tq, Tk, log2_scale(scale), scale, bucket(Tq), bucket(Tk), **flags,
    )
    return dq, dk, dv, dlogw
