"""LatentWire's linear-probe baseline, trained: per classification task, a multinomial logistic regression
on A's frozen hidden states (one layer, pooled over the prompt's tokens), standardised, its L2 strength
chosen by stratified k-fold cross-validation on the training rows alone (LatentWire's probe: sklearn's
LogisticRegression with a cross-validated C; ours is written here, fitted by L-BFGS in float64 to the
same objective, C sum_i CE_i + |W|^2 / 2).

The rows are each task's training rows (`data.training_rows`: never a test or calibration item, checked
against this run's). The finished probe of a method instance is one directory: per task its weights,
bias and standardisation, and what was chosen (meta.json).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cross_model.checkpointing import FINAL, directory_slug, publish_once, verify
from cross_model.config import resolved_train_config
from cross_model.data import load_task_examples
from cross_model.data.base import Example
from cross_model.data.training_rows import check_disjoint, task_rows
from cross_model.distributed import barrier, broadcast_object, is_main
from cross_model.models import LoadedModel
from cross_model.progress import Progress
from cross_model.prompting import chat_wrap, encode_texts, pad_left, sender_text
from cross_model.training.trainables import Trainable, TrainOutcome, TrainRequest

log = logging.getLogger(__name__)

PROBE_FILE = "probe.safetensors"


@torch.inference_mode()
def probe_features(
    a: LoadedModel, examples: list[Example], layer: int, pooling: str, batch_size: int = 8
) -> tuple[torch.Tensor, list[int]]:
    """A's hidden state after block `layer` (1..L) for each example's prompt as A reads it when it
    communicates, pooled over the real tokens (`mean`) or taken at the last one (`last`): N x D, float64;
    and each prompt's token count."""
    out, lengths = [], []
    with Progress(len(examples), f"linear probe: {a.info.name}'s features", unit="rows") as bar:
        for s in range(0, len(examples), batch_size):
            part = examples[s : s + batch_size]
            ids = encode_texts(a, [chat_wrap(a, sender_text(e)) for e in part])
            lengths += [len(x) for x in ids]
            batch = pad_left(ids, a.tokenizer.pad_token_id, a.device)
            pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            hidden = (
                a.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=pos,
                    output_hidden_states=True,
                    logits_to_keep=1,
                )
                .hidden_states[layer]
                .double()
            )
            if pooling == "mean":
                m = batch.attention_mask.double()[..., None]
                out.append((hidden * m).sum(1) / m.sum(1))
            else:
                out.append(hidden[:, -1])
            bar.update(len(part))
    return torch.cat(out).cpu(), lengths


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression minimising C sum CE + |W|^2 / 2 (the bias unpenalised, as
    sklearn's), from zero, by L-BFGS with a strong Wolfe line search, in float64: (W K x D, b K)."""
    x = x.double()
    w = torch.zeros((n_classes, x.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = c * F.cross_entropy(x @ w.T + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the training features; a constant feature gets std 1."""
    std = x.std(0, unbiased=False)
    return x.mean(0), torch.where(std > 0, std, torch.ones_like(std))


def stratified_folds(y: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """Each row's fold, dealing every class's rows (in a seeded order) round-robin over the folds."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(y)
    for k in y.unique().tolist():
        rows = (y == k).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        fold[rows] = torch.arange(len(rows)) % folds
    return [fold == f for f in range(folds)]


def choose_c(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, grid: list[float], folds: int, seed: int
) -> tuple[float, dict[str, float]]:
    """The C of `grid` with the best mean held-out accuracy over stratified folds (the smallest on a
    tie: the most regularised), and every C's accuracy."""
    scores = {}
    for c in grid:
        right = 0
        for held in stratified_folds(y, folds, seed):
            mean, std = standardise(x[~held])
            w, b = fit_logistic((x[~held] - mean) / std, y[~held], n_classes, c)
            right += int((((x[held] - mean) / std) @ w.T + b).argmax(-1).eq(y[held]).sum())
        scores[str(c)] = right / len(y)
    best = max(sorted(grid), key=lambda c: scores[str(c)])
    return best, scores


def labels_of(rows: list[Example], task: str) -> tuple[list[str], torch.Tensor]:
    candidates = rows[0].meta.get("candidates") if rows else None
    if not candidates:
        raise ValueError(
            f"linear probe: task {task} has no label candidates (it is not a classification task); "
            f"the probe serves sst2, ag_news, trec and tasks like them"
        )
    bad = [r.example_id for r in rows if r.answers[0] not in candidates]
    if bad:
        raise ValueError(
            f"linear probe: {task} row {bad[0]}'s gold is none of its candidates {candidates}"
        )
    return list(candidates), torch.tensor([candidates.index(r.answers[0]) for r in rows])


def train_probe(request: TrainRequest, name: str, params: Any) -> Path:
    """One instance's probes, one per configured task, trained or found finished."""
    cfg = request.cfg
    a = request.model_pair(params).sender
    identity = probe_identity(cfg, params, a)
    final = probe_dir(cfg, identity) / FINAL
    if broadcast_object(verify(final)[0] is not None if is_main() else None):
        log.info("linear probe: %s is already trained; loaded, not retrained", final)
        return final
    layer = params.layer or a.info.num_layers // 2
    tensors, tasks = {}, {}
    if is_main():  # small: one rank fits, the others wait
        for t in cfg.tasks:
            seed = t.seed if t.seed is not None else cfg.seed
            test, calib = load_task_examples(t.name, t.n_test, t.n_calib, seed, t.path)
            rows = task_rows(t.name, params.n_train, seed, t.path)
            check_disjoint(rows, test + calib, f"methods.{name}")
            candidates, y = labels_of(rows, t.name)
            x, _ = probe_features(a, rows, layer, params.pooling)
            c, scores = choose_c(x, y, len(candidates), params.c_grid, params.folds, params.seed)
            mean, std = standardise(x)
            w, b = fit_logistic((x - mean) / std, y, len(candidates), c)
            tensors.update(
                {
                    f"{t.name}.weight": w,
                    f"{t.name}.bias": b,
                    f"{t.name}.mean": mean,
                    f"{t.name}.std": std,
                }
            )
            tasks[t.name] = {
                "candidates": candidates,
                "C": c,
                "cv_accuracy": scores,
                "n_train": len(rows),
                "train_accuracy": float(
                    (((x - mean) / std) @ w.T + b).argmax(-1).eq(y).double().mean()
                ),
            }
            log.info(
                "methods.%s: %s probe, C = %g (cross-validated accuracy %.3f)",
                name,
                t.name,
                c,
                scores[str(c)],
            )
        publish_once(final, {PROBE_FILE: tensors}, {**identity, "layer": layer, "tasks": tasks})
    barrier()
    return final


def probe_identity(cfg: Any, params: Any, a: LoadedModel) -> dict[str, Any]:
    return {
        "sender": a.info.name,
        "layer": params.layer,
        "pooling": params.pooling,
        "n_train": params.n_train,
        "c_grid": list(params.c_grid),
        "folds": params.folds,
        "seed": params.seed,
        "tasks": [[t.name, t.seed if t.seed is not None else cfg.seed, t.path] for t in cfg.tasks],
        **cfg.models.template_identity(),
    }


def probe_dir(cfg: Any, identity: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(resolved_train_config(cfg).checkpoint_dir)
    return root / f"linear_probe__{directory_slug(identity['sender'])[-24:]}__{digest}"


def train_probes(request: TrainRequest, methods: list[tuple[str, Any]]) -> TrainOutcome:
    artefacts = {name: train_probe(request, name, params) for name, params in methods}
    record = {
        name: json.loads((path / "meta.json").read_text())["tasks"]
        for name, path in artefacts.items()
    }
    return TrainOutcome(artefacts, record)


def locate(request: TrainRequest, instance: str, params: Any) -> Path:
    return (
        probe_dir(
            request.cfg, probe_identity(request.cfg, params, request.model_pair(params).sender)
        )
        / FINAL
    )


TRAINABLE = Trainable(
    "linear_probe",
    "methods.<linear_probe instance>",
    "linear probe",
    "linear_probe.json",
    train_probes,
    locate,
)
