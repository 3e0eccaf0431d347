"""Batched greedy decoding with a KV cache over left-padded batches.

Our own loop (not `generate`) so that methods can hook the prefill (AC's residual edit), start from
a prepared cache (KVComm), or feed embeddings (CIPHER) while sharing one correct treatment of padding
and positions. Legend: B batch, T tokens, V vocab, D hidden.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from transformers import DynamicCache

from cross_model.models import LoadedModel


def eos_token_ids(lm: LoadedModel) -> set[int]:
    """The ids that end an answer (computed once per model: `get_vocab()` builds a dict of the whole
    vocabulary, 128k entries for Llama-3)."""
    return set(lm.cached("eos_token_ids", lambda: _eos_token_ids(lm)))


def _eos_token_ids(lm: LoadedModel) -> frozenset[int]:
    ids = set()
    if lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(x) for x in gen_eos)
    vocab = lm.tokenizer.get_vocab()
    for special in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        if special in vocab:
            ids.add(int(lm.tokenizer.convert_tokens_to_ids(special)))
    return frozenset(ids)


def positions_from_mask(
    mask_BT: torch.Tensor, offset_B: torch.Tensor | None = None
) -> torch.Tensor:
    """Position of each real token counted over real tokens only (pads get the row's first position)."""
    pos = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    if offset_B is not None:
        pos = pos + offset_B[:, None]
    return pos


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated ids per row, EOS excluded
    texts: list[str]  # decoded and stripped: the answers that are scored
    n_generated: list[int]  # tokens each row generated, EOS included (the compute spent)
    raw_texts: list[str] | None = None  # decoded as they are (a message quoted to the other model)


ForwardFn = Callable[..., torch.Tensor]
# chooses the next token of each active row: (step, logits of the active rows B' x V, their original
# rows) -> B' token ids. The default is the argmax (greedy).
ChooseFn = Callable[[int, torch.Tensor, list[int]], torch.Tensor]


def default_forward(
    lm: LoadedModel,
    cache: Any,
    full_mask_BT: torch.Tensor,
    position_ids_BT: torch.Tensor,
    input_ids_BT: torch.Tensor | None = None,
    inputs_embeds_BTD: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward step; returns the last position's logits (B x V). Only the last position goes
    through the LM head."""
    out = lm.model(
        input_ids=input_ids_BT,
        inputs_embeds=inputs_embeds_BTD,
        attention_mask=full_mask_BT,
        position_ids=position_ids_BT,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]


@torch.inference_mode()
def greedy_generate(
    lm: LoadedModel,
    input_ids_BT: torch.Tensor | None,
    attention_mask_BT: torch.Tensor,
    max_new_tokens: int,
    *,
    inputs_embeds_BTD: torch.Tensor | None = None,
    cache: Any = None,
    past_mask_BP: torch.Tensor | None = None,
    position_offset_B: torch.Tensor | None = None,
    prefill_context: Callable[[], ContextManager] | None = None,
    forward: ForwardFn | None = None,
    max_new_tokens_B: list[int] | None = None,
    first_logits_BV: torch.Tensor | None = None,
    choose: ChooseFn | None = None,
) -> GenerationResult:
    """Greedy decoding of a left-padded batch (or another per-step rule: `choose`).

    `cache`/`past_mask_BP`: a prefix already in the cache (its padding mask); `position_offset_B`:
    where each row's new tokens start counting positions; `prefill_context`: entered around the
    prefill forward only; `max_new_tokens_B`: per-row limits (rows stop early, the batch runs to the max);
    `first_logits_BV`: the prompt was prefilled already (its keys/values are in `cache`), these are
    its last logits.
    """
    own_forward = forward is None
    forward = forward or (lambda **kw: default_forward(lm, **kw))
    bsz = attention_mask_BT.shape[0]
    device = attention_mask_BT.device
    cache = cache if cache is not None else DynamicCache()
    eos = eos_token_ids(lm)
    limits = max_new_tokens_B or [max_new_tokens] * bsz
    max_steps = max(limits)

    full_mask = (
        attention_mask_BT
        if past_mask_BP is None
        else torch.cat([past_mask_BP, attention_mask_BT], dim=-1)
    )
    position_ids = positions_from_mask(attention_mask_BT, position_offset_B)
    if first_logits_BV is not None:
        logits = first_logits_BV
    else:
        with prefill_context() if prefill_context else contextlib.nullcontext():
            logits = forward(
                cache=cache,
                full_mask_BT=full_mask,
                position_ids_BT=position_ids,
                input_ids_BT=input_ids_BT,
                inputs_embeds_BTD=inputs_embeds_BTD,
            )
    next_pos = position_ids[:, -1] + 1

    generated: list[list[int]] = [[] for _ in range(bsz)]
    n_generated = [0] * bsz
    done = [limit <= 0 for limit in limits]
    # With the plain forward, rows that finished leave the batch (their cache rows are dropped), so
    # decoding costs what the unfinished rows need. A custom forward keeps per-row state: keep them.
    shrink = own_forward
    active = list(range(bsz))  # original row of each row still in the batch
    for step in range(max_steps):
        next_tok = logits.argmax(dim=-1) if choose is None else choose(step, logits, active)
        for row, tok in zip(active, next_tok.tolist()):
            if done[row]:
                continue
            n_generated[row] += 1
            if tok in eos:
                done[row] = True
            else:
                generated[row].append(tok)
                if len(generated[row]) >= limits[row]:
                    done[row] = True
        if all(done) or step == max_steps - 1:
            break
        if shrink and any(done[row] for row in active):
            keep = [i for i, row in enumerate(active) if not done[row]]
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            full_mask, next_pos, next_tok = full_mask[index], next_pos[index], next_tok[index]
            active = [active[i] for i in keep]
        full_mask = torch.cat(
            [full_mask, torch.ones((len(active), 1), dtype=full_mask.dtype, device=device)], dim=-1
        )
        logits = forward(
            cache=cache,
            full_mask_BT=full_mask,
            position_ids_BT=next_pos[:, None],
            input_ids_BT=next_tok[:, None],
            inputs_embeds_BTD=None,
        )
        next_pos = next_pos + 1
    raw = [lm.tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    return GenerationResult(generated, [t.strip() for t in raw], n_generated, raw)
