"""How often each method gives the same answer as a reference method, item by item, in a finished run.

    python -m cross_model.agreement runs/qkvcomm_pareto kvcomm_30

Accuracy can stay level while answers change (a compressed message that turns one wrong answer into
another); the share of identical answers says how much of the reference's behaviour survived. Beside
it, the paired difference in accuracy and first-named match on the same items (`cross_model.paired`:
bootstrap interval, McNemar's test). Only items both methods answered are compared, and the table
says how many those are.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cross_model.metrics import wilson_interval
from cross_model.paired import compare, holm_by_line
from cross_model.result_files import RESULTS, read_results, result_dir

PAIRED_METRICS = ("score", "first_named")


def agreement(run_dir: Path, reference: str) -> list[dict[str, Any]]:
    """One row per (task, method) of `run_dir` where the task has `reference` results."""
    root = Path(run_dir) / RESULTS
    if not root.is_dir():
        raise FileNotFoundError(
            f"{run_dir}: no {RESULTS}/ folder; is this a run directory with an evaluate stage done?"
        )
    rows = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        ref = read_results(result_dir(run_dir, task_dir.name, reference))
        if not ref:
            continue
        for method_dir in sorted(p for p in task_dir.iterdir() if p.is_dir()):
            got = read_results(method_dir)
            shared = sorted(ref.keys() & got.keys())
            same = sum(got[i]["answer"] == ref[i]["answer"] for i in shared)
            lo, hi = wilson_interval(same, len(shared)) if shared else (0.0, 0.0)
            row = {
                "task": task_dir.name,
                "method": method_dir.name,
                "n": len(shared),
                "same": same,
                "same_pct": 100 * same / len(shared) if shared else 0.0,
                "ci": (100 * lo, 100 * hi),
            }
            for (
                metric
            ) in PAIRED_METRICS:  # accuracy difference on the same items, when the rows are scored
                if shared and all(metric in got[i] and metric in ref[i] for i in shared):
                    row[metric] = compare(ref, got, metric).to_dict()
            rows.append(row)
    if not rows:
        raise ValueError(
            f"{run_dir}: no task has results for {reference!r}; methods there: "
            f"{sorted({p.name for t in root.iterdir() if t.is_dir() for p in t.iterdir()})}"
        )
    return rows


def _paired_cell(r: dict[str, Any] | None, adjusted: float | None) -> str:
    if r is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{100 * r['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], p={r['mcnemar_p']:.2g} ({adjusted:.2g}) {r['verdict']}"


def format_agreement(rows: list[dict[str, Any]], reference: str) -> str:
    compared = [
        r for r in rows if r["method"] != reference
    ]  # Holm over the table's real comparisons
    adjusted = {m: dict(zip(map(id, compared), holm_by_line(compared, m))) for m in PAIRED_METRICS}
    lines = [
        f"| task | method | same answer as {reference} % [95% CI] | items | accuracy - {reference} (points) [95% CI], "
        f"McNemar p (Holm) | first-named - {reference} (points) [95% CI], McNemar p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            _paired_cell(r.get(m), adjusted[m].get(id(r)) if r["method"] != reference else 1.0)
            for m in PAIRED_METRICS
        ]
        lines.append(
            f"| {r['task']} | {r['method']} | {r['same_pct']:.0f} [{r['ci'][0]:.0f}, {r['ci'][1]:.0f}] | {r['n']} "
            f"| {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cross_model.agreement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("reference", help="the method whose answers the others are compared with")
    args = ap.parse_args(argv)
    try:
        print(format_agreement(agreement(args.run_dir, args.reference), args.reference))
    except (FileNotFoundError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
