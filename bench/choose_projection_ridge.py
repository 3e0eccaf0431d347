"""`make projection-ridge`: choose the least-squares projection's ridge on a separate seed, never on
test items.

For the quickstart's Gemma-3-270M (k = 12) -> SmolLM2-135M (j = 20) pair, fits W with `solver: lstsq`
at each ridge and corpus size on the offline corpus drawn with `--seed` (1: not the experiments' seed
0, whose corpus trains the quickstart's projection), and reports each fit's held-out R^2 and cosine
on that corpus's own held-out split. `TrainConfig.ridge`'s default is the ridge with the best mean
R^2 over the sizes. Writes docs/projection/ridge_choice.json and prints the table.

    python -m bench.choose_projection_ridge [--seed 1] [--sizes 512,2048] [--json docs/projection/ridge_choice.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cross_model.config import TrainConfig
from cross_model.models import load_model
from cross_model.runinfo import git_commit
from cross_model.training.ac_projection import train_projection

RIDGES = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PAIR = ("gemma3-270m", 12, "smollm2-135m-instruct", 20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.choose_projection_ridge", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sizes", default="512,2048", help="train.n_sentences values, comma-separated")
    ap.add_argument("--json", default="docs/projection/ridge_choice.json")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    sender, receiver = load_model(PAIR[0]), load_model(PAIR[2])
    rows = []
    with tempfile.TemporaryDirectory() as ckpt:  # activations cached per size, reused across ridges
        for ridge in RIDGES:
            fits = {}
            for n in sizes:
                cfg = TrainConfig(corpus="offline", n_sentences=n, ridge=ridge, checkpoint_dir=ckpt)
                fit = train_projection(
                    sender, receiver, PAIR[1], PAIR[3], cfg, seed=args.seed
                ).meta["fit"]
                fits[str(n)] = {"r2": fit["r2"], "cosine": fit["cosine"]}
            rows.append(
                {
                    "ridge": ridge,
                    "fits": fits,
                    "mean_r2": sum(f["r2"] for f in fits.values()) / len(fits),
                }
            )
            print(
                f"ridge {ridge:g}: "
                + ", ".join(f"n={n} R^2 {f['r2']:.4f}" for n, f in fits.items()),
                flush=True,
            )
    best = max(rows, key=lambda r: r["mean_r2"])["ridge"]
    out = {
        "pair": {"sender": PAIR[0], "k": PAIR[1], "receiver": PAIR[2], "j": PAIR[3]},
        "corpus": "offline",
        "seed": args.seed,
        "sizes": sizes,
        "rows": rows,
        "best": best,
        "seconds": time.perf_counter() - start,
        "git": git_commit(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"best ridge: {best:g} (TrainConfig.ridge's default should be this); wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
