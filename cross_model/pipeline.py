"""The stages of an experiment (train, calibrate, evaluate, report), run in order in one run directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from cross_model.calibration import calibrate_methods, calibration_path
from cross_model.checkpointing import verify
from cross_model.config import ExperimentConfig, to_dict
from cross_model.context import RunContext, method_instances  # noqa: F401 - run_experiments builds the context
from cross_model.data.base import get_task
from cross_model.distributed import barrier, broadcast_object, get_world_size, is_main
from cross_model.evaluation import evaluate, prepare_data
from cross_model.failures import RunRefused
from cross_model.memory import device_memory, estimate, shape_of, size
from cross_model.report_files import format_table, summarize, write_reports
from cross_model.result_files import gather_results, write_json_atomically
from cross_model.runinfo import load_run_context
from cross_model.sweeps import plot_layer_sweep
from cross_model.tracking import Tracker
from cross_model.trainers import registered_trainables  # every trainable registered
from cross_model.training.trainables import TrainRequest, get_trainable

log = logging.getLogger(__name__)


def plan(cfg: ExperimentConfig) -> list[str]:
    """One line per stage saying what it will do (for --dry-run and the start-up log)."""
    methods = method_instances(cfg)
    lines = []
    for stage in cfg.stages:
        if stage == "train":
            needs = [
                f"{name} ({cls.trained_by})" for name, cls, p in methods if cls.needs_training(p)
            ]
            lines.append(
                f"train: {'fit the learned parts of ' + ', '.join(needs) if needs else 'nothing to train'}"
            )
        elif stage == "calibrate":
            needs = [name for name, cls, p in methods if cls.needs_calibration(p)]
            lines.append(
                f"calibrate: {'calibrate ' + ', '.join(needs) if needs else 'nothing to calibrate'}"
            )
        elif stage == "evaluate":
            tasks = ", ".join(t.key for t in cfg.tasks)
            lines.append(f"evaluate: {', '.join(n for n, _, _ in methods)} on {tasks}")
        elif stage == "report":
            lines.append(
                "report: results.json, results.md, results.csv and plots in the run directory"
            )
    return lines


CHARS_PER_TOKEN = 3  # English BPE averages about 4; 3 errs towards more tokens, so more memory


def prompt_tokens(methods: list[tuple[str, type, Any]], longest: int) -> int:
    """The longest prompt any method reads: per method that reads the context, the longest item
    (tokens) cut to its own max_prompt_tokens; with no item loaded, the caps alone (0: unknown). A
    method that reads no context (the baseline) reads the question, far shorter, whatever its cap."""
    readers = [params.max_prompt_tokens for _, cls, params in methods if cls.reads_context]
    if longest:
        return max((min(longest, cap) if cap else longest for cap in readers), default=longest)
    return max(readers) if readers and all(readers) else 0


def estimate_dtype(cfg: ExperimentConfig, device, dtype) -> tuple[torch.dtype, str]:
    """The dtype the run will use on its target device, and why: `auto` on a machine without a GPU
    resolves to float32, but a config whose device is auto or cuda runs on a GPU in bfloat16."""
    if cfg.platform.dtype != "auto":
        return dtype, "platform.dtype"
    if getattr(device, "type", device) != "cuda" and cfg.platform.device in ("auto", "cuda"):
        return torch.bfloat16, (
            f"what dtype auto gives on a GPU; this machine would run "
            f"{str(dtype).removeprefix('torch.')}: set platform.dtype to estimate another"
        )
    return dtype, f"dtype auto on {getattr(device, 'type', device)}"


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
    tokens = prompt_tokens(methods, longest_chars // CHARS_PER_TOKEN if longest_chars else 0)
    if not tokens:
        return [
            "memory: not estimated (no task loaded here and no max_prompt_tokens on every method "
            "that reads the context)"
        ]
    dtype, why = estimate_dtype(cfg, device, dtype)
    new = max(t.max_new_tokens or get_task(t.name).max_new_tokens for t in cfg.tasks)
    batch = max([cfg.eval.batch_size] + [p.batch_size for _, _, p in methods if p.batch_size])
    element = torch.tensor([], dtype=dtype).element_size()
    est = estimate(shapes, element, batch, tokens, new, cfg.eval.reuse_prefills)
    lines = [f"memory: {line}" for line in est.lines()]
    lines.append(f"memory: in {str(dtype).removeprefix('torch.')} ({why})")
    lines += [
        f"memory: {s.name}: {s.parameters / 1e6:,.1f} M parameters, {s.num_layers} layers, KV "
        f"{s.kv_bytes_per_token(element) / 2**10:.0f} KiB per token (config: {s.source})"
        for s in shapes
    ]
    budget = device_memory(device)
    if budget is not None and est.total > budget:
        lines.append(
            f"memory: WARNING: {size(est.total)} is more than this device's {size(budget)}; "
            f"lower eval.batch_size or the methods' max_prompt_tokens (an out-of-memory batch is halved, "
            f"at the cost of time)"
        )
    return lines


def train_request(ctx: RunContext) -> TrainRequest:
    return TrainRequest(
        ctx.cfg,
        ctx.models.pair,
        ctx.models.get,
        ctx.stop,
        ctx.tracker.log if ctx.tracker is not None else None,
    )


def methods_to_train(cfg: ExperimentConfig) -> list[tuple[str, type, Any]]:
    """The method instances whose learned part the train stage makes; each names a registered trainable."""
    methods = [(n, c, p) for n, c, p in method_instances(cfg) if c.needs_training(p)]
    for name, cls, _ in methods:
        try:
            get_trainable(cls.trained_by)
        except ValueError as err:
            raise RunRefused(f"methods.{name}: {err}") from err
    return methods


def train_stage(ctx: RunContext) -> dict[str, Path]:
    """Each registered trainable trains (or finds finished) what this run's methods need; rank 0
    records each one's outcome in the run directory. Returns method instance -> artefact directory."""
    methods = methods_to_train(ctx.cfg)
    if not methods:
        log.info("train: no method has a learned part; nothing to do")
        return {}
    request, artefacts = train_request(ctx), {}
    for trainable in registered_trainables():
        mine = [(n, p) for n, c, p in methods if c.trained_by == trainable.name]
        if not mine:
            continue
        outcome = trainable.train(request, mine)
        if is_main():  # what the report and `doc_tables --publish` quote about it
            write_json_atomically(ctx.run_dir / trainable.record_file, outcome.record)
        artefacts.update(outcome.artefacts)
    return artefacts


