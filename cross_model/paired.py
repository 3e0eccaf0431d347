"""Paired comparisons: two methods scored on the same items.

Two Wilson intervals that overlap say little: at n = 100 each is about +-9 points wide, while the two
methods' answers are strongly correlated item by item. The paired difference uses that: the mean of
(B's score - A's score) over the items both answered, a 95% percentile interval from a bootstrap over
items (seeded, so a report is reproducible), and McNemar's exact test on the discordant items (A right
and B wrong, or the reverse). "Better" is claimed only when the interval excludes 0 and p < 0.05.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

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


def paired_difference(a: Sequence[float], b: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """mean(b - a) over paired items, its bootstrap interval, and McNemar's p for 0/1 scores."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} scores; pairs need the same items")
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
    return {"n": n, "diff": float(d.mean()), "ci95": (float(lo), float(hi)), "a_only": a_only, "b_only": b_only,
            "mcnemar_p": mcnemar_exact_p(a_only, b_only)}


def verdict(result: dict[str, Any], alpha: float = 0.05) -> str:
    """"better"/"worse" only when the interval excludes 0 and McNemar's test agrees (p < alpha): with
    few discordant items a percentile bootstrap alone is too ready to exclude 0."""
    lo, hi = result["ci95"]
    if result["mcnemar_p"] >= alpha:
        return "no difference shown"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no difference shown"


def paired_rows(rows: dict[str, dict[str, list[dict[str, Any]]]], reference: str,
                metrics: Sequence[str] = ("score", "first_named")) -> list[dict[str, Any]]:
    """For each task and each method but `reference`: the paired difference to `reference` on each
    metric, over the items both have (`rows`: task -> method -> result rows)."""
    out = []
    for task, methods in rows.items():
        if reference not in methods:
            continue
        ref = {r["example_id"]: r for r in methods[reference]}
        for method, method_rows in methods.items():
            if method == reference:
                continue
            got = {r["example_id"]: r for r in method_rows}
            shared = [i for i in ref if i in got]
            line: dict[str, Any] = {"task": task, "method": method, "reference": reference, "n": len(shared)}
            for metric in metrics:
                if not all(metric in ref[i] and metric in got[i] for i in shared):
                    continue
                res = paired_difference([float(ref[i][metric]) for i in shared], [float(got[i][metric]) for i in shared])
                line[metric] = {**res, "verdict": verdict(res)}
            out.append(line)
    return out


def format_paired(lines: list[dict[str, Any]], metrics: Sequence[tuple[str, str]] = (("score", "accuracy"),
                                                                                   ("first_named", "first-named"))) -> str:
    """Markdown: difference in points [95% CI], McNemar p, verdict, per metric."""
    if not lines:
        return ""
    ref = lines[0]["reference"]
    head = "| task | method | n | " + " | ".join(f"{label} - {ref} (points) [95% CI], McNemar p" for _, label in metrics) + " |"
    table = [head, "|" + "---|" * (3 + len(metrics))]
    for line in lines:
        cells = []
        for key, _ in metrics:
            r = line.get(key)
            if r is None:
                cells.append("-")
                continue
            lo, hi = r["ci95"]
            cells.append(f"{100 * r['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], p={r['mcnemar_p']:.2g}: {r['verdict']}")
        table.append(f"| {line['task']} | {line['method']} | {line['n']} | " + " | ".join(cells) + " |")
    return "\n".join(table)
