"""Tasks (what A sees, what B sees, the gold answers) and the projection-training corpus."""

from cross_model.data.base import Example, Task, available_tasks, get_task, load_task_examples  # noqa: F401
