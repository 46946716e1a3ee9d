"""Which cache layer an attention call reads: a per-thread record from a cache layer's ``update`` to the seam.

A Hugging Face attention module updates its cache layer and calls the attention function right after, without
passing the layer. :class:`~fastattn_icl.integrations.momentum_cache.MomentumCache` layers record themselves here
in ``update``; the seam takes the record in the same call. This module imports nothing from transformers, so the
seam can read it without importing transformers' cache code.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["record_updated_layer", "take_updated_layer"]

_updated = threading.local()


def record_updated_layer(layer_idx: int | None, layer: Any) -> None:
    """Record that ``layer`` (of layer index ``layer_idx``) was just updated in this thread."""
    if not hasattr(_updated, "layers"):
        _updated.layers = {}
    _updated.layers[layer_idx] = layer


def take_updated_layer(layer_idx: int | None) -> Any:
    """The cache layer that was just updated for ``layer_idx`` in this thread, or ``None``. Every record is dropped on
    each call (an attention call follows its layer's update at once), so a record left by a forward outside a
    momentum block can neither reach a later call nor keep its cache alive."""
    records = getattr(_updated, "layers", None)
    if not records:
        return None
    layer = records.get(layer_idx) if layer_idx is not None else None
    records.clear()
    return layer
