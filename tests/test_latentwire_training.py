"""LatentWire's training job through the real entry point: kill -9 and resume equals an uninterrupted
run; one process, two DDP ranks and two DeepSpeed ranks (ZeRO-2 over gloo, DS_ACCELERATOR=cpu) train
the same interlingua; a checkpoint made for other receivers or sizes is refused."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cross_model.checkpointing import CheckpointManager
from cross_model.config import InterlinguaConfig
from cross_model.data import load_task_examples
from cross_model.interlingua.encoder import EncoderShape
from cross_model.interlingua.model import LatentWire, receiver_record
from cross_model.interlingua.train_interlingua import fit_interlingua
from tests.helpers import entry, kill_9_and_resume, run_entry, write_copies

ROOT = Path(__file__).resolve().parent.parent
INTERLINGUA = {
    "receivers": ["tiny-llama-64", "tiny-gemma3-64"],
    "m": 4,
    "d_z": 32,
    "layers": 1,
    "n_train": 32,
    "n_heldout": 8,
    "steps": 12,
    "batch_size": 8,
    "checkpoint_every": 3,
    "eval_every": 6,
    "kd_weight": 0.5,
}


def _config(tmp_path: Path, name: str, **interlingua) -> Path:
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "stages": ["train"],
        "models": {"sender": "tiny-llama-64", "receiver": "tiny-llama-64"},
        "tasks": [{"name": "secret_word", "n_test": 6, "n_calib": 2}],
        "methods": {"lw": {"method": "latentwire"}},
        "interlingua": {
            **INTERLINGUA,
            "checkpoint_dir": str(tmp_path / name / "ckpt"),
            **interlingua,
        },
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _entry(config: Path, nproc: int = 1, delay: float = 0.0) -> subprocess.Popen:
    return entry(config, nproc, delay, DS_ACCELERATOR="cpu")


def _run(config: Path, nproc: int = 1) -> str:
    return run_entry(config, nproc, DS_ACCELERATOR="cpu")


def _final(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    (final,) = list((tmp_path / name / "ckpt").glob("*/final"))
    return load_file(str(final / "interlingua.safetensors"))


def test_kill_9_then_restart_gives_the_uninterrupted_interlingua(tmp_path):
    """With LatentWire's warm-up, a cosine schedule and clipping: the rate is a function of the step, so
    the resumed run takes the same steps."""
    design = {"warmup_steps": 4, "schedule": "cosine", "grad_clip": 0.5}
    _run(_config(tmp_path, "ref", **design))
    config = _config(tmp_path, "killed", **design)
    kill_9_and_resume(config, tmp_path / "killed" / "ckpt", DS_ACCELERATOR="cpu")
    ref, got = _final(tmp_path, "ref"), _final(tmp_path, "killed")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    (final,) = list((tmp_path / "killed" / "ckpt").glob("*/final"))
    history = json.loads((final / "interlingua.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 6, 12]  # held-out losses survive the kill
    assert "loaded, not retrained" in _run(config)


def _has_compiler() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++"))


def test_one_process_two_ddp_ranks_and_two_deepspeed_ranks_train_the_same_interlingua(tmp_path):
    """Never skipped: `make install` installs DeepSpeed and this machine has a C++ compiler for its
    CPU op; a machine without either fails here, naming which."""
    assert importlib.util.find_spec("deepspeed") is not None, (
        "DeepSpeed is not installed: run `make install`"
    )
    assert _has_compiler(), "DeepSpeed's CPU backend JIT-compiles a C++ comm op: install g++"
    # The first of 4 warm-up steps, clipped: each engine must take a quarter of the rate and clip.
    short = {"steps": 1, "eval_every": 1, "warmup_steps": 4, "grad_clip": 0.05}
    _run(_config(tmp_path, "one", **short))
    _run(_config(tmp_path, "ddp", **short), nproc=2)
    out = _run(_config(tmp_path, "zero2", engine="deepspeed", zero_stage=2, **short), nproc=2)
    assert "engine deepspeed" in out
    one, ddp, ds = (_final(tmp_path, n) for n in ("one", "ddp", "zero2"))
    lr = InterlinguaConfig().lr / 4
    for k in one:
        assert float((ddp[k] - LatentWire_init(k)).abs().max()) > lr / 2, f"{k} did not train"
    # One Adam step moves each weight by about lr x sign(gradient). Gradients summed in another order
    # (gloo over ranks, DeepSpeed's own CPU all-reduce) differ in the last bits, visible after the step
    # only where a gradient is near Adam's eps (1e-8); a rank that stepped on its own half of the batch
    # would move a large share of the weights the other way.
    for a, b in ((ddp, one), (ds, ddp)):
        diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in b])
        assert float((diffs > 1e-5).float().mean()) < 0.01 and float(diffs.max()) <= lr
    losses = [_history(tmp_path, n)[-1]["heldout_loss"] for n in ("ddp", "zero2")]
    assert abs(losses[0] - losses[1]) < 1e-3 * losses[0]


def test_the_learning_rate_warms_up_then_decays_and_clipping_bounds_the_gradient(
    tmp_path, tiny_llama
):
    """lr_factor: linear warm-up to 1, then constant or cosine to 0. In a real step: Adam's first update
    moves a weight by about the rate, so with 4 warm-up steps by a quarter of lr and no more; with
    grad_clip the gradient the optimizer read has at most that norm (and without it, more)."""
    from cross_model.training.loop import lr_factor

    assert [lr_factor(s, 4, 10, "constant") for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, 10, "cosine") == 1.0 and lr_factor(7, 4, 10, "cosine") == pytest.approx(
        0.5
    )
    assert lr_factor(0, 0, 10, "cosine") == 1.0 and 0 < lr_factor(9, 0, 10, "cosine") < 0.03
    assert [lr_factor(s, 2, 10, "linear") for s in (0, 2, 6, 9)] == [
        0.5,
        1.0,
        0.5,
        0.125,
    ]  # C2C's schedule
    rows = load_task_examples("secret_word", 8, 0, 0)[0]
    identity = {"receivers": ["tiny-llama-64"], "shape": {"m": 4, "d_z": 32}, "seed": 0}
    moved, norms = {}, {}
    for name, extra in (("warm", {"warmup_steps": 4, "grad_clip": 0.05}), ("plain", {})):
        ic = InterlinguaConfig(
            m=4, d_z=32, layers=1, steps=1, batch_size=4, checkpoint_every=1, **extra
        )
        net = LatentWire(EncoderShape(m=4, d_z=32, layers=1), [receiver_record(tiny_llama)]).attach(
            [tiny_llama]
        )
        before = {k: v.clone() for k, v in net.state_dict().items()}

        def grad_norm(step, module, name=name):
            norms[name] = float(
                torch.cat(
                    [p.grad.flatten() for p in module.parameters() if p.grad is not None]
                ).norm()
            )

        fit_interlingua(
            net, rows, [], ic, identity, tmp_path / name, torch.device("cpu"), on_step=grad_norm
        )
        moved[name] = max(float((net.state_dict()[k] - before[k]).abs().max()) for k in before)
    lr = InterlinguaConfig().lr
    assert 0.9 * lr <= moved["plain"] <= 1.01 * lr
    assert 0.9 * lr / 4 <= moved["warm"] <= 1.01 * lr / 4
    assert norms["warm"] <= 0.05 * 1.0001 < norms["plain"]
    with pytest.raises(ValueError, match="warmup_steps .10. must be below steps"):
        InterlinguaConfig(steps=10, warmup_steps=10, schedule="cosine").validate("interlingua")


def _history(tmp_path: Path, name: str) -> list[dict]:
    (final,) = list((tmp_path / name / "ckpt").glob("*/final"))
    return json.loads((final / "interlingua.json").read_text())["history"]


_INIT: dict[str, torch.Tensor] = {}


def LatentWire_init(key: str) -> torch.Tensor:  # noqa: N802 - the untrained weights, seed 0
    if not _INIT:
        recs = [{"name": n, "d_model": 64, "target_rms": 1.0} for n in INTERLINGUA["receivers"]]
        _INIT.update(
            LatentWire(
                EncoderShape(m=4, d_z=32, layers=1, heads=4, max_bytes=512), recs, seed=0
            ).state_dict()
        )
    return _INIT[key]


def test_a_checkpoint_made_for_other_sizes_is_refused(tmp_path, tiny_llama):
    rows = load_task_examples("secret_word", 8, 0, 0)[0]
    ic = InterlinguaConfig(m=4, d_z=32, layers=1, steps=2, batch_size=4, checkpoint_every=1)
    identity = {"receivers": ["tiny-llama-64"], "shape": {"m": 4, "d_z": 32}, "seed": 0}
    net = LatentWire(EncoderShape(m=4, d_z=32, layers=1), [receiver_record(tiny_llama)]).attach(
        [tiny_llama]
    )
    fit_interlingua(net, rows, [], ic, identity, tmp_path / "a", torch.device("cpu"))
    assert CheckpointManager(tmp_path / "a").latest_step() == 2
    other = {**identity, "shape": {"m": 8, "d_z": 32}}
    net8 = LatentWire(EncoderShape(m=8, d_z=32, layers=1), [receiver_record(tiny_llama)]).attach(
        [tiny_llama]
    )
    with pytest.raises(ValueError, match="shape"):
        fit_interlingua(net8, rows, [], ic, other, tmp_path / "a", torch.device("cpu"))


def test_train_evaluate_report_with_every_variant_and_the_controls(tmp_path):
    from cross_model.interlingua import wire

    cfg = json.loads(_config(tmp_path, "full").read_text())
    cfg["stages"] = ["train", "evaluate", "report"]
    cfg["interlingua"]["steps"] = 3
    cfg["methods"] = {
        "lw": {"method": "latentwire"},
        "lw_shuffled": {"method": "latentwire", "variant": "shuffled"},
        "lw_zero": {"method": "latentwire", "variant": "zero"},
        "lw_4bit": {"method": "latentwire", "bits": 4},
        "lw_text": {"method": "latentwire", "variant": "text"},
        "lw_budget": {"method": "latentwire", "variant": "token_budget"},
        "lw_joint": {"method": "latentwire", "variant": "joint"},
    }
    cfg["eval"] = {"batch_size": 4}
    path = tmp_path / "full.json"
    path.write_text(json.dumps(cfg))
    _run(path)
    run = tmp_path / "runs" / "full"
    results = json.loads((run / "results.json").read_text())
    rows = results["examples"]["secret_word"]
    test = {e.example_id: e for e in load_task_examples("secret_word", 6, 2, 0)[0]}
    for name, method_rows in rows.items():
        assert sorted(r["example_id"] for r in method_rows) == sorted(test) and not any(
            r["error"] for r in method_rows
        ), name
        for r in method_rows:
            assert r["text_bytes"] == len(test[r["example_id"]].prompt_A.encode())
            assert r["gold_nll"] > 0 and r["first_token_correct"] in (0.0, 1.0)
    by = {name: {r["example_id"]: r for r in method_rows} for name, method_rows in rows.items()}
    for i in test:
        assert (
            by["lw"][i]["payload_bytes"]
            == by["lw_shuffled"][i]["payload_bytes"]
            == by["lw_zero"][i]["payload_bytes"]
            == wire.payload_size(4, 32, 16)
        )
        assert by["lw_4bit"][i]["payload_bytes"] == wire.payload_size(4, 32, 4)
        assert by["lw_text"][i]["payload_bytes"] == by["lw_text"][i]["text_bytes"]
        assert by["lw_budget"][i]["payload_bytes"] <= by["lw_text"][i]["payload_bytes"]
        j = by["lw_joint"][i]
        assert j["joint_choice"] in INTERLINGUA["receivers"] and j["oracle_score"] >= j["score"]
        # Joint keeps the first receiver's own answer when it chose it.
        if j["joint_choice"] == "tiny-llama-64":
            assert j["answer"] == by["lw"][i]["answer"]
    controls = {(c["method"], c["control"]) for c in results["latentwire_controls"]}
    assert {("lw", "lw_shuffled"), ("lw", "lw_zero"), ("lw_4bit", "lw_shuffled")} <= controls
    assert all(c["receiver"] == "tiny-llama-64" for c in results["latentwire_controls"])
    (joint,) = results["latentwire_joint"]
    assert joint["oracle"] >= max(v["accuracy"] for v in joint["receivers"].values())
    assert sum(v["kept"] for v in joint["receivers"].values()) == pytest.approx(1.0)
    assert "LatentWire's controls" in (run / "results.md").read_text()
    history = json.loads((run / "interlingua.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 3]


@pytest.mark.parametrize("task", ["squad", "hotpotqa"])
def test_hub_tasks_train_on_rows_past_their_test_region(task, tmp_path):
    """A hub split's training rows are the rows after its first 1000 (the test region) in the loader's
    seed-42 order, whatever the run's n_test and n_calib; a source too small to keep them refuses."""
    import datasets

    from cross_model.config import ExperimentConfig, TaskConfig
    from cross_model.interlingua.train_interlingua import training_data

    fixture = ROOT / "tests" / "fixtures" / f"{task}.jsonl"
    big = write_copies(fixture, tmp_path / f"{task}.jsonl", 1100)
    trained = {}
    for n_test, n_calib in ((1, 1), (1000, 8)):
        cfg = ExperimentConfig(
            tasks=[TaskConfig(name=task, n_test=n_test, n_calib=n_calib, path=big)],
            interlingua=InterlinguaConfig(n_train=2, n_heldout=1),
        )
        train, held = training_data(cfg)
        trained[n_test] = [e.example_id for e in train + held]
    order = datasets.load_dataset("json", data_files=big, split="train").shuffle(seed=42)
    assert trained[1] == trained[1000] == [f"{task}-{order[i]['id']}" for i in (1000, 1001, 1002)]
    cfg.tasks[0] = TaskConfig(
        name=task, n_test=1, n_calib=1, path=str(fixture)
    )  # 3 rows, none kept for training
    with pytest.raises(ValueError, match="3 training rows asked, the source keeps 0"):
        training_data(cfg)


def test_deepspeed_zero2_killed_with_its_workers_resumes_to_the_uninterrupted_interlingua(tmp_path):
    """Two ZeRO-2 ranks, the launcher and both workers killed with -9 after the first checkpoint, then
    started again: they resume from the checkpoint (its optimizer state is plain data, which a
    weights-only load accepts) and end where an uninterrupted two-rank run ends."""
    assert _has_compiler(), "DeepSpeed's CPU backend JIT-compiles a C++ comm op: install g++"
    ds = {
        "engine": "deepspeed",
        "zero_stage": 2,
        "steps": 6,
        "checkpoint_every": 2,
        "eval_every": 3,
    }
    _run(_config(tmp_path, "ref", **ds), nproc=2)
    config = _config(tmp_path, "killed", **ds)
    kill_9_and_resume(config, tmp_path / "killed" / "ckpt", nproc=2, DS_ACCELERATOR="cpu")
    ref, got = _final(tmp_path, "ref"), _final(tmp_path, "killed")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [h["step"] for h in _history(tmp_path, "killed")] == [
        h["step"] for h in _history(tmp_path, "ref")
    ]
