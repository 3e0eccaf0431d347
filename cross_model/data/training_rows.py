"""Rows of a configured task set aside for training (LatentWire's interlingua, C2C's projector): never
its test or calibration items."""

from __future__ import annotations

from cross_model.data.base import Example, load_task_examples
from cross_model.data.hub import TASKS as HUB_TASKS
from cross_model.data.ladder import LADDER_TASKS, training_rows


def task_rows(name: str, n_test: int, n_calib: int, n_rows: int, seed: int, path: str | None) -> list[Example]:
    """Rows of a configured task that are neither its test nor its calibration items: the ladder's
    middle rows, or a hub split's rows after its test rows (its calibration rows are at the back)."""
    if name in LADDER_TASKS:
        return training_rows(name, n_test, n_calib, n_rows, seed)
    if name in HUB_TASKS:  # the rows after the test rows, from the front: calibration keeps its own (the back)
        rows, _ = load_task_examples(name, n_test + n_rows, n_calib, seed, path)
        return rows[n_test:]
    raise ValueError(
        f"interlingua: task {name!r} has no rows set aside for training; train on {', '.join(LADDER_TASKS)} "
        f"or a hub task ({', '.join(sorted(HUB_TASKS))})"
    )
