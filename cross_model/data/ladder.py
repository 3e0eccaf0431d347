"""LatentWire's training ladder: closed-answer QA whose answer is in A's context and nowhere else.

`secret_word` (copy): A reads "The secret word is X." in one of several phrasings, B is asked for the
word. `fact_lookup`: A reads 2-4 key/value facts, B is asked for one key's value. The third rung is
`countries`/`tipsheets` (synthetic.py). Every item is a distinct (phrasing, word) or (fact set,
question) combination; test items come from a fixed region at the front of a seeded permutation
(`TEST_REGIONS`), calibration items from its back, and `training_rows` hands out the rows between
them, so training never sees a test or a calibration item of any run whatever its sizes (a word or a
value seen in training appears in held-out rows in new combinations).
"""

from __future__ import annotations

import random

from cross_model.data.base import (
    TEST_REGION,
    Example,
    Task,
    front_and_back,
    register_task,
    training_region,
)

WORDS = (
    "apple",
    "river",
    "candle",
    "violin",
    "tiger",
    "pencil",
    "garden",
    "rocket",
    "mirror",
    "castle",
    "anchor",
    "blanket",
    "cactus",
    "dolphin",
    "engine",
    "feather",
    "glacier",
    "hammer",
    "island",
    "jacket",
    "kettle",
    "lantern",
    "magnet",
    "needle",
    "orchid",
    "parrot",
    "quilt",
    "saddle",
    "tunnel",
    "umbrella",
    "velvet",
    "wallet",
    "yogurt",
    "zipper",
    "balloon",
    "compass",
    "diamond",
    "falcon",
    "guitar",
    "harbor",
    "igloo",
    "jungle",
    "ladder",
    "meadow",
    "noodle",
    "oyster",
    "pepper",
    "rabbit",
    "salmon",
    "teapot",
    "walnut",
    "bridge",
    "cherry",
    "desert",
    "forest",
    "helmet",
    "lemon",
    "marble",
    "planet",
    "silver",
    "thunder",
    "window",
    "button",
    "carpet",
    "dragon",
    "pillow",
    "spider",
    "tomato",
    "basket",
    "circus",
    "donkey",
    "finger",
    "ginger",
    "honey",
    "insect",
    "jigsaw",
    "koala",
    "lizard",
    "monkey",
    "nickel",
    "orange",
    "peanut",
    "radish",
    "sugar",
    "turtle",
    "valley",
    "whistle",
    "copper",
    "banana",
    "cotton",
    "puzzle",
)
PHRASINGS = (
    "The secret word is {w}.",
    "Remember this: the secret word is {w}.",
    "Here is the secret word: {w}.",
    "The secret word for today is {w}.",
    "Note that the secret word is {w}.",
    "Keep it quiet, the secret word is {w}.",
    "Someone whispered that the secret word is {w}.",
    "The secret word, written on the card, is {w}.",
)
KEYS = (
    "color of the box",
    "name of the dog",
    "city of the meeting",
    "day of the party",
    "fruit in the bowl",
    "animal in the barn",
    "metal of the ring",
    "flower in the vase",
    "tool on the bench",
    "drink on the table",
)
VALUES = {
    "color of the box": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    "name of the dog": ("Rex", "Bella", "Max", "Luna", "Charlie", "Daisy", "Rocky", "Milo"),
    "city of the meeting": ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Dublin", "Seoul"),
    "day of the party": (
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ),
    "fruit in the bowl": ("apple", "pear", "plum", "mango", "peach", "grape", "kiwi", "lime"),
    "animal in the barn": ("cow", "horse", "goat", "sheep", "pig", "duck", "hen", "donkey"),
    "metal of the ring": ("gold", "silver", "copper", "iron", "tin", "nickel", "zinc", "steel"),
    "flower in the vase": ("rose", "tulip", "lily", "daisy", "orchid", "iris", "lotus", "poppy"),
    "tool on the bench": ("hammer", "saw", "drill", "wrench", "chisel", "file", "clamp", "ruler"),
    "drink on the table": ("tea", "coffee", "milk", "juice", "water", "cocoa", "soda", "cider"),
}
LOOKUP_POOL = 6000
# secret_word has 728 items: its first 120 are test items, its last 29 calibration, the 579 between
# are training rows (the ladder trains on 512 + 64)
TEST_REGIONS = {"secret_word": 120, "fact_lookup": TEST_REGION}


