"""What C2C's evaluation and training share: both models read B's prompt, and B's cache of it (all but
the last token) is fused with A's, layer by layer, through the fuser (`c2c.fuser`).

B reads its chat-wrapped prompt; its last token is held back and read against the fused cache (as
C2C's RosettaModel: the instruction tokens are fused, the last one and everything generated after it
are B's alone). A reads the same characters, the text B's tokens cover up to the held-back one, in its
own tokens (the sharer reads the receiver's text re-tokenized); each of B's tokens reads the mean of
A's tokens whose characters overlap its own (`c2c.align`). Under the content control A reads another
item's prompt instead, and B's tokens read that prompt's aligned tokens at the same relative place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cross_model.c2c.align import AlignmentStats, TokenPool, align_spans, token_pool, token_spans
from cross_model.c2c.fuser import CacheFuser, GateNoise
from cross_model.models import LoadedModel
from cross_model.prefill_memo import run_prefill
from cross_model.prompting import Batch, pad_left


@dataclass
class HeldBack:
    """One row of B's prompt split for fusion: the fused prefix (ids and character spans), the last
    token, and the prefix's text (what A reads)."""

    ids: list[int]
    spans: list[tuple[int, int]]
    last: int
    text: str


def split_prompt(b: LoadedModel, wrapped: str, max_tokens: int | None = None) -> HeldBack:
    ids, spans = token_spans(b, wrapped)
    if len(ids) < 2:
        raise ValueError(
            f"c2c: B's prompt has {len(ids)} token(s); fusion needs at least two (a prefix and the last)"
        )
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(
            f"c2c: B's prompt has {len(ids)} tokens, over max_prompt_tokens {max_tokens}; A must read the "
            f"characters B reads, so c2c cuts no prompt: cap the contexts (tasks.N.max_context_chars)"
        )
    cut = spans[-1][0] if spans[-1][1] > spans[-1][0] else spans[-1][1]
    return HeldBack(ids[:-1], spans[:-1], ids[-1], wrapped[:cut])


def relative_alignment(donor: list[list[int]], n: int) -> list[list[int]]:
    """`n` receiver tokens reading a donor's alignment at the same relative place (the content control)."""
    m = len(donor)
    return [donor[round(j * (m - 1) / max(n - 1, 1))] for j in range(n)]


@dataclass
class SharedInput:
    """A batch as both models read it: B's prefix (left-padded), its held-back tokens, A's tokens of the
    prefix text and the pooling of A's tokens into B's."""

    prefix: Batch
    prefix_ids: list[list[int]]
    last_B1: torch.Tensor
    a_ids: list[list[int]]
    a_batch: Batch
    pool: TokenPool
    stats: AlignmentStats


def shared_input(
    a: LoadedModel,
    b: LoadedModel,
    wrapped: list[str],
    donors: list[str] | None = None,
    max_tokens: int | None = None,
) -> SharedInput:
    """`wrapped`: B's chat-wrapped prompts; `donors`: the prompts A reads instead (content control)."""
    rows = [split_prompt(b, w, max_tokens) for w in wrapped]
    read = rows if donors is None else [split_prompt(b, w) for w in donors]
    stats, alignments, a_ids = AlignmentStats(), [], []
    for own, src in zip(rows, read):
        ids, spans = token_spans(a, src.text)
        aligned = align_spans(spans, src.spans)
        stats.add(spans, src.spans, aligned)
        alignments.append(aligned if src is own else relative_alignment(aligned, len(own.ids)))
        a_ids.append(ids)
    prefix = pad_left([r.ids for r in rows], b.tokenizer.pad_token_id, b.device)
    a_batch = pad_left(a_ids, a.tokenizer.pad_token_id, a.device)
    last = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=b.device)
    return SharedInput(
        prefix,
        [r.ids for r in rows],
        last,
        a_ids,
        a_batch,
        token_pool(alignments, a_batch.attention_mask, prefix.input_ids.shape[1]),
        stats,
    )


def gate_noise(
    fuser: CacheFuser,
    inp: SharedInput,
    seed: int,
    step: int,
    row_ids: tuple[int, ...],
    temperature: float,
) -> list[GateNoise]:
    """Per receiver layer, the Gumbel uniforms of a training step: drawn per row from the seed, the step
    and the row's index, over the row's own tokens, so they do not depend on the batch a row meets,
    on the rank it lands on or on resuming."""
    heads = fuser.receiver["num_kv_heads"]
    n_layers = len(fuser.fusers)
    width = inp.prefix.input_ids.shape[1]
    u = torch.full((len(row_ids), n_layers, 2, heads, width, 1), 0.5)
    for i, (rid, ids) in enumerate(zip(row_ids, inp.prefix_ids)):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + rid)
        u[i, ..., width - len(ids) :, :] = torch.rand(
            (n_layers, 2, heads, len(ids), 1), generator=g
        )
    u = u.to(inp.prefix.input_ids.device)
    return [GateNoise(u[:, l, 0], u[:, l, 1], temperature) for l in range(n_layers)]


def fused_cache(
    fuser: CacheFuser,
    a: LoadedModel,
    b: LoadedModel,
    inp: SharedInput,
    layers: list[int],
    noise: list[GateNoise] | None = None,
    grad: bool = False,
    force_open: bool = False,
) -> DynamicCache:
    """B's cache of its prefix with receiver layers in `layers` fused (hard gates, or the soft ones of
    `noise`, or held open: `force_open`); every other layer as B computed it. `grad`: the fused tensors carry
    the fuser's gradient."""
    top = max((fuser.partners[l] for l in layers), default=-1) + 1
    b_pre = run_prefill(b, inp.prefix, inp.prefix_ids, b.info.num_layers)
    a_kv = run_prefill(a, inp.a_batch, inp.a_ids, top).kv if layers else []
    if grad:  # out of inference mode, for autograd
        b_kv = [(k.clone(), v.clone()) for k, v in b_pre.kv]
        a_kv = [(k.clone(), v.clone()) for k, v in a_kv]
    else:
        b_kv = b_pre.kv
    cache = DynamicCache()
    chosen = set(layers)
    pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for l, (k_b, v_b) in enumerate(b_kv):
        if l in chosen:
            la = fuser.partners[l]
            if la not in pooled:
                pooled[la] = (inp.pool(a_kv[la][0].float()), inp.pool(a_kv[la][1].float()))
            f = fuser.fusers[l]
            n = noise[l] if noise is not None else None
            k_b = f.fuse(
                "key", pooled[la][0], k_b.float(), n and n.u_key, n and n.temperature, force_open
            ).to(k_b.dtype)
            v_b = f.fuse(
                "value",
                pooled[la][1],
                v_b.float(),
                n and n.u_value,
                n and n.temperature,
                force_open,
            ).to(v_b.dtype)
        cache.update(k_b, v_b, l)
    return cache
