"""The interface every method implements, the per-example prediction record, and shared helpers."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from cross_model.data.base import Example
from cross_model.failures import (
    free_device_memory,
    full_traceback,
    innermost_traceback,
    is_out_of_memory,
    poisons_process,
)
from cross_model.generation import GenerationResult, greedy_generate
from cross_model.models import LoadedModel
from cross_model.prefill_memo import Prefill, PrefillMemo, run_prefill
from cross_model.prompt_prefix_cache import PrefixCache, PrefixedBatch
from cross_model.prompting import Batch, chat_wrap, encode_texts, pad_left

log = logging.getLogger(__name__)


@dataclass
class MethodParams:
    batch_size: int | None = field(
        default=None, metadata={"help": "examples per batch (None: eval.batch_size)"}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "answer length (None: the task's)"}
    )
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "longer prompts keep first and last halves"}
    )
    sender: str | None = field(
        default=None, metadata={"help": "this method's model A (None: models.sender)"}
    )
    senders: list[str] | None = field(
        default=None,
        metadata={
            "help": "multi-sender tasks: each sender's model, in "
            "order (None: `sender` for every one)"
        },
    )
    receiver: str | None = field(
        default=None, metadata={"help": "this method's model B (None: models.receiver)"}
    )
    share_prefix: bool = field(
        default=True,
        metadata={
            "help": "prefill the prompt prefix all rows share once (same answers, less compute)"
        },
    )
    group: str | None = field(
        default=None, metadata={"help": "the sweep entry this instance came from (set by `sweep:`)"}
    )

    def validate(self, prefix: str) -> None:
        if self.senders is not None and (
            not self.senders or (self.sender and self.sender != self.senders[0])
        ):
            raise ValueError(
                f"{prefix}.senders: a non-empty list whose first model is `sender` when both are set "
                f"(got sender {self.sender!r}, senders {self.senders!r})"
            )
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
    error: str | None = None  # the innermost frames of the traceback, kept with the result row
    extra: dict[str, Any] = field(default_factory=dict)
    error_traceback: str | None = field(
        default=None, repr=False
    )  # in full, for a run that stops; not saved

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["error_traceback"]
        return out


@dataclass
class ModelPair:
    sender: LoadedModel
    receiver: LoadedModel
    more_senders: list[LoadedModel] = field(
        default_factory=list
    )  # senders 2, 3, ... when they differ (`senders`)

    @property
    def same_model(self) -> bool:
        return self.sender is self.receiver

    def sender_for(self, j: int) -> LoadedModel:
        """Sender j's model (0: `sender`); senders without a model of their own run `sender`."""
        return self.more_senders[j - 1] if 0 < j <= len(self.more_senders) else self.sender

    @property
    def senders(self) -> list[LoadedModel]:
        return [self.sender, *self.more_senders]


