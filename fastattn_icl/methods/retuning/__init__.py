"""Re-Tuning (Pasewark et al., ACL 2024): a model solves a problem by calling itself on sub-problems.

- :mod:`~fastattn_icl.methods.retuning.tasks`: the paper's addition, DP and parity tasks in its Re-Tuning,
  scratchpad and baseline formats: training data, validation, scoring, and the rules the recursive driver follows.
- :mod:`~fastattn_icl.methods.retuning.driver`: greedy recursive inference with KV reuse across calls and batching
  (:func:`retune_generate`), and the reference loop that re-prefills after every return (:func:`reprefill_generate`).
- :mod:`~fastattn_icl.methods.retuning.tokenizer`: a character-level tokenizer for models trained from scratch.
"""

from fastattn_icl.methods.retuning.driver import CallNode, RetuneResult, reprefill_generate, retune_generate
from fastattn_icl.methods.retuning.tasks import (
    FORMATS,
    TASKS,
    TaskRules,
    final_answer_of,
    generate_pairs,
    get_task,
    ground_truth,
    problem_pairs,
    sample_problem,
    top_prompt,
    validate_pair,
)
from fastattn_icl.methods.retuning.tokenizer import char_tokenizer

__all__ = [
    "FORMATS",
    "TASKS",
    "CallNode",
    "RetuneResult",
    "TaskRules",
    "char_tokenizer",
    "final_answer_of",
    "generate_pairs",
    "get_task",
    "ground_truth",
    "problem_pairs",
    "reprefill_generate",
    "retune_generate",
    "sample_problem",
    "top_prompt",
    "validate_pair",
]
