"""What C2C's evaluation and training share: A's side (prefill and token alignment) and B's cache
built from it through the projector, with hard gates (evaluation) or soft ones (training)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from cross_model.c2c.align import AlignmentStats, TokenPool, align_spans, token_pool, token_spans
from cross_model.c2c.projector import CacheProjector
from cross_model.generation import positions_from_mask
from cross_model.kv_layout import SRC_A, KVLayout
from cross_model.models import LoadedModel
from cross_model.prefill_memo import Prefill
from cross_model.surgery import decoder


@dataclass
class SenderSide:
    """A's prefill of its prompts and, per row, B's tokens of the same text aligned to A's."""

    pre: Prefill
    pool: TokenPool  # each B context token's mean over its A tokens
    context_mask_BN: torch.Tensor  # B x N_B, left-padded: B's tokens of A's prompt text
    stats: AlignmentStats


def align_prompts(
    a: LoadedModel, b: LoadedModel, wrapped: list[str], a_ids: list[list[int]]
) -> tuple[list, list[int], AlignmentStats]:
    """Per row, B's tokens of A's chat-wrapped prompt aligned to A's tokens, and their counts."""
    stats, alignments, counts = AlignmentStats(), [], []
    for text, ids in zip(wrapped, a_ids):
        got, a_spans = token_spans(a, text)
        if got != ids:
            raise ValueError(
                "c2c: A's prompt was truncated (max_prompt_tokens) or tokenised differently, so its "
                "characters cannot be aligned; raise max_prompt_tokens or leave it unset"
            )
        _, b_spans = token_spans(b, text)
        rows = align_spans(a_spans, b_spans)
        stats.add(a_spans, b_spans, rows)
        alignments.append(rows)
        counts.append(len(rows))
    return alignments, counts, stats


def sender_side(
    a: LoadedModel, b: LoadedModel, wrapped: list[str], a_ids: list[list[int]], pre: Prefill
) -> SenderSide:
    alignments, counts, stats = align_prompts(a, b, wrapped, a_ids)
    width = max(counts)
    mask = torch.zeros((len(counts), width), dtype=torch.long, device=pre.full_mask.device)
    for i, n in enumerate(counts):
        mask[i, width - n :] = 1
    return SenderSide(pre, token_pool(alignments, pre.full_mask, width), mask, stats)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Rotary:
    """A model's rotary embedding at given positions, per layer (Gemma-3's local and global layers have
    their own), to take it off A's cached keys and put B's on the projected ones."""

    def __init__(self, lm: LoadedModel, pos_BT: torch.Tensor):
        self.lm, self.pos = lm, pos_BT
        self.emb = decoder(lm).rotary_emb
        self.types = getattr(lm.model.config, "layer_types", None)
        self.by_type = "layer_type" in inspect.signature(self.emb.forward).parameters
        self._memo: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.types[layer] if self.by_type and self.types else None
        if kind not in self._memo:
            like = torch.zeros((), dtype=torch.float32, device=self.pos.device)
            cos, sin = (
                self.emb(like, self.pos, kind) if kind is not None else self.emb(like, self.pos)
            )
            if cos.shape[-1] != self.lm.info.head_dim:
                raise ValueError(
                    f"c2c rope: reapply needs rotary embedding over the whole head ({self.lm.info.name} "
                    f"rotates {cos.shape[-1]} of {self.lm.info.head_dim} dims); use rope: as_cached"
                )
            self._memo[kind] = (cos[:, None].float(), sin[:, None].float())
        return self._memo[kind]

    def apply(self, layer: int, k_BHTD: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(layer)
        return k_BHTD * cos + _rotate_half(k_BHTD) * sin

    def remove(self, layer: int, k_BHTD: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(layer)
        return k_BHTD * cos - _rotate_half(k_BHTD) * sin


def receiver_cache(
    projector: CacheProjector,
    b: LoadedModel,
    side: SenderSide,
    layers: list[int],
    gates: torch.Tensor | None = None,
    sent: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    a: LoadedModel | None = None,
    rope: str = "as_cached",
) -> tuple[DynamicCache, KVLayout, torch.Tensor]:
    """B's cache: receiver layers in `layers` hold the projected context (B's positions 0..N_B-1), every
    other layer nothing; `gates` (one soft gate per receiver layer) adds log(g) to the context keys'
    logits. `sent[la]`: A's keys/values as B received them (quantized), else A's prefill. Returns the
    cache, its layout and B's position offset (N_B per row). `rope: reapply` takes A's rotary embedding
    off its cached keys (at A's positions) before the projector and puts B's on the projected keys (at
    B's context positions); `as_cached` projects the keys as A cached them (as C2C)."""
    mask = side.context_mask_BN
    bsz = mask.shape[0]
    device = mask.device
    pos, valid = positions_from_mask(mask), mask.bool()
    src = torch.full_like(pos, SRC_A)
    none_l = torch.zeros((bsz, 0), dtype=torch.long, device=device)
    none_b = torch.zeros((bsz, 0), dtype=torch.bool, device=device)
    heads, dim = b.info.num_kv_heads, b.info.head_dim
    dtype = b.model.dtype
    cache = DynamicCache()
    key_pos, key_valid, key_src, bias = [], [], [], []
    chosen = set(layers)
    pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if rope == "reapply":
        if a is None:
            raise ValueError("c2c rope: reapply needs the sender model")
        a_rope = Rotary(a, positions_from_mask(side.pre.full_mask))
        b_rope = Rotary(b, pos)
    for l in range(b.info.num_layers):
        la = projector.partners[l]
        if l in chosen:
            if (
                la not in pooled
            ):  # several receiver layers may read one sender layer (nearest pairing)
                k_a, v_a = sent[la] if sent and la in sent else side.pre.kv[la]
                k_a = k_a.float() if rope != "reapply" else a_rope.remove(la, k_a.float())
                # Each B token's mean over the A tokens covering its characters, heads flattened.
                pooled[la] = (side.pool(k_a), side.pool(v_a.float()))
            k, v = projector.project(l, *pooled[la])
            if rope == "reapply":
                k = b_rope.apply(l, k)
            cache.update(k.to(dtype), v.to(dtype), l)
            key_pos.append(pos)
            key_valid.append(valid)
            key_src.append(src)
            bias.append(
                None
                if gates is None
                else torch.log(gates[l].clamp(min=1e-9)).expand(bsz, mask.shape[1])
            )
        else:
            empty = torch.zeros((bsz, heads, 0, dim), dtype=dtype, device=device)
            cache.update(empty, empty, l)
            key_pos.append(none_l)
            key_valid.append(none_b)
            key_src.append(none_l)
            bias.append(None)
    layout = KVLayout(key_pos, key_valid, key_src, key_bias=bias if gates is not None else None)
    return cache, layout, mask.sum(-1)
