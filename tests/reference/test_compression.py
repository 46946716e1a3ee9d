"""Anchor KV gather oracle (docs/methods.md §5)."""

import pytest
import torch

from fastattn_icl.reference import gather_kv_reference


def _cache(L=2, B=2, Hkv=2, T=5, D=3):
    """Entry encodes (layer, batch, head, position) so a gathered element names its source."""
    idx = torch.arange(L * B * Hkv * T, dtype=torch.float64).reshape(L, B, Hkv, T, 1).expand(-1, -1, -1, -1, D)
    keys = [idx[layer].clone() for layer in range(L)]
    values = [-idx[layer].clone() for layer in range(L)]
    return keys, values


def test_hand_example():
    keys, values = _cache()
    index = torch.tensor([[0, 2, 4], [3, 1, 1]])
    K, V = gather_kv_reference(keys, values, index)
    assert K.shape == V.shape == (2, 2, 2, 3, 3)
    T = 5
    for layer in range(2):
        for b in range(2):
            for h in range(2):
                base = ((layer * 2 + b) * 2 + h) * T
                expected = torch.tensor([base + int(p) for p in index[b]], dtype=torch.float64)
                assert torch.equal(K[layer, b, h, :, 0], expected)
                assert torch.equal(V[layer, b, h, :, 1], -expected)
    # position 2 of layer 1, batch 0, head 1 by hand: ((1·2 + 0)·2 + 1)·5 + 2 = 27
    assert K[1, 0, 1, 1, 0].item() == 27.0


def test_errors():
    keys, values = _cache()
    with pytest.raises(ValueError, match=r"\[0, T=5\)"):
        gather_kv_reference(keys, values, torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match=r"\[0, T=5\)"):
        gather_kv_reference(keys, values, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match=r"\[B=2, M\]"):
        gather_kv_reference(keys, values, torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="integer"):
        gather_kv_reference(keys, values, torch.tensor([[0.0], [1.0]]))
    with pytest.raises(ValueError, match="one length"):
        gather_kv_reference(keys, values[:1], torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="layer 1"):
        gather_kv_reference([keys[0], keys[1][:, :1]], [values[0], values[1][:, :1]], torch.tensor([[0], [1]]))
