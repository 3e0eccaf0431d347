#!/usr/bin/env python
"""The one entry point: config -> train projection -> calibrate -> evaluate -> report.

python run_experiments.py --config configs/quickstart.yaml [--dry-run] [--section.key value ...]
torchrun --nproc_per_node=4 run_experiments.py --config configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

# Only what the listing verbs need loads here (no torch, no method module): --list-methods,
# --help-method, --list-tasks and --help-config answer at once; a run's modules load in `run`.
from cross_model.config import describe
from cross_model.data.base import available_tasks, get_task
from cross_model.methods.registry import available_methods, get_method_class, method_summary

log = logging.getLogger("run_experiments")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_experiments.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be overridden with --section.key VALUE (see --help-config).",
    )
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply without one")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and planned stages, then exit",
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with its default and meaning",
    )
    parser.add_argument(
        "--list-methods", action="store_true", help="list the registered methods, one line each"
    )
    parser.add_argument(
        "--help-method", metavar="NAME", help="every parameter of method NAME: default and meaning"
    )
    parser.add_argument(
        "--list-tasks",
        action="store_true",
        help="list the registered tasks: metric, size, answer length",
    )
    parser.add_argument(
        "--allow-code-change",
        action="store_true",
        help="resume a run whose code, torch/transformers versions or (in half precision) number of "
        "ranks differ from its first start",
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    return build_parser().parse_known_args(argv)


def describe_registries(args: argparse.Namespace) -> int:
    """--list-methods, --help-method NAME, --list-tasks."""
    if args.list_methods:
        for name in available_methods():
            print(f"{name:10s} {method_summary(name)}")
    if args.help_method:
        try:
            cls = get_method_class(args.help_method)
        except ValueError as err:
            print(f"--help-method: {err}", file=sys.stderr)
            return 2
        print(
            f"# methods.<instance>: {{method: {args.help_method}, ...}}; each key, its default and meaning"
        )
        print("\n".join(describe(cls.Params, "methods.<instance>.")))
    if args.list_tasks:
        for name in available_tasks():
            t = get_task(name)
            size = "all" if t.default_n_test >= 10**6 else t.default_n_test
            print(
                f"{name:14s} metric {t.metric}, {size} test items by default, answers of up to "
                f"{t.max_new_tokens} tokens. {t.description}".rstrip()
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    if args.list_methods or args.help_method or args.list_tasks:
        return describe_registries(args)
    return run(args, overrides)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """The run (or its dry run): the modules that load torch and transformers are imported here."""
    from cross_model.config import dump_yaml
    from cross_model.context import load_experiment
    from cross_model.data.check import check_counts, check_models
    from cross_model.distributed import (
        Preempted,
        StopFlag,
        broadcast_object,
        distributed_session,
        init_distributed,
        is_main,
        read_env,
        setup_logging,
    )
    from cross_model.failures import RunRefused
    from cross_model.pipeline import RunContext, memory_plan, plan, run_stages
    from cross_model.platform import detect_platform
    from cross_model.progress import set_progress_interval
    from cross_model.runinfo import (
        check_shared_run_dir,
        prepare_run_dir,
        run_identity,
        run_metadata,
    )

    try:
        cfg = load_experiment(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        # a wrong argument reads as an override: say how the command is used, then what was wrong
        print(build_parser().format_usage().rstrip(), file=sys.stderr)
        print(f"config error: {err}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level)
    set_progress_interval(cfg.logging.progress_every_s)
    env = read_env()
    try:
        platform = detect_platform(cfg.platform.device, cfg.platform.dtype, env.local_rank)
    except ValueError as err:
        print(f"platform error (rank {env.rank}): {err}", file=sys.stderr)
        return 2

    try:  # ranks that share one GPU are refused here, before nccl starts
        init_distributed(platform.dist_backend, device=platform.device)
    except ValueError as err:
        print(f"platform error (rank {env.rank}): {err}", file=sys.stderr)
        return 2
    with distributed_session(platform.dist_backend, platform.device) as env:
        log.info("platform: %s; world size %d", platform.description, env.world_size)
        if args.dry_run:
            failed = False
            if is_main():
                print(dump_yaml(cfg), end="")
                print("# planned stages:")
                for line in plan(cfg):
                    print(f"#   {line}")
                print("# data (loaded here, before any model):")
                checks = check_counts(cfg)
                for check in checks:
                    print(f"#   {check.line}")
                print(
                    "# models (asked of the hub whether each exists and may be read; no weights fetched):"
                )
                models = check_models(cfg)
                for access in models:
                    print(f"#   {access.line}")
                for line in memory_plan(
                    cfg,
                    platform.device,
                    platform.dtype,
                    max((c.longest_chars for c in checks), default=0),
                ):
                    print(f"# {line}")
                blocked = [access.line for access in models if access.blocks]
                if blocked:
                    print("model error: " + "; ".join(blocked), file=sys.stderr)
                failed = not all(c.ok for c in checks) or bool(blocked)
                if not all(c.ok for c in checks):
                    print(
                        "data error: " + "; ".join(c.line for c in checks if not c.ok),
                        file=sys.stderr,
                    )
            return 2 if broadcast_object(failed) else 0
        run_dir = cfg.run_dir
        start = None
        if is_main():
            meta = run_metadata(env.world_size, platform.description)
            identity = run_identity(meta, platform.kind, str(platform.dtype).removeprefix("torch."))
            try:
                start = prepare_run_dir(cfg, meta, identity, args.allow_code_change)
            except ValueError as err:
                start = err
        start = broadcast_object(start)
        if isinstance(start, ValueError):
            if is_main():
                print(f"run error: {start}", file=sys.stderr)
            return 2
        check_shared_run_dir(run_dir)
        row_info = {
            "start": start,
            "device": platform.kind,
            "dtype": str(platform.dtype).removeprefix("torch."),
        }
        log.info("run directory: %s", run_dir)
        for line in plan(cfg):
            log.info("plan: %s", line)
        stop = StopFlag().install()  # SIGTERM / SIGUSR1: save, leave together, exit 0, resume later
        try:
            run_stages(
                RunContext(
                    cfg=cfg,
                    platform=platform,
                    env=env,
                    run_dir=run_dir,
                    stop=stop,
                    row_info=row_info,
                )
            )
        except Preempted as why:
            log.warning("preempted: %s. Start the same command again to resume.", why)
        except RunRefused as why:
            if is_main():
                print(f"run error: {why}", file=sys.stderr)
            return 2
        finally:
            stop.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
