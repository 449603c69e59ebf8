"""Tasks: what gets trained. A task owns its data, its model builder, its per-sample loss, its
evaluation and the state that trains (what federations exchange and checkpoints hold).

Centralized training, the federation's clients and server, audits and the CLI build through
``get_task(cfg)`` instead of image-specific builders (issue 11, step 1). Tasks:
``image-classification``, ``text-classification`` and ``causal-lm``.
"""

from dpfl.tasks.base import TASKS, Task, TaskData, get_task
from dpfl.tasks.causal_lm import CausalLM
from dpfl.tasks.image import ImageClassification
from dpfl.tasks.text import TextClassification

__all__ = [
    "TASKS",
    "CausalLM",
    "ImageClassification",
    "Task",
    "TaskData",
    "TextClassification",
    "get_task",
]
