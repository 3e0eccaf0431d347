"""Shared-prompt-prefix reuse: compute the keys/values of the tokens every prompt of a batch starts
with (chat template, system prompt, instruction) once, and prefill only each row's own suffix.

With SmolLM2's template the shared prefix is 44-52 tokens of 57-174, so on CPU, where prefill is
compute-bound, this removes most of the prefill of short prompts. The layout is
[prefix | left padding | suffix]: the attention mask covers the padding in the middle and suffix
positions continue after the prefix, so each row sees exactly the tokens of its own prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from cross_model.generation import positions_from_mask
from cross_model.models import LoadedModel
from cross_model.prompting import pad_left

MIN_SHARED = 8  # below this the bookkeeping is not worth it


def shared_prefix_length(ids: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    if not ids:
        return 0
    limit = min(len(x) for x in ids) - 1
    n = 0
    first = ids[0]
    while n < limit and all(x[n] == first[n] for x in ids):
        n += 1
    return n


@dataclass
class PrefixedBatch:
    """A suffix batch whose rows all continue `prefix_len` cached tokens."""

    input_ids: torch.Tensor  # B x S, the suffixes, left-padded
    suffix_mask: torch.Tensor  # B x S
    cache: Any  # DynamicCache holding the prefix for every row (B x H x P x D per layer)
    prefix_len: int

    @property
    def past_mask(self) -> torch.Tensor:
        return torch.ones(
            (self.input_ids.shape[0], self.prefix_len),
            dtype=self.suffix_mask.dtype,
            device=self.suffix_mask.device,
        )

    @property
    def full_mask(self) -> torch.Tensor:
        return torch.cat([self.past_mask, self.suffix_mask], dim=-1)

    @property
    def position_offset(self) -> torch.Tensor:
        return torch.full(
            (self.input_ids.shape[0],),
            self.prefix_len,
            dtype=torch.long,
            device=self.input_ids.device,
        )

    @property
    def position_ids(self) -> torch.Tensor:
        return positions_from_mask(self.suffix_mask, self.position_offset)


def _kv_bytes(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in kv)


def sliding_window(lm: LoadedModel) -> int | None:
    """The model's sliding window, if any layer has one. Transformers applies it to cache indices,
    not positions, so padding in the middle of a row would shift it: with one, the prefix layout is
    used only while no row, padding and `PrefixCache.reserve` new tokens included, reaches the window."""
    config = lm.model.config.get_text_config()
    if "sliding_attention" not in (getattr(config, "layer_types", None) or []):
        return None
    return getattr(config, "sliding_window", None)


class PrefixCache:
    """Per-model memo of prefix keys/values (batch of one), expanded to each batch on demand.

    Bounded in bytes, not entries: a prefix is a chat template (kilobytes) or, for A's query-blind
    prompts on one long document, the whole document's cache (hundreds of megabytes at 8B). The
    evaluator clears it with the batch memo after every batch and on out-of-memory, so nothing a
    batch prefilled outlives the batch."""

    def __init__(self, max_bytes: int = 256 * 2**20, reserve: int = 256):
        self._entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.max_bytes = max_bytes
        self.reserve = reserve  # tokens a row may still generate (see `sliding_window`)

    @property
    def nbytes(self) -> int:
        return sum(_kv_bytes(kv) for kv in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()

    @torch.inference_mode()
    def _prefix_kv(
        self, lm: LoadedModel, prefix: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (id(lm.model), tuple(prefix))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        ids = torch.tensor([prefix], dtype=torch.long, device=lm.device)
        cache = DynamicCache()
        lm.model.get_decoder()(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            use_cache=True,
        )
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if _kv_bytes(kv) <= self.max_bytes:  # a prefix over the bound is used once, never kept
            self._entries[key] = kv
            while self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)
        return kv

    def split(self, lm: LoadedModel, ids: list[list[int]]) -> PrefixedBatch | None:
        """The batch as (cached shared prefix, suffixes), or None when the rows share too little or
        the layout would change a sliding window."""
        p = shared_prefix_length(ids)
        if (
            len(ids) < 2 or p < MIN_SHARED
        ):  # one row has nothing to share (and would evict useful prefixes)
            return None
        if not self.fits_window(lm, [len(x) for x in ids]):
            return None
        batch = pad_left([x[p:] for x in ids], lm.tokenizer.pad_token_id, lm.device)
        return PrefixedBatch(
            batch.input_ids, batch.attention_mask, self.cache_for(lm, ids[0][:p], len(ids)), p
        )

    def fits_window(self, lm: LoadedModel, lengths: list[int]) -> bool:
        """Whether rows of these lengths can use the prefix layout without shifting a sliding window."""
        window = sliding_window(lm)
        return (
            window is None or max(lengths) + (max(lengths) - min(lengths)) + self.reserve < window
        )

    def cache_for(self, lm: LoadedModel, prefix: list[int], n_rows: int) -> DynamicCache:
        """A cache holding `prefix` for each of `n_rows` rows."""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(self._prefix_kv(lm, prefix)):
            cache.update(
                k.expand(n_rows, -1, -1, -1).clone(), v.expand(n_rows, -1, -1, -1).clone(), layer
            )
        return cache
