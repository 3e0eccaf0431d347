"""One experiment at several seeds: each method's accuracy, first-named accuracy and (LatentWire) the
gold-NLL gap to each control, as the mean over seeds with their spread (sample standard deviation,
minimum and maximum), from the runs' published-quality results.

    python -m cross_model.seed_spread docs/latentwire_seeds runs/ladder_s0 runs/ladder_s1 runs/ladder_s2

`make latentwire-seeds` runs the ladder with `interlingua.seed` 0, 1 and 2 (the same test items, another
initialisation and training order each) and publishes the spread.

Every run must come from committed code (as `doc_tables --publish` requires) and differ only in its
seed: the same tasks, methods and item ids. A seed's interval says how sure one run is of its items;
the spread says how much training another interlingua moves the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from cross_model.runinfo import check_committed


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def run_seed(run: dict[str, Any]) -> int:
    """What varies between the runs: the interlingua's own seed where set (same items, another
    initialisation and data order), else the experiment's."""
    own = (run["config"].get("interlingua") or {}).get("seed")
    return run["config"]["seed"] if own is None else own


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The spread over `runs` (each a run's results.json) of every (task, method) they all hold."""
    if len(runs) < 2:
        raise ValueError("seed spread: give the results of two or more seeds")
    seeds = [run_seed(r) for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(
            f"seed spread: the runs' seeds repeat ({seeds}); each run must have its own seed"
        )
    keys = [{(s["task"], s["method"]) for s in r["summary"]} for r in runs]
    if any(k != keys[0] for k in keys):
        raise ValueError(
            "seed spread: the runs hold different tasks or methods; run one config at several seeds"
        )
    ids = [{(s["task"], s["method"]): s["n"] for s in r["summary"]} for r in runs]
    if any(i != ids[0] for i in ids):
        raise ValueError(
            "seed spread: the runs scored different numbers of items; run one config at several seeds"
        )
    rows = []
    for task, method in sorted(keys[0]):
        per = [
            next(s for s in r["summary"] if (s["task"], s["method"]) == (task, method))
            for r in runs
        ]
        rows.append(
            {
                "task": task,
                "method": method,
                "n": per[0]["n"],
                "seeds": seeds,
                "accuracy": _spread([s["accuracy"] for s in per]),
                "first_named": _spread([s["first_named"] for s in per]),
                "per_seed_first_named": [s["first_named"] for s in per],
            }
        )
    controls = []
    by_key = [
        {(c["task"], c["method"], c["control"]): c for c in r.get("latentwire_controls", [])}
        for r in runs
    ]
    for key in sorted(set.intersection(*(set(b) for b in by_key))) if by_key[0] else []:
        gaps = [b[key]["nll_gap"]["diff"] for b in by_key]
        controls.append(
            {
                "task": key[0],
                "method": key[1],
                "control": key[2],
                "nll_gap": _spread(gaps),
                "seeds_crossed": sum(bool(b[key]["information_crossed"]) for b in by_key),
            }
        )
    return {
        "seeds": seeds,
        "runs": [
            {
                "name": r["name"],
                "seed": run_seed(r),
                "commit": (r["starts"][0].get("git") or {}).get("commit"),
            }
            for r in runs
        ],
        "rows": rows,
        "controls": controls,
    }


def format_spread(data: dict[str, Any]) -> str:
    n = len(data["seeds"])
    lines = [
        f"| task | method | items | accuracy % over {n} seeds: mean (sd) [min, max] | first-named %: mean (sd) "
        f"[min, max] |",
        "|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        cells = [
            f"{100 * s['mean']:.1f} ({100 * s['sd']:.1f}) [{100 * s['min']:.0f}, {100 * s['max']:.0f}]"
            for s in (r["accuracy"], r["first_named"])
        ]
        lines.append(f"| {r['task']} | {r['method']} | {r['n']} | {cells[0]} | {cells[1]} |")
    if data["controls"]:
        lines += [
            "",
            "| task | latent | control | gold-NLL gap (control - latent): mean (sd) [min, max] | seeds where "
            "information crossed |",
            "|---|---|---|---|---|",
        ]
        for c in data["controls"]:
            g = c["nll_gap"]
            lines.append(
                f"| {c['task']} | {c['method']} | {c['control']} | {g['mean']:+.3f} ({g['sd']:.3f}) "
                f"[{g['min']:+.3f}, {g['max']:+.3f}] | {c['seeds_crossed']} of {n} |"
            )
    return "\n".join(lines) + "\n"


def publish(target: Path, run_dirs: list[Path]) -> Path:
    runs = []
    for d in run_dirs:
        data = json.loads((d / "results.json").read_text())
        check_committed(data, d)
        runs.append(data)
    target.mkdir(parents=True, exist_ok=True)
    out = target / "seeds.json"
    out.write_text(json.dumps(aggregate(runs), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cross_model.seed_spread",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("target", type=Path, help="docs directory for seeds.json")
    ap.add_argument("runs", type=Path, nargs="+", help="the run directories, one per seed")
    args = ap.parse_args(argv)
    try:
        print(publish(args.target, args.runs))
    except (ValueError, FileNotFoundError) as err:
        print(f"seed spread refused: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
