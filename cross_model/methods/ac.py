"""Activation communication (Ramesh & Li, ICML 2025): one residual vector crosses.

A runs its prompt only up to layer k; its residual after layer k at its last prompt token is sent.
While B prefills, the residual entering block j at B's last prompt token becomes f(A's vector, B's):
replace, sum or mean. Widths differ and no projection: B keeps its first d_B - d dims and the rest
combine with A's last d dims (d = min(d_A, d_B), the paper's footnote 1). With a learned projection
W (d_B x d_A): f(W a, b). Payload: d_A x bytes per element, sent before projection.

`control: random` is the destructive control: the same bytes, A's vector replaced by a random one of
the same norm (a fixed direction per example id, so shards and batches agree). Where AC beats it on
the same items, the vector carried something; where it does not, any change was the edit itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from cross_model.data.base import Example
from cross_model.methods.base import Method, MethodParams, Prediction
from cross_model.methods.registry import register
from cross_model.prefill_memo import Prefill
from cross_model.projection import load_projection
from cross_model.prompting import receiver_text, sender_text
from cross_model.surgery import check_layer, residual_edit

MODES = ("replace", "sum", "mean")
CONTROLS = (None, "random")


@dataclass
class ACParams(MethodParams):
    mode: str = field(default="replace", metadata={"help": "replace, sum or mean"})
    k: int = field(default=26, metadata={"help": "sender layer: hidden_states[k] (0 = embeddings)"})
    j: int = field(
        default=26, metadata={"help": "receiver block whose incoming residual is edited"}
    )
    projection: str | None = field(
        default=None,
        metadata={
            "help": "null (slicing rule), 'train' (fitted by the train stage) or a checkpoint dir"
        },
    )
    control: str | None = field(
        default=None,
        metadata={
            "help": "null, or 'random': A's vector replaced by a random one of the same norm"
        },
    )

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.mode not in MODES:
            raise ValueError(f"{prefix}.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.k < 0 or self.j < 0:
            raise ValueError(f"{prefix}.k/j: layers are >= 0, got k={self.k}, j={self.j}")
        if self.control not in CONTROLS:
            raise ValueError(f"{prefix}.control: {self.control!r} is not one of null, random")


def random_like(a_BD: torch.Tensor, example_ids: list[str]) -> torch.Tensor:
    """Per row, a Gaussian direction seeded by the example id, scaled to the row's norm."""
    rows = []
    for a_D, key in zip(a_BD.float(), example_ids):
        seed = int.from_bytes(hashlib.sha256(f"ac-control:{key}".encode()).digest()[:8], "little")
        r = torch.randn(
            a_D.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float32
        )
        rows.append(r * (a_D.cpu().norm() / r.norm()))
    return torch.stack(rows).to(a_BD.device, a_BD.dtype)


def combine(mode: str, a_BD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    """f(a, b) over widths that may differ: B's first d_B - d dims stay; the rest mix with A's last d."""
    d_b = b_BD.shape[-1]
    d = min(a_BD.shape[-1], d_b)
    a_tail = a_BD[..., a_BD.shape[-1] - d :].to(b_BD.dtype)
    b_head, b_tail = b_BD[..., : d_b - d], b_BD[..., d_b - d :]
    if mode == "replace":
        mixed = a_tail
    elif mode == "sum":
        mixed = b_tail + a_tail
    elif mode == "mean":
        mixed = (b_tail + a_tail) / 2
    else:
        raise ValueError(f"unknown AC mode {mode!r}")
    return torch.cat([b_head, mixed], dim=-1)


@register("ac")
class ActivationCommunication(Method):
    Params = ACParams
    trained_by = "projection"

    @classmethod
    def needs_training(cls, params: ACParams) -> bool:
        return params.projection == "train"

    def check_pair(self) -> None:
        check_layer(self.pair.sender, self.params.k, f"methods.{self.name}.k")
        check_layer(self.pair.receiver, self.params.j, f"methods.{self.name}.j", allow_last=False)
        self.projection = None
        source = self.trained or (
            self.params.projection if self.params.projection != "train" else None
        )
        if source is not None:
            self.set_projection_from(source)

    def set_projection_from(self, directory: str) -> None:
        s, r = self.pair.sender.info, self.pair.receiver.info
        expected = {
            "sender": s.name,
            "receiver": r.name,
            "k": self.params.k,
            "j": self.params.j,
            "d_in": s.hidden_size,
            "d_out": r.hidden_size,
        }
        self.projection, _ = load_projection(directory, expected)
        self.projection.to(self.pair.receiver.device)

    def sender_vectors(self, examples: list[Example]) -> torch.Tensor:
        """A's residual after layer k at its last prompt token (B x d_A); no layer above k runs."""
        return self.sender_prefill(examples).hidden_last[self.params.k]

    def sender_prefill(self, examples: list[Example]) -> Prefill:
        return self.prefill(
            self.pair.sender, [sender_text(e) for e in examples], layers=self.params.k
        )

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        pre = self.sender_prefill(examples)
        a_BD = pre.hidden_last[self.params.k]
        if self.params.control == "random":
            a_BD = random_like(a_BD, [e.example_id for e in examples])
        sent_bytes = a_BD.shape[-1] * a_BD.element_size()
        message = (
            self.projection(a_BD).to(self.pair.receiver.dtype)
            if self.projection is not None
            else a_BD
        )
        message = message.to(self.pair.receiver.device)
        edit = lambda b_BD: combine(self.params.mode, message, b_BD)  # noqa: E731
        gen, lengths = self.answer_with(
            self.pair.receiver,
            [receiver_text(e) for e in examples],
            examples,
            prefill_context=lambda: residual_edit(self.pair.receiver, self.params.j, edit),
        )
        return [
            Prediction(
                e.example_id,
                text,
                sent_bytes,
                sender_prefill_tokens=n_a,
                receiver_prefill_tokens=n_b,
                receiver_generated_tokens=n_out,
            )
            for e, text, n_a, n_b, n_out in zip(
                examples, gen.texts, pre.prompt_lengths, lengths, gen.n_generated
            )
        ]
