"""The content control at equal bytes (`control: other_item`): A reads another test item's context,
the next one in order of context length (cyclic), and B its own question. Same task, nearly the same
bytes, the wrong content: what the method's accuracy owes to the item's own context is the paired
difference to it. The whole test list decides each item's donor, so every rank and batch size gives
an item the same one."""

from __future__ import annotations

from dataclasses import replace

from cross_model.data.base import Example


def donor_map(items: list[Example]) -> dict[str, Example]:
    """Each item's donor; none for a task of one item."""
    order = sorted(items, key=lambda e: (len(e.prompt_A), e.example_id))
    return (
        {e.example_id: order[(i + 1) % len(order)] for i, e in enumerate(order)}
        if len(order) > 1
        else {}
    )


def donors_of(examples: list[Example], donors: dict[str, Example], method: str) -> list[Example]:
    """Each example's donor, or a clear error for an example without one."""
    missing = [e.example_id for e in examples if e.example_id not in donors]
    if missing:
        raise ValueError(
            f"methods.{method}: control other_item needs another item of the task for "
            f"{missing[0]} (the evaluator hands over the test list; a task of one item has none)"
        )
    return [donors[e.example_id] for e in examples]


def with_donor_contexts(
    examples: list[Example], donors: dict[str, Example], method: str
) -> list[Example]:
    """The examples as A reads them under the control: each with its donor's context."""
    return [
        replace(e, prompt_A=d.prompt_A)
        for e, d in zip(examples, donors_of(examples, donors, method))
    ]
