"""Rows of a configured task set aside for training (LatentWire's interlingua, C2C's projector): a
split of their own, never a test or calibration item of any run of the task, whatever its sizes."""

from __future__ import annotations

from cross_model.data.base import Example, available_tasks, get_task


def task_rows(name: str, n_rows: int, seed: int, path: str | None) -> list[Example]:
    """The first `n_rows` training rows of task `name` (`Task.train`), or a clear error naming the tasks
    that keep some."""
    task = get_task(name)
    if task.train is None:
        keeping = [t for t in available_tasks() if get_task(t).train is not None]
        raise ValueError(
            f"task {name!r} keeps no rows for training; train on one that does: {', '.join(keeping)}"
        )
    return task.train(n_rows, seed, path)


def content(example: Example) -> tuple:
    """What makes two items the same item: every sender's context and B's question."""
    return example.contexts, example.prompt_B


def check_disjoint(rows: list[Example], held_out: list[Example], what: str) -> None:
    """Refuse training rows that are, by content, test or calibration items of the run."""
    clash = {content(e) for e in held_out} & {content(e) for e in rows}
    if clash:
        raise ValueError(
            f"{what}: {len(clash)} training rows are test or calibration items of this run, e.g. "
            f"{sorted(clash)[0]!r}"
        )
