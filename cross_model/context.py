"""What the stages share: the run's context, the configured method instances and their models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cross_model.config import ExperimentConfig, load_config
from cross_model.distributed import DistEnv, barrier, is_main
from cross_model.methods.base import ModelPair
from cross_model.methods.registry import resolve_method, validate_methods
from cross_model.models import load_model
from cross_model.platform import Platform


@dataclass
class RunContext:
    cfg: ExperimentConfig
    platform: Platform
    env: DistEnv
    run_dir: Path
    state: dict[str, Any] = field(default_factory=dict)  # what one stage hands to the next


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """`config.load_config`, then every method instance checked against its method's parameters."""
    cfg = load_config(path, overrides)
    validate_methods(cfg.methods)
    return cfg


def method_instances(cfg: ExperimentConfig) -> list[tuple[str, type, Any]]:
    return [(name, *resolve_method(name, params)) for name, params in cfg.methods.items()]


def model_pair(ctx: RunContext, params: Any) -> Any:
    """The (sender, receiver) pair of a method: the experiment's models unless the method names its
    own (`sender:` / `receiver:`); each model is loaded once per run and shared."""
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

    senders = getattr(params, "senders", None) or []
    sender = get(senders[0] if senders else getattr(params, "sender", None) or m.sender, "sender")
    receiver = get(getattr(params, "receiver", None) or m.receiver, "receiver")
    return ModelPair(sender, receiver, [get(spec, "sender") for spec in senders[1:]])


def model_by_name(ctx: RunContext, spec: str) -> Any:
    """One model of the run by its spec (loaded once per run, shared with every method)."""
    return model_pair(ctx, SimpleNamespace(sender=spec, receiver=spec)).receiver
