"""Flash attention forward and backward in Triton: the one kernel family every ICL method extends.

Math (per batch ``b``, query head ``h``, kv head ``h // N_REP``)::

    S = scale · Q Kᵀ            masked to -inf where not visible
    P = softmax(S)              lse = logsumexp(S) per row (natural log, saved for the backward)
    O = P V

Visibility: bottom-right causal (row ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``) when
``IS_CAUSAL``, and the key-padding mask ``[B, Tk]`` (nonzero = keep) when ``HAS_PADDING``. A row that
sees no key returns 0 and ``lse = -inf``; no NaN is ever produced.

Method flags (both off = plain attention, same code path):

- ``HAS_ANCHORS`` (SPEC §2): per-key log-weights ``logw [B, H, Tk]`` (β of the anchor's class at anchor
  keys, 0 elsewhere) and the first re-weighted query row ``[B]``. On re-weighted rows
  ``P̂ = W ∘ P`` with ``W = exp(logw)``: the numerator only, the softmax denominator stays unweighted.
- ``HAS_ISOLATION`` (SPEC §3): a per-row column limit ``[B, Tq]``; keys ``j < limit`` get the logit
  ``-1e4`` (overwritten, after scaling and masking; a masked key stays masked).

Backward (``O`` is the re-weighted output, ``D = rowsum(dO ∘ O)``, ``W = 1`` without anchors)::

    dV = P̂ᵀ dO     dP = dO Vᵀ     dS = P ∘ (W ∘ dP - D)     dQ = scale · dS K     dK = scale · dSᵀ Q
    d logw[k] = Σ_(re-weighted rows i) P̂_ik dP_ik     (summed over the batch per class into dβ by autograd)
    dS = 0 on isolated entries (their logits are constants)

``_attn_bwd_dkdv_kernel`` owns one block of keys of one kv head and loops over the ``N_REP`` query
heads that read it, so GQA needs neither repeated K/V nor atomics; ``_attn_bwd_dq_kernel`` owns one
block of query rows. Only ``q, k, v, o, lse`` are saved; ``P`` is recomputed per tile.

Constraints: fp16, bf16 or fp32 inputs (fp32 accumulation always; fp32 dots use tf32x3 on a GPU, three
tf32 passes with close to fp32 accuracy, never plain tf32); head dim 8..256, padded to a power of two
``BLOCK_D`` with masked loads; any sequence lengths; arbitrary strides on every tensor (row offsets are
taken in int64). Grids are flat (``blocks x batch x heads`` on axis 0), so batch x heads is not capped
at 65535, and causal programs start with the query blocks that see the most keys.

Feature flags are ``tl.constexpr`` so a flag that is off compiles away: ``IS_CAUSAL``,
``HAS_PADDING``, ``HAS_ANCHORS``, ``HAS_ISOLATION``, ``HAS_PREFIX``, ``HAS_MOMENTUM``.

Momentum epilogue (``HAS_MOMENTUM``, SPEC §6): ``O = attention + M`` with ``M [B, Hkv, Tq, D]`` (float32, from the
decayed-sum scan in ``momentum.py``) added per kv head before the store; ``STORE_ATTN`` also stores the attention
part, which the backward uses as its ``o`` (``D = rowsum(dO ∘ O_attn)``; ``O - M`` rounded to the output dtype
would lose the attention part under a large ``M``).

Shared prefix (``HAS_PREFIX``, forward only; SPEC §5 serving of a compressed demonstration cache): keys
``PK/PV [B, Hkv, Tp, D]`` logically precede ``K/V`` and every query row sees all of them (no causal or
padding mask: causality is bottom-right over ``K`` alone, which puts every query after the prefix). They
are read through their own strides, so a prefix shared by the whole batch is one ``[1, Hkv, Tp, D]`` copy
expanded with batch stride 0: a batch of test inputs never materialises it ``B`` times. The online softmax
runs over the prefix blocks first, then over ``K``, so the result is attention over the concatenation.

Saliency (SPEC §4, ``_attn_bwd_saliency_kernel``): ``I = |Σ_h P̂_h ∘ dO_h V_hᵀ|`` needs every head of a
``(query block, key block)`` tile at once (heads are summed before the absolute value), which the per-head
dk/dv and dq programs never hold, so a backward that records it launches one more kernel of this family:
a program owns a block of query rows and every ``N_SPLIT``-th key block, loops over all heads per tile
(recomputing ``P`` from ``lse`` and ``dP = dO Vᵀ``: two of the backward's dot products again) and reduces
``I`` on the fly to the flow-score numerators (``PER_HEAD``: also per head; ``STORE_ROWS``: selected rows of
``I``). Partial sums go to per-program slots summed on the host: deterministic, no atomics, memory linear
in ``T``. dq, dk, dv are computed exactly as without it.

Caveat: under ``TRITON_INTERPRET=1`` a ``tl.dot`` on bf16 operands is wrong (triton 3.9), so bf16 is
only exercised on a GPU.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634  # the kernels work in log2 units: exp(x) = exp2(x · log2(e))
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
ISOLATION_VALUE = -1e4  # SPEC §3: isolated logits are overwritten with this constant
ISOLATION_LOG2 = tl.constexpr(ISOLATION_VALUE * _LOG2E)  # the same logit in the kernels' log2 units


@triton.jit
def _load_rows(base, row0, n_rows, stride_r, stride_d, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    # [BLOCK_R, BLOCK_D] tile of rows row0 .. row0 + BLOCK_R; the row offset is taken in int64 once so
    # tile-local offsets stay int32 even when T · stride_r passes 2^31
    ptr = base + tl.cast(row0, tl.int64) * stride_r
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if MASK_ROWS:
        return tl.load(ptrs, mask=(offs_r[:, None] < n_rows - row0) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store_rows(base, row0, n_rows, stride_r, stride_d, x, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    ptr = base + tl.cast(row0, tl.int64) * stride_r
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, x.to(base.dtype.element_ty),
             mask=(offs_r[:, None] < n_rows - row0) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _causal_visible(rows, cols, Tq, Tk):
    # bool, broadcast of rows x cols (either orientation): bottom-right aligned causal visibility
    return cols <= rows + (Tk - Tq)


@triton.jit
def _key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, Tk):
    # [BLOCK_N] bool from the key-padding mask (nonzero = keep); keys past Tk are not kept
    keep = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_n * stride_kpmn, mask=offs_n < Tk, other=0)
    return keep != 0


@triton.jit
def _causal_bounds(row0, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    # For query rows row0 .. row0 + BLOCK_M: key blocks [0, full_end) are inside Tk and visible to every
    # row (no mask needed); blocks [full_end, hi) need the causal / bounds mask; keys >= hi are unseen.
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(Tk, row0 + BLOCK_M + (Tk - Tq)), 0)
        full_end = tl.maximum(tl.minimum(row0 + (Tk - Tq) + 1, Tk), 0) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full_end = Tk // BLOCK_N * BLOCK_N
    return full_end, hi


@triton.jit
def _block_ids(n_blocks, HEAVY_FIRST: tl.constexpr):
    # one flat grid axis (the y/z axes cap at 65535 programs): (block, batch·head) with the block index
    # varying fastest, so programs of one head run together and share its K/V in L2
    pid = tl.program_id(0)
    blk = pid % n_blocks
    if HEAVY_FIRST:  # causal: the last query blocks see the most keys; start them first
        blk = n_blocks - 1 - blk
    return blk, pid // n_blocks


@triton.jit
def _row_features(ROW_FROM, ISO, b, offs_m, stride_isob, Tq, HAS_ANCHORS: tl.constexpr,
                  HAS_ISOLATION: tl.constexpr):
    # per query row: re-weighted? (row >= reweight_from[b]) and the isolation column limit (keys j < limit
    # of an isolated row are overwritten); both are placeholders when their feature is off
    rw = offs_m < 0
    iso_lim = offs_m * 0
    if HAS_ANCHORS:
        rw = (offs_m >= tl.load(ROW_FROM + b)) & (offs_m < Tq)
    if HAS_ISOLATION:
        iso_lim = tl.load(ISO + b.to(tl.int64) * stride_isob + offs_m, mask=offs_m < Tq, other=0)
    return rw, iso_lim


@triton.jit
def _key_weights(LOGWh, offs_n, Tk):
    # [BLOCK_N] post-softmax weights exp(logw) of the keys (1 for keys that are not anchors)
    return tl.math.exp2(tl.load(LOGWh + offs_n, mask=offs_n < Tk, other=0.0) * LOG2E)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, LOGWh, b, offs_m, rw, iso_lim, lo, hi,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmb, stride_kpmn,
                    Tq, Tk, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_ANCHORS: tl.constexpr,
                    HAS_ISOLATION: tl.constexpr, MASK_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, start_n, Tk, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BLOCK)
        v = _load_rows(V, start_n, Tk, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BLOCK)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASK_BLOCK:
            vis = offs_n[None, :] < Tk
            if IS_CAUSAL:
                vis = vis & _causal_visible(offs_m[:, None], offs_n[None, :], Tq, Tk)
            s = tl.where(vis, s, float("-inf"))
        if HAS_PADDING:
            s = tl.where(_key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, Tk)[None, :], s, float("-inf"))
        if HAS_ISOLATION:  # overwrite (not add) after scaling and masking; a masked key stays masked
            s = tl.where((offs_n[None, :] < iso_lim[:, None]) & (s != float("-inf")), ISOLATION_LOG2, s)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator stays unweighted
        if HAS_ANCHORS:  # post-softmax re-weighting of the numerator only
            p = p * tl.where(rw[:, None], _key_weights(LOGWh, offs_n, Tk)[None, :], 1.0)
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
    pid_m, pid_bh = _block_ids(tl.cdiv(Tq, BLOCK_M), IS_CAUSAL)
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
    q = _load_rows(Q, row0, Tq, stride_qm, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    rw, iso_lim = _row_features(ROW_FROM, ISO, b, offs_m, stride_isob, Tq, HAS_ANCHORS, HAS_ISOLATION)

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
                                        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, False, False, False, DOT_PRECISION)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, PKb, PVb, KPM, LOGWh, b, offs_m, rw, iso_lim, p_full, Tp,
                                        stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                                        stride_kpmb, stride_kpmn, Tq, Tp, qk_scale,
                                        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, False, False, True, DOT_PRECISION)
    full_end, hi = _causal_bounds(row0, Tq, Tk, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, LOGWh, b, offs_m, rw, iso_lim, 0, full_end,
                                    stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PADDING, HAS_ANCHORS,
                                    HAS_ISOLATION, False, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, LOGWh, b, offs_m, rw, iso_lim, full_end, hi,
                                    stride_kn, stride_kd, stride_vn, stride_vd,
                                    stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PADDING, HAS_ANCHORS,
                                    HAS_ISOLATION, True, DOT_PRECISION)

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    if HAS_MOMENTUM:
        # MoAttn epilogue: O = attention + M (M [B, Hkv, Tq, D] float32, shared by the kv head's query heads); the
        # attention part alone is kept for the backward when STORE_ATTN
        if STORE_ATTN:
            OA += b.to(tl.int64) * stride_oab + h.to(tl.int64) * stride_oah
            _store_rows(OA, row0, Tq, stride_oam, stride_oad, o, BLOCK_M, HEAD_DIM, BLOCK_D)
        MOM += b.to(tl.int64) * stride_mb + hk.to(tl.int64) * stride_mh
        o = o + _load_rows(MOM, row0, Tq, stride_mm, stride_md, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    _store_rows(O, row0, Tq, stride_om, stride_od, o, BLOCK_M, HEAD_DIM, BLOCK_D)
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA,
                                stride_ob, stride_oh, stride_om, stride_od,
                                stride_dob, stride_doh, stride_dom, stride_dod,
                                H, Tq,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # D = rowsum(dO ∘ O) with the (re-weighted) output O
    pid_m, pid_bh = _block_ids(tl.cdiv(Tq, BLOCK_M), False)
    b = pid_bh // H
    h = pid_bh % H
    row0 = pid_m * BLOCK_M
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, row0, Tq,
                   stride_om, stride_od, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, row0, Tq,
                    stride_dom, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _row_lse(LSE, row_base, offs_m, Tq):
    # lse in log2 units; a row with no visible key (lse = -inf) gets +inf so exp2(s - lse) = 0.
    # Rows past Tq read 0: their q and dO tiles are 0, so they contribute exactly 0.
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Tq, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _row_stats(LSE, DELTA, row_base, offs_m, Tq):
    lse = _row_lse(LSE, row_base, offs_m, Tq)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Tq, other=0.0)
    return lse, delta


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, dlw, k, v, wk, Qh, DOh, LSE, DELTA, ROW_FROM, ISO, b, row_base, offs_n, lo, hi,
                         stride_qm, stride_qd, stride_dom, stride_dod, stride_isob, Tq, Tk, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_ANCHORS: tl.constexpr, HAS_ISOLATION: tl.constexpr,
                         CAUSAL_MASK: tl.constexpr, MASK_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Keys past Tk and padded keys are not masked here: each only feeds its own row of dk / dv / dlogw,
    # which the caller drops (past Tk) or zeroes (padded), so the per-iteration mask is unnecessary.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Qh, start_m, Tq, stride_qm, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_ROWS)
        do = _load_rows(DOh, start_m, Tq, stride_dom, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, MASK_ROWS)
        lse, delta = _row_stats(LSE, DELTA, row_base, offs_m, Tq)
        rw, iso_lim = _row_features(ROW_FROM, ISO, b, offs_m, stride_isob, Tq, HAS_ANCHORS, HAS_ISOLATION)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        if HAS_ISOLATION:
            iso_t = offs_n[:, None] < iso_lim[None, :]
            s_t = tl.where(iso_t, ISOLATION_LOG2, s_t)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(_causal_visible(offs_m[None, :], offs_n[:, None], Tq, Tk), p_t, 0.0)
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
    pid_n, pid_bhk = _block_ids(tl.cdiv(Tk, BLOCK_N), False)  # causal: block 0 sees the most rows
    b = pid_bhk // HKV
    hk = pid_bhk % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh, n0, Tk,
                   stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh, n0, Tk,
                   stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    keep = offs_n < Tk
    if HAS_PADDING:
        keep = _key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, Tk)

    # Row blocks [lo, mid) need the causal mask, [mid, full_end) need no mask at all, and
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
            wk = _key_weights(LOGW + (b * H + h).to(tl.int64) * Tk, offs_n, Tk)
        dk, dv, dlw = _attn_bwd_dkdv_inner(dk, dv, dlw, k, v, wk, Qh, DOh, LSE, DELTA, ROW_FROM, ISO, b, row_base,
                                           offs_n, lo, mid, stride_qm, stride_qd, stride_dom, stride_dod,
                                           stride_isob, Tq, Tk, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                           HAS_ANCHORS, HAS_ISOLATION, True, True, DOT_PRECISION)
        dk, dv, dlw = _attn_bwd_dkdv_inner(dk, dv, dlw, k, v, wk, Qh, DOh, LSE, DELTA, ROW_FROM, ISO, b, row_base,
                                           offs_n, mid, full_end, stride_qm, stride_qd, stride_dom, stride_dod,
                                           stride_isob, Tq, Tk, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                           HAS_ANCHORS, HAS_ISOLATION, False, False, DOT_PRECISION)
        dk, dv, dlw = _attn_bwd_dkdv_inner(dk, dv, dlw, k, v, wk, Qh, DOh, LSE, DELTA, ROW_FROM, ISO, b, row_base,
                                           offs_n, full_end, Tq, stride_qm, stride_qd, stride_dom, stride_dod,
                                           stride_isob, Tq, Tk, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                           HAS_ANCHORS, HAS_ISOLATION, False, True, DOT_PRECISION)
        if HAS_ANCHORS:
            tl.store(DLOGW + (b * H + h).to(tl.int64) * Tk + offs_n, tl.where(keep, dlw, 0.0), mask=offs_n < Tk)
    if HAS_PADDING:
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    _store_rows(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh, n0, Tk, stride_dkn, stride_dkd,
                dk * sm_scale, BLOCK_N, HEAD_DIM, BLOCK_D)
    _store_rows(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh, n0, Tk, stride_dvn, stride_dvd,
                dv, BLOCK_N, HEAD_DIM, BLOCK_D)


@triton.jit
def _recompute_probs(q, k, lse, iso_lim, offs_n, qk_scale, HAS_ISOLATION: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # The backward's P of a [BLOCK_M, BLOCK_N] tile from the saved lse (log2 units), isolated logits overwritten
    # first; masks are the caller's. Returns P and the isolated entries (unused without HAS_ISOLATION).
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    iso = offs_n[None, :] < iso_lim[:, None]
    if HAS_ISOLATION:
        s = tl.where(iso, ISOLATION_LOG2, s)
    return tl.math.exp2(s - lse[:, None]), iso


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, rw, iso_lim, K, V, KPM, LOGWh, b, offs_m, lo, hi,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       IS_CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_ANCHORS: tl.constexpr,
                       HAS_ISOLATION: tl.constexpr, MASK_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Keys past Tk load as 0 and so add 0 to dq: only the causal and padding masks matter here.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, start_n, Tk, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BLOCK)
        v = _load_rows(V, start_n, Tk, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, MASK_BLOCK)
        p, iso = _recompute_probs(q, k, lse, iso_lim, offs_n, qk_scale, HAS_ISOLATION, DOT_PRECISION)
        if MASK_BLOCK and IS_CAUSAL:
            p = tl.where(_causal_visible(offs_m[:, None], offs_n[None, :], Tq, Tk), p, 0.0)
        if HAS_PADDING:
            p = tl.where(_key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, Tk)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_ANCHORS:
            ds = p * (tl.where(rw[:, None], _key_weights(LOGWh, offs_n, Tk)[None, :], 1.0) * dp - delta[:, None])
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
    pid_m, pid_bh = _block_ids(tl.cdiv(Tq, BLOCK_M), IS_CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // N_REP
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    LOGWh = LOGW + pid_bh.to(tl.int64) * Tk
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, row0, Tq,
                   stride_qm, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, row0, Tq,
                    stride_dom, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    lse, delta = _row_stats(LSE, DELTA, pid_bh.to(tl.int64) * Tq, offs_m, Tq)
    rw, iso_lim = _row_features(ROW_FROM, ISO, b, offs_m, stride_isob, Tq, HAS_ANCHORS, HAS_ISOLATION)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _causal_bounds(row0, Tq, Tk, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, rw, iso_lim, K, V, KPM, LOGWh, b, offs_m, 0, full_end,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PADDING, HAS_ANCHORS, HAS_ISOLATION, False,
                            DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, rw, iso_lim, K, V, KPM, LOGWh, b, offs_m, full_end, hi,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_kpmb, stride_kpmn, Tq, Tk, qk_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_PADDING, HAS_ANCHORS, HAS_ISOLATION, True,
                            DOT_PRECISION)
    _store_rows(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh, row0, Tq, stride_dqm, stride_dqd,
                dq * sm_scale, BLOCK_M, HEAD_DIM, BLOCK_D)


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
    rw, iso_lim = _row_features(ROW_FROM, ISO, b, offs_m, stride_isob, T, HAS_ANCHORS, HAS_ISOLATION)
    # named, not `_`: Triton types a loop-carried name by its first binding (an int here), and the probs'
    # isolation tile below (a bool tile) would rebind `_` inside the loop, which no CUDA target compiles
    _full_end, hi = _causal_bounds(row0, T, T, BLOCK_M, BLOCK_N, IS_CAUSAL)
    lower_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_(j<i) I[i, j]
    label_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ over label columns j of I[i, j]
    part = (pid_m.to(tl.int64) * B + b) * N_SPLIT + split  # this program's slot in the partial sums
    for start_n in range(split * BLOCK_N, hi, N_SPLIT * BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        vis = row_ok[:, None] & (offs_n[None, :] < T)
        if IS_CAUSAL:
            vis = vis & _causal_visible(offs_m[:, None], offs_n[None, :], T, T)
        if HAS_PADDING:
            vis = vis & _key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, T)[None, :]
        lower = (offs_n[None, :] < offs_m[:, None]) & (offs_m[:, None] <= target)
        label_n = tl.load(LABEL + b.to(tl.int64) * stride_lblb + offs_n, mask=offs_n < T, other=0) != 0
        sal = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(0, H):
            h = tl.cast(g, tl.int64)
            hk = h // N_REP
            q = _load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, row0, T,
                           stride_qm, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, True)
            do = _load_rows(DO + b.to(tl.int64) * stride_dob + h * stride_doh, row0, T,
                            stride_dom, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, True)
            k = _load_rows(K + b.to(tl.int64) * stride_kb + hk * stride_kh, start_n, T,
                           stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, True)
            v = _load_rows(V + b.to(tl.int64) * stride_vb + hk * stride_vh, start_n, T,
                           stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, True)
            lse = _row_lse(LSE, (b * H + h) * T, offs_m, T)
            p, _iso = _recompute_probs(q, k, lse, iso_lim, offs_n, qk_scale, HAS_ISOLATION, DOT_PRECISION)
            p = tl.where(vis, p, 0.0)
            if HAS_ANCHORS:  # the probe sits on the weights that multiply V: the re-weighted P̂
                wk = _key_weights(LOGW + (b * H + h) * T, offs_n, T)
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


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel, padded head dim and input width (2-byte
# fp16/bf16, 4-byte fp32), chosen from the compile report (benchmarks/results/compile-sm80.md, -sm90.md): the
# configs that compile without spilling on sm_80 and sm_90 come first, in the order the autotuner tries them. On
# CUDA the autotuner first drops the configs whose shared memory (smem_bytes) exceeds the device's, then times the
# rest once per key (head dim, flags, power-of-two length buckets); under the interpreter the first one runs.
_CANDIDATES = {
    "fwd": {
        (32, False): [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
        (64, False): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2)],
        (128, False): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
        (256, False): [(64, 64, 8, 2), (64, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 2), (32, 64, 8, 2)],
        (64, True): [(32, 32, 8, 2), (16, 64, 8, 2), (32, 32, 8, 1), (16, 64, 8, 1), (16, 128, 8, 1)],
        (128, True): [(32, 32, 8, 2), (16, 64, 8, 2), (32, 32, 8, 1), (16, 64, 8, 1), (16, 128, 8, 1)],
        (256, True): [(32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 2)],
    },
    "dkdv": {
        (32, False): [(32, 32, 8, 1), (16, 64, 4, 1), (32, 64, 4, 2), (64, 32, 8, 2)],
        (64, False): [(16, 64, 4, 1), (64, 16, 4, 1), (64, 32, 8, 2), (32, 128, 8, 2), (32, 128, 8, 1),
                      (128, 32, 8, 2)],
        (128, False): [(64, 32, 8, 1), (32, 32, 8, 1), (16, 128, 8, 1), (64, 32, 8, 2), (32, 32, 4, 2)],
        (256, False): [(16, 32, 4, 2), (16, 32, 4, 1), (32, 32, 4, 3), (32, 64, 8, 2), (32, 64, 8, 1)],
        (64, True): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 32, 8, 1), (32, 16, 4, 2)],
        (128, True): [(16, 32, 8, 1), (32, 32, 8, 1), (32, 32, 8, 2), (64, 32, 8, 2)],
        (256, True): [(16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 4, 2)],
    },
    "dq": {
        (64, False): [(128, 32, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)],
        (128, False): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (32, 32, 4, 2), (64, 32, 4, 3),
                       (128, 64, 8, 2)],
        (256, False): [(64, 32, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2), (32, 32, 8, 2), (16, 128, 8, 1), (64, 64, 8, 2)],
        (64, True): [(16, 64, 8, 2), (16, 64, 8, 1), (16, 32, 4, 2), (16, 32, 8, 1), (32, 32, 8, 1)],
        (128, True): [(16, 64, 8, 2), (16, 64, 8, 1), (16, 32, 4, 2), (16, 32, 8, 1), (32, 32, 8, 1)],
        (256, True): [(16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 4, 2)],
    },
    "saliency": {
        (64, False): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
        (128, False): [(32, 128, 8, 2), (32, 64, 8, 2), (32, 128, 8, 1), (32, 32, 8, 2), (64, 64, 8, 2)],
        (256, False): [(32, 32, 8, 2), (32, 64, 8, 1), (32, 64, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
        (64, True): [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 1)],
        (128, True): [(16, 64, 8, 1), (16, 32, 8, 1), (32, 32, 8, 1)],
        (256, True): [(16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 4, 2)],
    },
}
_INTERPRETER_BLOCKS = (32, 32)  # mid-size tiles exercise the multi-block paths at small T
PREPROCESS_BLOCK_M = 64  # rows per program of D = rowsum(dO ∘ O) (a memory-bound pass, not tuned)
_TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_PADDING", "DOT_PRECISION", "TQ_BUCKET", "TK_BUCKET"]
# per kind: extra autotune keys, and outputs to zero before every timed run and the final one: the partial sums
# (a config with smaller row blocks writes slots the chosen config never touches; per-head sums accumulate)
_TUNE_EXTRA = {"fwd": (["HAS_PREFIX"], None), "saliency": (["PER_HEAD", "STORE_ROWS"], ["SUMS", "HEAD_SUMS"])}
_KERNELS = {}
_tuned = {}


def _flag_product(names, *fixed_sets):
    """Every value combination of boolean ``names``, each joined with every dict of ``fixed_sets``."""
    out = set()
    for values in itertools.product((False, True), repeat=len(names)):
        for fixed in fixed_sets or ({},):
            out.add(tuple(sorted({**dict(zip(names, values)), **fixed}.items())))
    return frozenset(out)


_METHODS = ({"HAS_ANCHORS": False, "HAS_ISOLATION": False}, {"HAS_ANCHORS": True, "HAS_ISOLATION": False},
            {"HAS_ANCHORS": False, "HAS_ISOLATION": True}, {"HAS_ANCHORS": True, "HAS_ISOLATION": True})
_NO_METHOD = dict(HAS_ANCHORS=False, HAS_ISOLATION=False)
_FWD_EXTRAS = dict(HAS_PREFIX=False, HAS_MOMENTUM=False, STORE_ATTN=False)
# Every flag combination the launchers below can produce, per kernel: _launch refuses any other, and the compile
# suite (tests/compile, triton_kernels/specializations.py) compiles exactly these. The forward's prefix and
# momentum epilogue run without method features (the launchers pass none with them); STORE_ATTN needs momentum.
FLAG_SETS = {
    "fwd": _flag_product(("IS_CAUSAL", "HAS_PADDING"), *({**m, **_FWD_EXTRAS} for m in _METHODS),
                         {**_NO_METHOD, **_FWD_EXTRAS, "HAS_PREFIX": True},
                         {**_NO_METHOD, **_FWD_EXTRAS, "HAS_MOMENTUM": True},
                         {**_NO_METHOD, **_FWD_EXTRAS, "HAS_MOMENTUM": True, "STORE_ATTN": True}),
    "dkdv": _flag_product(("IS_CAUSAL", "HAS_PADDING"), *_METHODS),
    "dq": _flag_product(("IS_CAUSAL", "HAS_PADDING"), *_METHODS),
    "saliency": _flag_product(("IS_CAUSAL", "HAS_PADDING", "PER_HEAD", "STORE_ROWS"), *_METHODS),
    "preprocess": frozenset({()}),
}
TUNED_KINDS = ("fwd", "dkdv", "dq", "saliency")
_FLAG_NAMES = {kind: tuple(name for name, _ in next(iter(sets))) for kind, sets in FLAG_SETS.items()}


def _check_flags(kind: str, meta: dict) -> None:
    flags = tuple(sorted((name, bool(meta[name])) for name in _FLAG_NAMES[kind]))
    if flags not in FLAG_SETS[kind]:
        raise NotImplementedError(f"{kind} kernel: the flag set {dict(flags)} is not in FLAG_SETS (add it there, so "
                                  "the compile suite builds it, before a launcher uses it)")


def _candidates(kind: str, block_d: int, elem_size: int):
    # head dims up to 32 have their own list where the d-64 one spills at BLOCK_D 32; otherwise they use it
    per_width = _CANDIDATES[kind]
    d = min(max(block_d, 32), 256)
    return per_width.get((d, elem_size >= 4)) or per_width[(max(d, 64), elem_size >= 4)]


# Tile rows a config keeps in shared memory, per kind: (rows loaded once per program, rows loaded per loop step),
# each row BLOCK_D elements. fwd: q | k, v; dq: q, dO | k, v; dk/dv: k, v | q, dO; saliency: nothing | q, dO, k, v
# (all re-read per head).
_SMEM_ROWS = {
    "fwd": lambda bm, bn: (bm, 2 * bn),
    "dq": lambda bm, bn: (2 * bm, 2 * bn),
    "dkdv": lambda bm, bn: (2 * bn, 2 * bm),
    "saliency": lambda bm, bn: (0, 2 * bm + 2 * bn),
}


# A 1-stage config (no software pipelining) stages its dot operands and layout conversions through shared memory:
# per kind, the fraction of the per-step tiles and the rows per (block_m + block_n) it was measured to need at most
# (compile report, sm_80 and sm_90, triton 3.6 and 3.9).
_ONE_STAGE = {"fwd": (1.0, 0.5), "dq": (1.0, 0.5), "dkdv": (1.0, 1.0), "saliency": (0.75, 0.0)}


def smem_bytes(kind: str, block_m: int, block_n: int, block_d: int, num_stages: int, elem_size: int) -> int:
    """An upper bound of the shared memory one program of config ``(block_m, block_n, num_stages)`` uses, in
    tile rows of ``block_d`` elements: the stationary tiles plus ``num_stages`` copies of the per-step tiles (what
    Hopper's warpgroup-MMA path allocates; Ampere's needs one copy less), dk/dv one more ``block_m`` rows, plus the
    per-row statistics of each stage; 1-stage configs per :data:`_ONE_STAGE`. The compile suite checks on every
    change that it bounds the compiled value of every specialization on sm_80 and sm_90 and is not loose (at most
    2x + 16 KiB for pipelined configs); the autotuner prunes with it."""
    once, per_step = _SMEM_ROWS[kind](block_m, block_n)
    if num_stages == 1:
        share, extra = _ONE_STAGE[kind]
        rows = once + share * per_step + extra * (block_m + block_n)
    else:
        rows = once + num_stages * per_step + (block_m if kind == "dkdv" else 0)
    return int(elem_size * block_d * rows) + 8 * block_m * num_stages


class SharedMemoryError(RuntimeError):
    """No autotune config of a kernel fits the device's shared memory per block."""


