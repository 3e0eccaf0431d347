"""The public KVComm code's data files, read as its loaders read them (github Zephyroam/KVComm,
`dataloader/`; the files are public but not in this repository: point a task's `path` at them).

- `countries.jsonl`: `id, person, landmark, country, prompt_A, prompt_B`; the answer is `country`,
  and the public loader appends its instruction to `prompt_B` with no space between. 5 new tokens.
- `tipsheets.jsonl`: `prompt_A, prompt_B, options, label, attitudes`; the answer is `label`, the
  options are the candidates. 10 new tokens.
- TMATH: a directory `hint_<area>/hint_<n>.json`, one record per file: `problem` (B),
  `socratic_questions` (A), `solution` (the gold), `level`, `type`. The public loader reads every
  area's files into one `datasets` table and samples `shuffle(seed=42).select(range(300))`; so do
  we, with the files in a fixed order (the areas in the public list, then by n) where the public
  `glob` takes the directory's order, which no two filesystems need share.

Countries and tip sheets are read in file order, as the public loaders do (they do not sample); our
test items are the first `n_test` rows and the calibration items come from a reserve of fixed size at the
back (`base.front_and_back`), never the same whatever the sizes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cross_model.data.base import MATH, Example, front_and_back

COUNTRIES_INSTRUCTION = "You are required to extrapolate the country from the context."
TMATH_AREAS = (
    "algebra",
    "geometry",
    "number_theory",
    "intermediate_algebra",
    "prealgebra",
    "precalculus",
    "counting_and_probability",
)
SAMPLE_SEED = 42


def _records(path: str, task: str, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(
            f"tasks.{task}.path: {p} is a directory; point it at the public {task}.jsonl"
        )
    rows = []
    with open(p) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({err})") from err
            missing = [k for k in fields if k not in row]
            if missing:
                raise ValueError(
                    f"{p}:{lineno}: a public {task} record needs {', '.join(fields)}; "
                    f"this one lacks {', '.join(missing)}"
                )
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"tasks.{task}.path: no records in {p}")
    return rows


def read_countries(
    path: str, n_test: int, n_calib: int, max_new_tokens: int
) -> tuple[list[Example], list[Example]]:
    rows = _records(
        path, "countries", ("id", "person", "landmark", "country", "prompt_A", "prompt_B")
    )
    candidates = sorted({str(r["country"]) for _, r in rows})

    def make(row: dict) -> Example:
        return Example(
            example_id=f"countries-{row['id']}",
            prompt_A=row["prompt_A"],
            prompt_B=row["prompt_B"] + COUNTRIES_INSTRUCTION,
            answers=(str(row["country"]),),
            task="countries",
            max_new_tokens=max_new_tokens,
            metric="f1_match",
            meta={"candidates": candidates, "person": row["person"], "landmark": row["landmark"]},
        )

    test, calib = front_and_back(rows, n_test, n_calib, "countries", "records")
    return [make(r) for _, r in test], [make(r) for _, r in calib]


def read_tipsheets(
    path: str, n_test: int, n_calib: int, max_new_tokens: int
) -> tuple[list[Example], list[Example]]:
    rows = _records(path, "tipsheets", ("prompt_A", "prompt_B", "options", "label"))

    def make(lineno: int, row: dict) -> Example:
        return Example(
            example_id=f"tipsheets-line{lineno:05d}",
            prompt_A=row["prompt_A"],
            prompt_B=row["prompt_B"],
            answers=(str(row["label"]),),
            task="tipsheets",
            max_new_tokens=max_new_tokens,
            metric="f1_match",
            meta={
                "candidates": [str(o) for o in row["options"]],
                "attitudes": row.get("attitudes"),
            },
        )

    test, calib = front_and_back(rows, n_test, n_calib, "tipsheets", "records")
    return [make(*r) for r in test], [make(*r) for r in calib]


def is_tmath_directory(path: str | None) -> bool:
    return (
        bool(path)
        and Path(path).expanduser().is_dir()
        and any((Path(path).expanduser() / f"hint_{a}").is_dir() for a in TMATH_AREAS)
    )


def tmath_files(path: str) -> list[Path]:
    """Every `hint_<area>/hint_<n>.json`, the areas in the public loader's order, then by n."""
    root = Path(path).expanduser()

    def number(f: Path) -> tuple[int, str]:
        m = re.fullmatch(r"hint_(\d+)\.json", f.name)
        return (int(m.group(1)) if m else 10**12, f.name)

    files = [
        f for a in TMATH_AREAS for f in sorted((root / f"hint_{a}").glob("*.json"), key=number)
    ]
    if not files:
        raise ValueError(
            f"tasks.tmath.path: no hint_<area>/*.json files under {root} "
            f"(areas: {', '.join(TMATH_AREAS)})"
        )
    return files


def read_tmath(
    path: str, n_test: int, n_calib: int, max_new_tokens: int
) -> tuple[list[Example], list[Example]]:
    import datasets

    files = tmath_files(path)
    table = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    missing = [
        k for k in ("problem", "socratic_questions", "solution") if k not in table.column_names
    ]
    if missing:
        raise ValueError(
            f"tasks.tmath.path: the TMATH records under {path} lack {', '.join(missing)}"
        )
    if len(table) != len(files):
        raise ValueError(
            f"tasks.tmath.path: {len(files)} files gave {len(table)} records; the public format is "
            f"one JSON object per hint_<n>.json"
        )
    # The row index into the unshuffled table names the file it came from.
    table = table.add_column(
        "_file", [f"{f.parent.name.removeprefix('hint_')}-{f.stem}" for f in files]
    )
    table = table.shuffle(seed=SAMPLE_SEED)
    test_rows, calib_rows = front_and_back(
        list(range(len(table))), n_test, n_calib, "tmath", "TMATH files"
    )

    def make(row: dict) -> Example:
        hints = row["socratic_questions"]
        hints = hints if isinstance(hints, str) else "\n".join(map(str, hints))
        return Example(
            example_id=f"tmath-{row['_file']}",
            prompt_A=hints,
            prompt_B=row["problem"],
            answers=(str(row["solution"]),),
            task="tmath",
            max_new_tokens=max_new_tokens,
            metric="rouge_l_recall",
            kind=MATH,
            meta={"level": row.get("level"), "type": row.get("type")},
        )

    return [make(table[i]) for i in test_rows], [make(table[i]) for i in calib_rows]
