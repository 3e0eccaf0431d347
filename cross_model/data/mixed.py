"""Mixed-task evaluation: countries and tip sheets in one test stream, so that a KVComm layer
selection calibrated on a mixture can be tested on one (the public code's `countries_tipsheets`).

`countries_tipsheets` concatenates the two tasks' items (countries first); `_shuffled` puts the
concatenation in the order `datasets`' `shuffle(seed=42)` gives it. `n_test` and `n_calib` are per
source task, so each contributes the same number of items; calibration items stay disjoint from test
items because each source's are. With `path`, a directory holding the public `countries.jsonl` and
`tipsheets.jsonl` is read (as `public_files` reads them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cross_model.data.base import Example, Task, get_task, register_task

SOURCES = ("countries", "tipsheets")
SHUFFLE_SEED = 42


def _sources(
    n_test: int, n_calib: int, seed: int, path: str | None
) -> tuple[list[Example], list[Example]]:
    test, calib = [], []
    for name in SOURCES:
        file = None
        if path:
            file = Path(path).expanduser() / f"{name}.jsonl"
            if not file.exists():
                raise FileNotFoundError(
                    f"tasks.countries_tipsheets.path: {file} does not exist (the directory must hold "
                    f"the public {', '.join(s + '.jsonl' for s in SOURCES)})"
                )
        t, c = get_task(name).build(
            n_test=n_test, n_calib=n_calib, seed=seed, path=str(file) if file else None
        )
        test += t
        calib += c
    return test, calib


def build_concatenated(
    n_test: int, n_calib: int, seed: int, path: str | None = None
) -> tuple[list[Example], list[Example]]:
    return _sources(n_test, n_calib, seed, path)


def build_shuffled(
    n_test: int, n_calib: int, seed: int, path: str | None = None
) -> tuple[list[Example], list[Example]]:
    test, calib = _sources(n_test, n_calib, seed, path)
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(test))  # datasets' shuffle(seed=42)
    return [test[i] for i in order], calib


register_task(
    Task(
        "countries_tipsheets",
        "f1_match",
        10,
        100,
        build_concatenated,
        description="countries then tipsheets items (n_test of each)",
    )
)
register_task(
    Task(
        "countries_tipsheets_shuffled",
        "f1_match",
        10,
        100,
        build_shuffled,
        description="countries and tipsheets items shuffled with seed 42 (n_test of each)",
    )
)
