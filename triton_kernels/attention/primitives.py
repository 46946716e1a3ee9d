"""What the forward, backward and saliency kernels of the attention family share.

Device side: tile loads and stores with int64 row offsets, the visibility masks (bottom-right causal, key padding),
the causal split of a row block's keys into unmasked and masked blocks, the flat-grid program ids, the method
features of a row block (anchor re-weighting, isolation) and the backward's recomputation of ``P`` from the saved
``lse``. The kernels work in log2 units: ``exp(x) = exp2(x · log2 e)``, so logits are scaled by
:func:`log2_scale` and ``lse`` is converted back to natural log when stored.

Host side: the padded head dim, the dot precision, and the arguments the launchers pass for the optional inputs
(a placeholder, never read, stands in for an absent one).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634  # the kernels work in log2 units: exp(x) = exp2(x · log2(e))
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
ISOLATION_VALUE = -1e4  # docs/methods.md §3: isolated logits are overwritten with this constant
ISOLATION_LOG2 = tl.constexpr(ISOLATION_VALUE * _LOG2E)  # the same logit in the kernels' log2 units


@triton.jit
def load_rows(base, row0, n_rows, stride_r, stride_d, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, MASK_BOUNDS: tl.constexpr):
    # [BLOCK_R, BLOCK_D] tile of rows row0 .. row0 + BLOCK_R; MASK_BOUNDS: the tile may reach past n_rows (those rows
    # load as 0). The row offset is taken in int64 once so tile-local offsets stay int32 even when T · stride_r
    # passes 2^31
    ptr = base + tl.cast(row0, tl.int64) * stride_r
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if MASK_BOUNDS:
        return tl.load(ptrs, mask=(offs_r[:, None] < n_rows - row0) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def store_rows(base, row0, n_rows, stride_r, stride_d, x, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    ptr = base + tl.cast(row0, tl.int64) * stride_r
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, x.to(base.dtype.element_ty),
             mask=(offs_r[:, None] < n_rows - row0) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def causal_visible(rows, cols, Tq, Tk):
    # bool, broadcast of rows x cols (either orientation): bottom-right aligned causal visibility
    return cols <= rows + (Tk - Tq)


@triton.jit
def key_keep(KPM, b, offs_n, stride_kpmb, stride_kpmn, Tk):
    # [BLOCK_N] bool from the key-padding mask (nonzero = keep); keys past Tk are not kept
    keep = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_n * stride_kpmn, mask=offs_n < Tk, other=0)
    return keep != 0


@triton.jit
def causal_bounds(row0, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    # For query rows row0 .. row0 + BLOCK_M: key blocks [0, full_end) are inside Tk and visible to every
    # row (no mask needed); blocks [full_end, hi) need MASK_BOUNDS and, if causal, MASK_CAUSAL; keys >= hi are
    # unseen.
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(Tk, row0 + BLOCK_M + (Tk - Tq)), 0)
        full_end = tl.maximum(tl.minimum(row0 + (Tk - Tq) + 1, Tk), 0) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full_end = Tk // BLOCK_N * BLOCK_N
    return full_end, hi


@triton.jit
def block_ids(n_blocks, HEAVY_FIRST: tl.constexpr):
    # one flat grid axis (the y/z axes cap at 65535 programs): (block, batch·head) with the block index
    # varying fastest, so programs of one head run together and share its K/V in L2
    pid = tl.program_id(0)
    blk = pid % n_blocks
    if HEAVY_FIRST:  # causal: the last query blocks see the most keys; start them first
        blk = n_blocks - 1 - blk
    return blk, pid // n_blocks


@triton.jit
def row_features(ROW_FROM, ISO, b, offs_m, stride_isob, Tq, HAS_ANCHORS: tl.constexpr,
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
def key_weights(LOGWh, offs_n, Tk):
    # [BLOCK_N] post-softmax weights exp(logw) of the keys (1 for keys that are not anchors)
    return tl.math.exp2(tl.load(LOGWh + offs_n, mask=offs_n < Tk, other=0.0) * LOG2E)


@triton.jit
def row_lse(LSE, row_base, offs_m, Tq):
    # lse in log2 units; a row with no visible key (lse = -inf) gets +inf so exp2(s - lse) = 0.
    # Rows past Tq read 0: their q and dO tiles are 0, so they contribute exactly 0.
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Tq, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def recompute_probs(q, k, lse, iso_lim, offs_n, qk_scale, HAS_ISOLATION: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # The backward's P of a [BLOCK_M, BLOCK_N] tile from the saved lse (log2 units), isolated logits overwritten
    # first; masks are the caller's. Returns P and the isolated entries (unused without HAS_ISOLATION).
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    iso = offs_n[None, :] < iso_lim[:, None]
    if HAS_ISOLATION:
        s = tl.where(iso, ISOLATION_LOG2, s)
    return tl.math.exp2(s - lse[:, None]), iso


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def log2_scale(scale: float) -> float:
    """The kernels' ``qk_scale``: the softmax scale in log2 units (``exp(scale · s) = exp2(log2_scale(scale) · s)``)."""
    return scale * _LOG2E


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


def dot_precision(q: torch.Tensor) -> str:
    return dot_precision_for(q.dtype, q.device.type == "cuda")


@functools.cache
def placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Stands in for an absent optional input (its flag is off, so it is never read). It has the dtype
    # of the real input so the autotuner, which keys on argument dtypes, picks the same block config
    # with a method's feature on or off: that keeps neutral knobs (beta = 0) bit-identical to base.
    return torch.zeros(1, dtype=dtype, device=device)


def kpm_args(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    if key_padding_mask is None:
        return placeholder(q.device, torch.uint8), 0, 0
    kpm = key_padding_mask.view(torch.uint8)
    return kpm, kpm.stride(0), kpm.stride(1)


def method_args(key_log_weights, reweight_from, isolation_limit, q: torch.Tensor):
    """Pointers of the optional method inputs (a placeholder stands in for an absent one) and flags.

    ``key_log_weights``: float32 ``[B, H, Tk]`` contiguous (0 = not an anchor), ``reweight_from``:
    int32 ``[B]``, ``isolation_limit``: int32 ``[B, Tq]`` (row stride read, unit column stride).
    """
    has_anchors = key_log_weights is not None
    has_isolation = isolation_limit is not None
    logw = key_log_weights if has_anchors else placeholder(q.device, torch.float32)
    row_from = reweight_from if has_anchors else placeholder(q.device, torch.int32)
    iso = isolation_limit if has_isolation else placeholder(q.device, torch.int32)
    stride_isob = isolation_limit.stride(0) if has_isolation else 0
    return (logw, row_from, iso, stride_isob), dict(HAS_ANCHORS=has_anchors, HAS_ISOLATION=has_isolation)
