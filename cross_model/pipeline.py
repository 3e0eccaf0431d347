"""The stages of an experiment (train, calibrate, evaluate, report), run in order in one run directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cross_model.c2c.training import train_c2c
from cross_model.calibration import calibrate_methods
from cross_model.config import ExperimentConfig, to_dict
from cross_model.context import RunContext, method_instances, model_by_name, model_pair  # noqa: F401 - the stages' shared names
from cross_model.distributed import barrier, broadcast_object, get_world_size, is_main
from cross_model.data.base import get_task
from cross_model.evaluation import evaluate, prepare_data, task_splits
from cross_model.failures import RunRefused
from cross_model.memory import device_memory, estimate, shape_of, size
from cross_model.reporting import format_table, summarize, write_reports
from cross_model.result_files import gather_results, write_json_atomically
from cross_model.runinfo import load_run_context
from cross_model.sweeps import plot_layer_sweep
from cross_model.tracking import Tracker
from cross_model.interlingua.training import train_interlingua
from cross_model.training import FINAL, train_projections_for

log = logging.getLogger(__name__)


def plan(cfg: ExperimentConfig) -> list[str]:
    """One line per stage saying what it will do (for --dry-run and the start-up log)."""
    methods = method_instances(cfg)
    lines = []
    for stage in cfg.stages:
        if stage == "train":
            needs = [name for name, cls, p in methods if cls.needs_training(p)]
            lines.append(f"train: {'fit the learned maps (projection, interlingua or c2c projector) of ' + ', '.join(needs) if needs else 'nothing to train'}")
        elif stage == "calibrate":
            needs = [name for name, cls, p in methods if cls.needs_calibration(p)]
            lines.append(f"calibrate: {'calibrate ' + ', '.join(needs) if needs else 'nothing to calibrate'}")
        elif stage == "evaluate":
            tasks = ", ".join(t.key for t in cfg.tasks)
            lines.append(f"evaluate: {', '.join(n for n, _, _ in methods)} on {tasks}")
        elif stage == "report":
            lines.append("report: results.json, results.md, results.csv and plots in the run directory")
    return lines


CHARS_PER_TOKEN = 3  # English BPE averages about 4; 3 errs towards more tokens, so more memory


def memory_plan(cfg: ExperimentConfig, device, dtype, longest_chars: int) -> list[str]:
    """What one rank will hold at the run's largest batch and context, from the models' configs
    (no weights loaded), and a warning above the device's memory. The context is the longest loaded
    item (characters / 3) cut to the methods' max_prompt_tokens where every method sets one."""
    methods = method_instances(cfg)
    specs = {cfg.models.sender, cfg.models.receiver}
    for _, _, p in methods:
        specs |= {m for m in (p.sender, p.receiver, *(p.senders or [])) if m}
    try:
        shapes = [shape_of(spec) for spec in sorted(specs)]
    except (FileNotFoundError, ValueError) as err:
        return [f"memory: not estimated ({err})"]
    caps = [p.max_prompt_tokens for _, _, p in methods]
    tokens = longest_chars // CHARS_PER_TOKEN if longest_chars else 0
    if caps and all(caps):
        tokens = min(tokens, max(caps)) if tokens else max(caps)
    elif not tokens and any(caps):  # no data here: the methods that read contexts say how long they may be
        tokens = max(c for c in caps if c)
    if not tokens:
        return ["memory: not estimated (no task loaded here and no max_prompt_tokens on every method)"]
    new = max(t.max_new_tokens or get_task(t.name).max_new_tokens for t in cfg.tasks)
    batch = max([cfg.eval.batch_size] + [p.batch_size for _, _, p in methods if p.batch_size])
    element = torch.tensor([], dtype=dtype).element_size()
    est = estimate(shapes, element, batch, tokens, new, cfg.eval.reuse_prefills)
    lines = [f"memory: {line}" for line in est.lines()]
    lines += [f"memory: {s.name}: {s.parameters / 1e6:,.1f} M parameters, {s.num_layers} layers, KV "
              f"{s.kv_bytes_per_token(element) / 2**10:.0f} KiB per token (config: {s.source})" for s in shapes]
    budget = device_memory(device)
    if budget is not None and est.total > budget:
        lines.append(f"memory: WARNING: {size(est.total)} is more than this device's {size(budget)}; "
                     f"lower eval.batch_size or the methods' max_prompt_tokens (an out-of-memory batch is halved, "
                     f"at the cost of time)")
    return lines


