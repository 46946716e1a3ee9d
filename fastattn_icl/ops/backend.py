"""Backend choice for the attention ops: explicit, never a silent fallback.

``"auto"`` picks the Triton kernels for CUDA tensors and the plain-PyTorch backend for CPU tensors.
``"triton"`` on CPU tensors is allowed only when ``TRITON_INTERPRET=1`` was set before the kernels
were imported (that is how the test suite proves the kernels on a machine without a GPU).
``"torch"`` runs the plain-PyTorch backend on any device.
The default can be changed for a block of code with :func:`use_backend`, or for the process with the
``FASTATTN_ICL_BACKEND`` environment variable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
# decided once, at import (finding a package does not import it): a lookup per call cannot be traced by
# torch.compile(fullgraph=True) (torch 2.11's compiler refuses importlib.util.find_spec)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_default = [os.environ.get("FASTATTN_ICL_BACKEND", "auto")]


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Make ``name`` the backend of every attention op called inside the block."""
    _check_name(name)
    _default.append(name)
    try:
        yield
    finally:
        _default.pop()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(name: str | None, device: torch.device) -> str:
    """Turn ``name`` (or the current default) into ``"triton"`` or ``"torch"`` for ``device``."""
    name = _check_name(_default[-1] if name is None else name)
    if name == "torch":
        return "torch"
    has_triton = _HAS_TRITON
    if device.type == "cuda":
        if not has_triton:
            raise RuntimeError(
                "fastattn_icl's CUDA path needs Triton (pip install triton); "
                "pass backend='torch' to run the plain-PyTorch backend instead"
            )
        return "triton"
    if name == "auto":
        return "torch"
    if not has_triton:
        raise RuntimeError("backend='triton' needs Triton installed (pip install triton)")
    if device.type == "cpu" and triton_interpreting():
        return "triton"
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors, got {device}; on CPU it runs only under the Triton "
        "interpreter (export TRITON_INTERPRET=1 before importing fastattn_icl), which is meant for tests"
    )
