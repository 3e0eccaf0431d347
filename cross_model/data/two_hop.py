"""A two-hop task for several senders, from the Countries generator: A1 knows who is at which landmark,
A2 knows which country each landmark is in, and B, asked which country a person is in, needs both.

Item k takes pair k of Countries' seeded permutation (the person asked about and their landmark; pairs
whose landmark names its country are left out) and
draws its distractors from a generator seeded by the item itself: a second person at a landmark of
another country (A1's context), and a third landmark of a third country (A2's context lists the three
landmarks' countries, in a shuffled order). So neither sender alone can answer (A1 never names a
country; A2 never names a person), and an item's content and split depend on the item only: test
items from the permutation's first `TEST_REGION` pairs, calibration items from its fixed reserve at
the back, exactly as Countries.
"""

from __future__ import annotations

import random

from cross_model.data.base import TEST_REGION, Example, Task, front_and_back, register_task
from cross_model.data.synthetic import COUNTRY_NAMES, LANDMARKS, PEOPLE, _countries_pairs

NAME = "countries_two_hop"
# Landmarks whose name gives their country away ("Gateway of India") would make A2 unnecessary.
UNNAMED = sorted(x for x in LANDMARKS if not any(c in x for c in COUNTRY_NAMES))


def _other(rng: random.Random, options: list[str], avoid_countries: set[str]) -> str:
    return rng.choice([x for x in options if LANDMARKS[x] not in avoid_countries])


def two_hop_example(seed: int, split: str, index: int, person: str, landmark: str) -> Example:
    """Item `index` of the permutation: `person` is at `landmark`; the distractors come from the item's own
    generator."""
    rng = random.Random(f"{NAME}-{seed}-{index}")
    country = LANDMARKS[landmark]
    other_person = rng.choice([p for p in PEOPLE if p != person])
    other_landmark = _other(rng, UNNAMED, {country})
    third_landmark = _other(rng, UNNAMED, {country, LANDMARKS[other_landmark]})
    who = [f"{person} is at the {landmark}.", f"{other_person} is at the {other_landmark}."]
    rng.shuffle(who)
    where = [f"The {x} is in {LANDMARKS[x]}." for x in (landmark, other_landmark, third_landmark)]
    rng.shuffle(where)
    return Example(
        example_id=f"{NAME}-s{seed}-{split}-{index:04d}",
        prompt_A=" ".join(who),
        prompt_B=f"Which country is {person} located in?",
        answers=(country,),
        task=NAME,
        max_new_tokens=TWO_HOP.max_new_tokens,
        metric="f1_match",
        meta={
            "candidates": COUNTRY_NAMES,
            "person": person,
            "landmark": landmark,
            "distractors": [other_landmark, third_landmark],
        },
        more_senders=(" ".join(where),),
    )


def build_two_hop(
    n_test: int, n_calib: int, seed: int, path: str | None = None
) -> tuple[list[Example], list[Example]]:
    if path:
        raise ValueError(f"tasks.{NAME}: a generated task, it reads no file; drop `path`")
    indexed = list(enumerate(p for p in _countries_pairs(seed) if p[1] in UNNAMED))
    test, calib = front_and_back(indexed, n_test, n_calib, NAME, test_region=TEST_REGION)
    return (
        [two_hop_example(seed, "test", k, *pair) for k, pair in test],
        [two_hop_example(seed, "calib", k, *pair) for k, pair in calib],
    )


TWO_HOP = register_task(
    Task(
        NAME,
        "f1_match",
        5,
        200,
        build_two_hop,
        rows_available=len(PEOPLE) * len(UNNAMED),
        description="two senders: who is at which landmark (A1), which country each landmark is in (A2)",
    )
)
