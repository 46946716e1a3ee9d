"""Tolerance rule shared by tests and benchmarks (DESIGN.md).

One oracle, two precisions: the kernel's error against a float64 oracle may be at most ``factor``
times the error of the same-dtype oracle against the float64 oracle, plus a small epsilon term
(``factor`` = 2 for outputs, 3 for gradients). The epsilon term is at the precision of the computation: ``EPS``
(relative to the oracle's largest magnitude) for fp16/bf16/fp32, ``EPS64`` when the result and the same-dtype
reference are both float64 (two float64 ways of computing one quantity, e.g. two forms of an oracle).
"""

from __future__ import annotations

import torch

FWD_FACTOR = 2.0
GRAD_FACTOR = 3.0
EPS = 1e-5
EPS64 = 1e-12


def default_eps(out: torch.Tensor, same_dtype_ref: torch.Tensor) -> float:
    """``EPS64`` when ``out`` and ``same_dtype_ref`` are both float64, ``EPS`` otherwise."""
    return EPS64 if out.dtype == same_dtype_ref.dtype == torch.float64 else EPS


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, NaN-aware: any NaN in ``x`` (where ``ref`` is finite) gives inf.

    An infinity of ``ref`` (a masked logit, the lse of an empty row) is matched only by the same infinity.
    """
    x64, ref64 = x.detach().double().cpu(), ref.detach().double().cpu()
    if x64.shape != ref64.shape:
        raise ValueError(f"shape mismatch: {tuple(x64.shape)} vs reference {tuple(ref64.shape)}")
    if x64.numel() == 0:
        return 0.0
    diff = torch.where(x64 == ref64, 0.0, (x64 - ref64).abs())
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max())


def tolerance(same_dtype_ref: torch.Tensor, ref64: torch.Tensor, *, factor: float, eps: float = EPS) -> float:
    finite = ref64.detach()[torch.isfinite(ref64.detach())]  # an infinite entry must not make the scale infinite
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return factor * max_error(same_dtype_ref, ref64) + eps * scale


def check_close(
    name: str,
    out: torch.Tensor,
    same_dtype_ref: torch.Tensor,
    ref64: torch.Tensor,
    *,
    factor: float = FWD_FACTOR,
    eps: float | None = None,
) -> tuple[float, float]:
    """Raise ``AssertionError`` if ``out`` breaks the rule; return ``(error, tolerance)``. ``eps`` defaults to
    :func:`default_eps`."""
    eps = default_eps(out, same_dtype_ref) if eps is None else eps
    err = max_error(out, ref64)
    tol = tolerance(same_dtype_ref, ref64, factor=factor, eps=eps)
    if not err <= tol:
        ref_err = max_error(same_dtype_ref, ref64)
        raise AssertionError(
            f"{name}: max error {err:.3e} > tolerance {tol:.3e} "
            f"({factor}x same-dtype reference error {ref_err:.3e} + eps)"
        )
    return err, tol


def _cast(args: tuple, dtype: torch.dtype) -> list:
    return [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def check_against_oracle(
    name: str,
    fn,
    oracle,
    *args,
    dtype: torch.dtype = torch.float32,
    factor: float = FWD_FACTOR,
    eps: float | None = None,
) -> tuple[float, float]:
    """The rule for two ways of computing one quantity: ``fn(*args)`` in ``dtype`` against ``oracle(*args)`` in
    float64, with ``oracle(*args)`` in ``dtype`` as the same-dtype reference.

    Floating-point tensors among ``args`` are detached and cast (``fn`` makes its own leaves for gradients),
    anything else passes through. ``fn`` and ``oracle`` return a tensor or a sequence of tensors, compared
    element by element. Return the worst ``(error, tolerance)``.
    """
    low, high = _cast(args, dtype), _cast(args, torch.float64)
    outs, refs, refs64 = fn(*low), oracle(*low), oracle(*high)
    if isinstance(outs, torch.Tensor):
        return check_close(name, outs, refs, refs64, factor=factor, eps=eps)
    if not len(outs) == len(refs) == len(refs64):
        raise ValueError(f"{name}: {len(outs)} results vs {len(refs)} from the oracle")
    checks = [
        check_close(f"{name}[{i}]", o, r, r64, factor=factor, eps=eps)
        for i, (o, r, r64) in enumerate(zip(outs, refs, refs64))
    ]
    return max(checks)
