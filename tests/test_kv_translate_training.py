"""The KV translator's training job through the real entry point: the held-out loss falls below B's loss without A;
kill -9 and resume equals an uninterrupted run; two gloo ranks train the projector one process
trains; a checkpoint made for another pair is refused; the evaluate stage loads the trained projector."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cross_model.c2c.projector import new_projector
from cross_model.c2c.train_projector import WEIGHTS_FILE, TranslatorLoss, fit_projector, identity_of
from cross_model.checkpointing import CheckpointManager
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model
from tests.helpers import entry, kill_9_and_resume, run_entry

ROOT = Path(__file__).resolve().parent.parent
C2C = {
    "method": "kv_translate",
    "gate_init": 1.0,
    "steps": 12,
    "n_train": 32,
    "n_heldout": 8,
    "batch_size_train": 8,
    "target_tokens": 6,
    "hidden": 32,
    "lr": 1e-2,
    "checkpoint_every": 3,
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
        "methods": {"baseline": {}, "kv_translate": C2C},
        "train": {"checkpoint_dir": str(tmp_path / name / "ckpt")},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _run(config: Path, nproc: int = 1) -> str:
    return run_entry(config, nproc)


def _final(
    tmp_path: Path, name: str, train_control: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    (final,) = [
        f
        for f in (tmp_path / name / "ckpt").glob("kv_translate__*/final")
        if json.loads((f / "meta.json").read_text())["train_control"] == train_control
    ]
    return load_file(str(final / WEIGHTS_FILE)), json.loads((final / "meta.json").read_text())


def test_training_lowers_the_heldout_loss_and_the_evaluate_stage_reads_the_projector(tmp_path):
    """With the controls on (the default): the other-item control reads the same projector, the
    shuffled-A control trains its own on the same rows with A reading other rows' contexts."""
    _run(_config(tmp_path, "ref", ("train", "evaluate", "report"), controls=True))
    _, meta = _final(tmp_path, "ref")
    _, shuffled = _final(tmp_path, "ref", "shuffled_a")
    assert len(list((tmp_path / "ref" / "ckpt").glob("kv_translate__*/final"))) == 2
    assert [h["step"] for h in shuffled["history"]] == [h["step"] for h in meta["history"]]
    # every gate closed, B does not read A: the same targets (B's continuation of each row's own context)
    assert [h["heldout_loss_closed"] for h in shuffled["history"]] == pytest.approx(
        [h["heldout_loss_closed"] for h in meta["history"]]
    )
    assert shuffled["history"][-1]["heldout_loss"] != pytest.approx(
        meta["history"][-1]["heldout_loss"]
    )
    first, last = meta["history"][0], meta["history"][-1]
    assert [h["step"] for h in meta["history"]] == [0, 4, 8, 12]  # each epoch (32 rows / 8)
    assert (
        last["heldout_loss"] < first["heldout_loss"]
        and last["heldout_loss"] < last["heldout_loss_closed"]
    )
    results = json.loads((tmp_path / "runs" / "ref" / "results.json").read_text())
    rows = results["examples"]["countries"]["kv_translate"]
    assert len(rows) == 4 and all(r["error"] is None for r in rows)
    assert all(r["layers"] == meta["open_layers"] for r in rows)  # the open gates are the selection
    control = results["examples"]["countries"]["kv_translate_other_item"]
    assert [r["example_id"] for r in control] == [r["example_id"] for r in rows]
    assert all(
        r["error"] is None
        for r in control + results["examples"]["countries"]["kv_translate_shuffled_a"]
    )
    run_meta = json.loads((tmp_path / "runs" / "ref" / "kv_translate.json").read_text())
    assert run_meta["kv_translate"]["open_layers"] == meta["open_layers"]


