"""Loader of the compiled extension ``fastattn_icl._C`` (C++ / CUDA ops in ``torch.ops.fastattn_icl``).

Nothing here raises at import, imports the extension at import, or touches CUDA: the package works
without the extension built. The extension is imported on first use, by :func:`load` (or anything
that calls it), and the outcome is cached. Code that needs a compiled op calls :func:`require`, which
raises a ``RuntimeError`` saying how to build what is missing; there is no silent fallback from an
explicit request.

``load() -> module | None``, ``available() -> bool``, ``load_error() -> str | None``,
``has_cuda_kernels() -> bool`` (whether the build compiled ``csrc/cuda``), ``has_op(name) -> bool``,
``require(op_name, device)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

NAMESPACE = "fastattn_icl"

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `pip install --no-build-isolation .`; --no-build-isolation builds against the installed torch)"
)
CUDA_BUILD_HINT = (
    "rebuild with a CUDA toolkit (CUDA_HOME pointing at it, nvcc on PATH) and a CUDA build of torch: "
    "`pip install --no-build-isolation -e .` (FASTATTN_ICL_NO_CUDA must not be 1)"
)

# Dispatch keys of the devices the ops can run on (Meta: shape-only, from the fake kernels).
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}

_state: dict[str, object] = {"tried": False, "module": None, "error": None}


def load() -> ModuleType | None:
    """Import ``fastattn_icl._C`` once; the module, or ``None`` when it cannot be imported."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = importlib.import_module("fastattn_icl._C")
        except Exception as exc:  # ImportError, or OSError / undefined symbols from a stale build
            _state["module"] = None
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["module"]  # type: ignore[return-value]


def load_error() -> str | None:
    """Why the extension could not be imported (``None`` when it was, or was not tried yet)."""
    return _state["error"]  # type: ignore[return-value]


def available() -> bool:
    """Whether ``fastattn_icl._C`` is importable."""
    return load() is not None


def has_cuda_kernels() -> bool:
    """Whether the extension is importable and was built with its CUDA kernels. Touches no CUDA."""
    module = load()
    return bool(getattr(module, "WITH_CUDA", False)) if module is not None else False


def has_op(op_name: str, argument: str | None = None) -> bool:
    """Whether ``torch.ops.fastattn_icl.<op_name>`` has a schema (loads the extension first), with an argument named
    ``argument`` when one is given (a build from older sources has the op without a newer argument)."""
    load()
    schema = _schema(op_name)
    return schema is not None and (argument is None or any(a.name == argument for a in schema.arguments))


def _schema(op_name: str):
    """The op's ``FunctionSchema``, or ``None`` when it is not registered."""
    try:
        return torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{op_name}", "").schema()
    except RuntimeError:
        return None


def require(op_name: str, device: torch.device | str) -> None:
    """Raise ``RuntimeError`` unless the compiled op ``op_name`` can run on ``device``.

    The message says what is missing and how to build it: the extension itself, the op (a stale
    build), or the CUDA kernels (a build made without a CUDA toolkit or with a CPU-only torch).
    """
    device = torch.device(device)
    qualname = f"{NAMESPACE}::{op_name}"
    if load() is None:
        raise RuntimeError(
            f"{qualname} needs the compiled extension fastattn_icl._C, which could not be imported "
            f"({load_error()}); {BUILD_HINT}"
        )
    if _schema(op_name) is None:
        raise RuntimeError(
            f"the installed fastattn_icl._C has no op {qualname} (it was built from older sources); "
            f"rebuild it: {BUILD_HINT}"
        )
    if device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            f"{qualname} was asked to run on {device}, but fastattn_icl._C was built without CUDA "
            f"kernels (torch {torch.__version__}, torch.version.cuda={torch.version.cuda}); "
            f"{CUDA_BUILD_HINT}"
        )
    key = _DISPATCH_KEYS.get(device.type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
        supported = [
            d for d, k in _DISPATCH_KEYS.items() if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k)
        ]
        hint = f"; {CUDA_BUILD_HINT}" if device.type == "cuda" else ""
        raise RuntimeError(
            f"{qualname} has no kernel for device {device} in this build (it has: "
            f"{', '.join(supported) or 'none'}){hint}"
        )
