"""The task interface and registry. Every example has a stable id, A's prompt, B's prompt and answers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

QA = "qa"
MATH = "math"
CODE = "code"
SUMMARY = "summary"
CHOICE = "choice"  # multiple choice: B's prompt is the benchmark's own answer template


@dataclass(frozen=True)
class Example:
    example_id: str
    prompt_A: str  # what only the sender sees (context, hint, tip sheet)
    prompt_B: str  # what only the receiver sees (the question)
    answers: tuple[str, ...]
    task: str
    max_new_tokens: int
    metric: (
        str  # f1_match, exact_match, numeric_match, rouge_l_recall, edit_similarity, choice_letter
    )
    kind: str = QA  # selects the instruction (QA, math, code or summary)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Multi-sender tasks: the contexts of senders 2, 3, ... (`prompt_A` is sender 1's). Methods that
    # cannot serve several senders refuse such a task (`Method.multi_sender`).
    more_senders: tuple[str, ...] = ()

    @property
    def contexts(self) -> tuple[str, ...]:
        return (self.prompt_A, *self.more_senders)

    def as_sender(self, j: int) -> Example:
        """The item as sender j sees it: its own context as `prompt_A`, no other sender's."""
        if not self.more_senders:
            if j:
                raise IndexError(f"{self.example_id} has one sender, not {j + 1}")
            return self
        return replace(self, prompt_A=self.contexts[j], more_senders=())


def sender_count(examples: list[Example]) -> int:
    """How many senders a batch's items have: one number for the batch, or a clear error."""
    counts = {len(e.contexts) for e in examples}
    if len(counts) > 1:
        raise ValueError(
            f"a batch mixes items with {sorted(counts)} senders; a multi-sender task gives every item "
            "the same number (this batch: " + ", ".join(e.example_id for e in examples[:4]) + ")"
        )
    return counts.pop() if counts else 1


SMALL_SOURCE = 50  # below this many rows (test fixtures, a hand-made file) no reserve is set aside
# A source that also gives training rows keeps its test items among the first TEST_REGION rows of its
# fixed order; the rows after them, up to the calibration reserve, are its training rows. Fixed, so that
# a row's split never depends on how many test items a run asks for.
TEST_REGION = 1000
# n_test asking for every row of a source, with no calibration items (`calibrate_on: test_item_0`,
# as the public KVComm code's countries and tip-sheets runs score every row)
EVERY_ROW = 10**9


