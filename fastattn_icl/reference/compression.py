"""Oracle for the anchor KV gather of SPEC.md §5 (Hidden_anchor compression)."""

from __future__ import annotations

import torch


def gather_kv_reference(
    keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep positions ``index [B, M]`` (per batch row) of every layer's cache.

    ``keys[l]``, ``values[l]``: ``[B, Hkv, T, D]``. Returns ``(K, V)``, each ``[L, B, Hkv, M, D]``
    with ``K[l, b, h, m] = keys[l][b, h, index[b, m]]``.
    """
    out_k, out_v = [], []
    for k, v in zip(keys, values):
        idx = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        out_k.append(torch.gather(k, 2, idx))
        out_v.append(torch.gather(v, 2, idx))
    return torch.stack(out_k), torch.stack(out_v)
