"""The stages of an experiment (train, calibrate, evaluate, report), run in order in one run directory."""

from __future__ import annotations

import logging
from typing import Callable

from cross_model.calibration import calibrate_methods
from cross_model.config import ExperimentConfig, to_dict
from cross_model.context import RunContext, method_instances, model_pair  # noqa: F401 - the stages' shared names
from cross_model.distributed import barrier, is_main
from cross_model.evaluation import evaluate, task_splits
from cross_model.reporting import format_table, summarize, write_reports
from cross_model.result_files import gather_results
from cross_model.runinfo import load_run_context
from cross_model.tracking import Tracker
from cross_model.training import train_projections_for

log = logging.getLogger(__name__)


def plan(cfg: ExperimentConfig) -> list[str]:
    """One line per stage saying what it will do (for --dry-run and the start-up log)."""
    methods = method_instances(cfg)
    lines = []
    for stage in cfg.stages:
        if stage == "train":
            needs = [name for name, cls, p in methods if cls.needs_training(p)]
            lines.append(f"train: {'fit projections for ' + ', '.join(needs) if needs else 'nothing to train'}")
        elif stage == "calibrate":
            needs = [name for name, cls, p in methods if cls.needs_calibration(p)]
            lines.append(f"calibrate: {'calibrate ' + ', '.join(needs) if needs else 'nothing to calibrate'}")
        elif stage == "evaluate":
            tasks = ", ".join(t.name for t in cfg.tasks)
            lines.append(f"evaluate: {', '.join(n for n, _, _ in methods)} on {tasks}")
        elif stage == "report":
            lines.append("report: results.json, results.md, results.csv and plots in the run directory")
    return lines


def _stage_train(ctx: RunContext) -> None:
    methods = [(n, c, p) for n, c, p in method_instances(ctx.cfg) if c.needs_training(p)]
    if not methods:
        log.info("train: no method needs a learned projection; nothing to do")
        return
    train_projections_for(ctx, methods)


def _stage_calibrate(ctx: RunContext) -> None:
    methods = [(n, c, p) for n, c, p in method_instances(ctx.cfg) if c.needs_calibration(p)]
    if not methods:
        log.info("calibrate: no method needs calibration; nothing to do")
        return
    calibrate_methods(ctx, methods)


def _stage_evaluate(ctx: RunContext) -> None:
    outcomes = evaluate(ctx)
    for task, o in outcomes.items():
        log.info("evaluate %s: %d batches on this rank, %d prefills shared between methods, %d run",
                 task, o.batches, o.prefill_hits, o.prefill_misses)


def _stage_report(ctx: RunContext) -> None:
    """Read every rank's results, write the files on rank 0, print the table."""
    if is_main():
        names = [name for name, _, _ in method_instances(ctx.cfg)]
        summary, rows = [], {}
        for task, (test, _) in task_splits(ctx).items():
            for name in names:
                task_rows = gather_results(ctx.run_dir, task, name, test)
                summary.append(summarize(task, name, task_rows))
                rows.setdefault(task, {})[name] = task_rows
        paths = write_reports(ctx.run_dir, summary, rows, load_run_context(ctx.run_dir))
        tracker = ctx.state.get("tracker")
        if tracker is not None:
            tracker.log_summary(summary)
        print(format_table(summary), flush=True)
        print(f"\nResults in {ctx.run_dir}/: " + ", ".join(p.name for p in paths), flush=True)
    barrier()


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], None]] = {
    "train": _stage_train,
    "calibrate": _stage_calibrate,
    "evaluate": _stage_evaluate,
    "report": _stage_report,
}


def run_stages(ctx: RunContext) -> None:
    tracker = ctx.state.setdefault("tracker", Tracker.start(ctx.cfg.logging, ctx.run_dir, to_dict(ctx.cfg), ctx.cfg.name))
    try:
        for stage in ctx.cfg.stages:
            log.info("== stage %s ==", stage)
            STAGE_FUNCTIONS[stage](ctx)
    finally:
        tracker.finish()
