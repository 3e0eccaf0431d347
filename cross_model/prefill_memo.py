"""One prefill per batch of prompts, shared by the methods that read the same prompts.

Several methods start from the same forward: NLD's and CIPHER's first messages and AC's and KVComm's
payloads all come from A's prefill of the same sender prompts; the baseline's answer and NLD's and
CIPHER's first receiver answers all come from B's prefill of the same question. A `PrefillMemo` keeps
the last few such prefills (keys/values, each layer's output at the last token, the last logits) keyed
by the model and the exact token ids of every row, so the evaluator runs each of them once per batch
(it loops batch-major: one batch of items through every method, then the next, one memo per batch).
The result is the same computation on the same inputs, so answers do not change (tests check it).

A prefill that ran only up to layer k (AC, KVComm) serves later requests for k or fewer layers; a
request for more layers runs again, never computing layers nobody asked for.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from cross_model.generation import positions_from_mask
from cross_model.models import LoadedModel
from cross_model.prompt_prefix_cache import PrefixedBatch
from cross_model.prompting import Batch
from cross_model.surgery import _StopForward, decoder

DEFAULT_ENTRIES = 4


@dataclass
class LayerKV:
    keys: torch.Tensor  # B x H x T x D
    values: torch.Tensor


@dataclass
class KVView:
    """Read-only per-layer keys/values, shaped like a cache's `.layers` (what `assemble_receiver_cache` reads)."""

    layers: list[LayerKV]


@dataclass
class Prefill:
    """A batch of prompts after its prefill. `layers` blocks ran (all of them when `logits` is set).

    Layout: with a shared prefix, [prefix | left padding | suffix]; otherwise left-padded. Either way
    the last column is every row's last prompt token."""

    input_ids: torch.Tensor  # B x S: what the forward read (the suffixes when there is a prefix)
    suffix_mask: torch.Tensor  # B x S
    prefix_len: int
    kv: list[
        tuple[torch.Tensor, torch.Tensor]
    ]  # per layer that ran, B x H x T x D (T = prefix + S)
    hidden_last: list[torch.Tensor]  # hidden_states[l] at the last token, l = 0..layers (B x D)
    logits: torch.Tensor | None  # B x V at the last token, when the whole model ran
    layers: int
    prompt_lengths: list[int]
    first_ids: list[int]  # each row's first prompt token (KVComm's attention sink)

    @property
    def past_mask(self) -> torch.Tensor | None:
        if not self.prefix_len:
            return None
        return torch.ones(
            (self.suffix_mask.shape[0], self.prefix_len),
            dtype=self.suffix_mask.dtype,
            device=self.suffix_mask.device,
        )

    @property
    def full_mask(self) -> torch.Tensor:
        past = self.past_mask
        return self.suffix_mask if past is None else torch.cat([past, self.suffix_mask], dim=-1)

    @property
    def position_offset(self) -> torch.Tensor | None:
        if not self.prefix_len:
            return None
        return torch.full(
            (self.suffix_mask.shape[0],),
            self.prefix_len,
            dtype=torch.long,
            device=self.suffix_mask.device,
        )

    @property
    def position_ids(self) -> torch.Tensor:
        return positions_from_mask(self.suffix_mask, self.position_offset)

    def cache(self) -> DynamicCache:
        """A new cache to decode from (the logits' prefill ran every layer). Decoding appends to it
        by concatenation, so the memo's tensors are never changed."""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(self.kv):
            cache.update(k, v, layer)
        return cache

    def kv_view(self) -> KVView:
        """The keys/values as they are, without copies, for readers that never write into them."""
        return KVView([LayerKV(k, v) for k, v in self.kv])


@torch.inference_mode()
def run_prefill(
    lm: LoadedModel,
    batch: Batch | PrefixedBatch,
    ids_rows: list[list[int]],
    layers: int | None,
    position_offset_B: torch.Tensor | None = None,
) -> Prefill:
    """Prefill `batch` through `layers` blocks (None: all, with the last position's logits).
    `position_offset_B`: each row's first token takes this position instead of 0 (a left-padded batch)."""
    n_layers = lm.info.num_layers
    upto = n_layers if layers is None else layers
    if not 0 <= upto <= n_layers:
        raise ValueError(f"prefill: {lm.info.name} has {n_layers} layers, asked for {upto}")
    if isinstance(batch, PrefixedBatch):
        if position_offset_B is not None:
            raise ValueError(
                "prefill: a position offset needs a left-padded batch, not a shared-prefix one"
            )
        ids, suffix_mask, cache, prefix_len = (
            batch.input_ids,
            batch.suffix_mask,
            batch.cache,
            batch.prefix_len,
        )
        full_mask, positions = batch.full_mask, batch.position_ids
    else:
        ids, suffix_mask, cache, prefix_len = (
            batch.input_ids,
            batch.attention_mask,
            DynamicCache(),
            0,
        )
        full_mask, positions = (
            batch.attention_mask,
            positions_from_mask(batch.attention_mask, position_offset_B),
        )
    dec = decoder(lm)
    hidden: list[torch.Tensor | None] = [None] * (upto + 1)
    handles = []

    def capture(index: int, stop: bool):
        def hook(module: Any, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            # A copy: a view of the last column would keep the whole B x T x D layer output alive
            # for as long as the memo keeps this prefill (every layer's, twice the KV cache).
            hidden[index] = h[:, -1, :].clone(memory_format=torch.contiguous_format)
            if stop:
                raise _StopForward

        return hook

    handles.append(
        dec.embed_tokens.register_forward_hook(capture(0, layers is not None and upto == 0))
    )
    for i, block in enumerate(dec.layers[:upto]):
        handles.append(
            block.register_forward_hook(capture(i + 1, layers is not None and i + 1 == upto))
        )
    logits = None
    try:
        if layers is None:
            out = lm.model(
                input_ids=ids,
                attention_mask=full_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :]
        else:
            dec(
                input_ids=ids,
                attention_mask=full_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    kv = [(layer.keys, layer.values) for layer in cache.layers[:upto]]
    return Prefill(
        ids,
        suffix_mask,
        prefix_len,
        kv,
        hidden,
        logits,
        upto,
        [len(x) for x in ids_rows],
        [x[0] for x in ids_rows],
    )


class PrefillMemo:
    """The last few prefills, keyed by (model, every row's token ids). The evaluator makes one per
    batch of items, passes it to every method, and drops it after the batch: nothing outlives it."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES):
        self.max_entries = max_entries
        # key -> (weak reference to the model, prefill): a freed model's id may be reused by another
        self._entries: OrderedDict[tuple, tuple[weakref.ref, Prefill]] = OrderedDict()
        self.hits = self.misses = 0

    def get(
        self,
        lm: LoadedModel,
        ids: list[list[int]],
        share_prefix: bool,
        layers: int | None,
        make_batch,
    ) -> Prefill:
        """The prefill of these prompts through `layers` blocks (None: all + logits); `make_batch()`
        builds the batch when it has to run."""
        key = (id(lm.model), share_prefix, tuple(tuple(x) for x in ids))
        need = lm.info.num_layers if layers is None else layers
        model_ref, found = self._entries.get(key, (None, None))
        if found is not None and model_ref() is not lm.model:
            del self._entries[key]
            found = None
        if found is not None and (
            found.logits is not None or (layers is not None and found.layers >= need)
        ):
            self._entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        pre = run_prefill(lm, make_batch(), ids, layers)
        if self.max_entries > 0:
            self._entries[key] = (weakref.ref(lm.model), pre)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return pre

    def clear(self) -> None:
        self._entries.clear()
