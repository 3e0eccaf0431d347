"""LatentWire's linear-probe baseline (docs/METHODS.md): A reads the text; a logistic regression on A's
hidden state (one layer, pooled) names the label, and only the label's index crosses (one byte). B does
nothing. It says how much of a classification task A's representation holds linearly: the ceiling a
latent channel from A could pass on without B's own reading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from cross_model.checkpointing import verify
from cross_model.data.base import Example
from cross_model.methods.base import Method, MethodParams, Prediction
from cross_model.methods.registry import register
from cross_model.training.linear_probe import PROBE_FILE, probe_features


@dataclass
class LinearProbeParams(MethodParams):
    probe: str = field(
        default="train",
        metadata={"help": "train (the train stage fits it) or a finished probe directory"},
    )
    layer: int | None = field(
        default=None,
        metadata={
            "help": "A's hidden state after this block (None: the middle one; "
            "LatentWire's: 16 of Llama-3.1-8B's 32)"
        },
    )
    pooling: str = field(
        default="mean",
        metadata={"help": "mean (over the prompt's tokens, LatentWire's default) or last"},
    )
    n_train: int = field(
        default=1000, metadata={"help": "training rows per task (its training split)"}
    )
    c_grid: list[float] = field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0],
        metadata={"help": "inverse L2 strengths cross-validated on the training rows"},
    )
    folds: int = field(default=5, metadata={"help": "stratified cross-validation folds"})
    seed: int = field(default=0, metadata={"help": "the folds' seed"})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"{prefix}.pooling: mean or last, got {self.pooling!r}")
        if self.layer is not None and self.layer < 1:
            raise ValueError(f"{prefix}.layer: >= 1 (a block's output) or null, got {self.layer}")
        if self.folds < 2 or self.n_train < self.folds or not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError(
                f"{prefix}: needs folds >= 2, n_train >= folds and a non-empty c_grid of positive values"
            )


@register("linear_probe")
class LinearProbe(Method):
    Params = LinearProbeParams
    trained_by = "linear_probe"

    @classmethod
    def needs_training(cls, params: LinearProbeParams) -> bool:
        return params.probe == "train"

    def check_pair(self) -> None:
        a = self.pair.sender
        self.probes: dict[str, dict[str, torch.Tensor]] = {}
        source = self.trained or (None if self.params.probe == "train" else self.params.probe)
        if source is None:
            return  # evaluation needs the trained probe; `_run_batch` says so per item
        meta, why = verify(Path(source))
        if meta is None:
            raise ValueError(f"methods.{self.name}: {source} is not a finished probe: {why}")
        if meta["sender"] != a.info.name or meta["pooling"] != self.params.pooling:
            raise ValueError(
                f"methods.{self.name}: the probe in {source} reads {meta['sender']} ({meta['pooling']} "
                f"pooling); this run's sender is {a.info.name} ({self.params.pooling})"
            )
        if not 1 <= meta["layer"] <= a.info.num_layers:
            raise ValueError(
                f"methods.{self.name}: layer {meta['layer']} is outside {a.info.name}'s {a.info.num_layers}"
            )
        weights = load_file(str(Path(source) / PROBE_FILE))
        self.layer = meta["layer"]
        for task, info in meta["tasks"].items():
            self.probes[task] = {
                k: weights[f"{task}.{k}"] for k in ("weight", "bias", "mean", "std")
            }
            self.probes[task]["candidates"] = info["candidates"]

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        a = self.pair.sender
        missing = sorted({e.task for e in examples if e.task not in self.probes})
        if missing:
            raise ValueError(
                f"methods.{self.name}: no trained probe for task {missing[0]} (the train stage fits one "
                f"per configured classification task)"
            )
        x, lengths = probe_features(a, examples, self.layer, self.params.pooling)
        out = []
        for e, row, n in zip(examples, x, lengths):
            p = self.probes[e.task]
            k = int((((row - p["mean"]) / p["std"]) @ p["weight"].T + p["bias"]).argmax())
            out.append(
                Prediction(
                    e.example_id,
                    p["candidates"][k],
                    1,
                    sender_prefill_tokens=n,
                    extra={"label_index": k},
                )
            )
        return out
