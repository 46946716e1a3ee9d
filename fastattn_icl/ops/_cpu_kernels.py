"""The compiled kernels of the CPU attention path (``csrc/cpu_features.cpp``, ``csrc/cpu_saliency.cpp``), and their
fakes.

The plain-PyTorch backend (:mod:`fastattn_icl.ops._torch_backend`) calls them on CPU tensors when ``fastattn_icl._C``
is built: the anchor correction and its backward, the isolated rows of a causal call as short key windows (these
take the backend's grouped layouts, ``q`` ``[B, Hkv, G, Tq, D]``, ``k``/``v`` ``[B, Hkv, Tk, D]``, ``lse``
``[B, Hkv, G, Tq]`` float32, with any strides but a unit one along ``D``), the momentum decay scan and the scan
added into the attention output (``momentum_add_``), the saliency
pass's reduction of each chunk of rows (contiguous ``[B, H, n, Tc]`` chunks of ``P`` and ``dO Vᵀ``), and the backward
of plain attention without a key mask (``csrc/cpu_flash.cpp``, in place of PyTorch's CPU flash backward).
Without the extension the backend runs its eager code for the same math and warns once (:func:`warn_missing`). The
backend imports this module on first use (it loads the extension).
"""

from __future__ import annotations

import functools
import warnings

import torch

from fastattn_icl import _ext
from fastattn_icl.ops._validate import output_like

OPS = ("anchor_correction_", "anchor_backward_", "isolation_window_ok", "isolation_window_fwd_",
       "isolation_window_bwd_", "momentum_scan", "momentum_add_", "saliency_reduce", "flash_attention_fwd",
       "flash_attention_bwd")


ARGS = (("flash_attention_fwd", "key_weights"),)  # (op, argument): an older build's op of that name lacks it


def _missing() -> str | None:
    """The first op of :data:`OPS` (or argument of :data:`ARGS`) the build lacks, or ``None``."""
    op = next((name for name in OPS if not _ext.has_op(name)), None)
    if op is not None:
        return f"fastattn_icl::{op}"
    return next((f"the argument {arg} of fastattn_icl::{op}" for op, arg in ARGS if not _ext.has_op(op, arg)), None)


@functools.cache
def available() -> bool:
    """Whether the extension is built with every op of :data:`OPS`, with the arguments of :data:`ARGS` (asked once: a
    build does not change under a running process)."""
    return _missing() is None


_warned = False


def warn_missing() -> None:
    """Warn, once per process, that the CPU features run eager ops because the compiled kernels are missing."""
    global _warned
    if _warned:
        return
    _warned = True
    why = _ext.load_error() or f"the build has no {_missing() or 'fastattn_icl::' + OPS[0]} (built from older sources)"
    warnings.warn(
        "fastattn_icl: the CPU path's anchor re-weighting, isolated rows, momentum scan and saliency run eager PyTorch "
        "ops (tens of small ops per call), and its attention PyTorch's slower CPU flash kernel, because their "
        f"compiled kernels are missing: {why}; {_ext.BUILD_HINT}",
        RuntimeWarning,
        stacklevel=4,
    )


def _no_output(*args) -> None:
    return None


def _flag(first, *args) -> torch.Tensor:
    """Whether the op served the rows: a bool scalar on the device of its first tensor (all share one)."""
    return torch.empty((), dtype=torch.bool, device=first.device)


def _scan_fake(x, eta, reverse) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _momentum_add_fake(o, v, key_padding_mask, eta) -> torch.Tensor:
    return torch.empty(v.shape[0], v.shape[1], v.shape[3], dtype=v.dtype, device=v.device)


def _saliency_fake(p, dp, key_padding_mask, label, target, row0, causal, per_head, row_slot, rows, p_min):
    B, H = p.shape[:2]
    return torch.empty(B, 1 + (H if per_head else 0), 3, dtype=torch.float64, device=p.device)


def _flash_fwd_fake(q, k, v, causal, scale, key_weights=None):
    B, H, Tq, _ = q.shape
    return output_like(q), torch.empty(B, H, Tq, dtype=q.dtype, device=q.device)


def _flash_bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=q.dtype, device=q.device))


def _register_fakes() -> bool:
    if not available():
        return False
    # csrc/ops.cpp names this module as the ops' python module: torch checks that their fakes are registered here
    fakes = {"anchor_correction_": _no_output, "anchor_backward_": _no_output, "isolation_window_ok": _flag,
             "isolation_window_fwd_": _flag, "isolation_window_bwd_": _no_output,
             "momentum_scan": _scan_fake, "momentum_add_": _momentum_add_fake, "saliency_reduce": _saliency_fake,
             "flash_attention_fwd": _flash_fwd_fake, "flash_attention_bwd": _flash_bwd_fake}
    for name, fake in fakes.items():
        torch.library.register_fake(f"fastattn_icl::{name}", fake)
    return True


_registered = _register_fakes()
