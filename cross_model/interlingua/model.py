"""The trainable part of LatentWire (encoder + one adapter per receiver), its loss over frozen
receivers, and loading a finished one with the checks that it fits this run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cross_model.checkpointing import META, verify
from cross_model.interlingua.encoder import EncoderShape, InterlinguaEncoder, encode_bytes
from cross_model.interlingua.receiver_io import (
    Adapter,
    answer_logits,
    compose,
    distillation,
    embedding_rms,
    gold_nll,
    text_prefixes,
    use_bos,
    weighted_ce,
)
from cross_model.models import LoadedModel

WEIGHTS_FILE = "interlingua.safetensors"
META_FILE = "interlingua.json"


def receiver_record(lm: LoadedModel) -> dict[str, Any]:
    return {
        "name": lm.info.name,
        "revision": lm.info.revision,
        "d_model": lm.info.hidden_size,
        "target_rms": embedding_rms(lm),
    }


class TeacherCache:
    """The frozen receiver reading the context as text, its logits at the answer positions, computed
    once per (receiver, row) and kept until `budget_bytes` is spent (rows past it are recomputed each
    time). Each row is computed alone, so a value never depends on the batch it first came in: a run
    resumed with an empty cache sees the same teacher as one that never stopped."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.rows: dict[tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    def logits(
        self,
        lm: LoadedModel,
        r: int,
        contexts: list[str],
        questions: list[str],
        answers: list[str],
        a_max: int,
        bos: bool | str,
    ) -> torch.Tensor:
        """B x a_max x V, row i's first len(answer_i) positions filled."""
        rows = []
        for key in zip([r] * len(contexts), contexts, questions, answers):
            t = self.rows.get(key)
            if t is None:
                self.misses += 1
                with torch.no_grad():
                    prefixes = text_prefixes(lm, [key[1]])[0]
                    one = answer_logits(lm, compose(lm, prefixes, [key[2]], [key[3]], bos))
                t = one.logits_BAV[0, : int(one.lengths[0])].detach()
                size = t.numel() * t.element_size()
                if self.used + size <= self.budget:
                    self.rows[key], self.used = t, self.used + size
            else:
                self.hits += 1
            rows.append(t)
        out = rows[0].new_zeros(len(rows), a_max, rows[0].shape[-1])
        for i, t in enumerate(rows):
            out[i, : t.shape[0]] = t
        return out


class LatentWire(nn.Module):
    """Encoder + adapters. The frozen receivers are kept outside the module tree (a plain list), so
    that DDP / DeepSpeed see, broadcast and reduce only what trains."""

    def __init__(
        self,
        shape: EncoderShape,
        receivers: list[dict[str, Any]],
        calibrate: bool = True,
        seed: int = 0,
        bos_policy: str = "auto",
    ):
        super().__init__()
        self.shape = shape
        self.bos_policy = bos_policy
        self.records = receivers
        self.encoder = InterlinguaEncoder(shape, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.adapters = nn.ModuleList(
                Adapter(shape.d_z, r["d_model"], r["target_rms"], calibrate) for r in receivers
            )
        self.receivers: list[LoadedModel] = []  # attached for training and evaluation
        self.loss_weights: dict[str, float] = {
            "first_weight": 0.0,
            "k_weight": 0.0,
            "k": 4,
            "kd_weight": 0.0,
            "tau": 1.0,
        }
        self.teacher = TeacherCache(0)  # training sets its budget (interlingua.kd_cache_mb)

    def attach(self, receivers: list[LoadedModel]) -> "LatentWire":
        """Attach the frozen receivers (all of them for training; for evaluation those the run has
        loaded, by name). A receiver this interlingua has no adapter for is refused."""
        by_name = {}
        for lm in receivers:
            r = self.records[self.index_of(lm.info.name)]
            if lm.info.hidden_size != r["d_model"]:
                raise ValueError(
                    f"interlingua: {lm.info.name} has width {lm.info.hidden_size}, its adapter {r['d_model']}"
                )
            by_name[lm.info.name] = lm
        object.__setattr__(
            self, "receivers", [by_name.get(r["name"]) for r in self.records]
        )  # not submodules
        return self

    def index_of(self, name: str) -> int:
        names = [r["name"] for r in self.records]
        if name not in names:
            raise ValueError(
                f"interlingua: no adapter for receiver {name!r}; it was trained for {', '.join(names)}"
            )
        return names.index(name)

    def latent(self, contexts: list[str]) -> torch.Tensor:
        ids, mask = encode_bytes(contexts, self.shape.max_bytes, self.encoder.positions.device)
        return self.encoder(ids, mask)

    def receiver(self, r: int) -> LoadedModel:
        lm = self.receivers[r] if r < len(self.receivers) else None
        if lm is None:
            raise ValueError(
                f"interlingua: receiver {self.records[r]['name']} is not loaded in this run"
            )
        return lm

    def bos(self, r: int) -> bool | str:
        return use_bos(self.receiver(r), self.bos_policy)

    def soft_tokens(self, z_BMZ: torch.Tensor, r: int) -> torch.Tensor:
        lm = self.receiver(r)
        return self.adapters[r](z_BMZ.to(self.encoder.positions.device)).to(lm.device, lm.dtype)

    def row_losses(
        self,
        z_BMZ: torch.Tensor,
        r: int,
        questions: list[str],
        answers: list[str],
        contexts: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per row, from one forward of receiver r: the weighted CE, gold NLL and (with contexts and
        kd_weight > 0) distillation from the same receiver reading the context as text."""
        lm, w = self.receiver(r), self.loss_weights
        soft = self.soft_tokens(z_BMZ, r)
        a = answer_logits(lm, compose(lm, list(soft), questions, answers, self.bos(r)))
        out = {
            "ce": weighted_ce(a, w["first_weight"], w["k_weight"], int(w["k"])),
            "nll": gold_nll(a),
        }
        loss = out["ce"]
        if contexts is not None and w["kd_weight"] > 0:
            teacher = self.teacher.logits(
                lm, r, contexts, questions, answers, a.logits_BAV.shape[1], self.bos(r)
            )
            out["kd"] = distillation(a, teacher, w["tau"])
            loss = loss + w["kd_weight"] * out["kd"]
        out["loss"] = loss
        return out

    def forward(
        self, contexts: list[str], questions: list[str], answers: list[str]
    ) -> torch.Tensor:
        """Per-row training loss, the mean over receivers (float32, on the encoder's device)."""
        z = self.latent(contexts)
        dev = self.encoder.positions.device
        total = [
            self.row_losses(z, r, questions, answers, contexts)["loss"].to(dev)
            for r in range(len(self.receivers))
        ]
        return torch.stack(total).mean(0)


def load_latentwire(
    directory: str | Path, receivers: list[LoadedModel]
) -> tuple[LatentWire, dict[str, Any]]:
    """A finished interlingua with `receivers` attached, refused when its files fail their checksums or
    it was made for other receivers or widths."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / META_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"no interlingua in {directory} (expected {META_FILE} and {WEIGHTS_FILE})"
        )
    if (directory / META).exists() and verify(directory)[0] is None:
        raise ValueError(
            f"interlingua {directory} is damaged: {verify(directory)[1]}; delete it and train again"
        )
    meta = json.loads((directory / META_FILE).read_text())
    net = LatentWire(
        EncoderShape(**meta["shape"]),
        meta["receivers"],
        meta.get("calibrate", True),
        bos_policy=meta.get("bos_policy", "auto"),
    )
    net.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    net.attach(receivers)
    return net.eval().requires_grad_(False), meta
