"""What the stages share: the run's context, the configured method instances and their models."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cross_model.config import ExperimentConfig, load_config
from cross_model.data.base import get_task
from cross_model.data.hub import PUBLIC_TASKS
from cross_model.distributed import DistEnv, StopFlag, rank0_first
from cross_model.methods.base import ModelPair
from cross_model.methods.registry import resolve_method, validate_methods
from cross_model.metrics import PUBLIC_METRICS
from cross_model.models import load_model
from cross_model.platform import Platform
from cross_model.prompting import CHAT_KWARGS

log = logging.getLogger(__name__)


MODEL_WAIT_S = 6 * 3600


class ModelStore:
    """The run's models: each loaded once (rank 0 first, so a packaged model is de-quantised and
    cached once) and shared by every method and trainer that names it."""

    def __init__(self, cfg: ExperimentConfig, platform: Platform):
        self.cfg, self.platform = cfg, platform
        self.loaded: dict[tuple[str, str | None], Any] = {}

    def _load(self, spec: str, role: str) -> Any:
        m, p = self.cfg.models, self.platform
        # A configured revision belongs to its model name (the role's own first).
        own, other = (m.sender, m.sender_revision), (m.receiver, m.receiver_revision)
        if role == "receiver":
            own, other = other, own
        revision = own[1] if spec == own[0] else other[1] if spec == other[0] else None
        key = (spec, revision)
        if key not in self.loaded:
            # Rank 0 downloads and caches (16 GB over a slow link can take hours); the other ranks
            # wait for it longer than the process group's 30 minutes, saying what they wait for.
            self.loaded[key] = rank0_first(
                lambda: load_model(spec, p.dtype, p.device, revision),
                f"downloading and caching {spec}",
                MODEL_WAIT_S,
            )
            self.loaded[key].derived[CHAT_KWARGS] = dict(m.chat_template_kwargs)
        return self.loaded[key]

    def pair(self, params: Any) -> ModelPair:
        """The (sender, receiver) pair of a method: the experiment's models unless the method names its
        own (`sender:` / `receiver:` / `senders:`)."""
        m = self.cfg.models
        senders = getattr(params, "senders", None) or []
        sender = self._load(
            senders[0] if senders else getattr(params, "sender", None) or m.sender, "sender"
        )
        receiver = self._load(getattr(params, "receiver", None) or m.receiver, "receiver")
        return ModelPair(sender, receiver, [self._load(spec, "sender") for spec in senders[1:]])

    def get(self, spec: str) -> Any:
        """One model of the run by its spec."""
        return self._load(spec, "receiver")


@dataclass
class RunContext:
    """One run: its config, platform, process group and directory, what every row records about the
    start (`row_info`), the stop flag, the tracker and the models. Stage results are not kept here:
    each stage returns them and the pipeline passes them on."""

    cfg: ExperimentConfig
    platform: Platform
    env: DistEnv
    run_dir: Path
    stop: StopFlag | None = None
    row_info: dict[str, Any] = field(default_factory=dict)
    tracker: Any = None
    models: ModelStore = field(init=False)

    def __post_init__(self) -> None:
        self.models = ModelStore(self.cfg, self.platform)


def load_experiment(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """`config.load_config`, the preset written into it, then every method instance checked against
    its method's parameters."""
    cfg = load_config(path, overrides)
    validate_methods(cfg.methods)
    return apply_preset(add_controls(cfg))


def add_controls(cfg: ExperimentConfig) -> ExperimentConfig:
    """Add every control a method declares (`Method.controls`) that the config lacks, by what it runs
    (its method and typed parameters), not by its name: controls are not opt-in. Written into the
    config, so the run's resolved config lists them. `controls: false` turns them off (tests)."""
    if not cfg.controls:
        return cfg
    configured = [(name, *resolve_method(name, params)) for name, params in cfg.methods.items()]
    present = [(cls, typed) for _, cls, typed in configured]
    for name, cls, typed in configured:
        for control, entry in cls.controls(name, typed).items():
            resolved = resolve_method(control, entry)
            if resolved in present:
                continue
            if control in cfg.methods:
                raise ValueError(
                    f"methods.{control}: the name of {name}'s control ({entry}) is taken by another "
                    f"method; rename it"
                )
            cfg.methods[control] = entry
            present.append(resolved)
    return cfg


# Tasks the public code reads whole (its own files, LongBench's rows), calibrated on the first test item
PUBLIC_FILE_TASKS = (
    "countries",
    "tipsheets",
    "countries_tipsheets",
    "countries_tipsheets_shuffled",
)
PUBLIC_WHOLE_TASKS = ("multifieldqa_en_public", "twowikimqa_public", "twowikimqa_ms_public")


def apply_preset(cfg: ExperimentConfig) -> ExperimentConfig:
    """Write what `preset` implies into the config itself, so the run's resolved config.yaml says it:
    under kvcomm_public every method takes its `public_settings` (KVComm's receiver and calibration
    blend, CIPHER's EOS) and every task the public code reads or scores otherwise gets its reading and
    metric, wherever the config does not set them itself (an explicit setting wins, and the run records
    both)."""
    if cfg.preset != "kvcomm_public":
        return cfg
    for name, params in cfg.methods.items():
        cls, _ = resolve_method(name, params)
        for (
            key,
            value,
        ) in cls.public_settings.items():  # each method says what the preset sets on it
            params.setdefault(key, value)
    for task in cfg.tasks:
        if (
            task.name in PUBLIC_TASKS
        ):  # the public loader's reading of the same rows, under the task's label
            task.label, task.name = task.key, PUBLIC_TASKS[task.name]
        if task.metric is None:
            task.metric = PUBLIC_METRICS.get(get_task(task.name).metric)
        if task.calibrate_on is None and (
            task.name in PUBLIC_FILE_TASKS and task.path or task.name in PUBLIC_WHOLE_TASKS
        ):
            task.calibrate_on = (
                "test_item_0"  # the public runs: calibrated on test item 0, every row scored
            )
            if task.name.startswith("countries_tipsheets") and task.max_new_tokens is None:
                task.max_new_tokens = (
                    10  # the public mixed task: 10 new tokens for both sources' items
                )
        if task.prompts is None:
            task.prompts = "public"  # the public code's templates for every kind of task
    validate_methods(cfg.methods)
    return cfg


def method_instances(cfg: ExperimentConfig) -> list[tuple[str, type, Any]]:
    return [(name, *resolve_method(name, params)) for name, params in cfg.methods.items()]
