"""User-level workflows of the ICL research methods, on Hugging Face models through the attention seam.

- :mod:`~fastattn_icl.methods.anchors`: label-word positions in a templated prompt, prompt building, batching.
- :mod:`~fastattn_icl.methods.reweighting`: anchor re-weighting (docs/methods.md §2), a trainable ``β[L, H, C]``.
- :mod:`~fastattn_icl.methods.isolation`: information-flow isolation (docs/methods.md §3) and its random control.
- :mod:`~fastattn_icl.methods.information_flow`: per-layer information-flow scores (docs/methods.md §4) from the fused
  backward, with the paper-style plot.
- :mod:`~fastattn_icl.methods.keep_sets`: the kept positions of anchor compression (Hidden_anchor, Hidden_random,
  Text_anchor) as rules of the template.
- :mod:`~fastattn_icl.methods.compression`: anchor compression (docs/methods.md §5), a reusable compressed demonstration
  cache served to batches of test inputs from one shared prefix, and its loyalty evaluation.
- :mod:`~fastattn_icl.methods.momentum`: momentum attention (docs/methods.md §6) in every layer of a model, also in
  ``generate``.
- :mod:`~fastattn_icl.methods.deep_thinking`: Deep-Thinking (docs/methods.md §7), iterative forward tuning of the
  demonstrations' K/V with one fused update of all layers per step, and answer-choice scoring.
- :mod:`~fastattn_icl.methods.correlation`: deep-layer correlation (the anchors paper §2.3), AUC-ROC per layer of
  the target's attention on the label words against the prediction.
- :mod:`~fastattn_icl.methods.metrics`: label and word loyalty.
- :mod:`~fastattn_icl.methods.retuning`: Re-Tuning (recursive self-calls): the tasks' data and rules, greedy recursive
  inference with KV reuse across calls and batching, a character-level tokenizer.
"""

from fastattn_icl.methods.anchors import (
    ICLExample,
    LabelWordPositions,
    PromptBuilder,
    collate,
    label_token_ids,
    label_word_positions,
)
from fastattn_icl.methods.compression import (
    CompressedDemonstrations,
    CompressionEvaluation,
    compress_demonstrations,
    evaluate_compression,
)
from fastattn_icl.methods.correlation import LabelAttentionCorrelation, auc_roc, deep_layer_correlation
from fastattn_icl.methods.deep_thinking import DeepThinkingResult, deep_thinking, score_choices
from fastattn_icl.methods.information_flow import InformationFlow, information_flow
from fastattn_icl.methods.isolation import (
    first_layers,
    isolate,
    last_layers,
    pad_positions,
    random_non_label_positions,
)
from fastattn_icl.methods.keep_sets import KeepSet, hidden_anchor_keep, hidden_random_positions, text_anchor_text
from fastattn_icl.methods.metrics import label_loyalty, label_predictions, topk_jaccard, word_loyalty
from fastattn_icl.methods.momentum import momentum
from fastattn_icl.methods.reweighting import AnchorReweighting, ReweightingEvaluation

__all__ = [
    "AnchorReweighting",
    "CompressedDemonstrations",
    "CompressionEvaluation",
    "DeepThinkingResult",
    "ICLExample",
    "InformationFlow",
    "LabelWordPositions",
    "PromptBuilder",
    "ReweightingEvaluation",
    "collate",
    "compress_demonstrations",
    "deep_thinking",
    "evaluate_compression",
    "first_layers",
    "hidden_anchor_keep",
    "hidden_random_positions",
    "information_flow",
    "isolate",
    "KeepSet",
    "LabelAttentionCorrelation",
    "auc_roc",
    "deep_layer_correlation",
    "label_loyalty",
    "label_predictions",
    "label_token_ids",
    "label_word_positions",
    "momentum",
    "last_layers",
    "pad_positions",
    "random_non_label_positions",
    "score_choices",
    "text_anchor_text",
    "topk_jaccard",
    "word_loyalty",
]
