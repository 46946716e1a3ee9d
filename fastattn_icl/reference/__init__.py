"""Eager PyTorch oracles: docs/methods.md §1–7 in code, one module per method.

Clarity over speed, fully batched, GQA-aware and float64-capable. Imports only torch; optimized
code never imports this package, tests and benchmarks compare against it.

Mask convention everywhere: causal is bottom-right aligned (query row ``i`` sees key ``j`` iff
``j <= i + Tk - Tq``), ``key_padding_mask`` is bool ``[B, Tk]`` with True = keep, and a row with no
visible key outputs zeros.
"""

from fastattn_icl.reference.anchors import anchor_reweight_attention
from fastattn_icl.reference.attention import attention, attention_probs, attention_scores, visible_mask
from fastattn_icl.reference.compression import gather_kv_reference
from fastattn_icl.reference.deep_thinking import (
    deep_thinking_mask,
    deep_thinking_position_ids,
    deep_thinking_update,
    gate_update,
)
from fastattn_icl.reference.isolation import ISOLATION_VALUE, isolate_scores, isolation_region
from fastattn_icl.reference.momentum import momentum_attention, momentum_recurrent, momentum_term
from fastattn_icl.reference.saliency import flow_scores, normalise_flow, probe_saliency, saliency_map

__all__ = [
    "ISOLATION_VALUE",
    "anchor_reweight_attention",
    "attention",
    "attention_probs",
    "attention_scores",
    "deep_thinking_mask",
    "deep_thinking_position_ids",
    "deep_thinking_update",
    "flow_scores",
    "gate_update",
    "gather_kv_reference",
    "isolate_scores",
    "isolation_region",
    "momentum_attention",
    "momentum_recurrent",
    "momentum_term",
    "normalise_flow",
    "probe_saliency",
    "saliency_map",
    "visible_mask",
]
