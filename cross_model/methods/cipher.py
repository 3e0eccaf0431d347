"""CIPHER: debate in expected embeddings instead of tokens.

Each step feeds back e = softmax(logits / T) @ E (E: the input embedding table times the model's
embedding scale) as `inputs_embeds`, with a KV cache (the public code recomputes the whole prefix;
`vector_generate(..., recompute=True)` is that reference, kept for tests and benchmarks). A message
ends when the nearest vocabulary embedding (cosine) of e is EOS, or at `nld_max_tokens`. B's
refinement prompt embeds its text with B's table and splices in B's own and A's vectors; B's final
answer is decoded greedily as tokens. Payload: n_vectors x d x bytes per element.

Several senders (a multi-sender task): each reads its own context and sends its own vectors; B's
refinement prompt splices each sender's vectors, in sender order, into its own "Another agent's
answer" block (the public com_ms.py's template); in later rounds each sender reads B's vectors and
then the other senders', one block each. The payload counts every sender's.
With `senders`, each sender runs its own model (all with B's vocabulary and width).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from cross_model.data.base import Example, sender_count
from cross_model.generation import (
    default_forward,
    eos_token_ids,
    greedy_generate,
    positions_from_mask,
)
from cross_model.methods.base import Method, Prediction
from cross_model.methods.debate import (
    DebateParams,
    first_sender_text,
    receiver_prompt,
    refinement_parts,
)
from cross_model.methods.registry import register
from cross_model.models import LoadedModel
from cross_model.prefill_memo import Prefill
from cross_model.prompt_prefix_cache import MIN_SHARED, shared_prefix_length
from cross_model.prompting import VECTOR_MARK, chat_wrap, encode_texts
from cross_model.surgery import embed_ids, input_embeddings


@dataclass
class CipherParams(DebateParams):
    temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of the expected embedding"}
    )
    eos: str = field(
        default="all",
        metadata={
            "help": "which ids end a message: all (the tokenizer's and the generation "
            "config's) or tokenizer (its one id, as the public code; preset "
            "kvcomm_public)"
        },
    )

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.temperature <= 0:
            raise ValueError(f"{prefix}.temperature: must be > 0, got {self.temperature}")
        if self.eos not in EOS_RULES:
            raise ValueError(f"{prefix}.eos: {self.eos!r} is not one of {', '.join(EOS_RULES)}")


@dataclass
class VectorTables:
    """What every CIPHER step reads, made once per model: the embedding table in (at least) fp32 for
    the softmax mixture, each row's inverse norm for the nearest-token cosine, and the EOS ids."""

    table_VD: torch.Tensor
    inv_norm_V: torch.Tensor
    eos: torch.Tensor


EOS_RULES = ("all", "tokenizer")


def message_eos_ids(lm: LoadedModel, rule: str = "all") -> list[int]:
    """The ids whose nearest embedding ends a message: every EOS id the model declares, or (`tokenizer`)
    the tokenizer's one, as the public CIPHER code stops (Llama-3-Instruct's <|eot_id|> then does not end
    a message: only <|end_of_text|> does)."""
    if rule == "tokenizer":
        if lm.tokenizer.eos_token_id is None:
            raise ValueError(
                f"cipher eos: tokenizer: {lm.info.name}'s tokenizer has no eos_token_id; use eos: all"
            )
        return [int(lm.tokenizer.eos_token_id)]
    return sorted(eos_token_ids(lm))


def vector_tables(lm: LoadedModel, eos_rule: str = "all") -> VectorTables:
    def build() -> VectorTables:
        table = input_embeddings(lm)
        table = table.to(
            torch.promote_types(table.dtype, torch.float32)
        )  # a copy only when narrower
        inv = 1.0 / table.norm(dim=-1).clamp(min=1e-12)
        return VectorTables(table, inv, torch.tensor([], dtype=torch.long, device=table.device))

    shared = lm.cached("cipher_tables", build)  # the large parts, once per model whatever the rule
    return lm.cached(
        f"cipher_tables_{eos_rule}",
        lambda: VectorTables(
            shared.table_VD,
            shared.inv_norm_V,
            torch.tensor(message_eos_ids(lm, eos_rule), device=shared.table_VD.device),
        ),
    )


