"""Re-Tuning (Pasewark et al., ACL 2024): a model solves a problem by calling itself on sub-problems.

- :mod:`~fastattn_icl.methods.retuning.tasks`: the paper's addition, DP and parity tasks in its Re-Tuning,
  scratchpad and baseline formats: training data, validation, scoring, and the rules the recursive driver follows.
"""

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

__all__ = [
    "FORMATS",
    "TASKS",
    "TaskRules",
    "final_answer_of",
    "generate_pairs",
    "get_task",
    "ground_truth",
    "problem_pairs",
    "sample_problem",
    "top_prompt",
    "validate_pair",
]
