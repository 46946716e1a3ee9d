"""``gather_kv``: keep some positions of every layer's KV cache, all layers in one op.

This is the cache-compression step of anchor compression (docs/methods.md §5, Hidden_anchor): the kept
positions (label words and formatting tokens) of the demonstrations' cache become the prefix cache
of every test input. The op is ``torch.ops.fastattn_icl.gather_kv``, compiled in ``fastattn_icl._C``
(``csrc/gather_kv.cpp`` on CPU, ``csrc/cuda/gather_kv.cu`` on CUDA: one launch for all layers).
This module registers its fake (meta) kernel, so it works under ``torch.compile``, and its autograd
formula (the gradient scatters back to the kept positions). The oracle is
:func:`fastattn_icl.reference.compression.gather_kv_reference`.

Importing this module never raises: without the extension the registrations are skipped and
:func:`gather_kv` raises a ``RuntimeError`` saying how to build it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastattn_icl import _ext

__all__ = ["gather_kv"]

_OP = "gather_kv"


def gather_kv(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    index: torch.Tensor,
    *,
    check_index: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather positions ``index`` of every layer's keys and values.

    Args:
        keys: ``L`` tensors ``keys[l]: [B, Hkv, T, D]``, one per layer, all of the same shape, dtype
            and device. Any strides: non-contiguous views (for example a Hugging Face cache stored
            as ``[B, T, Hkv, D]`` and transposed) are read in place, without a copy. Any dtype.
        values: ``L`` tensors ``values[l]: [B, Hkv, T, D]``, the same shape, dtype and device as
            ``keys``.
        index: int64 positions, ``[B, M]`` (one row per batch row) or ``[M]`` (the same positions
            for every row), on the same device, each in ``[0, T)``. Positions may repeat and need
            not be sorted.
        check_index: check on the host that every position is in ``[0, T)`` and raise a
            ``ValueError`` naming the first bad one. On CUDA this costs one device-to-host sync;
            with ``False`` an out-of-range position is still caught, by a device-side assert on CUDA
            (which poisons the CUDA context) or an ``IndexError`` on CPU. Skipped while
            ``torch.compile`` traces.

    Returns:
        ``(K, V)``, each ``[L, B, Hkv, M, D]``, contiguous, of the inputs' dtype and device, with
        ``K[l, b, h, m] = keys[l][b, h, index[b, m]]`` (and likewise ``V``): an exact copy.

    Raises:
        TypeError: an argument is not a tensor (list), ``index`` is not int64, or dtypes differ.
        ValueError: an empty layer list, ``len(keys) != len(values)``, a tensor that is not
            ``[B, Hkv, T, D]`` or differs in shape or device from ``keys[0]``, an ``index`` that is
            not ``[B, M]`` or ``[M]``, or (with ``check_index``) a position outside ``[0, T)``.
        RuntimeError: ``fastattn_icl._C`` is not built, or was built without kernels for the
            inputs' device (for CUDA: without a CUDA toolkit or with a CPU-only torch).
    """
    keys, values = _check_layers(keys, values)
    ref = keys[0]
    B, H, T, D = ref.shape
    index = _check_index(index, B, ref.device)
    if not torch.compiler.is_compiling():
        # Host-side only: while torch.compile traces, the op's fake kernel stands in for it.
        _ext.require(_OP, ref.device)
        if check_index and index.device.type != "meta":
            _check_index_range(index, T)
    if index.dim() == 1:
        index = index.expand(B, index.shape[0])  # a view: the kernels read it with stride 0
    return torch.ops.fastattn_icl.gather_kv(keys, values, index)


