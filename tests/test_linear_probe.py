"""LatentWire's linear-probe baseline: the logistic regression reaches its optimum (the objective's
gradient vanishes), cross-validation folds are stratified and C is chosen on the training rows, and
through the real entry point the train stage fits a probe per task whose answers equal the argmax of
the saved probe on A's hidden states computed here independently."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cross_model.models import load_model
from cross_model.training.linear_probe import PROBE_FILE, choose_c, fit_logistic, stratified_folds
from tests.helpers import run_entry


def test_the_fit_is_the_optimum_of_the_regularised_objective():
    torch.manual_seed(0)
    x = torch.randn(60, 5, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(60, dtype=torch.float64) > 0).long() + (x[:, 1] > 1).long()
    for c in (0.1, 10.0):
        w, b = fit_logistic(x, y, 3, c)
        p = torch.softmax(x @ w.T + b, -1) - F.one_hot(y, 3).double()
        torch.testing.assert_close(c * p.T @ x + w, torch.zeros_like(w), atol=1e-5, rtol=0)  # d/dW
        torch.testing.assert_close(
            c * p.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0
        )  # d/db
    # a stronger penalty (smaller C) gives smaller weights
    assert fit_logistic(x, y, 3, 0.1)[0].norm() < fit_logistic(x, y, 3, 10.0)[0].norm()


def test_folds_are_stratified_and_c_is_chosen_by_held_out_accuracy():
    y = torch.tensor([0] * 10 + [1] * 5)
    folds = stratified_folds(y, 5, seed=3)
    assert all(
        int(f.sum()) == 3 and int(y[f].sum()) == 1 for f in folds
    )  # two of class 0, one of class 1 each
    assert sum(f.long() for f in folds).eq(1).all()
    torch.manual_seed(1)
    x = torch.randn(40, 3, dtype=torch.float64)
    labels = (x[:, 0] > 0).long()
    best, scores = choose_c(x, labels, 2, [0.001, 1.0], 4, seed=0)
    assert set(scores) == {"0.001", "1.0"} and best == max(
        [0.001, 1.0], key=lambda c: (scores[str(c)], -c)
    )


def _sst2(path: Path, n: int) -> None:
    good, bad = (
        ["a charming , moving film", "great fun and warm"],
        ["a dull , tedious mess", "awful and boring"],
    )
    rows = [
        {
            "idx": i,
            "sentence": (good if i % 2 else bad)[i % 4 // 2] + f" number {i} .",
            "label": i % 2,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_train_stage_fits_a_probe_and_evaluation_reads_it(tmp_path):
    data = tmp_path / "sst2.jsonl"
    _sst2(
        data, 1100
    )  # a local copy keeps its first 1000 rows as the test region and a calibration reserve at the back
    cfg = {
        "name": "probe",
        "output_dir": str(tmp_path / "runs"),
        "stages": ["train", "evaluate", "report"],
        "models": {"sender": "tiny-llama-64", "receiver": "tiny-llama-48"},
        "tasks": [{"name": "sst2", "n_test": 8, "n_calib": 0, "path": str(data)}],
        "methods": {
            "probe": {
                "method": "linear_probe",
                "layer": 1,
                "n_train": 40,
                "c_grid": [0.1, 10.0],
                "folds": 4,
            }
        },
        "train": {"checkpoint_dir": str(tmp_path / "ckpt")},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    run_entry(tmp_path / "c.json")
    (final,) = list((tmp_path / "ckpt").glob("linear_probe__*/final"))
    meta = json.loads((final / "meta.json").read_text())
    assert meta["layer"] == 1 and meta["tasks"]["sst2"]["n_train"] == 40
    assert meta["tasks"]["sst2"]["candidates"] == ["negative", "positive"]
    assert json.loads((tmp_path / "runs" / "probe" / "linear_probe.json").read_text())["probe"][
        "sst2"
    ]["C"] in (0.1, 10.0)
    w = load_file(str(final / PROBE_FILE))
    rows = json.loads((tmp_path / "runs" / "probe" / "results.json").read_text())["examples"][
        "sst2"
    ]["probe"]
    assert len(rows) == 8 and all(r["error"] is None and r["payload_bytes"] == 1 for r in rows)
    a = load_model("tiny-llama-64")
    from cross_model.data import load_task_examples

    items = {e.example_id: e for e in load_task_examples("sst2", 8, 0, path=str(data))[0]}
    for (
        r
    ) in rows:  # the reference: A's mean hidden state after block 1, one item at a time, no padding
        from cross_model.prompting import chat_wrap, encode_texts, sender_text

        ids = torch.tensor(
            [encode_texts(a, [chat_wrap(a, sender_text(items[r["example_id"]]))])[0]]
        )
        with torch.no_grad():
            h = (
                a.model(input_ids=ids, output_hidden_states=True)
                .hidden_states[1][0]
                .double()
                .mean(0)
            )
        k = int(
            (((h - w["sst2.mean"]) / w["sst2.std"]) @ w["sst2.weight"].T + w["sst2.bias"]).argmax()
        )
        assert r["answer"] == ["negative", "positive"][k]
