"""Each method done the straightforward way, the reference our speed is measured against: one example
at a time, every step a full forward over the whole sequence (no KV cache), logits at every position
and all hidden states kept, nothing shared between steps, prompts or methods. Same prompts and the
same greedy rule as ours, so the answers can be compared."""

from __future__ import annotations

from typing import Any, Callable

import torch

from cross_model.data.base import Example
from cross_model.generation import eos_token_ids
from cross_model.methods.ac import combine
from cross_model.methods.cipher import vector_generate
from cross_model.surgery import embed_ids
from cross_model.methods.debate import refinement_text
from cross_model.models import LoadedModel
from cross_model.prompting import chat_wrap, encode_texts, receiver_text, sender_text, skyline_text
from cross_model.surgery import assemble_receiver_cache, decoder_layers, layout_forward


def ids_of(lm: LoadedModel, text: str) -> list[int]:
    return encode_texts(lm, [chat_wrap(lm, text)])[0]


@torch.inference_mode()
def naive_generate(
    lm: LoadedModel, ids: list[int] | None, max_new: int, *, embeds: torch.Tensor | None = None,
    logits_of: Callable[[list[int]], torch.Tensor] | None = None,
) -> str:
    """Greedy decoding that re-reads the whole sequence at every step (no cache, full logits)."""
    eos = eos_token_ids(lm)
    out: list[int] = []
    for _ in range(max_new):
        if logits_of is not None:
            logits = logits_of(out)
        elif embeds is not None:
            new = embed_ids(lm, out).to(embeds.dtype) if out else embeds[:0]
            x = torch.cat([embeds, new])[None]
            logits = lm.model(inputs_embeds=x, output_hidden_states=True, use_cache=False).logits[0]
        else:
            x = torch.tensor([ids + out], device=lm.device)
            logits = lm.model(input_ids=x, output_hidden_states=True, use_cache=False).logits[0]
        tok = int(logits[-1].argmax())
        if tok in eos:
            break
        out.append(tok)
    return lm.tokenizer.decode(out, skip_special_tokens=True).strip()


def baseline(m: Any, e: Example) -> str:
    return naive_generate(m.pair.receiver, ids_of(m.pair.receiver, receiver_text(e)), m.max_new_tokens(e))


def skyline(m: Any, e: Example) -> str:
    return naive_generate(m.pair.receiver, ids_of(m.pair.receiver, skyline_text(e)), m.max_new_tokens(e))


def nld(m: Any, e: Example) -> str:
    a, b, p = m.pair.sender, m.pair.receiver, m.params
    msg = naive_generate(a, ids_of(a, sender_text(e)), p.nld_max_tokens)
    first = naive_generate(b, ids_of(b, receiver_text(e)), p.nld_max_tokens)
    return naive_generate(b, ids_of(b, refinement_text(receiver_text(e), first, msg)), m.max_new_tokens(e))


@torch.inference_mode()
def cipher(m: Any, e: Example) -> str:
    """The public CIPHER's way: every step re-reads the whole embedded prefix."""
    a, b, p = m.pair.sender, m.pair.receiver, m.params

    def vectors(lm: LoadedModel, text: str) -> torch.Tensor:
        ids = torch.tensor([ids_of(lm, text)], device=lm.device)
        emb = lm.model.get_input_embeddings()(ids)
        return vector_generate(lm, emb, torch.ones_like(ids), p.nld_max_tokens, p.temperature, recompute=True)[0][0]

    a_vec, b_vec = vectors(a, sender_text(e)), vectors(b, receiver_text(e))
    prompt = m._refinement_embeds(b, receiver_text(e), b_vec, a_vec)
    return naive_generate(b, None, m.max_new_tokens(e), embeds=prompt)


@torch.inference_mode()
def ac(m: Any, e: Example) -> str:
    a, b, p = m.pair.sender, m.pair.receiver, m.params
    a_ids = torch.tensor([ids_of(a, sender_text(e))], device=a.device)
    vec = a.model(input_ids=a_ids, output_hidden_states=True, use_cache=False).hidden_states[p.k][:, -1]
    if m.projection is not None:
        vec = m.projection(vec).to(b.dtype)
    ids = ids_of(b, receiver_text(e))
    last = len(ids) - 1  # the prompt's last token, wherever the sequence has grown to

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> Any:
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, last] = combine(p.mode, vec, h[:, last]).to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=h))

    handle = decoder_layers(b)[p.j].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        return naive_generate(b, ids, m.max_new_tokens(e))
    finally:
        handle.remove()


@torch.inference_mode()
def kvcomm(m: Any, e: Example) -> str:
    """A: one full forward (every layer, full logits); B: every step re-reads all its tokens over a
    cache assembled afresh from A's."""
    a, b = m.pair.sender, m.pair.receiver
    selected = m.selected_layers()
    a_ids = torch.tensor([ids_of(a, sender_text(e))], device=a.device)
    a_out = a.model(input_ids=a_ids, output_hidden_states=True, use_cache=True)
    a_mask = torch.ones_like(a_ids)
    ids = ids_of(b, receiver_text(e))
    n_a = a_ids.shape[1]

    def logits_of(out: list[int]) -> torch.Tensor:
        cache, layout = assemble_receiver_cache(a_out.past_key_values, a_mask, m.layer_map, selected)
        seq = torch.tensor([ids + out], device=b.device)
        pos = torch.arange(n_a, n_a + seq.shape[1], device=b.device)[None]
        fwd = layout_forward(b, layout, all_logits=True)
        return fwd(cache=cache, full_mask_BT=torch.ones_like(seq), position_ids_BT=pos, input_ids_BT=seq)[0]

    return naive_generate(b, None, m.max_new_tokens(e), logits_of=logits_of)


REFERENCES: dict[str, Callable[[Any, Example], str]] = {
    "baseline": baseline, "skyline": skyline, "nld": nld, "cipher": cipher, "ac": ac, "kvcomm": kvcomm,
}
