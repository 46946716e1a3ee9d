"""Momentum attention (docs/methods.md §6, MoAttn) on a Hugging Face model: every attention layer (or some) adds
``M_t = Σ_{i<t} η^{t-i} v_i`` of its kv head to its output, through the ``"fastattn_icl"`` seam.

    with fastattn_icl.methods.momentum(model, eta=0.1):
        logits = model(input_ids, attention_mask=mask).logits
        tokens = model.generate(input_ids, attention_mask=mask, max_new_tokens=20)

Positions are absolute over the layer's cache, so a prefill, a chunk over a cache and single-token decoding
(``generate``) all add the momentum a full pass would. With a plain ``DynamicCache`` each step rescans the layer's
values; pass ``past_key_values=fastattn_icl.integrations.momentum_cache.MomentumCache()`` to carry the running
state in O(d) per layer instead. The model is switched to the seam for the block (GPT-J is
patched) and switched back after it, also when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from fastattn_icl.integrations import ICLController, routed
from fastattn_icl.ops.momentum import check_eta

__all__ = ["momentum"]


@contextlib.contextmanager
def momentum(model: torch.nn.Module, eta: float, *, layers: Iterable[int] | None = None) -> Iterator[ICLController]:
    """Run the block with momentum attention of strength ``eta`` in ``layers`` (default: every layer).

    Args:
        model: a Hugging Face decoder model of a routed family (or GPT-J).
        eta: η in ``[0, 1)``; ``0`` is plain attention.
        layers: decoder layer indices, or ``None`` for all.

    Yields:
        the model's controller (the state is removed on exit; nested blocks restore the outer state).

    Raises:
        ValueError: η outside ``[0, 1)`` or a layer index out of range.
    """
    eta = check_eta(eta)
    with routed(model) as controller, controller.override(layers=layers, momentum=eta):
        yield controller
