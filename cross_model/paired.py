"""Paired comparisons: two methods scored on the same items.

Two Wilson intervals that overlap say little: at n = 100 each is about +-9 points wide, while the two
methods' answers are strongly correlated item by item. The paired difference uses that: the mean of
(B's score - A's score) over the items both answered, a 95% percentile interval from a bootstrap over
items (seeded, so a report is reproducible), and McNemar's exact test on the discordant items (A right
and B wrong, or the reverse). "Better" is claimed only when the interval excludes 0 and p < 0.05.
`compare` is the one place two methods' rows are paired (by example id, in sorted order), so the
interval does not depend on the order the rows arrived in; a table of several comparisons shows
Holm-adjusted p-values beside the raw ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 10_000


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the discordant items under Binomial(a_only + b_only, 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """mean(b - a) over paired items, its bootstrap interval, and McNemar's p for 0/1 scores."""
    if len(a) != len(b):
        raise ValueError(
            f"paired_difference: {len(a)} and {len(b)} scores; pairs need the same items"
        )
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "diff": 0.0, "ci95": (0.0, 0.0), "a_only": 0, "b_only": 0, "mcnemar_p": 1.0}
    d = y - x
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    means = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    a_only, b_only = int(((x >= 0.5) & (y < 0.5)).sum()), int(((x < 0.5) & (y >= 0.5)).sum())
    return {
        "n": n,
        "diff": float(d.mean()),
        "ci95": (float(lo), float(hi)),
        "a_only": a_only,
        "b_only": b_only,
        "mcnemar_p": mcnemar_exact_p(a_only, b_only),
    }


@dataclass(frozen=True)
class PairedResult:
    """Two methods on the same items, aligned by example id (sorted), with its seeded bootstrap: the
    same result whatever order the rows arrived in (rank files, test order)."""

    n: int
    diff: float
    ci95: tuple[float, float]
    a_only: int
    b_only: int
    mcnemar_p: float
    ids: tuple[str, ...] = field(default=(), repr=False)

    @property
    def verdict(self) -> str:
        return verdict(self.to_dict(verdict_too=False))

    def to_dict(self, verdict_too: bool = True) -> dict[str, Any]:
        out = {
            "n": self.n,
            "diff": self.diff,
            "ci95": self.ci95,
            "a_only": self.a_only,
            "b_only": self.b_only,
            "mcnemar_p": self.mcnemar_p,
        }
        return {**out, "verdict": verdict(out)} if verdict_too else out


Rows = Iterable[dict[str, Any]] | Mapping[str, dict[str, Any]]


def _by_id(rows: Rows) -> Mapping[str, dict[str, Any]]:
    return rows if isinstance(rows, Mapping) else {r["example_id"]: r for r in rows}


def compare(
    reference: Rows,
    method: Rows,
    value: str | Callable[[dict[str, Any]], float | None] = "score",
    seed: int = 0,
) -> PairedResult:
    """The one paired comparison: `method` minus `reference` on the items both have a value for,
    aligned by example id and taken in sorted id order, then `paired_difference` (seeded bootstrap,
    McNemar). `value` is a row key or a function of a row (None: the item has no value)."""
    get = (lambda r: r.get(value)) if isinstance(value, str) else value
    ref, got = _by_id(reference), _by_id(method)
    ids = sorted(
        i for i in ref.keys() & got.keys() if get(ref[i]) is not None and get(got[i]) is not None
    )
    res = paired_difference(
        [float(get(ref[i])) for i in ids], [float(get(got[i])) for i in ids], seed=seed
    )
    return PairedResult(
        res["n"],
        res["diff"],
        tuple(res["ci95"]),
        res["a_only"],
        res["b_only"],
        res["mcnemar_p"],
        tuple(ids),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of the p-values of one table's comparisons (each at most 1)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    out, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        out[i] = running
    return out


def verdict(result: dict[str, Any], alpha: float = 0.05) -> str:
    """ "better"/"worse" only when the interval excludes 0 and McNemar's test agrees (p < alpha): with
    few discordant items a percentile bootstrap alone is too ready to exclude 0."""
    lo, hi = result["ci95"]
    if result["mcnemar_p"] >= alpha:
        return "no difference shown"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no difference shown"


def paired_rows(
    rows: dict[str, dict[str, list[dict[str, Any]]]],
    reference: str,
    metrics: Sequence[str] = ("score", "first_named"),
) -> list[dict[str, Any]]:
    """For each task and each method but `reference`: the paired difference to `reference` on each
    metric, over the items both have (`rows`: task -> method -> result rows)."""
    out = []
    for task, methods in rows.items():
        if reference not in methods:
            continue
        ref = _by_id(methods[reference])
        for method, method_rows in methods.items():
            if method == reference:
                continue
            got = _by_id(method_rows)
            shared = ref.keys() & got.keys()
            line: dict[str, Any] = {
                "task": task,
                "method": method,
                "reference": reference,
                "n": len(shared),
            }
            for metric in metrics:
                if not all(metric in ref[i] and metric in got[i] for i in shared):
                    continue
                line[metric] = compare(ref, got, metric).to_dict()
            out.append(line)
    return out


def holm_by_line(lines: list[dict[str, Any]], key: str) -> list[float | None]:
    """Holm-adjusted McNemar p of each line's `key` comparison, over the lines of one table that have it."""
    have = [n for n, line in enumerate(lines) if line.get(key) is not None]
    adjusted = holm([lines[n][key]["mcnemar_p"] for n in have])
    out: list[float | None] = [None] * len(lines)
    for n, p in zip(have, adjusted):
        out[n] = p
    return out


def format_paired(
    lines: list[dict[str, Any]],
    metrics: Sequence[tuple[str, str]] = (("score", "accuracy"), ("first_named", "first-named")),
) -> str:
    """Markdown: difference in points [95% CI], McNemar p, verdict, per metric."""
    if not lines:
        return ""
    ref = lines[0]["reference"]
    head = (
        "| task | method | n | "
        + " | ".join(f"{label} - {ref} (points) [95% CI], McNemar p (Holm)" for _, label in metrics)
        + " |"
    )
    table = [head, "|" + "---|" * (3 + len(metrics))]
    adjusted = {key: holm_by_line(lines, key) for key, _ in metrics}
    for n, line in enumerate(lines):
        cells = []
        for key, _ in metrics:
            r = line.get(key)
            if r is None:
                cells.append("-")
                continue
            lo, hi = r["ci95"]
            cells.append(
                f"{100 * r['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], p={r['mcnemar_p']:.2g} "
                f"({adjusted[key][n]:.2g}): {r['verdict']}"
            )
        table.append(
            f"| {line['task']} | {line['method']} | {line['n']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(table)
