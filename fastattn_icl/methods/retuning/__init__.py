"""Re-Tuning (Pasewark et al., ACL 2024): models that solve a problem by calling themselves on subproblems.

- :mod:`~fastattn_icl.methods.retuning.driver`: greedy recursive inference with KV reuse across calls and batching
  (:func:`retune_generate`), and the reference loop that re-prefills after every return (:func:`reprefill_generate`).
- :mod:`~fastattn_icl.methods.retuning.tokenizer`: a character-level tokenizer for models trained from scratch.
"""

from fastattn_icl.methods.retuning.driver import CallNode, RetuneResult, reprefill_generate, retune_generate
from fastattn_icl.methods.retuning.tokenizer import char_tokenizer

__all__ = ["CallNode", "RetuneResult", "char_tokenizer", "reprefill_generate", "retune_generate"]