def test_kill_9_then_restart_gives_the_uninterrupted_projector_and_two_ranks_the_same(tmp_path):
    _run(_config(tmp_path, "one"))
    config = _config(tmp_path, "killed")
    kill_9_and_resume(config, tmp_path / "killed" / "ckpt")
    ref, ref_meta = _final(tmp_path, "one")
    got, got_meta = _final(tmp_path, "killed")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [h["step"] for h in got_meta["history"]] == [
        0,
        4,
        8,
        12,
    ]  # held-out losses survive the kill
    assert "loaded, not retrained" in _run(config)
    _run(_config(tmp_path, "two"), nproc=2)
    two, _ = _final(tmp_path, "two")
    # Two ranks add the gradient halves in another order; Adam divides by sqrt(v), which turns that
    # rounding into visible differences on weights whose gradient is near zero. Bound: a tenth of one
    # step's size (lr = 1e-2), far below what another batch order or a missing rank would give.
    for k in ref:
        torch.testing.assert_close(two[k], ref[k], atol=1e-3, rtol=1e-3)
    assert sum(int((two[k] - ref[k]).abs().gt(1e-5).sum()) for k in ref) <= 0.01 * sum(
        v.numel() for v in ref.values()
    )


def test_a_checkpoint_made_for_another_pair_is_refused(tmp_path):
    a, b, c = load_model("tiny-gemma3-64"), load_model("tiny-llama-48"), load_model("tiny-llama-64")
    _, params = resolve_method(
        "kv_translate", {**{k: v for k, v in C2C.items() if k != "method"}, "steps": 1}
    )
    ident = identity_of(params, c, b)  # a checkpoint of another sender in this directory
    proj = new_projector(params, a, b)
    CheckpointManager(tmp_path).save(
        1, {k: v for k, v in proj.state_dict().items()}, ident, {"optimizer": {}, "step": 1}, None
    )
    with pytest.raises(ValueError, match="does not fit this run: sender"):
        fit_projector(
            TranslatorLoss(proj, a, b, params), b, params, identity_of(params, a, b), tmp_path
        )


