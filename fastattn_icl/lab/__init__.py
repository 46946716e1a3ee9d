"""The lab: real models, the project's task data, and the reproduction of the papers' studies.

- :func:`load_model` (``"smollm2"`` or a local checkpoint) and :func:`load_task` (``sst2``, ``agnews``, ``trec``,
  ``emoc``);
- ``python -m fastattn_icl reproduce`` runs :mod:`fastattn_icl.lab.reproduce`.
"""

from fastattn_icl.lab.models import INSTALL_HINT, LoadedModel, ModelNotFound, find_smollm2, load_model
from fastattn_icl.lab.tasks import TASKS, Example, Task, TaskDataError, load_task

__all__ = ["INSTALL_HINT", "TASKS", "Example", "LoadedModel", "ModelNotFound", "Task", "TaskDataError",
           "find_smollm2", "load_model", "load_task"]