def calibration_reserve(n: int) -> int:
    """How many of a fixed-size source's rows, at the back of its fixed order, are kept for calibration:
    4% of them, at least 8 and at most 64; none for a source of fewer than `SMALL_SOURCE` rows."""
    return 0 if n < SMALL_SOURCE else min(64, max(8, n // 25))


def front_and_back(
    items: list,
    n_test: int,
    n_calib: int,
    task: str,
    what: str = "items",
    test_region: int | None = None,
) -> tuple[list, list]:
    """Test items from the front of a source's fixed order, calibration items from a reserve of fixed
    size at its back (`calibration_reserve`): an item's split is a property of the item, the same for
    every n_test and n_calib, so no run's calibration item is another run's test item. A small source
    has no reserve: calibration takes its last n_calib rows, and only within one run are the two
    splits disjoint. A source that also gives training rows (`training_region`) keeps its test items
    among its first `test_region` items."""
    if n_test == EVERY_ROW and not n_calib:
        return list(items), []
    reserve = calibration_reserve(len(items))
    if not reserve:
        if n_test + n_calib > len(items):
            raise ValueError(
                f"tasks.{task}: n_test ({n_test}) + n_calib ({n_calib}) exceeds the {len(items)} {what} "
                f"available; lower them"
            )
    elif n_test > len(items) - reserve:
        raise ValueError(
            f"tasks.{task}: n_test ({n_test}) exceeds the {len(items) - reserve} test {what} of its "
            f"{len(items)} (the last {reserve} are kept for calibration); lower n_test"
        )
    elif n_calib > reserve:
        raise ValueError(
            f"tasks.{task}: n_calib ({n_calib}) exceeds the {reserve} {what} kept for calibration "
            f"(the last {reserve} of {len(items)}); lower n_calib"
        )
    if test_region is not None and n_test > test_region and len(items) - reserve > test_region:
        raise ValueError(
            f"tasks.{task}: n_test ({n_test}) exceeds the {test_region} test {what} of its "
            f"{len(items)} (the {what} after them are kept for training, the last {reserve} for "
            f"calibration); lower n_test"
        )
    return items[:n_test], items[len(items) - n_calib :] if n_calib else []


def training_region(
    items: list, n_rows: int, task: str, test_region: int, what: str = "items"
) -> list:
    """The first `n_rows` of a source's training rows: those after its test region and before its
    calibration reserve (`front_and_back`), so no training row is a test or calibration item of any
    run. A small source (no reserve) keeps none."""
    reserve = calibration_reserve(len(items))
    free = items[test_region : len(items) - reserve] if reserve else []
    if n_rows > len(free):
        raise ValueError(
            f"tasks.{task}: {n_rows} training {what} asked, the source keeps {len(free)} (the "
            f"{what} after its first {test_region} test {what} and before its last {reserve} "
            f"calibration {what}, of {len(items)}); lower n_train/n_heldout"
        )
    return free[:n_rows]


def by_length(examples: list[Example]) -> list[Example]:
    """Items ordered by their prompts' lengths, so that a batch of neighbours pads little."""
    return sorted(examples, key=lambda e: (len(e.prompt_A), len(e.prompt_B)))


@dataclass(frozen=True)
class Task:
    """A registered task: how to build its test and calibration splits."""

    name: str
    metric: str
    max_new_tokens: int
    default_n_test: int
    # build(n_test, n_calib, seed, path) -> (test examples, calibration examples), disjoint by construction
    build: Callable[..., tuple[list[Example], list[Example]]]
    kind: str = QA
    description: str = ""
    rows_available: int | None = (
        None  # rows the source has in all, where fixed and known (checked by --dry-run)
    )
    source: Any = (
        None  # where the rows come from (a hub source, for `python -m cross_model.data check`)
    )
    # train(n_rows, seed, path) -> rows set aside for training (LatentWire, C2C): never a test or a
    # calibration item of any run, whatever its sizes; None where the task keeps no such rows
    train: Callable[..., list[Example]] | None = None


_TASKS: dict[str, Task] = {}
_MODULES = ("synthetic", "two_hop", "ladder", "hub", "multiple_choice", "local", "mixed")


def register_task(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"cross_model.data.{module}")


def available_tasks() -> list[str]:
    _load_all()
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    _load_all()
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def load_task_examples(
    name: str,
    n_test: int | None = None,
    n_calib: int = 0,
    seed: int = 0,
    path: str | None = None,
    max_new_tokens: int | None = None,
) -> tuple[list[Example], list[Example]]:
    """Test and calibration examples of a task; calibration ids never overlap test ids."""
    task = get_task(name)
    test, calib = task.build(
        n_test=n_test or task.default_n_test, n_calib=n_calib, seed=seed, path=path
    )
    if max_new_tokens is not None:
        test = [_with_max_new_tokens(e, max_new_tokens) for e in test]
        calib = [_with_max_new_tokens(e, max_new_tokens) for e in calib]
    overlap = {e.example_id for e in test} & {e.example_id for e in calib}
    if overlap:
        raise ValueError(f"task {name}: calibration and test share ids {sorted(overlap)[:3]}")
    ids = [e.example_id for e in test]
    repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if repeated:
        # results are keyed by id: a repeated one would silently keep one row for two items
        raise ValueError(
            f"task {name}{f' ({path})' if path else ''}: example ids {repeated[:3]} occur more than "
            f"once; give every item its own id"
        )
    return test, calib


def asked_sizes(
    n_test: int | None, n_calib: int, calibrate_on: str | None
) -> tuple[int | None, int]:
    """The (n_test, n_calib) a task config asks its source for: `calibrate_on: test_item_0` asks for
    no calibration items and, without n_test, for every row (its calibration is its first test item)."""
    if calibrate_on == "test_item_0":
        return n_test or EVERY_ROW, 0
    return n_test, n_calib


def _with_max_new_tokens(example: Example, n: int) -> Example:
    from dataclasses import replace

    return replace(example, max_new_tokens=n)
