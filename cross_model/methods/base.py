"""The interface every method implements, the per-example prediction record, and shared helpers."""

from __future__ import annotations

import logging
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cross_model.data.base import Example
from cross_model.generation import GenerationResult, greedy_generate
from cross_model.models import LoadedModel
from cross_model.prefix_cache import PrefixCache, PrefixedBatch
from cross_model.prompt_prefill import MEMO, Prefill
from cross_model.prompting import Batch, chat_wrap, encode_texts, pad_left

log = logging.getLogger(__name__)


@dataclass
class MethodParams:
    batch_size: int | None = field(default=None, metadata={"help": "examples per batch (None: eval.batch_size)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "answer length (None: the task's)"})
    max_prompt_tokens: int | None = field(default=None, metadata={"help": "longer prompts keep first and last halves"})
    sender: str | None = field(default=None, metadata={"help": "this method's model A (None: models.sender)"})
    receiver: str | None = field(default=None, metadata={"help": "this method's model B (None: models.receiver)"})
    share_prefix: bool = field(default=True, metadata={"help": "prefill the prompt prefix all rows share once (same answers, less compute)"})

    def validate(self, prefix: str) -> None:
        for name in ("batch_size", "max_new_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1 or null, got {value}")


@dataclass
class Prediction:
    example_id: str
    answer: str
    payload_bytes: int
    sender_prefill_tokens: int = 0
    sender_generated_tokens: int = 0
    receiver_prefill_tokens: int = 0
    receiver_generated_tokens: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelPair:
    sender: LoadedModel
    receiver: LoadedModel

    @property
    def same_model(self) -> bool:
        return self.sender is self.receiver


class Method:
    """A communication method. Subclasses set `Params` and implement `_run_batch`."""

    Params = MethodParams
    registry_name = ""

    def __init__(self, params: MethodParams, pair: ModelPair, name: str | None = None, run_dir: Path | None = None):
        self.params = params
        self.pair = pair
        self.name = name or self.registry_name
        self.run_dir = run_dir
        self.prefix_cache = PrefixCache()
        self.check_pair()

    # --- what the pipeline asks before running -------------------------------------------------
    @classmethod
    def needs_training(cls, params: MethodParams) -> bool:
        return False

    @classmethod
    def needs_calibration(cls, params: MethodParams) -> bool:
        return False

    def check_pair(self) -> None:
        """Refuse model pairs this method cannot serve, with a clear error."""

    def calibrate(self, examples: list[Example]) -> dict[str, Any]:
        return {}

    # --- running ----------------------------------------------------------------------------
    def max_new_tokens(self, example: Example) -> int:
        return self.params.max_new_tokens or example.max_new_tokens

    def run_batch(self, examples: list[Example]) -> list[Prediction]:
        """Run a batch; if it fails, run its examples one by one so that only the failing ones are
        recorded as errors (scored 0), never dropped."""
        try:
            preds = self._run_batch(examples)
            assert [p.example_id for p in preds] == [e.example_id for e in examples]
            return preds
        except Exception:  # noqa: BLE001 - a method failure is data, recorded per example
            err = traceback.format_exc(limit=4)
            if len(examples) == 1:
                log.warning("%s failed on %s: %s", self.name, examples[0].example_id, err.strip().splitlines()[-1])
                return [Prediction(examples[0].example_id, "", 0, error=err)]
            # Said out loud: a batch too big for the device memory lands here and runs, slowly.
            log.warning("%s: a batch of %d failed (%s); running its examples one at a time",
                        self.name, len(examples), err.strip().splitlines()[-1])
            return [p for e in examples for p in self.run_batch([e])]

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        raise NotImplementedError

    # --- shared helpers ---------------------------------------------------------------------
    def answer_with(
        self, lm: LoadedModel, texts: list[str], examples: list[Example], limit: int | None = None,
        reuse: bool = False, **kw: Any,
    ) -> tuple[GenerationResult, list[int]]:
        """Chat-wrap `texts`, prefill them on `lm` and decode greedily (`limit` new tokens, else each
        example's answer length); returns the generation and each row's prompt length. `reuse`: the
        prefill comes from (and goes to) the prefill memo, for prompts other methods also read."""
        limits = [limit or self.max_new_tokens(e) for e in examples]
        if reuse:
            if kw:
                raise ValueError("answer_with: a reused prefill cannot have its own forward or prefill context")
            pre = self.prefill(lm, texts)
            gen = greedy_generate(
                lm, None, pre.suffix_mask, max(limits), max_new_tokens_B=limits, cache=pre.cache(),
                past_mask_BP=pre.past_mask, position_offset_B=pre.position_offset, first_logits_BV=pre.logits,
            )
            return gen, pre.prompt_lengths
        batch = self.prompt_batch(lm, texts)
        if isinstance(batch, PrefixedBatch):
            kw.update(cache=batch.cache, past_mask_BP=batch.past_mask, position_offset_B=batch.position_offset)
            mask = batch.suffix_mask
        else:
            mask = batch.attention_mask
        gen = greedy_generate(lm, batch.input_ids, mask, max(limits), max_new_tokens_B=limits, **kw)
        return gen, self._prompt_lengths

    def prompt_ids(self, lm: LoadedModel, texts: list[str]) -> list[list[int]]:
        """Chat-wrapped, tokenised prompts; their lengths are kept in `_prompt_lengths`."""
        ids = encode_texts(lm, [chat_wrap(lm, t) for t in texts], self.params.max_prompt_tokens)
        self._prompt_lengths = [len(x) for x in ids]
        return ids

    def batch_from_ids(self, lm: LoadedModel, ids: list[list[int]]) -> Batch | PrefixedBatch:
        split = self.prefix_cache.split(lm, ids) if self.params.share_prefix else None
        return split if split is not None else pad_left(ids, lm.tokenizer.pad_token_id, lm.device)

    def prompt_batch(self, lm: LoadedModel, texts: list[str]) -> Batch | PrefixedBatch:
        """Chat-wrapped, tokenised prompts: with `share_prefix`, their common prefix comes from the
        prefix cache and only the suffixes are left to prefill; otherwise a plain left-padded batch.
        The full prompt lengths are kept in `_prompt_lengths` (the tokens each row stands for)."""
        return self.batch_from_ids(lm, self.prompt_ids(lm, texts))

    def prefill(self, lm: LoadedModel, texts: list[str], layers: int | None = None) -> Prefill:
        """These prompts prefilled through `layers` blocks (None: all, with logits), taken from the
        prefill memo when another method already ran the same prompts on the same model."""
        ids = self.prompt_ids(lm, texts)
        return MEMO.get(lm, ids, self.params.share_prefix, layers, lambda: self.batch_from_ids(lm, ids))
