"""LatentWire (learned interlingua): a trained encoder reads A's context as bytes and M latent vectors
cross the wire; the receiver's adapter turns them into M soft tokens before the question.

Variants (one method, so every one lands in the same tables and plots):
- `latent`: the encoded latent, sent through the wire format (`bits`: 16 raw float16, or 2 to 8);
- `shuffled`: another row's latent (the batch rolled by one): same bytes, wrong content;
- `zero`: a zero latent: nothing crosses but the adapters' bias;
- `text`: the receiver reads the whole context as text in the same prompt (the text path);
- `token_budget`: the context's first M tokens as text (the same number of prefix positions);
- `joint`: every receiver the interlingua serves answers from the same latent; the answer with the
  higher length-normalised log-probability (under the receiver that wrote it) is kept. Each row
  also records `oracle_score`, the better of the receivers' scores against the gold (an upper bound).
Every row records the gold answer's mean NLL and whether the first answer token is right, from one
teacher-forced forward over the same prefix, and the context's UTF-8 bytes (`text_bytes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cross_model.data.base import Example
from cross_model.generation import ChooseFn, eos_token_ids
from cross_model.interlingua import wire
from cross_model.interlingua.decoding import design_chooser
from cross_model.interlingua.model import META_FILE, LatentWire, load_latentwire
from cross_model.interlingua.receiver_io import (
    answer_logits,
    answer_scores,
    answer_text,
    compose,
    decode_answers,
    first_token_correct,
    gold_nll,
    question_text,
    text_prefixes,
    use_bos,
)
from cross_model.methods.base import Method, MethodParams, Prediction
from cross_model.methods.registry import register
from cross_model.metrics import score_prediction
from cross_model.models import LoadedModel

VARIANTS = ("latent", "shuffled", "zero", "text", "token_budget", "joint")
LATENT_VARIANTS = ("latent", "shuffled", "zero", "joint")


@dataclass
class LatentWireParams(MethodParams):
    variant: str = field(
        default="latent", metadata={"help": "latent, shuffled, zero, text, token_budget or joint"}
    )
    bits: int = field(
        default=16,
        metadata={"help": "latent on the wire: 16 (float16, raw) or 8, 4, 3, 2 (quantized)"},
    )
    checkpoint: str | None = field(
        default=None,
        metadata={"help": "a finished interlingua directory (None: the train stage's)"},
    )
    score_gold: bool = field(
        default=True, metadata={"help": "record the gold answer's NLL and first-token accuracy"}
    )
    first_token: str = field(
        default="greedy",
        metadata={
            "help": "greedy, or sample (the design's: temperature "
            "first_temperature, nucleus first_top_p)"
        },
    )
    first_temperature: float = field(
        default=0.7, metadata={"help": "first_token sample: the temperature"}
    )
    first_top_p: float = field(
        default=0.95, metadata={"help": "first_token sample: the nucleus mass"}
    )
    eos_ban_steps: int = field(
        default=0,
        metadata={"help": "EOS cannot end an answer in its first N tokens (the design's: 4)"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "first_token sample: seeds each row's draw with its example id"},
    )

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.variant not in VARIANTS:
            raise ValueError(
                f"{prefix}.variant: {self.variant!r} is not one of {', '.join(VARIANTS)}"
            )
        wire.check_bits(self.bits, "float16")
        if self.first_token not in ("greedy", "sample"):
            raise ValueError(f"{prefix}.first_token: greedy or sample, got {self.first_token!r}")
        if self.first_temperature <= 0 or not 0 < self.first_top_p <= 1 or self.eos_ban_steps < 0:
            raise ValueError(
                f"{prefix}: first_temperature > 0, 0 < first_top_p <= 1 and eos_ban_steps >= 0, got "
                f"{self.first_temperature}, {self.first_top_p}, {self.eos_ban_steps}"
            )


@register("latentwire")
class LatentWireMethod(Method):
    Params = LatentWireParams
    trained_by = "interlingua"

    def __init__(self, *args: Any, **kw: Any):
        self.net: LatentWire | None = None
        self.meta: dict[str, Any] = {}
        self._donor: list[
            str
        ] = []  # the previous batch's contexts: a one-row batch's "another row"
        super().__init__(*args, **kw)

    @classmethod
    def controls(cls, name: str, params: LatentWireParams) -> dict[str, dict[str, Any]]:
        """Always on: the shuffled and the zero latent on every receiver a latent instance serves (one
        pair per receiver, at the raw wire: `controls.control_rows` pairs them with every latent
        instance of that receiver)."""
        if params.variant != "latent":
            return {}
        shared = (
            "sender",
            "receiver",
            "checkpoint",
            "batch_size",
            "max_new_tokens",
            "max_prompt_tokens",
            "first_token",
            "first_temperature",
            "first_top_p",
            "eos_ban_steps",
            "seed",
        )  # what reads and decodes alike
        keep = {k: v for k, v in cls.set_fields(params).items() if k in shared}
        return {
            f"{name}_{v}": {"method": "latentwire", **keep, "variant": v}
            for v in ("shuffled", "zero")
        }

    @classmethod
    def needs_training(cls, params: LatentWireParams) -> bool:
        return params.variant != "text" and params.checkpoint is None

    def check_pair(self) -> None:
        source = self.trained or self.params.checkpoint
        if source is not None and self.params.variant != "text":
            self.set_projection_from(source)

    def set_projection_from(self, directory: str) -> None:
        """Load the finished interlingua; `joint` attaches every receiver it serves."""
        meta_file = Path(directory) / META_FILE
        names = (
            [r["name"] for r in json.loads(meta_file.read_text())["receivers"]]
            if meta_file.exists()
            else []
        )
        receivers = [self.pair.receiver]
        if self.params.variant == "joint":
            if self.load_model is None and any(n != self.pair.receiver.info.name for n in names):
                raise ValueError(
                    f"methods.{self.name}: joint needs every receiver ({', '.join(names)}) loaded"
                )
            receivers = [
                self.load_model(n) if self.load_model else self.pair.receiver for n in names
            ]
        self.net, self.meta = load_latentwire(directory, receivers)
        self.net.to(self.pair.receiver.device)
        self.net.index_of(self.pair.receiver.info.name)  # refuses a receiver without an adapter

    # --- the latent ---------------------------------------------------------------------------
    def _latent(self, examples: list[Example]) -> tuple[torch.Tensor, list[int]]:
        """The decoded latent each row's receiver reads (B x M x d_z) and the bytes each sent."""
        contexts = [e.prompt_A for e in examples]
        if self.params.variant == "shuffled":
            donors = (
                contexts[1:] + contexts[:1] if len(contexts) > 1 else (self._donor[:1] or contexts)
            )
            if len(contexts) == 1 and not self._donor:
                raise ValueError(
                    "latentwire shuffled: a first batch of one row has no other row's latent; "
                    "use eval.batch_size >= 2"
                )
            contexts = donors
        self._donor = [e.prompt_A for e in examples]
        with torch.inference_mode():
            z = self.net.latent(contexts)
        if self.params.variant == "zero":
            z = torch.zeros_like(z)
        blobs = [wire.encode(row, self.params.bits, "float16") for row in z]
        decoded = torch.stack([wire.decode(b) for b in blobs]).to(z.device)
        return decoded, [len(b) for b in blobs]

    def _prefixes(
        self, lm: LoadedModel, examples: list[Example]
    ) -> tuple[list[torch.Tensor], list[int], torch.Tensor | None]:
        """Each row's prefix on `lm`, the bytes that crossed, and the latent (None for text variants)."""
        contexts = [e.prompt_A for e in examples]
        if self.params.variant in ("text", "token_budget"):
            budget = self.net.shape.m if self.params.variant == "token_budget" else None
            with torch.inference_mode():
                prefixes, counts = text_prefixes(lm, contexts, budget)
            if budget is None:
                return prefixes, [len(c.encode("utf-8")) for c in contexts], None
            ids = [
                lm.tokenizer(c, add_special_tokens=False)["input_ids"][:budget] for c in contexts
            ]
            return prefixes, [len(lm.tokenizer.decode(x).encode("utf-8")) for x in ids], None
        z, sent = self._latent(examples)
        with torch.inference_mode():
            soft = self.net.soft_tokens(z, self.net.index_of(lm.info.name))
        return list(soft), sent, z

    def _bos(self, lm: LoadedModel) -> bool | str:
        """The BOS policy the interlingua was trained with (the tokenizer's own for text without one)."""
        return use_bos(lm, self.net.bos_policy if self.net is not None else "auto")

    def _gold(
        self, lm: LoadedModel, prefixes: list[torch.Tensor], examples: list[Example]
    ) -> list[dict[str, float]]:
        if not self.params.score_gold:
            return [{} for _ in examples]
        with torch.inference_mode():
            a = answer_logits(
                lm,
                compose(
                    lm,
                    prefixes,
                    [question_text(e) for e in examples],
                    [answer_text(e) for e in examples],
                    self._bos(lm),
                ),
            )
            nll, first = gold_nll(a).tolist(), first_token_correct(a).tolist()
        return [{"gold_nll": n, "first_token_correct": f} for n, f in zip(nll, first)]

    def _chooser(self, lm: LoadedModel, examples: list[Example]) -> ChooseFn | None:
        """Greedy (None), or the design's decoding: a sampled first token and EOS banned at first."""
        p = self.params
        if p.first_token == "greedy" and not p.eos_ban_steps:
            return None
        return design_chooser(
            eos_token_ids(lm),
            p.eos_ban_steps,
            p.first_token == "sample",
            p.first_temperature,
            p.first_top_p,
            p.seed,
            [e.example_id for e in examples],
        )

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        lm = self.pair.receiver
        questions = [question_text(e) for e in examples]
        limits = [self.max_new_tokens(e) for e in examples]
        prefixes, sent, z = self._prefixes(lm, examples)
        gen, lengths = decode_answers(
            lm, prefixes, questions, limits, self._bos(lm), self._chooser(lm, examples)
        )
        answers, n_out = gen.texts, gen.n_generated
        extras = self._gold(lm, prefixes, examples)
        if self.params.variant == "joint":
            answers, n_out, joint = self._joint(z, examples, questions, limits, gen)
            extras = [{**x, **j} for x, j in zip(extras, joint)]
        return [
            Prediction(
                e.example_id,
                text,
                n_bytes,
                receiver_prefill_tokens=n_in,
                receiver_generated_tokens=n,
                extra={
                    "variant": self.params.variant,
                    "receiver": lm.info.name,
                    "text_bytes": len(e.prompt_A.encode("utf-8")),
                    **x,
                },
            )
            for e, text, n_bytes, n_in, n, x in zip(examples, answers, sent, lengths, n_out, extras)
        ]

    def _joint(
        self, z: torch.Tensor, examples: list[Example], questions: list[str], limits: list[int], own
    ) -> tuple:
        """Every attached receiver answers from the same latent; keep the higher length-normalised
        log-probability of each receiver's own answer."""
        candidates = []  # per receiver: (texts, n_generated, scores)
        for r, lm in enumerate(self.net.receivers):
            with torch.inference_mode():
                soft = list(self.net.soft_tokens(z, r))
            bos = self._bos(lm)
            gen = (
                own
                if lm is self.pair.receiver
                else decode_answers(lm, soft, questions, limits, bos, self._chooser(lm, examples))[
                    0
                ]
            )
            scored = [" " + t for t in gen.texts]
            candidates.append(
                (
                    gen.texts,
                    gen.n_generated,
                    answer_scores(lm, soft, questions, scored, bos).tolist(),
                )
            )
        answers, n_out, extra = [], [], []
        for i, e in enumerate(examples):
            best = max(range(len(candidates)), key=lambda r: candidates[r][2][i])
            answers.append(candidates[best][0][i])
            n_out.append(sum(c[1][i] for c in candidates))
            scores = [
                score_prediction(e.metric, c[0][i], e.answers, e.meta.get("candidates", ()))[
                    "score"
                ]
                for c in candidates
            ]
            extra.append(
                {
                    "joint_choice": self.net.records[best]["name"],
                    "oracle_score": max(scores),
                    **{f"score_{self.net.records[r]['name']}": s for r, s in enumerate(scores)},
                }
            )
        return answers, n_out, extra