def test_sigterm_saves_a_checkpoint_exits_zero_and_the_next_run_resumes(tmp_path):
    config = _config(tmp_path, "term")
    proc = entry(config, delay=0.3)
    ckpt = tmp_path / "term" / "ckpt"
    deadline = time.time() + 180
    while not list(ckpt.glob("kv_translate__*/step_*/meta.json")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "preempted" in out, out[-3000:]
    (pair_dir,) = list(ckpt.glob("kv_translate__*"))
    assert (
        CheckpointManager(pair_dir).latest_step() is not None and not (pair_dir / "final").exists()
    )
    assert "resumed" in _run(config) and (pair_dir / "final").exists()


def test_training_called_directly_switches_the_receiver_to_the_layout_attention(tmp_path):
    """`fit_projector` used as a library (not through the train stage) on a receiver still on plain
    SDPA: the loss switches it to our attention, so the gates get gradients and move."""
    a, b = load_model("tiny-gemma3-64"), load_model("tiny-llama-48")
    b.model.set_attn_implementation("sdpa")
    _, params = resolve_method(
        "kv_translate",
        {
            **{k: v for k, v in C2C.items() if k != "method"},
            "gate_init": 0.0,
            "steps": 2,
            "n_train": 8,
            "n_heldout": 2,
        },
    )
    proj = new_projector(params, a, b)
    start = proj.gate_logits.detach().clone()
    fit_projector(
        TranslatorLoss(proj, a, b, params), b, params, identity_of(params, a, b), tmp_path
    )
    assert not torch.equal(proj.gate_logits.detach(), start)


def test_c2c_training_warms_up_clips_and_decays_as_c2c_when_asked(tmp_path):
    """C2C's optimisation choices as options: one step with 4 warm-up steps moves a weight by about a
    quarter of lr (Adam's first update is about the rate); with grad_clip the gradient the optimizer read
    has at most that norm; the recipe keys name all three, so a checkpoint of another recipe is refused."""
    from cross_model.c2c.train_projector import RECIPE_KEYS

    a, b = load_model("tiny-gemma3-64"), load_model("tiny-llama-48")
    moved, norms = {}, {}
    for name, extra in (
        ("c2c_like", {"warmup_steps": 4, "grad_clip": 0.01, "weight_decay": 0.001}),
        ("plain", {}),
    ):
        _, params = resolve_method(
            "kv_translate",
            {
                **{k: v for k, v in C2C.items() if k != "method"},
                "steps": 1,
                "n_train": 8,
                "n_heldout": 2,
                "gates": "open",
                **extra,
            },
        )
        proj = new_projector(params, a, b)
        before = {k: v.clone() for k, v in proj.state_dict().items()}
        fit_projector(
            TranslatorLoss(proj, a, b, params),
            b,
            params,
            identity_of(params, a, b),
            tmp_path / name,
        )
        moved[name] = max(float((proj.state_dict()[k] - before[k]).abs().max()) for k in before)
        norms[name] = float(
            torch.cat([p.grad.flatten() for p in proj.parameters() if p.grad is not None]).norm()
        )
    lr = params.lr
    assert 0.9 * lr <= moved["plain"] <= 1.01 * lr
    assert 0.9 * lr / 4 <= moved["c2c_like"] <= 1.01 * lr / 4
    assert norms["c2c_like"] <= 0.01 * 1.0001 < norms["plain"]
    assert {"warmup_steps", "grad_clip", "weight_decay"} <= set(RECIPE_KEYS)


def test_gold_targets_are_the_rows_answers_in_the_receivers_tokens(tmp_path):
    """target: gold (C2C trains on its data's responses): each row's gold answer tokenised by B, then
    B's EOS, cut at target_tokens; the run trains on them (targets.json) instead of B's continuation."""
    from cross_model.c2c.train_projector import gold_targets
    from cross_model.data import load_task_examples

    a, b = load_model("tiny-gemma3-64"), load_model("tiny-llama-48")
    rows = load_task_examples("countries", 4, 0)[0]
    got = gold_targets(b, rows, 3)
    for ids, row in zip(got, rows):
        want = b.tokenizer(row.answers[0], add_special_tokens=False)["input_ids"] + [
            b.tokenizer.eos_token_id
        ]
        assert ids == want[:3]
    _, params = resolve_method(
        "kv_translate",
        {
            **{k: v for k, v in C2C.items() if k != "method"},
            "steps": 1,
            "n_train": 4,
            "n_heldout": 1,
            "target": "gold",
            "target_tokens": 3,
        },
    )
    train = load_task_examples("countries", 5, 0, seed=7)[0]
    proj = new_projector(params, a, b)
    fit_projector(
        TranslatorLoss(proj, a, b, params),
        b,
        params,
        identity_of(params, a, b),
        tmp_path,
        rows=(train[:4], train[4:]),
    )
    assert json.loads((tmp_path / "targets.json").read_text()) == gold_targets(b, train, 3)


def test_the_gates_open_where_the_projected_cache_lowers_the_loss(tmp_path):
    """The synthetic task of C2C's fuser test (every row's answer the same word, which B alone does not
    say): every gate starts closed (logit -0.05, shut at evaluation) and training opens layers whose
    projected cache lowers the held-out loss below B alone's on the same targets."""
    from cross_model.data import load_task_examples

    a, b = load_model("tiny-gemma3-64"), load_model("tiny-llama-48")
    data = tmp_path / "rows.jsonl"
    contexts = [e.prompt_A for e in load_task_examples("countries", 20, 0, seed=11)[0]]
    data.write_text(
        "".join(
            json.dumps({"context": c, "question": "Say the word.", "answer": "Oslo"}) + "\n"
            for c in contexts
        )
    )
    _, params = resolve_method(
        "kv_translate",
        {
            **{k: v for k, v in C2C.items() if k not in ("method", "max_new_tokens")},
            "gate_init": -0.05,
            "data": str(data),
            "target": "gold",
            "n_train": 16,
            "n_heldout": 4,
            "batch_size_train": 4,
            "steps": 16,
            "target_tokens": 4,
        },
    )
    proj = new_projector(params, a, b)
    done = fit_projector(
        TranslatorLoss(proj, a, b, params), b, params, identity_of(params, a, b), tmp_path / "fit"
    )
    first, last = done.meta["history"][0], done.meta["history"][-1]
    assert first["open_layers"] == 0 and last["open_layers"] > 0
    assert last["heldout_loss"] < last["heldout_loss_closed"] - 0.05
