"""A Hugging Face cache that carries momentum attention's running state (docs/methods.md §6) in O(d) per layer.

With :func:`fastattn_icl.methods.momentum`, every attention call adds ``M_t = Σ_{i<t} η^{t-i} v_i`` at absolute
positions. A plain ``DynamicCache`` holds every value, so the seam recomputes ``M`` from all of them in each call:
correct, but O(T·d) per layer and decoding step. :class:`MomentumCache` is a ``DynamicCache`` whose layers also keep
``M`` at their end (``[B, Hkv, D]`` float32, ``m_(t+1) = η (m_t + v_t)``), so a step reads only its new values::

    with fastattn_icl.methods.momentum(model, eta=0.5):
        out = model.generate(ids, attention_mask=mask, past_key_values=MomentumCache(), max_new_tokens=50)

A layer's ``update`` (which the attention module calls right before the attention function) records itself for
the seam, which takes the record in the same call; the state is used only when it was computed with the same η at
exactly the first new position, and recomputed from all values otherwise (a prefill, or a cache filled before).
Beam reordering and batch selection reorder the state with the keys.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from fastattn_icl.integrations.updated_layers import record_updated_layer, take_updated_layer

__all__ = ["MomentumCache", "take_updated_layer"]

class _MomentumLayer(DynamicLayer):
    """A ``DynamicLayer`` that also holds ``M`` at its end: ``state [B, Hkv, D]`` float32 for ``eta`` at position
    ``state_position`` (``None`` until the seam computes it)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.layer_idx: int | None = None
        self.state: torch.Tensor | None = None
        self.state_position = -1
        self.state_eta: float | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        record_updated_layer(self.layer_idx, self)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.state, self.state_position, self.state_eta = None, -1, None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.state, self.state_position, self.state_eta = None, -1, None  # recomputed from the values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.state is not None:
            self.state = self.state[indices]


class MomentumCache(DynamicCache):
    """A ``DynamicCache`` whose layers carry momentum attention's running state (see the module docstring)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=_MomentumLayer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        while len(self.layers) <= layer_idx:
            self.layers.append(_MomentumLayer())
        self.layers[layer_idx].layer_idx = layer_idx
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)
