"""Oracle for the anchor KV gather of docs/methods.md §5 (Hidden_anchor compression)."""

from __future__ import annotations

import torch

__all__ = ["gather_kv_reference"]


def _check(keys, values, index) -> None:
    if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple)):
        raise TypeError("keys and values must be lists of tensors [B, Hkv, T, D], one per layer")
    if len(keys) == 0 or len(keys) != len(values):
        raise ValueError(f"keys and values must be non-empty and of one length, got {len(keys)} and {len(values)}")
    if not isinstance(index, torch.Tensor) or index.dtype == torch.bool or index.is_floating_point():
        raise TypeError("index must be an integer tensor [B, M]")
    if index.dim() != 2:
        raise ValueError(f"index must have shape [B, M], got {tuple(index.shape)}")
    shape = None
    for layer, (k, v) in enumerate(zip(keys, values)):
        for name, t in (("keys", k), ("values", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name}[{layer}] must be a tensor [B, Hkv, T, D]")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"keys[{layer}] {tuple(k.shape)} and values[{layer}] {tuple(v.shape)} differ in [B, Hkv, T]"
            )
        if shape is None:
            shape = (tuple(k.shape), tuple(v.shape))
        elif (tuple(k.shape), tuple(v.shape)) != shape:
            raise ValueError(
                f"layer {layer} has cache shapes {tuple(k.shape)}, {tuple(v.shape)}; layer 0 has {shape}"
            )
    B, _, T, _ = shape[0]
    if index.shape[0] != B:
        raise ValueError(f"index must have shape [B={B}, M], got {tuple(index.shape)}")
    if bool(((index < 0) | (index >= T)).any()):
        raise ValueError(f"index entries must be cache positions in [0, T={T})")


def gather_kv_reference(
    keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep positions ``index [B, M]`` (per batch row) of every layer's cache.

    ``keys[l]``, ``values[l]``: ``[B, Hkv, T, D]``. Returns ``(K, V)``, each ``[L, B, Hkv, M, D]``
    with ``K[l, b, h, m] = keys[l][b, h, index[b, m]]``. Positions are used as given (order and
    repeats are kept); each must lie in ``[0, T)``.
    """
    _check(keys, values, index)
    index = index.long()
    out_k, out_v = [], []
    for k, v in zip(keys, values):
        idx_k = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        idx_v = index[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[3])
        out_k.append(torch.gather(k, 2, idx_k))
        out_v.append(torch.gather(v, 2, idx_v))
    return torch.stack(out_k), torch.stack(out_v)
