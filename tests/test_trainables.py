"""A sixth trainer added the way the registry promises (its own module's code and one registration)
runs through the real pipeline: the train stage trains it and records it, the method gets its
artefact in its constructor, and an evaluation without the train stage finds it or refuses."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import run_experiments
from cross_model.checkpointing import FINAL, publish_once, verify
from cross_model.distributed import barrier, is_main
from cross_model.methods import registry
from cross_model.methods.base import Method, MethodParams, Prediction
from cross_model.training.trainables import (
    Trainable,
    TrainOutcome,
    register_trainable,
    registered_trainables,
    unregister_trainable,
)

CALLS: list[list[str]] = []


@dataclass
class StampParams(MethodParams):
    answer: str = field(default="", metadata={"help": "what the trained stamp should make it say"})


class StampMethod(Method):
    """Answers with what its trained artefact holds."""

    Params = StampParams
    trained_by = "stamp"

    @classmethod
    def needs_training(cls, params):
        return True

    def check_pair(self):
        self.stamp = (
            json.loads((Path(self.trained) / "stamp.json").read_text())["answer"]
            if self.trained
            else None
        )

    def _run_batch(self, examples):
        return [Prediction(e.example_id, self.stamp, 0) for e in examples]


def _root(cfg) -> Path:
    return Path(cfg.output_dir) / "stamps"


def _train(request, methods):
    CALLS.append([name for name, _ in methods])
    artefacts = {}
    for name, params in methods:
        final = _root(request.cfg) / params.answer / FINAL
        if is_main() and verify(final)[0] is None:
            publish_once(
                final,
                {"stamp.json": json.dumps({"answer": params.answer})},
                {"answer": params.answer},
            )
        barrier()
        artefacts[name] = final
    return TrainOutcome(artefacts, {name: str(path) for name, path in artefacts.items()})


STAMP = Trainable(
    "stamp",
    "methods.<instance>.answer",
    "stamp",
    "stamps.json",
    _train,
    lambda request, name, params: _root(request.cfg) / params.answer / FINAL,
)


@pytest.fixture
def stamp_trainer():
    registry.register("stamp_method")(StampMethod)
    register_trainable(
        STAMP
    )  # the one registration line a new trainer adds (in cross_model.trainers)
    CALLS.clear()
    yield
    unregister_trainable("stamp")
    registry._METHODS.pop("stamp_method", None)


def test_a_registered_trainer_runs_through_the_pipeline_without_the_pipeline_naming_it(
    tmp_path, stamp_trainer
):
    assert [t.name for t in registered_trainables()][:4] == [
        "c2c",
        "kv_translate",
        "projection",
        "interlingua",
    ]
    common = [
        "--config",
        "configs/tiny.yaml",
        "--output_dir",
        str(tmp_path),
        "--tasks",
        "[{name: countries, n_test: 3}]",
        "--methods",
        '{"baseline": {}, "stamped": {"method": "stamp_method", "answer": "Paris"}}',
    ]
    # Without the train stage and nothing trained: refused before any item is answered.
    assert run_experiments.main([*common, "--stages", "[evaluate]"]) == 2
    assert not (tmp_path / "tiny" / "results").exists() and CALLS == []
    assert run_experiments.main([*common, "--stages", "[train, evaluate, report]"]) == 0
    assert CALLS == [["stamped"]]
    record = json.loads((tmp_path / "tiny" / "stamps.json").read_text())
    assert record == {"stamped": str(tmp_path / "stamps" / "Paris" / FINAL)}
    rows = json.loads((tmp_path / "tiny" / "results.json").read_text())["examples"]["countries"][
        "stamped"
    ]
    assert [r["answer"] for r in rows] == ["Paris"] * 3
    # A later evaluation without the train stage reads the finished artefact (the trainer is not called).
    assert run_experiments.main([*common, "--name", "again", "--stages", "[evaluate, report]"]) == 0
    assert CALLS == [["stamped"]]
    rows = json.loads((tmp_path / "again" / "results.json").read_text())["examples"]["countries"][
        "stamped"
    ]
    assert [r["answer"] for r in rows] == ["Paris"] * 3


def test_a_method_naming_an_unregistered_trainable_is_refused(tmp_path, capsys):
    registry.register("stamp_method")(StampMethod)
    try:
        rc = run_experiments.main(
            [
                "--config",
                "configs/tiny.yaml",
                "--output_dir",
                str(tmp_path),
                "--methods",
                '{"stamped": {"method": "stamp_method", "answer": "x"}}',
            ]
        )
    finally:
        registry._METHODS.pop("stamp_method", None)
    assert rc == 2
    assert "no trainable 'stamp' is registered" in capsys.readouterr().err