@torch.inference_mode()
def vector_generate(
    lm: LoadedModel,
    prompts_BTD: torch.Tensor | None,
    mask_BT: torch.Tensor | None,
    max_steps: int,
    temperature: float,
    recompute: bool = False,
    start: Prefill | None = None,
    eos_rule: str = "all",
) -> tuple[list[torch.Tensor], list[int]]:
    """Expected-embedding messages from embedded, left-padded prompts. Returns per row its vectors
    (n_i x D, EOS excluded) and the steps it ran. With `start`, the prompts were prefilled already
    (from token ids, whose embeddings are the same vectors, shared prefix or not): pass None for both."""
    tables = vector_tables(lm, eos_rule)
    table_VD, work = tables.table_VD, tables.table_VD.dtype
    if start is not None and recompute:
        raise ValueError(
            "vector_generate: recompute=True needs the whole prompt, not a prefilled one"
        )
    if start is not None:
        cache, pos, mask, embeds = start.cache(), start.position_ids, start.full_mask, None
        bsz, dtype, width = (
            mask.shape[0],
            lm.model.get_input_embeddings().weight.dtype,
            lm.info.hidden_size,
        )
    else:
        bsz, dtype, width = prompts_BTD.shape[0], prompts_BTD.dtype, prompts_BTD.shape[-1]
        cache = None if recompute else DynamicCache()
        pos = positions_from_mask(mask_BT)
        embeds, mask = prompts_BTD, mask_BT

    def step(inputs_BTD: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        if recompute:
            return default_forward(
                lm, None, mask, positions_from_mask(mask), inputs_embeds_BTD=embeds
            )
        return default_forward(lm, cache, mask, pos_BT, inputs_embeds_BTD=inputs_BTD)

    logits = start.logits if start is not None else step(embeds, pos)
    next_pos = pos[:, -1] + 1
    vectors: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
    steps = [0] * bsz
    done = [False] * bsz
    for _ in range(max_steps):
        e_BD = (logits.to(work) / temperature).softmax(-1) @ table_VD
        # Cosine's argmax: |e| is the same for every candidate, so only the table's norms matter.
        nearest = ((e_BD @ table_VD.T) * tables.inv_norm_V).argmax(-1)
        is_eos = torch.isin(nearest, tables.eos).tolist()  # the step's one wait for the device
        e_out = e_BD.to(dtype)
        for i in range(bsz):
            if not done[i]:
                steps[i] += 1
                if is_eos[i]:
                    done[i] = True
                else:
                    vectors[i].append(e_out[i])
                    done[i] = len(vectors[i]) >= max_steps
        if all(done):
            break
        new_BTD = e_out[:, None, :]
        if recompute:  # only the reference re-reads the whole sequence
            embeds = torch.cat([embeds, new_BTD], dim=1)
        mask = torch.cat([mask, torch.ones((bsz, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        logits = step(new_BTD, next_pos[:, None])
        next_pos = next_pos + 1
    return [
        torch.stack(v) if v else torch.zeros((0, width), dtype=dtype, device=mask.device)
        for v in vectors
    ], steps


def pad_embeddings_left(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[0] for r in rows)
    d = rows[0].shape[-1]
    out = rows[0].new_zeros((len(rows), width, d))
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, width - r.shape[0] :] = r
            mask[i, width - r.shape[0] :] = 1
    return out, mask


@register("cipher")
class Cipher(Method):
    public_settings = {"eos": "tokenizer"}
    Params = CipherParams
    multi_sender = True

    def check_pair(self) -> None:
        b = self.pair.receiver
        for a in self.pair.senders:
            if (
                a.info.hidden_size != b.info.hidden_size
                or a.tokenizer.get_vocab() != b.tokenizer.get_vocab()
            ):
                raise ValueError(
                    f"methods.{self.name}: CIPHER needs one vocabulary and one embedding width for both models; "
                    f"{a.info.name} has vocab {a.info.vocab_size} x {a.info.hidden_size}, {b.info.name} has "
                    f"vocab {b.info.vocab_size} x {b.info.hidden_size}. Use ac or kvcomm for such pairs."
                )

    def _sender_groups(self, rows: int, n: int) -> list[tuple[LoadedModel, slice]]:
        """Sender-major rows by the model that runs them: one group when every sender runs one model."""
        models = [self.pair.sender_for(j) for j in range(rows // n)]
        if all(m is models[0] for m in models):
            return [(models[0], slice(0, rows))]
        return [(lm, slice(j * n, (j + 1) * n)) for j, lm in enumerate(models)]

    def _refinement_embeds(
        self, lm: LoadedModel, prompt: str, own: torch.Tensor, others: list[torch.Tensor]
    ) -> torch.Tensor:
        """Chat-wrapped refinement prompt with the vector messages spliced into its text."""
        head, rest = self._refinement_parts(lm, prompt, own, others)
        return torch.cat([embed_ids(lm, head).to(rest.dtype), rest], dim=0)

    def _refinement_parts(
        self, lm: LoadedModel, prompt: str, own: torch.Tensor, others: list[torch.Tensor]
    ) -> tuple[list[int], torch.Tensor]:
        """The refinement prompt as (token ids before the first message, embeddings of the rest): one's
        own vectors, then each other agent's under its header (`debate.refinement_parts`)."""
        texts = refinement_parts(prompt, len(others))
        wrapped = chat_wrap(lm, VECTOR_MARK.join(texts))
        head, *gaps = wrapped.split(VECTOR_MARK)
        # Only the head carries the tokenizer's own special tokens (e.g. <bos>) for template-less models.
        if lm.info.has_chat_template:
            gap_ids = [encode_texts(lm, [g])[0] for g in gaps]
        else:
            gap_ids = [lm.tokenizer(g, add_special_tokens=False)["input_ids"] for g in gaps]
        dtype = lm.model.get_input_embeddings().weight.dtype
        parts = [own]
        for message, ids in zip(others, gap_ids):
            parts += [embed_ids(lm, ids), message]
        parts.append(embed_ids(lm, gap_ids[-1]))
        return encode_texts(lm, [head])[0], torch.cat([x.to(dtype) for x in parts], dim=0)

    def _final_answer(
        self, lm: LoadedModel, parts: list[tuple[list[int], torch.Tensor]], limits: list[int]
    ):
        """B's answer to its refinement prompts; the text every row starts with is prefilled once."""
        heads = [h for h, _ in parts]
        p = shared_prefix_length(heads) if self.params.share_prefix and len(heads) > 1 else 0
        if p < MIN_SHARED or not self.prefix_cache.fits_window(
            lm, [len(h) + len(r) for h, r in parts]
        ):
            p = 0
        dtype = lm.model.get_input_embeddings().weight.dtype
        emb, mask = pad_embeddings_left(
            [torch.cat([embed_ids(lm, h[p:]).to(dtype), rest]) for h, rest in parts]
        )
        kw: dict[str, Any] = {}
        if p:
            n = len(parts)
            kw = dict(
                cache=self.prefix_cache.cache_for(lm, heads[0][:p], n),
                past_mask_BP=torch.ones((n, p), dtype=mask.dtype, device=mask.device),
                position_offset_B=torch.full((n,), p, dtype=torch.long, device=mask.device),
            )
        return greedy_generate(
            lm, None, mask, max(limits), inputs_embeds_BTD=emb, max_new_tokens_B=limits, **kw
        )

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        p = self.params
        a, b = (
            self.pair.sender,
            self.pair.receiver,
        )  # every sender has B's width and vocabulary (check_pair)
        n, senders = len(examples), sender_count(examples)
        # One row per (sender, item), sender-major: row j*n + i is sender j of item i.
        views = [e.as_sender(j) for j in range(senders) for e in examples]
        a_prompts = [first_sender_text(v, p) for v in views]
        b_prompts = [receiver_prompt(e) for e in examples]

        def heard(vecs: list[torch.Tensor], i: int, skip: int | None = None) -> list[torch.Tensor]:
            return [vecs[j * n + i] for j in range(senders) if j != skip]

        groups = self._sender_groups(len(views), n)
        # The first messages continue prefills other methods share (the same prompts' token ids).
        a_vecs, a_steps, a_len = [], [], []
        for lm, part in groups:
            a_pre = self.prefill(lm, a_prompts[part])
            vecs, steps = vector_generate(
                lm, None, None, p.nld_max_tokens, p.temperature, start=a_pre, eos_rule=p.eos
            )
            a_vecs, a_steps, a_len = a_vecs + vecs, a_steps + steps, a_len + a_pre.prompt_lengths
        b_pre = self.prefill(b, b_prompts)
        b_vecs, b_steps = vector_generate(
            b, None, None, p.nld_max_tokens, p.temperature, start=b_pre, eos_rule=p.eos
        )
        b_len = b_pre.prompt_lengths
        n_sent = [v.shape[0] for v in a_vecs]
        a_gen, b_gen = list(a_steps), list(b_steps)
        a_in, b_in = list(a_len), list(b_len)
        for r in range(1, p.rounds):
            a_rows = [
                self._refinement_embeds(
                    self.pair.sender_for(k // n),
                    ap,
                    av,
                    [b_vecs[k % n], *heard(a_vecs, k % n, k // n)],
                )
                for k, (ap, av) in enumerate(zip(a_prompts, a_vecs))
            ]
            new_a, steps = [], []
            for lm, part in groups:
                emb, mask = pad_embeddings_left(a_rows[part])
                vecs, took = vector_generate(
                    lm, emb, mask, p.nld_max_tokens, p.temperature, eos_rule=p.eos
                )
                new_a, steps = new_a + vecs, steps + took
            b_rows = [
                self._refinement_embeds(b, bp, bv, heard(a_vecs, i))
                for i, (bp, bv) in enumerate(zip(b_prompts, b_vecs))
            ]
            emb, mask = pad_embeddings_left(b_rows)
            b_vecs, b_steps2 = vector_generate(
                b, emb, mask, p.nld_max_tokens, p.temperature, eos_rule=p.eos
            )
            a_in = [x + len(rw) for x, rw in zip(a_in, a_rows)]
            b_in = [x + len(rw) for x, rw in zip(b_in, b_rows)]
            a_gen = [x + s for x, s in zip(a_gen, steps)]
            b_gen = [x + s for x, s in zip(b_gen, b_steps2)]
            a_vecs = new_a
            n_sent = [c + v.shape[0] for c, v in zip(n_sent, a_vecs)]
        parts = [
            self._refinement_parts(b, bp, bv, heard(a_vecs, i))
            for i, (bp, bv) in enumerate(zip(b_prompts, b_vecs))
        ]
        gen = self._final_answer(b, parts, [self.max_new_tokens(e) for e in examples])
        rows = [len(head) + len(rest) for head, rest in parts]
        elem = a_vecs[0].element_size() if a_vecs else 4
        d = a.info.hidden_size

        def per_item(values: list[int]) -> list[int]:
            return [sum(values[j * n + i] for j in range(senders)) for i in range(n)]

        vectors, a_in, a_gen = per_item(n_sent), per_item(a_in), per_item(a_gen)
        return [
            Prediction(
                e.example_id,
                text,
                count * d * elem,
                sender_prefill_tokens=ai,
                sender_generated_tokens=ag,
                receiver_prefill_tokens=bi + row,
                receiver_generated_tokens=bg + out,
                extra={
                    "sender_vectors": count,
                    **(
                        {"vectors_per_sender": [n_sent[j * n + i] for j in range(senders)]}
                        if senders > 1
                        else {}
                    ),
                },
            )
            for i, (e, text, count, ai, ag, bi, bg, row, out) in enumerate(
                zip(examples, gen.texts, vectors, a_in, a_gen, b_in, b_gen, rows, gen.n_generated)
            )
        ]
