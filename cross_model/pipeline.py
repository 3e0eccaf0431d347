"""The stages of an experiment (train, calibrate, evaluate, report), run in order in one run directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cross_model.config import ExperimentConfig
from cross_model.distributed import DistEnv, barrier, is_main
from cross_model.methods.registry import resolve_method
from cross_model.platform import Platform

log = logging.getLogger(__name__)


class Preempted(Exception):
    """A stop signal arrived; every rank saved its progress. The run exits 0 and resumes when restarted."""


@dataclass
class RunContext:
    cfg: ExperimentConfig
    platform: Platform
    env: DistEnv
    run_dir: Path
    state: dict[str, Any] = field(default_factory=dict)  # what one stage hands to the next


def method_instances(cfg: ExperimentConfig) -> list[tuple[str, type, Any]]:
    return [(name, *resolve_method(name, params)) for name, params in cfg.methods.items()]


def model_pair(ctx: RunContext, params: Any) -> Any:
    """The (sender, receiver) pair of a method: the experiment's models unless the method names its
    own (`sender:` / `receiver:`); each model is loaded once per run and shared."""
    from cross_model.methods.base import ModelPair
    from cross_model.models import load_model

    m, p = ctx.cfg.models, ctx.platform
    loaded = ctx.state.setdefault("models", {})

    def get(spec: str, role: str) -> Any:
        # A configured revision belongs to its model name (the role's own first).
        own, other = (m.sender, m.sender_revision), (m.receiver, m.receiver_revision)
        if role == "receiver":
            own, other = other, own
        revision = own[1] if spec == own[0] else other[1] if spec == other[0] else None
        key = (spec, revision)
        if key not in loaded:
            # Rank 0 first: a packaged model is de-quantised and cached once, then the others read the cache.
            if is_main():
                loaded[key] = load_model(spec, p.dtype, p.device, revision)
            barrier()
            if not is_main():
                loaded[key] = load_model(spec, p.dtype, p.device, revision)
        return loaded[key]

    sender = get(getattr(params, "sender", None) or m.sender, "sender")
    receiver = get(getattr(params, "receiver", None) or m.receiver, "receiver")
    return ModelPair(sender, receiver)


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


def _capability(module: str, function: str, stage: str) -> Callable | None:
    """The stage's implementation, or None (said in one line) while that capability has not landed."""
    import importlib

    try:
        return getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        log.info("%s: not available yet (%s is not implemented); skipped", stage, module)
        return None


def _stage_train(ctx: RunContext) -> None:
    methods = [(n, c, p) for n, c, p in method_instances(ctx.cfg) if c.needs_training(p)]
    if not methods:
        log.info("train: no method needs a learned projection; nothing to do")
        return
    train = _capability("cross_model.training", "train_projections_for", "train")
    if train:
        train(ctx, methods)


def _stage_calibrate(ctx: RunContext) -> None:
    methods = [(n, c, p) for n, c, p in method_instances(ctx.cfg) if c.needs_calibration(p)]
    if not methods:
        log.info("calibrate: no method needs calibration; nothing to do")
        return
    calibrate = _capability("cross_model.evaluation", "calibrate_methods", "calibrate")
    if calibrate:
        calibrate(ctx, methods)


def _stage_evaluate(ctx: RunContext) -> None:
    evaluate = _capability("cross_model.evaluation", "evaluate", "evaluate")
    if evaluate:
        evaluate(ctx)


def _stage_report(ctx: RunContext) -> None:
    report = _capability("cross_model.reporting", "report", "report")
    if report:
        report(ctx)


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], None]] = {
    "train": _stage_train,
    "calibrate": _stage_calibrate,
    "evaluate": _stage_evaluate,
    "report": _stage_report,
}


def run_stages(ctx: RunContext) -> None:
    from cross_model.config import to_dict
    from cross_model.tracking import Tracker

    tracker = ctx.state.setdefault("tracker", Tracker.start(ctx.cfg.logging, ctx.run_dir, to_dict(ctx.cfg), ctx.cfg.name))
    try:
        for stage in ctx.cfg.stages:
            log.info("== stage %s ==", stage)
            STAGE_FUNCTIONS[stage](ctx)
    finally:
        tracker.finish()