def _check_layers(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    for name, seq in (("keys", keys), ("values", values)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(
                f"gather_kv: {name} must be a list of L tensors [B, Hkv, T, D] (one per layer), "
                f"got {type(seq).__name__}"
            )
    keys, values = list(keys), list(values)
    if not keys:
        raise ValueError("gather_kv: keys is empty; pass one [B, Hkv, T, D] tensor per layer")
    if len(keys) != len(values):
        raise ValueError(
            f"gather_kv: got {len(keys)} key tensors but {len(values)} value tensors; pass one of each per layer"
        )
    ref = keys[0]
    for name, seq in (("keys", keys), ("values", values)):
        for layer, t in enumerate(seq):
            where = f"gather_kv: {name}[{layer}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where} must be a tensor [B, Hkv, T, D], got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{where} must be [B, Hkv, T, D] (4-D), got shape {tuple(t.shape)}")
            if t.shape != ref.shape:
                raise ValueError(
                    f"{where} has shape {tuple(t.shape)} but keys[0] has {tuple(ref.shape)}; every "
                    "layer's keys and values must be [B, Hkv, T, D] with the same shape"
                )
            if t.dtype != ref.dtype:
                raise TypeError(
                    f"{where} has dtype {t.dtype} but keys[0] has {ref.dtype}; every layer's keys and "
                    "values must share one dtype"
                )
            if t.device != ref.device:
                raise ValueError(
                    f"{where} is on {t.device} but keys[0] is on {ref.device}; all tensors must be on one device"
                )
            if t.layout != torch.strided:
                raise ValueError(f"{where} must be a dense (strided) tensor, got layout {t.layout}")
    return keys, values


def _check_index(index: torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"gather_kv: index must be an int64 tensor [B, M] or [M], got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise TypeError(f"gather_kv: index must be int64 (torch.long) positions [B, M] or [M], got {index.dtype}")
    if index.dim() not in (1, 2) or (index.dim() == 2 and index.shape[0] != B):
        raise ValueError(
            f"gather_kv: index must be [B, M] = [{B}, M] (positions per batch row) or [M] (the same "
            f"positions for every row), got shape {tuple(index.shape)}"
        )
    if index.device != device:
        raise ValueError(f"gather_kv: index is on {index.device} but keys are on {device}; move it there")
    return index


def _check_index_range(index: torch.Tensor, T: int) -> None:
    if index.numel() == 0:
        return
    bad = (index < 0) | (index >= T)
    if bool(bad.any()):  # one device-to-host sync on CUDA
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"gather_kv: index{list(pos)} = {int(index[pos])} is out of range; positions must be in [0, T) = [0, {T})"
        )


# --- registrations: only when the C++ schema exists (the extension is built) -------------------------


def _gather_kv_fake(keys, values, index):
    torch._check(len(keys) > 0, lambda: "gather_kv: keys is an empty list")
    torch._check(len(keys) == len(values), lambda: "gather_kv: len(keys) != len(values)")
    ref = keys[0]
    torch._check(ref.dim() == 4, lambda: f"gather_kv: keys[0] must be [B, Hkv, T, D], got {ref.shape}")
    torch._check(index.dim() == 2, lambda: f"gather_kv: index must be [B, M], got {index.shape}")
    B, H, _, D = ref.shape
    torch._check(index.shape[0] == B, lambda: f"gather_kv: index must be [B={B}, M], got {index.shape}")
    shape = (len(keys), B, H, index.shape[1], D)
    return ref.new_empty(shape), values[0].new_empty(shape)


def _setup_context(ctx, inputs, output):
    keys, values, index = inputs
    ctx.save_for_backward(index)
    ctx.T = keys[0].shape[2]


def _backward(ctx, grad_k, grad_v):
    # grad_k, grad_v: [L, B, Hkv, M, D] -> one [B, Hkv, T, D] gradient per layer, summed over repeats.
    (index,) = ctx.saved_tensors
    L, B, H, M, D = grad_k.shape
    idx = index[None, :, None, :, None].expand(L, B, H, M, D)

    def scatter(grad):
        out = grad.new_zeros((L, B, H, ctx.T, D))
        return list(out.scatter_add_(3, idx, grad).unbind(0))

    return scatter(grad_k), scatter(grad_v), None


def _register() -> bool:
    if not _ext.has_op(_OP):
        return False
    # The C++ schema names this module as its python module (m.set_python_module in csrc/ops.cpp):
    # torch imports it by itself when it needs the fake kernel, and these calls must stay here.
    torch.library.register_fake(f"fastattn_icl::{_OP}", _gather_kv_fake)
    torch.library.register_autograd(f"fastattn_icl::{_OP}", _backward, setup_context=_setup_context)
    return True


_registered = _register()
