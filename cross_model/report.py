"""The report stage from a run directory alone:

    python -m cross_model.report runs/quickstart

reads the resolved `config.yaml` the run saved, rebuilds its test splits (the same ids), and writes
results.json / .md / .csv and the plots there from every rank's result files, as `--stages [report]`
would, without the run's command line, models or GPUs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cross_model.context import load_experiment
from cross_model.evaluation import load_splits
from cross_model.pipeline import report_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cross_model.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "run_dir", type=Path, help="a run directory (it holds config.yaml and results/)"
    )
    args = ap.parse_args(argv)
    config = args.run_dir / "config.yaml"
    if not config.exists():
        print(
            f"error: {args.run_dir} has no config.yaml; give the directory a run wrote (<output_dir>/<name>)",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_experiment(config)
        report_run(cfg, args.run_dir, load_splits(cfg))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
