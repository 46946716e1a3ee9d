"""The Deep-Thinking state update (docs/methods.md §7) over every layer's K and V at once.

The state of all layers lives in one buffer ``work [R, 2, C]``: row ``r`` is one (K or V, layer, kv head) with its
current state ``X̂`` (``work[r, 0]``, ``C = N · d`` elements) next to the re-run's new ``X_new`` (``work[r, 1]``).
:class:`fastattn_icl.methods.deep_thinking.DeepThinkingCache` hands every layer views of this buffer, so the
re-run writes ``X_new`` in place and one call updates everything: one Triton launch on CUDA instead of ``2·L``
groups of small eager ops::

    g = X_new - X̂        m = g (first update) else g + β m        X̂ <- X̂ + η m

computed in float32; ``m [R, C]`` is a float32 buffer (many small η steps would round away in half precision).

On CPU the torch backend runs the compiled one-pass kernel ``torch.ops.fastattn_icl.fused_deep_thinking_update_``
(``csrc/deep_thinking.cpp``, bitwise the oracle's arithmetic) when ``fastattn_icl._C`` is built; this module
registers its fake kernel, so importing it loads the extension (never raising without it).
"""

from __future__ import annotations

import math

import torch

from fastattn_icl import _ext
from fastattn_icl.ops.backend import kernel, resolve_backend

__all__ = ["deep_thinking_update_"]


def check_coef(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    if math.isnan(x) or math.isinf(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")
    return x


@torch.library.custom_op("fastattn_icl::deep_thinking_update_", mutates_args=("work", "m"))
def _deep_thinking_update(work: torch.Tensor, m: torch.Tensor, eta: float, beta: float, first: bool,
                          backend: str) -> None:
    kernel(backend, "deep_thinking_update_")(work, m, eta, beta, first)


@_deep_thinking_update.register_fake
def _(work, m, eta, beta, first, backend):
    return None


def deep_thinking_update_(
    work: torch.Tensor, m: torch.Tensor, *, eta: float, beta: float, first: bool, backend: str | None = None
) -> None:
    """One Deep-Thinking step on every layer's K and V, in place (see the module docstring).

    Args:
        work: ``[R, 2, C]`` floating (fp16, bf16, fp32), unit stride along ``C``: ``work[:, 0]`` the state
            ``X̂`` (updated), ``work[:, 1]`` the new ``X_new`` (read).
        m: ``[R, C]`` float32 momentum buffer, same device (written; read unless ``first``).
        eta, beta: step size and momentum, finite and ``>= 0`` (defaults of the authors' code: 0.01, 0.9; ``beta
            = 0`` is the gate form ``X̂ <- η X_new + (1 - η) X̂``).
        first: the first update (``m = g``; ``m``'s old contents are not read).
        backend: ``"auto"`` (Triton on CUDA, the torch backend on CPU), ``"triton"`` or ``"torch"``; the torch backend
            runs the compiled C++ kernel on CPU tensors (eager ops, with a warning, when ``fastattn_icl._C`` is not
            built) and eager ops on other devices.
    """
    eta, beta = check_coef("eta", eta), check_coef("beta", beta)
    if not isinstance(work, torch.Tensor) or not work.is_floating_point() or work.dim() != 3 or work.shape[1] != 2:
        raise TypeError(f"work must be a floating tensor [R, 2, C], got {work!r:.80}")
    if work.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"work must be float16, bfloat16 or float32, got {work.dtype}")
    if work.shape[2] > 1 and work.stride(2) != 1:
        raise ValueError(f"work must have unit stride along C, got strides {work.stride()}")
    R, _, C = work.shape
    if not isinstance(m, torch.Tensor) or m.dtype != torch.float32 or tuple(m.shape) != (R, C):
        raise TypeError(f"m must be a float32 tensor [R={R}, C={C}], got {m!r:.80}")
    if C > 1 and m.stride(1) != 1:
        raise ValueError(f"m must have unit stride along C, got strides {m.stride()}")
    if m.device != work.device:
        raise ValueError(f"m must be on {work.device} (as work), got {m.device}")
    if not isinstance(first, bool):
        raise TypeError(f"first must be a bool, got {type(first).__name__}")
    _deep_thinking_update(work, m, eta, beta, first, resolve_backend(backend, work.device))


# --- the compiled CPU kernel's fake: only when the C++ schema exists (the extension is built) ---------------------

FUSED_OP = "fused_deep_thinking_update_"


def _fused_update_fake(work, m, eta, beta, first):
    return None


def _register_compiled() -> bool:
    if not _ext.has_op(FUSED_OP):
        return False
    # The C++ schema names this module as its python module (m.set_python_module in csrc/ops.cpp): torch checks that
    # the fake kernel is registered from there, so this call must stay here.
    torch.library.register_fake(f"fastattn_icl::{FUSED_OP}", _fused_update_fake)
    return True


_registered = _register_compiled()