class Method:
    """A communication method. Subclasses set `Params` and implement `_run_batch`."""

    Params = MethodParams
    registry_name = ""
    # Whether some model of the method reads the item's context (the memory estimate takes its
    # length only for those; B alone reads the question).
    reads_context = True

    trained_by: str | None = (
        None  # the registered trainable that makes this method's learned part, if any
    )
    # What `preset: kvcomm_public` sets on this method's parameters (unless the config sets them): the
    # public KVComm code's behaviour where ours differs (docs/METHODS.md).
    public_settings: dict[str, Any] = {}

    def __init__(
        self,
        params: MethodParams,
        pair: ModelPair,
        name: str | None = None,
        run_dir: Path | None = None,
        *,
        trained: str | None = None,
        load_model: Callable[[str], LoadedModel] | None = None,
    ):
        """`trained`: the directory of this method's finished learned part (the train stage's, or an
        earlier run's); `load_model`: the run's loader, for methods that read more models than the pair."""
        self.params = params
        self.pair = pair
        self.name = name or self.registry_name
        self.run_dir = run_dir
        self.trained = trained
        self.load_model = load_model
        self.prefix_cache = PrefixCache()
        self._memo: PrefillMemo | None = None  # set for the duration of one `run_batch`
        self.fitted_batch_size: int | None = (
            None  # after an out-of-memory: the batch size that fitted
        )
        self.check_pair()

    # --- what the pipeline asks before running -------------------------------------------------
    @classmethod
    def controls(cls, name: str, params: MethodParams) -> dict[str, dict[str, Any]]:
        """Instances (name -> config entry) that must run beside this one to show that information
        crossed; `context.add_controls` adds each one a config lacks (none, or an equivalent)."""
        return {}

    @staticmethod
    def set_fields(params: MethodParams, drop: tuple[str, ...] = ("group",)) -> dict[str, Any]:
        """The parameters an instance sets away from their defaults (a control's config entry copies them)."""
        default = type(params)()
        return {
            f.name: getattr(params, f.name)
            for f in fields(params)
            if f.name not in drop and getattr(params, f.name) != getattr(default, f.name)
        }

    @classmethod
    def needs_training(cls, params: MethodParams) -> bool:
        return False

    @classmethod
    def needs_calibration(cls, params: MethodParams) -> bool:
        return False

    multi_sender = (
        False  # serves tasks whose items have several senders' contexts (Example.more_senders)
    )

    def check_pair(self) -> None:
        """Refuse model pairs this method cannot serve, with a clear error."""

    def calibrate(self, examples: list[Example], batch_size: int | None = None) -> dict[str, Any]:
        return {}

    def set_task_items(self, items: list[Example]) -> None:
        """The evaluator hands every method the task's whole test list (the same on every rank) before
        its batches; methods that pair an item with another (a control) read it here."""

    # --- running ----------------------------------------------------------------------------
    def max_new_tokens(self, example: Example) -> int:
        return self.params.max_new_tokens or example.max_new_tokens

    def run_batch(
        self, examples: list[Example], memo: PrefillMemo | None = None
    ) -> list[Prediction]:
        """Run a batch, its prefills shared through `memo` (the evaluator's, for this batch of items;
        else one of its own, freed on return). A failing batch runs its examples one by one, so only
        the failing ones are recorded as errors (scored 0), never dropped; out of memory frees the
        caches and halves the batch, and later batches of this method start at the size that fitted;
        errors that poison the device or the process group are raised (see `cross_model.failures`)."""
        with self.using_memo(memo if memo is not None else PrefillMemo()):
            size = self.fitted_batch_size or len(examples)
            return [
                p
                for i in range(0, len(examples), size)
                for p in self._run_guarded(examples[i : i + size])
            ]

    def release_memory(self) -> None:
        """Drop every cache this method holds between batches (the batch memo, the prompt prefixes)."""
        if self._memo is not None:
            self._memo.clear()
        self.prefix_cache.clear()

    def _run_guarded(self, examples: list[Example]) -> list[Prediction]:
        try:
            preds = self._run_batch(examples)
            assert [p.example_id for p in preds] == [e.example_id for e in examples]
            return preds
        except Exception as exc:  # noqa: BLE001 - a method failure is data, recorded per example
            if poisons_process(exc):
                raise
            out_of_memory = is_out_of_memory(exc)
            failure = (innermost_traceback(exc), full_traceback(exc))
        # Retried here, outside the handler: inside it, the exception's traceback keeps every frame of
        # the failed attempt alive, and with them its caches and activations, so nothing could be freed.
        err, full = failure
        last = err.strip().splitlines()[-1]
        if out_of_memory:
            self.release_memory()
            free_device_memory()
            if len(examples) > 1:
                half = (len(examples) + 1) // 2
                self.fitted_batch_size = min(half, self.fitted_batch_size or half)
                log.warning(
                    "%s: out of memory on a batch of %d; caches freed, running it as %d + %d and later "
                    "batches at %d (a smaller batch_size avoids this)",
                    self.name,
                    len(examples),
                    half,
                    len(examples) - half,
                    self.fitted_batch_size,
                )
                return self._run_guarded(examples[:half]) + self._run_guarded(examples[half:])
        if len(examples) == 1:
            log.warning("%s failed on %s: %s", self.name, examples[0].example_id, last)
            return [Prediction(examples[0].example_id, "", 0, error=err, error_traceback=full)]
        log.warning(
            "%s: a batch of %d failed (%s); running its examples one at a time",
            self.name,
            len(examples),
            last,
        )
        return [p for e in examples for p in self._run_guarded([e])]

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        raise NotImplementedError

    # --- shared helpers ---------------------------------------------------------------------
    def answer_with(
        self,
        lm: LoadedModel,
        texts: list[str],
        examples: list[Example],
        limit: int | None = None,
        reuse: bool = False,
        **kw: Any,
    ) -> tuple[GenerationResult, list[int]]:
        """Chat-wrap `texts`, prefill them on `lm` and decode greedily (`limit` new tokens, else each
        example's answer length); returns the generation and each row's prompt length. `reuse`: the
        prefill comes from (and goes to) the prefill memo, for prompts other methods also read."""
        limits = [limit or self.max_new_tokens(e) for e in examples]
        if reuse:
            if kw:
                raise ValueError(
                    "answer_with: a reused prefill cannot have its own forward or prefill context"
                )
            pre = self.prefill(lm, texts)
            gen = greedy_generate(
                lm,
                None,
                pre.suffix_mask,
                max(limits),
                max_new_tokens_B=limits,
                cache=pre.cache(),
                past_mask_BP=pre.past_mask,
                position_offset_B=pre.position_offset,
                first_logits_BV=pre.logits,
            )
            return gen, pre.prompt_lengths
        ids = self.prompt_ids(lm, texts)
        batch = self.batch_from_ids(lm, ids)
        if isinstance(batch, PrefixedBatch):
            kw.update(
                cache=batch.cache,
                past_mask_BP=batch.past_mask,
                position_offset_B=batch.position_offset,
            )
            mask = batch.suffix_mask
        else:
            mask = batch.attention_mask
        gen = greedy_generate(lm, batch.input_ids, mask, max(limits), max_new_tokens_B=limits, **kw)
        return gen, [len(x) for x in ids]

    def prompt_ids(self, lm: LoadedModel, texts: list[str]) -> list[list[int]]:
        """Chat-wrapped, tokenised prompts (their lengths are the tokens each row stands for)."""
        return encode_texts(lm, [chat_wrap(lm, t) for t in texts], self.params.max_prompt_tokens)

    def batch_from_ids(self, lm: LoadedModel, ids: list[list[int]]) -> Batch | PrefixedBatch:
        split = self.prefix_cache.split(lm, ids) if self.params.share_prefix else None
        return split if split is not None else pad_left(ids, lm.tokenizer.pad_token_id, lm.device)

    def prefill(self, lm: LoadedModel, texts: list[str], layers: int | None = None) -> Prefill:
        """These prompts prefilled through `layers` blocks (None: all, with logits), taken from the
        prefill memo of the batch in progress when another method already ran the same prompts on the
        same model (outside `run_batch`/`using_memo`, nothing is kept)."""
        ids = self.prompt_ids(lm, texts)
        if self._memo is None:
            return run_prefill(lm, self.batch_from_ids(lm, ids), ids, layers)
        return self._memo.get(
            lm, ids, self.params.share_prefix, layers, lambda: self.batch_from_ids(lm, ids)
        )

    @contextlib.contextmanager
    def using_memo(self, memo: PrefillMemo | None) -> Iterator[PrefillMemo | None]:
        """Prefills in this block come from (and go to) `memo`: the evaluator passes one per batch of
        items, shared by every method, and frees it after the batch."""
        previous, self._memo = self._memo, memo
        try:
            yield memo
        finally:
            self._memo = previous
