"""The Deep-Thinking state update (docs/methods.md §7) over every layer's K and V in one Triton launch.

The state lives in one buffer ``work [R, 2, N·d]`` (``R`` = 2 · layers · kv heads rows; per row the current
state ``X̂`` then the re-run's new ``X_new``), so one program grid covers all of it::

    g = X_new - X̂        m = g (first update) else g + β m        X̂ <- X̂ + η m

in float32 (the momentum buffer ``m [R, N·d]`` is float32), ``X̂`` written back in the buffer's dtype, in place.
Compiled without FMA contraction, so each product and sum is rounded as the eager per-tensor reference rounds it.
Memory-bound: each element of ``X̂``, ``X_new`` and ``m`` is read once and ``X̂``, ``m`` written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _deep_thinking_update_kernel(W, M, stride_wr, stride_wh, stride_mr, n_cols, eta, beta,
                                 FIRST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    x_hat_ptr = W + row * stride_wr + cols
    x_hat = tl.load(x_hat_ptr, mask=ok, other=0.0).to(tl.float32)
    x_new = tl.load(W + row * stride_wr + stride_wh + cols, mask=ok, other=0.0).to(tl.float32)
    g = x_new - x_hat
    if FIRST:
        m = g
    else:
        m = g + beta * tl.load(M + row * stride_mr + cols, mask=ok, other=0.0)
    tl.store(M + row * stride_mr + cols, m, mask=ok)
    tl.store(x_hat_ptr, (x_hat + eta * m).to(W.dtype.element_ty), mask=ok)


BLOCK = 1024  # elements per program
FLAG_SETS = {"deep_thinking": frozenset({(("FIRST", False),), (("FIRST", True),)})}  # both values: nothing to refuse


def deep_thinking_update_(work: torch.Tensor, m: torch.Tensor, eta: float, beta: float, first: bool) -> None:
    """In place: ``work [R, 2, C]`` (``X̂`` then ``X_new`` per row, unit column stride), ``m [R, C]`` float32."""
    R, _, C = work.shape
    if R == 0 or C == 0:
        return
    _deep_thinking_update_kernel[(R, triton.cdiv(C, BLOCK))](
        work, m, work.stride(0), work.stride(1), m.stride(0), C, float(eta), float(beta), FIRST=first, BLOCK=BLOCK,
        **({} if work.device.type != "cuda" else {"enable_fp_fusion": False}),  # no FMA: the reference's roundings
    )
