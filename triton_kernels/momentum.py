"""The decayed sum of momentum attention (docs/methods.md §6, MoAttn) as a memory-bound Triton scan.

Math, per batch row and kv head, over absolute positions ``t`` of the key/value cache::

    M_t = Σ_{i<t} η^{t-i} x_i        (x = v, padded keys counting as 0; η in (0, 1))

Chunked scan: a program owns one ``(batch, kv head, head-dim block)`` and walks the sequence in blocks of
``BLOCK_T`` rows with the state ``m = M_{t0}`` at the block start (float32)::

    M_{t0+r} = η^r m + Σ_{c<r} η^{r-c} x_{t0+c}          (a [BLOCK_T, BLOCK_T] decay matrix times the block)
    m       <- η^{BLOCK_T} m + Σ_c η^{BLOCK_T-c} x_{t0+c}

Decay powers are ``exp2(n · log2 η)``, so they underflow to 0 instead of overflowing (no ``η^{-i}`` form). The
same kernel runs the backward's anti-causal sum ``dV_j = Σ_{i>j} η^{i-j} G_i`` (``G`` the output gradient summed
over the query heads of the kv head) as a forward scan over the reversed sequence (``REVERSE``), with ``GROUP``
input heads summed per output head.

Constraints: η in (0, 1) (η = 0 never launches: the caller skips the term), any input dtype (accumulated in
float32), head dim up to 256, arbitrary strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention.primitives import unit_column_stride


@triton.jit
def _decayed_scan_kernel(X, Y, KPM, M0,
                         stride_xb, stride_xh, stride_xt, stride_xd,
                         stride_yb, stride_yh, stride_yt, stride_yd,
                         stride_kpmb, stride_kpmt, stride_m0b, stride_m0h,
                         H_OUT, T_IN, T_OUT, OUT_START, log2_eta,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         MASK_IN: tl.constexpr, MASK_OUT: tl.constexpr, REVERSE: tl.constexpr,
                         HAS_M0: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Y rows t - OUT_START for t in [OUT_START, T_OUT) get M_t of the (possibly reversed) sequence X[0 .. T_IN);
    # rows of X at or past T_IN count as 0 (the backward's keys before the query chunk)
    pid_bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = (pid_bh // H_OUT).to(tl.int64)
    h = (pid_bh % H_OUT).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    Xb = X + b * stride_xb + h * GROUP * stride_xh
    Yb = Y + b * stride_yb + h * stride_yh
    r = tl.arange(0, BLOCK_T)
    lag = r[:, None] - r[None, :]
    decay = tl.where(lag > 0, tl.math.exp2(tl.maximum(lag, 1).to(tl.float32) * log2_eta), 0.0)  # [BLOCK_T, BLOCK_T]
    carry = tl.math.exp2(r.to(tl.float32) * log2_eta)  # η^r, 1 at r = 0
    tail = tl.math.exp2((BLOCK_T - r).to(tl.float32) * log2_eta)  # η^(BLOCK_T - c)
    eta_block = tl.math.exp2(BLOCK_T * log2_eta)
    if HAS_M0:  # the carried state M at the first row (a decode step continuing a sequence)
        m = tl.load(M0 + b * stride_m0b + h * stride_m0h + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        m = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, T_OUT, BLOCK_T):
        rows = t0 + r
        in_rows = rows < T_IN
        src = (T_IN - 1 - rows) if REVERSE else rows
        x = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for g in range(GROUP):
            ptrs = Xb + g * stride_xh + src.to(tl.int64)[:, None] * stride_xt + offs_d[None, :] * stride_xd
            x += tl.load(ptrs, mask=in_rows[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if MASK_IN:
            keep = tl.load(KPM + b * stride_kpmb + src.to(tl.int64) * stride_kpmt, mask=in_rows, other=0)
            x = tl.where((keep != 0)[:, None], x, 0.0)
        y = carry[:, None] * m[None, :] + tl.dot(decay, x, input_precision=DOT_PRECISION)
        out_rows = rows < T_OUT
        dst = (T_OUT - 1 - rows) if REVERSE else rows - OUT_START
        if MASK_OUT:
            keep = tl.load(KPM + b * stride_kpmb + dst.to(tl.int64) * stride_kpmt, mask=out_rows, other=0)
            y = tl.where((keep != 0)[:, None], y, 0.0)
        ptrs = Yb + dst.to(tl.int64)[:, None] * stride_yt + offs_d[None, :] * stride_yd
        tl.store(ptrs, y, mask=(out_rows & (rows >= OUT_START))[:, None] & d_ok[None, :])
        m = eta_block * m + tl.sum(tail[:, None] * x, axis=0)


BLOCK_T = 32
DOT_PRECISION = "ieee"  # the decay-matrix product in plain fp32: the scan's roundings match the reference
# The launcher's flag sets (compiled by the compile suite; _launch_scan refuses others): the forward scan masks its
# input rows and may continue a carried state; the backward's reversed scan masks its output rows and sums GROUP
# query heads per kv head (GROUP = H // Hkv is any integer; the suite compiles 1 and 4).
FLAG_SETS = {"scan": frozenset(
    {(("GROUP", 1), ("HAS_M0", m0), ("MASK_IN", mask), ("MASK_OUT", False), ("REVERSE", False))
     for m0 in (False, True) for mask in (False, True)}
    | {(("GROUP", g), ("HAS_M0", False), ("MASK_IN", False), ("MASK_OUT", mask), ("REVERSE", True))
       for g in (1, 4) for mask in (False, True)})}


def scan_block_d(head_dim: int) -> int:
    return min(64, max(16, triton.next_power_of_2(head_dim)))


def _launch_scan(x, y, kpm, *, t_in, t_out, out_start, eta, group, reverse, mask_in, mask_out, m0=None):
    # the mask index is the output row (MASK_OUT) or the input row (MASK_IN); only the table's forms are wired. Any
    # GROUP > 1 compiles the same code with another trip count: the table stands for them with 4
    flags = (("GROUP", 1 if group == 1 else 4), ("HAS_M0", m0 is not None), ("MASK_IN", mask_in),
             ("MASK_OUT", mask_out), ("REVERSE", reverse))
    if flags not in FLAG_SETS["scan"]:
        raise NotImplementedError(f"decayed scan: the form {dict(flags)} is not in FLAG_SETS (MASK_OUT needs REVERSE, "
                                  "MASK_IN and a carried state the forward direction, GROUP > 1 the backward)")
    B, HX, _, D = x.shape
    h_out = HX // group
    block_d = scan_block_d(D)
    if kpm is None:
        kpm_t, s_kb, s_kt = torch.zeros(1, dtype=torch.uint8, device=x.device), 0, 0
    else:
        kpm_t = kpm.view(torch.uint8)
        s_kb, s_kt = kpm_t.stride()
    grid = (B * h_out, triton.cdiv(D, block_d))
    m0_t = m0 if m0 is not None else y  # never read without HAS_M0
    _decayed_scan_kernel[grid](
        x, y, kpm_t, m0_t, *x.stride(), *y.stride(), s_kb, s_kt, m0_t.stride(0), m0_t.stride(1),
        h_out, t_in, t_out, out_start, float(torch.log2(torch.tensor(eta, dtype=torch.float64))),
        GROUP=group, HEAD_DIM=D, BLOCK_T=BLOCK_T, BLOCK_D=block_d, MASK_IN=mask_in, MASK_OUT=mask_out,
        REVERSE=reverse, HAS_M0=m0 is not None, DOT_PRECISION=DOT_PRECISION,
    )
    return y


def momentum_term(v: torch.Tensor, eta: float, first: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``M [B, Hkv, Tk - first, D]`` float32: ``M_t`` for absolute positions ``t = first .. Tk - 1`` of ``v [B,
    Hkv, Tk, D]`` (padded keys, ``key_padding_mask [B, Tk]`` False, count as 0)."""
    B, Hkv, Tk, D = v.shape
    y = torch.empty(B, Hkv, Tk - first, D, dtype=torch.float32, device=v.device)
    if Tk - first == 0:
        return y
    return _launch_scan(v, y, key_padding_mask, t_in=Tk, t_out=Tk, out_start=first, eta=eta, group=1,
                        reverse=False, mask_in=key_padding_mask is not None, mask_out=False)


