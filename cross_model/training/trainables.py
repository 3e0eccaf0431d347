"""The registry of trainable components: what the train stage trains and the evaluate stage loads.

A method whose `needs_training(params)` is true names its trainable by the class attribute
`trained_by`. Each trainable registers a `Trainable` (its name, its config section, a function that
trains what a run's methods need, a function that says where a finished artefact for one method lies)
from its own module, and `cross_model.trainers` imports those modules: one line per trainable. The
pipeline asks this registry and never names a trainer (torchtitan's train-spec registry is the model).

A trainer gets a `TrainRequest` (the config, the run's model loaders, the stop flag, a metrics sink)
and nothing else of the run, and returns a `TrainOutcome`: per method instance the directory of its
finished artefact, and the record the run directory keeps about the training (`record_file`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cross_model.distributed import StopFlag


@dataclass(frozen=True)
class TrainRequest:
    """What a trainer may use of the run."""

    cfg: Any  # the ExperimentConfig
    model_pair: Callable[
        [Any], Any
    ]  # a method's params -> its ModelPair (each model loaded once per run)
    load_model: Callable[[str], Any]  # a model spec -> the run's LoadedModel
    stop: StopFlag | None = None
    log_metrics: Callable[[dict[str, Any]], None] | None = None


@dataclass(frozen=True)
class TrainOutcome:
    """What one trainable trained (or found finished) for a run's methods."""

    artefacts: dict[str, Path]  # method instance -> its finished directory
    record: dict[str, Any] = field(
        default_factory=dict
    )  # written to the run directory as `record_file`


@dataclass(frozen=True)
class Trainable:
    name: str  # what methods name in `trained_by`
    config_section: str  # where its recipe lives in the experiment config
    what: str  # what it makes, for messages ("projection", "interlingua", ...)
    record_file: str  # the file in the run directory that records what was trained
    train: Callable[
        [TrainRequest, list[tuple[str, Any]]], TrainOutcome
    ]  # (request, [(instance, params)])
    locate: Callable[
        [TrainRequest, str, Any], Path
    ]  # (request, instance, params) -> its finished artefact's directory


_TRAINABLES: dict[str, Trainable] = {}


def register_trainable(spec: Trainable) -> Trainable:
    if spec.name in _TRAINABLES and _TRAINABLES[spec.name] != spec:
        raise RuntimeError(f"trainable {spec.name!r} registered twice")
    _TRAINABLES[spec.name] = spec
    return spec


def unregister_trainable(name: str) -> None:
    """For tests that register a trainable of their own."""
    _TRAINABLES.pop(name, None)


def get_trainable(name: str) -> Trainable:
    if name not in _TRAINABLES:
        raise ValueError(
            f"no trainable {name!r} is registered (known: {', '.join(_TRAINABLES) or 'none'}); "
            f"a method's `trained_by` must name one registered in cross_model.trainers"
        )
    return _TRAINABLES[name]


def registered_trainables() -> list[Trainable]:
    """In registration order: the order the train stage runs them."""
    return list(_TRAINABLES.values())
