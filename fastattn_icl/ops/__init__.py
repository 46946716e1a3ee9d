"""Autograd ops, the torch.library boundary, input validation and backend choice."""

from fastattn_icl.ops.attention import anchor_reweight_attention, attention, attention_with_lse
from fastattn_icl.ops.backend import use_backend
from fastattn_icl.ops.momentum import momentum_attention
from fastattn_icl.ops.prefix import shared_prefix_attention
from fastattn_icl.ops.saliency import Saliency, SaliencyResult

__all__ = [
    "Saliency",
    "SaliencyResult",
    "anchor_reweight_attention",
    "attention",
    "attention_with_lse",
    "momentum_attention",
    "shared_prefix_attention",
    "use_backend",
]