def _stage_train(ctx: RunContext) -> None:
    methods = [(n, c, p) for n, c, p in method_instances(ctx.cfg) if c.needs_training(p)]
    if not methods:
        log.info("train: no method needs a learned projection or an interlingua; nothing to do")
        return
    projections = [m for m in methods if getattr(m[1], "trained_by", "projection") == "projection"]
    c2c = [m for m in methods if getattr(m[1], "trained_by", "") == "c2c"]
    fits: dict[str, Any] = {}
    for name, cls, params in c2c:  # each c2c method its own projector (pair and recipe decide where)
        a = model_by_name(ctx, params.sender or ctx.cfg.models.sender)
        b = model_by_name(ctx, params.receiver or ctx.cfg.models.receiver)
        trained = train_c2c(ctx, name, params, a, b)
        if is_main():
            fits[name] = {"directory": str(trained.directory / FINAL), "history": trained.meta.get("history", []),
                          "open_layers": trained.meta.get("open_layers"), "loaded_final": trained.loaded_final}
    if c2c and is_main():
        write_json_atomically(ctx.run_dir / "c2c.json", fits)
    if projections:
        fits = train_projections_for(ctx, projections)
        if is_main():  # what `doc_tables --publish` quotes about each W
            write_json_atomically(ctx.run_dir / "projections.json", fits)
    if len(projections) + len(c2c) < len(methods):  # LatentWire's methods share the run's one interlingua
        trained = train_interlingua(ctx)
        ctx.state["interlingua"] = trained.directory / FINAL
        if is_main():  # what the report and `doc_tables --publish` quote about it
            write_json_atomically(ctx.run_dir / "interlingua.json", {
                "directory": str(trained.directory / FINAL), "history": trained.meta.get("history", []),
                "identity": trained.meta.get("identity", {}), "loaded_final": trained.loaded_final})


def _stage_calibrate(ctx: RunContext) -> None:
    methods = [(n, c, p) for n, c, p in method_instances(ctx.cfg) if c.needs_calibration(p)]
    if not methods:
        log.info("calibrate: no method needs calibration; nothing to do")
        return
    calibrate_methods(ctx, methods)


def calibration_path(ctx: RunContext, name: str) -> Path:
    return ctx.run_dir / f"calibration-{name}.json"


def check_saved_calibrations(ctx: RunContext) -> list:
    """An evaluation without the calibrate stage (`--stages [evaluate, report]`) reads each method's
    saved calibration; a method without one refuses the run now, not row by row later. Returns the
    methods whose saved calibration the evaluate stage loads."""
    if "evaluate" not in ctx.cfg.stages or "calibrate" in ctx.cfg.stages:
        return []
    needs = [(n, c, p) for n, c, p in method_instances(ctx.cfg) if c.needs_calibration(p)]
    missing = broadcast_object([n for n, _, _ in needs if not calibration_path(ctx, n).exists()] if is_main() else None)
    if missing:
        raise RunRefused(
            f"methods {', '.join(missing)} choose their layers or bits by calibration, and {ctx.run_dir} holds no saved "
            f"calibration for them (calibration-<method>.json); add the calibrate stage (stages: [calibrate, evaluate, "
            f"report]) or run it once in this run directory first"
        )
    return needs


def _stage_evaluate(ctx: RunContext) -> None:
    saved = check_saved_calibrations(ctx)
    if saved:  # the calibrate stage is not in this run's stages: load what an earlier start saved
        calibrate_methods(ctx, saved)
    outcomes = evaluate(ctx)
    for task, o in outcomes.items():
        log.info("evaluate %s: %d batches on this rank, %d prefills shared between methods, %d run",
                 task, o.batches, o.prefill_hits, o.prefill_misses)


def report_run(cfg: ExperimentConfig, run_dir: Path, splits: dict, tracker: Any = None) -> list[Path]:
    """Read every rank's results in `run_dir`, write the report files, print the table (one process)."""
    names = list(cfg.methods)
    summary, rows = [], {}
    for task, (test, _) in splits.items():
        for name in names:
            task_rows = gather_results(run_dir, task, name, test)
            summary.append(summarize(task, name, task_rows))
            rows.setdefault(task, {})[name] = task_rows
    context = load_run_context(run_dir)
    paths = write_reports(run_dir, summary, rows, context)
    if plot_layer_sweep(run_dir / "layer_sweep.png", summary, (context.get("config") or {}).get("methods") or {}):
        paths.append(run_dir / "layer_sweep.png")
    if tracker is not None:
        tracker.log_summary(summary)
    print(format_table(summary), flush=True)
    print(f"\nResults in {run_dir}/: " + ", ".join(p.name for p in paths), flush=True)
    return paths


def _stage_report(ctx: RunContext) -> None:
    if is_main():
        report_run(ctx.cfg, ctx.run_dir, task_splits(ctx), ctx.state.get("tracker"))
    barrier()


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], None]] = {
    "train": _stage_train,
    "calibrate": _stage_calibrate,
    "evaluate": _stage_evaluate,
    "report": _stage_report,
}


def run_stages(ctx: RunContext) -> dict[str, float]:
    """Run the configured stages; returns (and rank 0 writes to timings.json) each one's wall time.
    The report stage runs after the timings are written, so its tables can quote them."""
    tracker = ctx.state.setdefault("tracker", Tracker.start(ctx.cfg.logging, ctx.run_dir, to_dict(ctx.cfg), ctx.cfg.name))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    try:
        prepare_data(ctx)  # before any model loads
        check_saved_calibrations(ctx)  # before any stage's work
        for stage in ctx.cfg.stages:
            if stage == "report" and is_main():
                write_json_atomically(ctx.run_dir / "timings.json", {
                    "stages": seconds, "total_s": time.perf_counter() - start, "world_size": get_world_size(),
                    "platform": ctx.platform.description if ctx.platform else None})
            log.info("== stage %s ==", stage)
            t0 = time.perf_counter()
            STAGE_FUNCTIONS[stage](ctx)
            seconds[stage] = time.perf_counter() - t0
    finally:
        tracker.finish()
    return seconds