def trained_artefacts(ctx: RunContext, trained: dict[str, Path]) -> dict[str, str]:
    """Where each method's learned part is: what this run's train stage returned, else where an
    earlier run with the same settings left it. Rank 0 checks each and tells the others, so every
    rank makes the same decision; a missing one refuses the run before any item is answered."""
    request, out = train_request(ctx), {}
    for name, cls, params in methods_to_train(ctx.cfg):
        trainable = get_trainable(cls.trained_by)
        path = trained.get(name) or trainable.locate(request, name, params)
        if not broadcast_object(verify(path)[0] is not None if is_main() else None):
            raise RunRefused(
                f"methods.{name}: needs a trained {trainable.what}, and there is no finished one at {path}; run the "
                f"train stage first (stages: [train, ...]) with the same {trainable.config_section} settings, or point "
                f"the method at a finished directory"
            )
        out[name] = str(path)
    return out


def build_methods(ctx: RunContext, trained: dict[str, Path]) -> dict[str, Any]:
    """Every configured method instance, built with its models and (when it has one) its learned part."""
    paths = trained_artefacts(ctx, trained)
    return {
        name: cls(
            params,
            ctx.models.pair(params),
            name,
            ctx.run_dir,
            trained=paths.get(name),
            load_model=ctx.models.get,
        )
        for name, cls, params in method_instances(ctx.cfg)
    }


def calibrate_stage(ctx: RunContext, methods: dict[str, Any], splits: dict) -> None:
    names = [n for n, c, p in method_instances(ctx.cfg) if c.needs_calibration(p)]
    if not names:
        log.info("calibrate: no method needs calibration; nothing to do")
        return
    calib = [e for _, (_, c) in splits.items() for e in c]
    calibrate_methods(ctx.run_dir, methods, names, calib, ctx.cfg.eval.batch_size)


