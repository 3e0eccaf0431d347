"""Each method done the straightforward way, by code that shares nothing with the method it checks, so
that "same answers" tests the method and not only our caching and batching:

- baseline, skyline: Hugging Face `generate` (greedy, batch 1) on the same prompt;
- NLD: three greedy generations with a plain loop (no cache: every step re-reads the whole sequence);
- CIPHER: a plain loop written here: every step a full forward over the embedded prefix, the expected
  embedding softmax(logits / T) @ E, nearest-token cosine for the stop rule, B's prompt embedded here;
- AC: the plain loop with a pre-hook written here that mixes A's `hidden_states[k]` into block j;
- KVComm with every layer: one greedy generation over A's prompt followed by B's (sending every
  layer is exactly B reading A's tokens as its own prefix), so the bench runs KVComm with every layer.

What they share with ours is the specification: prompt texts, chat templates, the tokenizer, greedy
argmax and the EOS ids the model's configs name. One example at a time; speeds are per example."""

from __future__ import annotations

from typing import Any, Callable

import torch

from cross_model.data.base import Example
from cross_model.methods.debate import refinement_parts, refinement_text
from cross_model.models import LoadedModel
from cross_model.prompting import chat_wrap, encode_texts, receiver_text, sender_text, skyline_text


def ids_of(lm: LoadedModel, text: str) -> list[int]:
    return encode_texts(lm, [chat_wrap(lm, text)])[0]


def stop_ids(lm: LoadedModel) -> set[int]:
    """The ids that end an answer, read from the tokenizer and the generation config."""
    ids = {lm.tokenizer.eos_token_id} if lm.tokenizer.eos_token_id is not None else set()
    cfg = getattr(lm.model.generation_config, "eos_token_id", None)
    ids |= set(cfg if isinstance(cfg, list) else [cfg] if cfg is not None else [])
    vocab = lm.tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>") if t in vocab}
    return {int(i) for i in ids}


def decode(lm: LoadedModel, out: list[int]) -> str:
    return lm.tokenizer.decode(out, skip_special_tokens=True).strip()


@torch.inference_mode()
def hf_generate(lm: LoadedModel, ids: list[int], max_new: int) -> str:
    """Hugging Face's own greedy `generate`, one example."""
    x = torch.tensor([ids], device=lm.device)
    out = lm.model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(stop_ids(lm)),
        pad_token_id=lm.tokenizer.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    new = out[0, x.shape[1] :].tolist()
    stops = stop_ids(lm)
    for i, tok in enumerate(new):
        if tok in stops:
            new = new[:i]
            break
    return decode(lm, new)


@torch.inference_mode()
def naive_generate(
    lm: LoadedModel,
    ids: list[int] | None,
    max_new: int,
    *,
    embeds: torch.Tensor | None = None,
    raw: bool = False,
) -> str:
    """Greedy decoding that re-reads the whole sequence at every step (no cache, full logits)."""
    stops = stop_ids(lm)
    emb = lm.model.get_input_embeddings()
    out: list[int] = []
    for _ in range(max_new):
        if embeds is not None:
            new = (
                emb(torch.tensor(out, dtype=torch.long, device=lm.device)).to(embeds.dtype)
                if out
                else embeds[:0]
            )
            logits = lm.model(inputs_embeds=torch.cat([embeds, new])[None], use_cache=False).logits[
                0
            ]
        else:
            logits = lm.model(
                input_ids=torch.tensor([ids + out], device=lm.device), use_cache=False
            ).logits[0]
        tok = int(logits[-1].argmax())
        if tok in stops:
            break
        out.append(tok)
    text = lm.tokenizer.decode(out, skip_special_tokens=True)
    return text if raw else text.strip()


def baseline(m: Any, e: Example) -> str:
    return hf_generate(
        m.pair.receiver, ids_of(m.pair.receiver, receiver_text(e)), m.max_new_tokens(e)
    )


def skyline(m: Any, e: Example) -> str:
    return hf_generate(
        m.pair.receiver, ids_of(m.pair.receiver, skyline_text(e)), m.max_new_tokens(e)
    )


def nld(m: Any, e: Example) -> str:
    a, b, p = m.pair.sender, m.pair.receiver, m.params
    raw = p.message_text == "raw"  # messages quoted as decoded, or stripped
    msg = naive_generate(a, ids_of(a, sender_text(e)), p.nld_max_tokens, raw=raw)
    first = naive_generate(b, ids_of(b, receiver_text(e)), p.nld_max_tokens, raw=raw)
    return naive_generate(
        b, ids_of(b, refinement_text(receiver_text(e), first, [msg])), m.max_new_tokens(e)
    )


def scaled_table(lm: LoadedModel) -> torch.Tensor:
    emb = lm.model.get_input_embeddings()
    scale = getattr(emb, "embed_scale", None)
    return emb.weight * scale.to(emb.weight.dtype) if scale is not None else emb.weight


@torch.inference_mode()
def expected_embeddings(
    lm: LoadedModel, prompt: torch.Tensor, steps: int, temperature: float
) -> torch.Tensor:
    """CIPHER's message, the plain way: each step reads the whole embedded prefix again."""
    table = scaled_table(lm)
    table = table.to(torch.promote_types(table.dtype, torch.float32))
    unit = table / table.norm(dim=-1, keepdim=True).clamp(
        min=1e-12
    )  # a zero row (padding) is no candidate
    stops, seq, sent = stop_ids(lm), prompt, []
    for _ in range(steps):
        logits = lm.model(inputs_embeds=seq[None], use_cache=False).logits[0, -1].to(table.dtype)
        e = (logits / temperature).softmax(-1) @ table
        if int((unit @ (e / e.norm())).argmax()) in stops:
            break
        sent.append(e.to(prompt.dtype))
        seq = torch.cat([seq, sent[-1][None]])
    return torch.stack(sent) if sent else prompt[:0]


