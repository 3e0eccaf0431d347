"""Run an experiment on this machine under torchrun.

    python -m launch.local --config configs/quickstart.yaml [--nproc_per_node auto|N] [--section.key value ...]

`auto` is the number of visible GPUs, or 1 on CPU/MPS. Everything after the launcher's own options is
passed to run_experiments.py unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def auto_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def torchrun_command(config: str, nproc: int, rest: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "run_experiments.py"),
        "--config",
        config,
        *rest,
    ]


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--nproc_per_node", default="auto", help="'auto' (GPUs, or 1 without) or a number"
    )
    parser.add_argument(
        "--print", action="store_true", help="print the command instead of running it"
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse(argv)
    if args.nproc_per_node == "auto":
        nproc = auto_nproc()
    elif args.nproc_per_node.isdigit() and int(args.nproc_per_node) >= 1:
        nproc = int(args.nproc_per_node)
    else:
        print(
            f"--nproc_per_node: expected 'auto' or a positive number, got {args.nproc_per_node!r}",
            file=sys.stderr,
        )
        return 2
    cmd = torchrun_command(args.config, nproc, rest)
    if args.print:
        print(" ".join(cmd))
        return 0
    os.execv(cmd[0], cmd)  # torchrun takes over this process: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
