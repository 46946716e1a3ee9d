"""Input checks shared by every op: typed errors that name what was expected, never ``assert``."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def output_like(q: torch.Tensor) -> torch.Tensor:
    """An empty output ``[B, H, Tq, D]`` in ``q``'s dtype, laid out as every backend writes it and the fake kernels
    promise: as ``q`` when ``q`` is contiguous (the usual ``[B, H, T, D]`` call; SDPA does the same), else as
    ``[B, Tq, H, D]`` memory (a Hugging Face model's ``.transpose(1, 2)`` view, a slice of a fused projection), so
    that ``out.transpose(1, 2)`` is contiguous there."""
    B, H, Tq, D = q.shape
    if q.is_contiguous():
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    return torch.empty(B, Tq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Check ``q [B, H, Tq, D]``, ``k``/``v [B, Hkv, Tk, D]``; return ``(B, H, Hkv, Tq, Tk, D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, heads, T, head_dim] (4 dims), got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"k must have batch size {B} (as q), got {Bk}")
    if Dk != D:
        raise ValueError(f"k must have head_dim {D} (as q), got {Dk}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv}) for grouped-query attention")
    check_head_dim(D)
    return B, H, Hkv, Tq, Tk, D


def check_head_dim(D: int) -> None:
    if D < 8 or D > MAX_HEAD_DIM or D % 8 != 0:
        raise ValueError(f"head_dim must be a multiple of 8 between 8 and {MAX_HEAD_DIM}, got {D}")


def check_key_padding_mask(mask: torch.Tensor | None, B: int, Tk: int, device: torch.device) -> None:
    """``mask`` is ``None`` or a bool tensor ``[B, Tk]`` with True = keep, on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor [B, Tk], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be torch.bool [B={B}, Tk={Tk}] (True = keep), got {mask.dtype}")
    if tuple(mask.shape) != (B, Tk):
        raise ValueError(f"key_padding_mask must have shape [B={B}, Tk={Tk}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device} (as q), got {mask.device}")


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    scale = float(scale)
    if not scale > 0.0 or scale != scale or scale == float("inf"):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return scale


def check_index_tensor(name: str, t, dims: int, layout: str, device: torch.device) -> torch.Tensor:
    """``t`` as int64 if it is an integer tensor with ``dims`` dims on ``device``; the errors name ``layout``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor {layout}, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor {layout}, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (as q), got {t.device}")
    return t.long()


def any_each(*conditions: torch.Tensor) -> list[bool]:
    """``[c.any() for c in conditions]`` with a single device-to-host copy."""
    return torch.stack([c.any() for c in conditions]).tolist()