def embedded_refinement(
    lm: LoadedModel, own_prompt: str, own: torch.Tensor, other: torch.Tensor
) -> torch.Tensor:
    """B's refinement prompt with the two vector messages spliced into its chat-wrapped text."""
    before, between, after = refinement_parts(own_prompt)
    mark = "\x00MSG\x00"
    head, mid, tail = chat_wrap(lm, f"{before}{mark}{between}{mark}{after}").split(mark)
    emb = lm.model.get_input_embeddings()
    plain = not lm.info.has_chat_template  # then only the head carries the tokenizer's own <bos>

    def embed(text: str, first: bool) -> torch.Tensor:
        ids = (
            lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            if plain and not first
            else encode_texts(lm, [text])[0]
        )
        return emb(torch.tensor(ids, dtype=torch.long, device=lm.device))

    return torch.cat(
        [
            embed(head, True),
            own.to(emb.weight.dtype),
            embed(mid, False),
            other.to(emb.weight.dtype),
            embed(tail, False),
        ]
    )


@torch.inference_mode()
def cipher(m: Any, e: Example) -> str:
    """The public CIPHER's way: every step re-reads the whole embedded prefix."""
    a, b, p = m.pair.sender, m.pair.receiver, m.params

    def vectors(lm: LoadedModel, text: str) -> torch.Tensor:
        ids = torch.tensor(ids_of(lm, text), device=lm.device)
        return expected_embeddings(
            lm, lm.model.get_input_embeddings()(ids), p.nld_max_tokens, p.temperature
        )

    a_vec, b_vec = vectors(a, sender_text(e)), vectors(b, receiver_text(e))
    return naive_generate(
        b, None, m.max_new_tokens(e), embeds=embedded_refinement(b, receiver_text(e), b_vec, a_vec)
    )


@torch.inference_mode()
def ac(m: Any, e: Example) -> str:
    a, b, p = m.pair.sender, m.pair.receiver, m.params
    a_ids = torch.tensor([ids_of(a, sender_text(e))], device=a.device)
    vec = a.model(input_ids=a_ids, output_hidden_states=True, use_cache=False).hidden_states[p.k][
        0, -1
    ]
    if m.projection is not None:
        vec = m.projection(vec[None])[0].to(b.dtype)
    ids = ids_of(b, receiver_text(e))
    last = len(ids) - 1  # the prompt's last token, wherever the sequence has grown to

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> Any:
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        d = min(vec.shape[-1], h.shape[-1])  # B's first d_B - d dims stay (widths may differ)
        own, theirs = h[0, last, h.shape[-1] - d :], vec[vec.shape[-1] - d :].to(h.dtype)
        h[0, last, h.shape[-1] - d :] = {
            "replace": theirs,
            "sum": own + theirs,
            "mean": (own + theirs) / 2,
        }[p.mode]
        return ((h, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=h))

    handle = b.model.get_decoder().layers[p.j].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        return naive_generate(b, ids, m.max_new_tokens(e))
    finally:
        handle.remove()


def sends_every_layer_to_itself(m: Any) -> bool:
    return m.pair.sender is m.pair.receiver and m.selected_layers() == set(
        range(m.pair.receiver.info.num_layers)
    )


def kvcomm(m: Any, e: Example) -> str:
    """Every layer sent: B reads A's prompt as its own prefix; one generation over both prompts."""
    if not sends_every_layer_to_itself(m):
        raise ValueError(
            "the KVComm reference is one concatenated forward: it needs every layer sent, A = B"
        )
    return concatenated(m, e)


def concatenated(m: Any, e: Example) -> str:
    """B generating after A's prompt and its own, as one sequence (no cache surgery)."""
    a, b = m.pair.sender, m.pair.receiver
    return hf_generate(
        b, ids_of(a, sender_text(e)) + ids_of(b, receiver_text(e)), m.max_new_tokens(e)
    )


def kv_translate(m: Any, e: Example) -> str:
    """The identity projector with every gate open, A = B: KVComm with every layer sent, so the same
    concatenated forward."""
    if not applies("kv_translate", m):
        raise ValueError(
            "the translator's reference is one concatenated forward: it needs A = B, the identity "
            "and open gates"
        )
    return concatenated(m, e)


def c2c(m: Any, e: Example) -> str:
    """C2C's fuser with every gate closed: B alone on its prompt."""
    if not applies("c2c", m):
        raise ValueError("the C2C reference is B alone: it needs every gate closed")
    return baseline(m, e)


def applies(name: str, m: Any) -> bool:
    """Whether `REFERENCES[name]` can check this configuration of the method."""
    if name == "kv_translate":
        return (
            m.pair.sender is m.pair.receiver
            and m.params.projector == "identity"
            and m.params.gates == "open"
        )
    if name == "c2c":
        return m.params.gates == "closed"
    return name in REFERENCES and (name != "kvcomm" or sends_every_layer_to_itself(m))


REFERENCES: dict[str, Callable[[Any, Example], str]] = {
    "baseline": baseline,
    "skyline": skyline,
    "nld": nld,
    "cipher": cipher,
    "ac": ac,
    "kvcomm": kvcomm,
    "kv_translate": kv_translate,
    "c2c": c2c,
}
