"""The evaluator's files: one JSONL per task, method and rank, appended and fsynced batch by batch.

`results/<task>/<method>/rank<r>.jsonl` holds one line per finished example. A kill can leave at most
a partial last line, cut before appending again; readers take every rank's file (of any world size),
the first row of each example id winning, except that an error row gives way to a later answer
(resume re-runs the items that failed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cross_model.data.base import Example
from cross_model.failures import RunRefused

log = logging.getLogger(__name__)

RESULTS = "results"


def write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def result_dir(run_dir: Path, task: str, method: str) -> Path:
    return Path(run_dir) / RESULTS / task / method


def repair_tail(path: Path) -> None:
    """Cut a line left half-written by a kill, so that appending starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        log.warning(
            "%s ends in a partial line (killed while writing); dropped %d bytes",
            path,
            len(data) - keep,
        )
        with open(path, "r+b") as f:
            f.truncate(keep)


def read_results(directory: Path) -> dict[str, dict[str, Any]]:
    """example id -> its row, from every rank file in `directory` (a partial last line of a file
    another rank is writing is ignored). A row that ended in an error is not final: a resumed run
    answers the item again and appends a new row, so a row without an error wins over error rows
    (the first such row, should two exist), and an item that failed every time keeps its last error.
    A winning row that followed failed attempts says how many in `failed_attempts`."""
    rows: dict[str, dict[str, Any]] = {}
    failures: dict[str, int] = {}
    for path in sorted(directory.glob("rank*.jsonl")):
        lines = path.read_text().splitlines()
        for lineno, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if lineno == len(lines):
                    continue  # the last line of a file another rank is writing
                raise _damaged(path, lineno, f"not a JSON row ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("example_id"), str):
                raise _damaged(path, lineno, "a row without an example_id")
            rid = row["example_id"]
            kept = rows.get(rid)
            if kept is not None and not kept.get("error"):
                if not row.get("error"):
                    log.warning("%s: duplicate result for %s ignored", path, rid)
                continue
            if kept is not None:
                failures[rid] = failures.get(rid, 0) + 1
            rows[rid] = row
    for rid, n in failures.items():
        rows[rid]["failed_attempts"] = n
    return rows


def _damaged(path: Path, lineno: int, what: str) -> RunRefused:
    # Skipping the line would drop an item's row from every score without a word.
    return RunRefused(
        f"{path}:{lineno}: {what}, in the middle of a results file (edited or damaged). Move the file "
        f"aside (nothing else reads it) and start the run again: its items are answered again"
    )


def finished_ids(directory: Path) -> set[str]:
    """The items with a row that did not end in an error: what a resumed evaluation skips."""
    return {rid for rid, row in read_results(directory).items() if not row.get("error")}


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def gather_results(
    run_dir: Path, task: str, name: str, test: list[Example]
) -> list[dict[str, Any]]:
    """Every test item's row, in test order; an item without a row is an error, never skipped."""
    rows = read_results(result_dir(run_dir, task, name))
    missing = [e.example_id for e in test if e.example_id not in rows]
    if missing:
        raise RuntimeError(
            f"{task}/{name}: {len(missing)} of {len(test)} test items have no result ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); run the evaluate stage again to finish them"
        )
    return [rows[e.example_id] for e in test]