def _secret_pool(seed: int) -> list[tuple[int, str]]:
    items = [(p, w) for p in range(len(PHRASINGS)) for w in WORDS]
    random.Random(f"secret_word-{seed}").shuffle(items)
    return items


def _secret_example(seed: int, split: str, i: int, item: tuple[int, str]) -> Example:
    p, w = item
    return Example(
        example_id=f"secret_word-s{seed}-{split}-{i:04d}",
        prompt_A=PHRASINGS[p].format(w=w),
        prompt_B="What is the secret word?",
        answers=(w,),
        task="secret_word",
        max_new_tokens=SECRET_WORD.max_new_tokens,
        metric="exact_match",
        meta={"candidates": list(WORDS)},
    )


def _lookup_pool(seed: int) -> list[tuple[tuple[tuple[str, str], ...], int]]:
    rng = random.Random(f"fact_lookup-{seed}")
    seen, items = set(), []
    while len(items) < LOOKUP_POOL:
        keys = rng.sample(KEYS, rng.randint(2, 4))
        facts = tuple((k, rng.choice(VALUES[k])) for k in keys)
        asked = rng.randrange(len(facts))
        if (facts, asked) not in seen:
            seen.add((facts, asked))
            items.append((facts, asked))
    return items


def _lookup_example(seed: int, split: str, i: int, item) -> Example:
    facts, asked = item
    key, value = facts[asked]
    return Example(
        example_id=f"fact_lookup-s{seed}-{split}-{i:04d}",
        prompt_A=" ".join(f"The {k} is {v}." for k, v in facts),
        prompt_B=f"What is the {key}?",
        answers=(value,),
        task="fact_lookup",
        max_new_tokens=FACT_LOOKUP.max_new_tokens,
        metric="exact_match",
        meta={"candidates": list(VALUES[key])},
    )


_POOLS = {
    "secret_word": (_secret_pool, _secret_example),
    "fact_lookup": (_lookup_pool, _lookup_example),
}


def _builder(name: str):
    pool_of, make = _POOLS[name]

    def build(
        n_test: int, n_calib: int, seed: int, path: str | None = None
    ) -> tuple[list[Example], list[Example]]:
        test, calib = front_and_back(
            pool_of(seed), n_test, n_calib, name, test_region=TEST_REGIONS[name]
        )
        return [make(seed, "test", i, x) for i, x in enumerate(test)], [
            make(seed, "calib", i, x) for i, x in enumerate(calib)
        ]

    return build


def training_rows(name: str):
    """`train(n_rows, seed)`: items of a ladder task after its test region and before its calibration
    reserve for this seed."""
    pool_of, make = _POOLS[name]

    def train(n_rows: int, seed: int, path: str | None = None) -> list[Example]:
        rows = training_region(pool_of(seed), n_rows, name, TEST_REGIONS[name])
        return [make(seed, "train", i, x) for i, x in enumerate(rows)]

    return train


SECRET_WORD = register_task(
    Task(
        "secret_word",
        "exact_match",
        5,
        100,
        _builder("secret_word"),
        train=training_rows("secret_word"),
        description=f"copy rung: 'The secret word is X.' in {len(PHRASINGS)} phrasings x {len(WORDS)} words",
    )
)
FACT_LOOKUP = register_task(
    Task(
        "fact_lookup",
        "exact_match",
        5,
        100,
        _builder("fact_lookup"),
        train=training_rows("fact_lookup"),
        description="lookup rung: 2-4 key/value facts, one asked",
    )
)
LADDER_TASKS = tuple(_POOLS)