def device_smem_limit(device: torch.device) -> int:
    """Shared memory a block may opt in to on ``device`` (cudaDevAttrMaxSharedMemoryPerBlockOptin)."""
    return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)


def prune_configs(kind: str, block_d: int, elem_size: int, configs, limit: int):
    """The configs of ``kind`` whose :func:`smem_bytes` fit ``limit`` bytes, in order; raises
    :class:`SharedMemoryError` (kernel, needed and available bytes) when none does."""
    need = {c: smem_bytes(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, c.num_stages, elem_size)
            for c in configs}
    kept = [c for c in configs if need[c] <= limit]
    if not kept:
        raise SharedMemoryError(
            f"{kind} attention kernel (head dim block {block_d}, {elem_size}-byte inputs): its smallest config needs "
            f"{min(need.values()):,} B of shared memory per block, the device has {limit:,} B")
    return kept


def _device_pruner(kind: str, block_d: int, elem_size: int):
    def early_config_prune(configs, named_args, **kwargs):
        return prune_configs(kind, block_d, elem_size, configs, device_smem_limit(named_args["Q"].device))

    return early_config_prune


def _kernel(kind: str, q: torch.Tensor):
    """The kernel to launch and whether its block sizes come from the autotuner."""
    jit_fn = _KERNELS[kind]
    if q.device.type != "cuda":
        return jit_fn, False
    key = (kind, _block_d(q.shape[-1]), q.element_size())
    if key not in _tuned:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in _candidates(kind, key[1], key[2])
        ]
        extra_key, reset = _TUNE_EXTRA.get(kind, ([], None))
        _tuned[key] = triton.autotune(configs=configs, key=_TUNE_KEY + extra_key, reset_to_zero=reset,
                                      prune_configs_by={"early_config_prune": _device_pruner(kind, *key[1:])})(jit_fn)
    return _tuned[key], True


