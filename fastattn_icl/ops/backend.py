"""Backend choice for the attention ops: explicit, never a silent fallback.

``"auto"`` picks the Triton kernels for CUDA tensors and the plain-PyTorch backend for CPU tensors.
``"triton"`` on CPU tensors is allowed only when ``TRITON_INTERPRET=1`` was set before the kernels
were imported (that is how the test suite proves the kernels on a machine without a GPU).
``"torch"`` runs the plain-PyTorch backend on any device.
The default can be changed for a block of code with :func:`use_backend`, or for the process with the
``FASTATTN_ICL_BACKEND`` environment variable.

Every op turns its ``backend`` argument into ``"triton"`` or ``"torch"`` with :func:`resolve_backend` and then
finds the function that computes it with :func:`kernel`: the one dispatch of the package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "torch")
# decided once, at import (finding a package does not import it): a lookup per call cannot be traced by
# torch.compile(fullgraph=True) (torch 2.11's compiler refuses importlib.util.find_spec)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_default = [os.environ.get("FASTATTN_ICL_BACKEND", "auto")]

# the functions both backends implement (same names, same contract), and the module of fastattn_icl._triton
# that holds each; the plain-PyTorch backend holds all of them in fastattn_icl.ops._torch_backend
_TRITON_MODULE = {
    "attention_fwd": "attention",
    "attention_bwd": "attention",
    "attention_saliency": "attention",
    "momentum_attention_fwd": "attention",
    "momentum_term": "momentum",
    "momentum_continue": "momentum",
    "momentum_value_grad": "momentum",
    "deep_thinking_update_": "deep_thinking",
}
# fusions only the plain-PyTorch backend has (the Triton kernels fuse the same work in their epilogues): kernel()
# gives None for them on the Triton backend, and the op runs its general composition
_TORCH_ONLY = ("momentum_attention_fwd_fused",)


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


def kernel(backend: str, name: str) -> Callable | None:
    """The function ``name`` (a key of ``_TRITON_MODULE``) of a resolved backend, ``"triton"`` or ``"torch"``; for a
    name of ``_TORCH_ONLY``, ``None`` on the Triton backend.

    Modules are imported on first use, so importing fastattn_icl never imports Triton. Called inside the
    ``torch.library`` ops, which ``torch.compile`` does not trace into.
    """
    if name not in _TRITON_MODULE and name not in _TORCH_ONLY:
        raise ValueError(f"no kernel named {name!r}; the kernels are {sorted([*_TRITON_MODULE, *_TORCH_ONLY])}")
    if backend == "triton" and name in _TORCH_ONLY:
        return None
    if backend == "triton":
        module = importlib.import_module(f"fastattn_icl._triton.{_TRITON_MODULE[name]}")
    elif backend == "torch":
        from fastattn_icl.ops import _torch_backend as module
    else:
        raise ValueError(f"backend must be resolved to 'triton' or 'torch' first, got {backend!r}")
    return getattr(module, name)
