"""C2C's fuser through the real entry point: the train stage trains it and both controls (the shuffled-A
fuser its own), the evaluate stage reads it and runs the other-item control; kill -9 and resume gives
the uninterrupted fuser bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cross_model.c2c.projector import WEIGHTS_FILE
from tests.helpers import kill_9_and_resume, run_entry

C2C = {
    "method": "c2c",
    "input": "skyline",
    "hidden_dim": 16,
    "intermediate_dim": 24,
    "dropout": 0.0,
    "steps": 8,
    "n_train": 16,
    "n_heldout": 4,
    "batch_size_train": 4,
    "target_tokens": 4,
    "lr": 3e-3,
    "checkpoint_every": 2,
    "max_new_tokens": 4,
}


def _config(tmp_path: Path, name: str, stages=("train",), controls: bool = False) -> Path:
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "stages": list(stages),
        "controls": controls,
        "models": {"sender": "tiny-gemma3-64", "receiver": "tiny-llama-48"},
        "tasks": [{"name": "countries", "n_test": 4, "n_calib": 0}],
        "methods": {"baseline": {}, "c2c": {**C2C, "data": "tasks"}},
        "train": {"checkpoint_dir": str(tmp_path / name / "ckpt")},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _finals(tmp_path: Path, name: str) -> dict:
    return {
        json.loads((f / "meta.json").read_text())["train_control"]: f
        for f in (tmp_path / name / "ckpt").glob("c2c__*/final")
    }


def test_the_train_stage_trains_the_fuser_and_its_controls_and_the_evaluate_stage_reads_them(
    tmp_path,
):
    run_entry(_config(tmp_path, "ref", ("train", "evaluate", "report"), controls=True))
    finals = _finals(tmp_path, "ref")
    assert sorted(finals, key=str) == sorted([None, "shuffled_a"], key=str)
    meta = json.loads((finals[None] / "meta.json").read_text())
    shuffled = json.loads((finals["shuffled_a"] / "meta.json").read_text())
    assert [h["step"] for h in meta["history"]] == [0, 4, 8]
    # with every gate closed B reads its own row (context and question here): the same loss, though A
    # read other rows' under the training control
    assert [h["heldout_loss_closed"] for h in shuffled["history"]] == [
        h["heldout_loss_closed"] for h in meta["history"]
    ]
    results = json.loads((tmp_path / "runs" / "ref" / "results.json").read_text())["examples"][
        "countries"
    ]
    for name in ("c2c", "c2c_other_item", "c2c_shuffled_a"):
        assert len(results[name]) == 4 and all(r["error"] is None for r in results[name]), name
    assert all(
        r["layers"] == meta["open_layers"] for r in results["c2c"] + results["c2c_other_item"]
    )
    run_meta = json.loads((tmp_path / "runs" / "ref" / "c2c.json").read_text())
    assert set(run_meta) == {"c2c", "c2c_other_item", "c2c_shuffled_a"}
    assert (
        run_meta["c2c_other_item"]["directory"]
        == run_meta["c2c"]["directory"]
        != run_meta["c2c_shuffled_a"]["directory"]
    )
    assert run_meta["c2c"]["open_layers"] == meta["open_layers"]


def test_kill_9_then_restart_gives_the_uninterrupted_fuser_and_two_ranks_the_same(tmp_path):
    """The gate noise is drawn per row (seed, step, row index), so two gloo ranks, each with half of
    every batch, draw what one process draws (dropout off: its draws follow each rank's generator)."""
    run_entry(_config(tmp_path, "one"))
    config = _config(tmp_path, "killed")
    kill_9_and_resume(config, tmp_path / "killed" / "ckpt")
    ref = load_file(str(_finals(tmp_path, "one")[None] / WEIGHTS_FILE))
    got = load_file(str(_finals(tmp_path, "killed")[None] / WEIGHTS_FILE))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    run_entry(_config(tmp_path, "two"), nproc=2)
    two = load_file(str(_finals(tmp_path, "two")[None] / WEIGHTS_FILE))
    for k in ref:  # the ranks sum the gradient halves in another order (see the translator's test)
        torch.testing.assert_close(two[k], ref[k], atol=1e-3, rtol=1e-3)