def _bucket(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def _launch(kind: str, q: torch.Tensor, grid_dim, *args, **meta):
    """Launch kernel ``kind``; ``grid_dim(BLOCK_M, BLOCK_N)`` gives the grid for a block config."""
    _check_flags(kind, meta)
    kernel, tuned = _kernel(kind, q)
    if tuned:
        kernel[lambda m: grid_dim(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)
    else:
        bm, bn = _INTERPRETER_BLOCKS
        kernel[grid_dim(bm, bn)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)


def dot_precision_for(dtype: torch.dtype, cuda: bool) -> str:
    # fp32 on a GPU: tf32x3 (three tf32 passes on the tensor cores, close to fp32 accuracy); plain IEEE
    # fp32 dots run on the FMA units and spill at useful tile sizes. The interpreter computes in fp32.
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    return "tf32x3" if cuda else "ieee"


def unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when its last dimension is not contiguous (e.g. the expanded grad of ``out.sum()``): the
    kernels are compiled, and proven by the compile suite, for a unit column stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(q: torch.Tensor) -> str:
    return dot_precision_for(q.dtype, q.device.type == "cuda")


@functools.cache
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Stands in for an absent optional input (its flag is off, so it is never read). It has the dtype
    # of the real input so the autotuner, which keys on argument dtypes, picks the same block config
    # with a method's feature on or off: that keeps neutral knobs (beta = 0) bit-identical to base.
    return torch.zeros(1, dtype=dtype, device=device)


def _kpm_args(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    if key_padding_mask is None:
        return _placeholder(q.device, torch.uint8), 0, 0
    kpm = key_padding_mask.view(torch.uint8)
    return kpm, kpm.stride(0), kpm.stride(1)


def _method_args(key_log_weights, reweight_from, isolation_limit, q: torch.Tensor):
    """Pointers of the optional method inputs (a placeholder stands in for an absent one) and flags.

    ``key_log_weights``: float32 ``[B, H, Tk]`` contiguous (0 = not an anchor), ``reweight_from``:
    int32 ``[B]``, ``isolation_limit``: int32 ``[B, Tq]`` (row stride read, unit column stride).
    """
    has_anchors = key_log_weights is not None
    has_isolation = isolation_limit is not None
    logw = key_log_weights if has_anchors else _placeholder(q.device, torch.float32)
    row_from = reweight_from if has_anchors else _placeholder(q.device, torch.int32)
    iso = isolation_limit if has_isolation else _placeholder(q.device, torch.int32)
    stride_isob = isolation_limit.stride(0) if has_isolation else 0
    return (logw, row_from, iso, stride_isob), dict(HAS_ANCHORS=has_anchors, HAS_ISOLATION=has_isolation)


def attention_fwd(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal: bool,
                  scale: float, *, prefix=None, momentum=None, out_attn=None, out=None, lse=None):
    """Launch the forward. Returns ``o`` (``[B, H, Tq, D]`` view of ``[B, Tq, H, D]`` memory) and
    ``lse [B, H, Tq]`` float32 (contiguous). ``out``/``lse`` may be given (tests pass NaN-filled ones).
    Method inputs (``None`` = feature off): see :func:`_method_args`. ``prefix``: ``None`` or the shared
    prefix ``(pk, pv)``, each ``[B, Hkv, Tp, D]`` with any strides (batch stride 0 for one copy), whose keys
    come before ``k`` and are visible to every query row (method features must be off). ``momentum``: ``None``
    or ``M [B, Hkv, Tq, D]`` float32 added in the epilogue (MoAttn); then ``out_attn`` (``None`` or a tensor like
    ``out``) also receives the attention part alone."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(B, Tq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    if lse is None:
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    if Tq == 0:
        return out, lse
    kpm, s_kpmb, s_kpmn = _kpm_args(key_padding_mask, q)
    (logw, row_from, iso, s_isob), method_flags = _method_args(key_log_weights, reweight_from, isolation_limit, q)
    pk, pv = prefix if prefix is not None else (k, v)  # never read without HAS_PREFIX
    Tp = pk.shape[2] if prefix is not None else 0
    mom = momentum if momentum is not None else _placeholder(q.device, torch.float32).view(1, 1, 1, 1)
    oa = out_attn if out_attn is not None else out  # never written without STORE_ATTN
    _launch(
        "fwd", q, lambda bm, bn: (triton.cdiv(Tq, bm) * B * H,),
        q, k, v, out, lse, kpm, logw, row_from, iso, pk, pv, mom, oa,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), s_kpmb, s_kpmn, s_isob, *pk.stride(), *pv.stride(),
        *mom.stride(), *oa.stride(),
        H, H // Hkv, Tq, Tk, Tp, scale * _LOG2E, _bucket(Tq), _bucket(Tp + Tk),  # tuned on all the keys read
        HEAD_DIM=D, BLOCK_D=_block_d(D), IS_CAUSAL=causal, HAS_PADDING=key_padding_mask is not None,
        HAS_PREFIX=prefix is not None, HAS_MOMENTUM=momentum is not None, STORE_ATTN=out_attn is not None,
        DOT_PRECISION=_dot_precision(q), **method_flags,
    )
    return out, lse


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
                  causal: bool, scale: float, *, dq=None, dk=None, dv=None, dlogw=None):
    """Launch the backward. Returns ``dq, dk, dv`` with the shapes (and strides) of ``q, k, v`` and
    ``dlogw [B, H, Tk]`` float32 (``None`` without anchors); all may be given (tests pass NaN-filled ones)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    do = unit_column_stride(do)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if key_log_weights is None:
        dlogw = None
    elif dlogw is None:  # every element is written by the dkdv kernel
        dlogw = torch.empty(B, H, Tk, dtype=torch.float32, device=q.device)
    if Tk == 0:
        return dq.zero_(), dk, dv, dlogw
    if Tq == 0:
        return dq, dk.zero_(), dv.zero_(), None if dlogw is None else dlogw.zero_()
    BLOCK_D = _block_d(D)
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Tq, PREPROCESS_BLOCK_M) * B * H,)](
        o, do, delta, *o.stride(), *do.stride(), H, Tq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=PREPROCESS_BLOCK_M,
    )
    kpm, s_kpmb, s_kpmn = _kpm_args(key_padding_mask, q)
    (logw, row_from, iso, s_isob), method_flags = _method_args(key_log_weights, reweight_from, isolation_limit, q)
    flags = dict(
        HEAD_DIM=D, BLOCK_D=BLOCK_D, IS_CAUSAL=causal, HAS_PADDING=key_padding_mask is not None,
        DOT_PRECISION=_dot_precision(q), **method_flags,
    )
    _launch(
        "dkdv", q, lambda bm, bn: (triton.cdiv(Tk, bn) * B * Hkv,),
        q, k, v, do, dk, dv, lse, delta, kpm, logw, logw if dlogw is None else dlogw, row_from, iso,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), s_kpmb, s_kpmn, s_isob,
        H, Hkv, H // Hkv, Tq, Tk, scale * _LOG2E, scale, _bucket(Tq), _bucket(Tk), **flags,
    )
    _launch(
        "dq", q, lambda bm, bn: (triton.cdiv(Tq, bm) * B * H,),
        q, k, v, do, dq, lse, delta, kpm, logw, row_from, iso,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), s_kpmb, s_kpmn, s_isob,
        H, H // Hkv, Tq, Tk, scale * _LOG2E, scale, _bucket(Tq), _bucket(Tk), **flags,
    )
    return dq, dk, dv, dlogw


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
    """Launch the saliency reduction of the backward (SPEC §4) for self-attention (``Tq == Tk == T``).

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
    min_bm = min(c[0] for c in _candidates("saliency", _block_d(D), q.element_size())) if q.is_cuda else 16
    n_parts = triton.cdiv(T, min_bm) * B * n_split
    sums = torch.zeros(n_parts, 3, dtype=torch.float32, device=q.device)
    head_sums = torch.zeros(n_parts, H, 3, dtype=torch.float32, device=q.device) if per_head else sums
    store_rows = rows is not None
    if not store_rows:
        row_slot = rows = _placeholder(q.device, torch.int32)
    kpm, s_kpmb, s_kpmn = _kpm_args(key_padding_mask, q)
    (logw, row_from, iso, s_isob), method_flags = _method_args(key_log_weights, reweight_from, isolation_limit, q)
    _launch(
        "saliency", q, lambda bm, bn: (triton.cdiv(T, bm) * B * n_split,),
        q, k, v, do, lse, kpm, logw, row_from, iso, label_mask, target, row_slot, sums, head_sums, rows,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), s_kpmb, s_kpmn, s_isob,
        label_mask.stride(0), row_slot.stride(0) if store_rows else 0,
        B, H, H // Hkv, T, n_split, rows.shape[1] if store_rows else 0, scale * _LOG2E, _bucket(T), _bucket(T),
        HEAD_DIM=D, BLOCK_D=_block_d(D), IS_CAUSAL=causal, HAS_PADDING=key_padding_mask is not None,
        PER_HEAD=per_head, STORE_ROWS=store_rows, DOT_PRECISION=_dot_precision(q), **method_flags,
    )
    total = sums.view(-1, B, n_split, 3).sum(dim=(0, 2))
    return total, (head_sums.view(-1, B, n_split, H, 3).sum(dim=(0, 2)) if per_head else None)


_KERNELS.update(fwd=_attn_fwd_kernel, dkdv=_attn_bwd_dkdv_kernel, dq=_attn_bwd_dq_kernel,
                saliency=_attn_bwd_saliency_kernel)


def momentum_attention_fwd(q, k, v, key_padding_mask, causal: bool, scale: float, momentum: torch.Tensor,
                           store_attn: bool):
    """``(out, lse, out_attn)``: the forward kernel with ``momentum [B, Hkv, Tq, D]`` (float32, from the
    decayed-sum scan of :mod:`fastattn_icl._triton.momentum`) added in its epilogue; ``out_attn`` holds the attention
    part when ``store_attn`` (the backward's ``o``), else it is an empty tensor."""
    B, H, Tq, D = q.shape
    out_attn = torch.empty(B, Tq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2) if store_attn else None
    out, lse = attention_fwd(q, k, v, key_padding_mask, None, None, None, causal, scale, momentum=momentum,
                             out_attn=out_attn)
    return out, lse, (out_attn if store_attn else q.new_empty(0))

