"""Data checks that need no model: a config's tasks against the rows their sources have (the dry
run), and one row of every task with where it came from (`python -m cross_model.data check CONFIG`).

A config that asks more rows than a source has must fail in seconds, before an 8B model loads."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from cross_model.context import load_experiment
from cross_model.data.base import (
    EVERY_ROW,
    asked_sizes,
    calibration_reserve,
    get_task,
    load_task_examples,
)
from cross_model.methods.registry import resolve_method
from cross_model.models import model_access


@dataclass(frozen=True)
class TaskCheck:
    key: str
    ok: bool
    line: str
    longest_chars: int = 0  # the longest item's prompts (all senders' and B's), when loaded


def _asked(t: Any) -> tuple[Any, int, int]:
    """The task, and the test and calibration items its config asks for (`base.asked_sizes`)."""
    task = get_task(t.name)
    n_test, n_calib = asked_sizes(t.n_test, t.n_calib, t.calibrate_on)
    return task, n_test or task.default_n_test, n_calib


def _count(n_test: int) -> str:
    return "every" if n_test == EVERY_ROW else str(n_test)


def check_counts(cfg: Any, load: bool = True) -> list[TaskCheck]:
    """Every task of `cfg`: its n_test + n_calib against the rows its source has (known sizes without
    loading; with `load`, by loading it). A source that cannot be reached here (no hub) is reported,
    not failed: the known sizes were checked, and the run itself will say what is missing."""
    out = []
    for t in cfg.tasks:
        task, n_test, n_calib = _asked(t)
        where = t.path or task.description or t.name
        sampled = task.default_n_test < 10**9  # the `_full` tasks take what is there
        if task.rows_available and not t.path and sampled and n_test != EVERY_ROW:
            reserve = calibration_reserve(task.rows_available) or n_calib
            if n_test > task.rows_available - reserve or n_calib > reserve:
                out.append(
                    TaskCheck(
                        t.key,
                        False,
                        (
                            f"tasks.{t.key}: n_test ({n_test}) and n_calib ({n_calib}) do not fit the {task.rows_available} "
                            f"rows of {where}: at most {task.rows_available - reserve} test rows, and the last {reserve} "
                            f"are kept for calibration"
                        ),
                    )
                )
                continue
        if not load:
            out.append(
                TaskCheck(
                    t.key,
                    True,
                    f"tasks.{t.key}: {_count(n_test)} test + {n_calib} calibration items asked of {where}",
                )
            )
            continue
        seed = t.seed if t.seed is not None else cfg.seed
        try:
            test, calib = load_task_examples(
                t.name, n_test, n_calib, seed, t.path, t.max_new_tokens
            )
        except FileNotFoundError as err:
            first = str(err).splitlines()[0]
            out.append(
                TaskCheck(
                    t.key,
                    True,
                    f"tasks.{t.key}: not loaded here ({first}); "
                    f"{_count(n_test)} test + {n_calib} calibration items asked of {where}",
                )
            )
            continue
        except ValueError as err:
            text = str(err)
            out.append(
                TaskCheck(
                    t.key,
                    False,
                    text if text.startswith(f"tasks.{t.name}") else f"tasks.{t.key}: {text}",
                )
            )
            continue
        longest = max(
            (sum(map(len, e.contexts)) + len(e.prompt_B) for e in test + calib), default=0
        )
        on_test = " (calibrated on its first test item)" if t.calibrate_on == "test_item_0" else ""
        out.append(
            TaskCheck(
                t.key,
                True,
                f"tasks.{t.key}: {len(test)} test + {len(calib)} calibration items from "
                f"{where}{on_test}",
                longest,
            )
        )
    return out


def resolved_commit(source: Any) -> str:
    """The commit the hub resolves the source's revision to, or why it cannot be read here."""
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(source.path, revision=source.revision or "main").sha
        return f"commit {sha}" + (
            "" if source.revision else " (unpinned: add it to data.hub.REVISIONS)"
        )
    except Exception as err:  # noqa: BLE001 - offline, gated or missing: all mean "not read here"
        return f"commit not read ({type(err).__name__})"


def check_rows(cfg: Any) -> list[TaskCheck]:
    """One row of every task of `cfg`, loaded through its real loader, and where it came from."""
    out = []
    for t in cfg.tasks:
        task = get_task(t.name)
        seed = t.seed if t.seed is not None else cfg.seed
        origin = t.path or task.description or t.name
        if task.source is not None and not t.path:
            origin += f", {resolved_commit(task.source)}"
        try:
            test, _ = load_task_examples(t.name, 1, 0, seed, t.path, t.max_new_tokens)
        except (FileNotFoundError, ValueError) as err:
            out.append(
                TaskCheck(
                    t.key, False, f"tasks.{t.key}: FAILED from {origin}: {str(err).splitlines()[0]}"
                )
            )
            continue
        e = test[0]
        answer = e.answers[0] if e.answers else ""
        out.append(
            TaskCheck(
                t.key,
                True,
                (
                    f"tasks.{t.key}: ok from {origin}: {e.example_id}, A reads {len(e.prompt_A)} chars "
                    f"({len(e.contexts)} sender{'s' if len(e.contexts) > 1 else ''}), B {len(e.prompt_B)} chars, "
                    f"gold {answer[:40]!r}"
                ),
            )
        )
    return out


def model_specs(cfg: Any) -> list[str]:
    """Every model the config's run loads: the pair, each method's own, LatentWire's receivers."""
    specs = [cfg.models.sender, cfg.models.receiver, *cfg.interlingua.receivers]
    for name, raw in cfg.methods.items():
        _, params = resolve_method(name, raw)
        specs += [m for m in (params.sender, params.receiver, *(params.senders or [])) if m]
    return list(dict.fromkeys(specs))


def check_models(cfg: Any) -> list[Any]:
    """`models.model_access` of every model the run loads."""
    return [model_access(spec) for spec in model_specs(cfg)]


def main(argv: list[str] | None = None) -> int:
    """`python -m cross_model.data check CONFIG [--section.key value ...]`: one row of every task."""
    parser = argparse.ArgumentParser(
        prog="python -m cross_model.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="check")
    check = verbs.add_parser(
        "check",
        help="load one row of every task of CONFIG and say where it came from",
        epilog="Any config key can be overridden with --section.key VALUE.",
    )
    check.add_argument("config", help="YAML config (see configs/)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        # as the run resolves it: a preset changes the tasks' sources (kvcomm_public: SCROLLS' Qasper)
        cfg = load_experiment(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        print(check.format_usage().rstrip(), file=sys.stderr)
        print(f"config error: {err}", file=sys.stderr)
        return 2
    checks = check_rows(cfg)
    for c in checks:
        print(c.line, flush=True)
    models = check_models(cfg)
    for access in models:
        print(f"model {access.line}", flush=True)
    failed = [check.key for check in checks if not check.ok]
    failed += [access.spec for access in models if access.blocks]
    usable = sum(1 for access in models if not access.blocks)
    print(
        f"{sum(check.ok for check in checks)} of {len(checks)} tasks loaded, {usable} of {len(models)} models "
        f"not refused" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0