def check_saved_calibrations(ctx: RunContext) -> list[str]:
    """An evaluation without the calibrate stage (`--stages [evaluate, report]`) reads each method's
    saved calibration; a method without one refuses the run now, not row by row later. Returns the
    methods whose saved calibration the evaluate stage loads."""
    if "evaluate" not in ctx.cfg.stages or "calibrate" in ctx.cfg.stages:
        return []
    needs = [n for n, c, p in method_instances(ctx.cfg) if c.needs_calibration(p)]
    missing = broadcast_object(
        [n for n in needs if not calibration_path(ctx.run_dir, n).exists()] if is_main() else None
    )
    if missing:
        raise RunRefused(
            f"methods {', '.join(missing)} choose their layers or bits by calibration, and {ctx.run_dir} holds no saved "
            f"calibration for them (calibration-<method>.json); add the calibrate stage (stages: [calibrate, evaluate, "
            f"report]) or run it once in this run directory first"
        )
    return needs


def evaluate_stage(ctx: RunContext, methods: dict[str, Any], splits: dict) -> None:
    saved = check_saved_calibrations(ctx)
    if saved:  # the calibrate stage is not in this run's stages: load what an earlier start saved
        calibrate_methods(ctx.run_dir, methods, saved, [], ctx.cfg.eval.batch_size)
    outcomes = evaluate(ctx, methods, splits)
    for task, o in outcomes.items():
        log.info(
            "evaluate %s: %d batches on this rank, %d prefills shared between methods, %d run",
            task,
            o.batches,
            o.prefill_hits,
            o.prefill_misses,
        )


def report_run(
    cfg: ExperimentConfig, run_dir: Path, splits: dict, tracker: Any = None
) -> list[Path]:
    """Read every rank's results in `run_dir`, write the report files, print the table (one process)."""
    names = list(cfg.methods)
    on_test = {t.key for t in cfg.tasks if t.calibrate_on == "test_item_0"}
    summary, rows = [], {}
    for task, (test, _) in splits.items():
        for name in names:
            task_rows = gather_results(run_dir, task, name, test)
            summary.append(summarize(task, name, task_rows))
            if task in on_test:  # the public runs' protocol: not a held-out calibration
                summary[-1]["calibrated_on_test_item"] = True
            rows.setdefault(task, {})[name] = task_rows
    context = load_run_context(run_dir)
    paths = write_reports(run_dir, summary, rows, context)
    if plot_layer_sweep(
        run_dir / "layer_sweep.png", summary, (context.get("config") or {}).get("methods") or {}
    ):
        paths.append(run_dir / "layer_sweep.png")
    if tracker is not None:
        tracker.log_summary(summary)
    print(format_table(summary), flush=True)
    print(f"\nResults in {run_dir}/: " + ", ".join(p.name for p in paths), flush=True)
    return paths


def run_stages(ctx: RunContext) -> dict[str, float]:
    """Run the configured stages; returns (and rank 0 writes to timings.json) each one's wall time.
    Each stage's result is passed on explicitly: the data stage's splits to every stage that reads
    items, the train stage's artefacts to the methods built for calibration and evaluation. The
    report stage runs after the timings are written, so its tables can quote them."""
    if ctx.tracker is None:
        ctx.tracker = Tracker.start(ctx.cfg.logging, ctx.run_dir, to_dict(ctx.cfg), ctx.cfg.name)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    try:
        splits = prepare_data(ctx.cfg)  # before any model loads
        check_saved_calibrations(ctx)  # before any stage's work
        trained: dict[str, Path] = {}
        methods: dict[str, Any] | None = None
        for stage in ctx.cfg.stages:
            if stage == "report" and is_main():
                write_json_atomically(
                    ctx.run_dir / "timings.json",
                    {
                        "stages": seconds,
                        "total_s": time.perf_counter() - start,
                        "world_size": get_world_size(),
                        "platform": ctx.platform.description if ctx.platform else None,
                    },
                )
            log.info("== stage %s ==", stage)
            t0 = time.perf_counter()
            if stage == "train":
                trained = train_stage(ctx)
            elif stage in ("calibrate", "evaluate"):
                methods = methods if methods is not None else build_methods(ctx, trained)
                (calibrate_stage if stage == "calibrate" else evaluate_stage)(ctx, methods, splits)
            elif stage == "report":
                if is_main():
                    report_run(ctx.cfg, ctx.run_dir, splits, ctx.tracker)
                barrier()
            seconds[stage] = time.perf_counter() - t0
    finally:
        ctx.tracker.finish()
    return seconds
