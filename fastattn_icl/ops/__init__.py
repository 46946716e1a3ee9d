"""Autograd ops, the torch.library boundary, input validation and backend choice."""

from fastattn_icl.ops.attention import anchor_reweight_attention, attention, attention_with_lse
from fastattn_icl.ops.backend import use_backend

__all__ = ["anchor_reweight_attention", "attention", "attention_with_lse", "use_backend"]
