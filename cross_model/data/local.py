"""Tasks read from local files: `jsonl` (bring your own data) and `tmath` (a local copy of TMATH: the
public KVComm directory or our JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

from cross_model.data import public_files
from cross_model.data.base import (
    MATH,
    Example,
    Task,
    calibration_reserve,
    front_and_back,
    register_task,
)
from cross_model.metrics import METRICS


def _read_jsonl(path: str | None, task: str) -> list[tuple[int, dict]]:
    if not path:
        raise ValueError(
            f"tasks.{task}: set `path` to a local .jsonl file (or a directory of them)"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"tasks.{task}.path: {p} does not exist")
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    rows = []
    for f in files:
        with open(f) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({err})") from err
    if not rows:
        raise ValueError(f"tasks.{task}: no records in {p}")
    return rows


def _split_rows(rows: list, n_test: int, n_calib: int, task: str) -> tuple[list, list]:
    """Rows with `"split": "calib"` are calibration items; without that field, a reserve of fixed size
    at the file's back is (`base.front_and_back`): a row's split never depends on the sizes asked."""
    if any(r.get("split") == "calib" for _, r in rows):
        test = [x for x in rows if x[1].get("split") != "calib"][:n_test]
        calib = [x for x in rows if x[1].get("split") == "calib"][:n_calib]
        if len(test) < n_test:
            raise ValueError(
                f"tasks.{task}: asked for n_test={n_test} but the file has {len(test)} test records"
            )
        return test, calib
    return front_and_back(rows, n_test, n_calib, task, "records")


def build_jsonl(
    n_test: int, n_calib: int, seed: int, path: str | None = None
) -> tuple[list[Example], list[Example]]:
    rows = _read_jsonl(path, "jsonl")
    marked = any(r.get("split") == "calib" for _, r in rows)
    n_test = min(
        n_test,
        sum(1 for _, r in rows if r.get("split") != "calib")
        if marked
        else len(rows) - (calibration_reserve(len(rows)) or n_calib),
    )

    def make(lineno: int, row: dict, split: str) -> Example:
        missing = [k for k in ("prompt_A", "prompt_B", "answers") if k not in row]
        if missing:
            raise ValueError(
                f"{path}:{lineno}: record lacks {', '.join(missing)} (each line needs prompt_A, prompt_B, answers)"
            )
        answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
        metric = row.get("metric", "f1_match")
        if metric not in METRICS:
            raise ValueError(
                f"{path}:{lineno}: metric {metric!r} is not one of {', '.join(METRICS)}"
            )
        return Example(
            example_id=f"jsonl-{row.get('id', f'{split}-{lineno}')}",
            prompt_A=row["prompt_A"],
            prompt_B=row["prompt_B"],
            answers=tuple(map(str, answers)),
            task="jsonl",
            max_new_tokens=int(row.get("max_new_tokens", 32)),
            metric=metric,
            meta={"candidates": row.get("candidates", [])},
        )

    test, calib = _split_rows(rows, n_test, n_calib, "jsonl")
    return [make(n, r, "test") for n, r in test], [make(n, r, "calib") for n, r in calib]


def build_tmath(
    n_test: int, n_calib: int, seed: int, path: str | None = None
) -> tuple[list[Example], list[Example]]:
    """TMATH as the public KVComm code ships it (a directory of hint_<area>/hint_<n>.json, sampled as it
    samples), or our JSONL: `problem` (B), `hints` (A: Socratic questions, a list or a string), `answer`
    or `solution`."""
    if public_files.is_tmath_directory(path):
        return public_files.read_tmath(path, n_test, n_calib, 256)
    rows = _read_jsonl(path, "tmath")

    def make(lineno: int, row: dict, split: str) -> Example:
        for key in ("problem", "hints"):
            if key not in row:
                raise ValueError(f"{path}:{lineno}: TMATH record lacks {key!r}")
        gold = row.get("solution") or row.get("answer")
        if gold is None:
            raise ValueError(f"{path}:{lineno}: TMATH record needs `solution` or `answer`")
        hints = row["hints"] if isinstance(row["hints"], str) else "\n".join(row["hints"])
        return Example(
            example_id=f"tmath-{row.get('id', lineno)}",
            prompt_A=hints,
            prompt_B=row["problem"],
            answers=(str(gold),),
            task="tmath",
            max_new_tokens=256,
            metric="rouge_l_recall",
            kind=MATH,
        )

    test, calib = _split_rows(rows, n_test, n_calib, "tmath")
    return [make(n, r, "test") for n, r in test], [make(n, r, "calib") for n, r in calib]


register_task(
    Task(
        "jsonl",
        "f1_match",
        32,
        10**9,
        build_jsonl,
        description="local JSONL: prompt_A, prompt_B, answers",
    )
)
register_task(
    Task(
        "tmath",
        "rouge_l_recall",
        256,
        300,
        build_tmath,
        kind=MATH,
        description="local TMATH: the public hint_<area>/ directory (300 sampled) or JSONL",
    )
)