def momentum_continue(v_new: torch.Tensor, eta: float, m0: torch.Tensor,
                      key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hkv, n + 1, D]`` float32: ``M`` at the ``n`` positions of ``v_new [B, Hkv, n, D]`` given the carried state
    ``m0 [B, Hkv, D]`` (``M`` at the first of them), then the state after them (row ``n``). ``key_padding_mask``:
    ``[B, n]`` over ``v_new``'s positions."""
    B, Hkv, n, D = v_new.shape
    y = torch.empty(B, Hkv, n + 1, D, dtype=torch.float32, device=v_new.device)
    return _launch_scan(v_new, y, key_padding_mask, t_in=n, t_out=n + 1, out_start=0, eta=eta, group=1,
                        reverse=False, mask_in=key_padding_mask is not None, mask_out=False, m0=m0)


def momentum_value_grad(grad_out: torch.Tensor, eta: float, Hkv: int, Tk: int,
                        key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``dV [B, Hkv, Tk, D]`` float32 of the momentum term: ``Σ_{i>j} η^{i-j} G_i`` with ``G`` the output gradient
    ``grad_out [B, H, Tq, D]`` (rows at absolute positions ``Tk - Tq ..``) summed over each kv head's query heads;
    zero at padded keys."""
    B, H, Tq, D = grad_out.shape
    grad_out = unit_column_stride(grad_out)
    y = torch.empty(B, Hkv, Tk, D, dtype=torch.float32, device=grad_out.device)
    if Tk == 0:
        return y
    # reversed: query row Tq - 1 (position Tk - 1) comes first; keys before the chunk see only decayed state
    return _launch_scan(grad_out, y, key_padding_mask, t_in=Tq, t_out=Tk, out_start=0, eta=eta, group=H // Hkv,
                        reverse=True, mask_in=False, mask_out=key_padding_mask is not None)
