"""Natural-language debate: A sends text messages; B revises its answer in their light.
Payload: the UTF-8 bytes of every message A sent.

Several senders (a multi-sender task): each reads its own context and sends its own messages; B reads
all of them, in sender order, each in its own "Another agent's answer" block (the public com_ms.py's
template); in later rounds each sender reads B's answer and the other senders' messages, one block
each (every agent sees every other, as in Du et al.). The payload is every sender's bytes.
With `senders`, each sender runs its own model."""

from __future__ import annotations

from cross_model.data.base import Example, sender_count
from cross_model.methods.base import Method, Prediction
from cross_model.methods.debate import (
    DebateParams,
    first_sender_text,
    receiver_prompt,
    refinement_text,
)
from cross_model.methods.registry import register


@register("nld")
class NaturalLanguageDebate(Method):
    Params = DebateParams
    multi_sender = True

    def _generate(
        self,
        lm,
        texts: list[str],
        examples: list[Example],
        limit: int | None,
        tokens: list[dict],
        who: str,
        reuse: bool = False,
    ):
        """Generate for `examples` (one row per example and sender); each row's tokens count for its item."""
        gen, lengths = self.answer_with(
            lm, texts, examples, limit=limit, reuse=reuse
        )  # None: the task's length
        for k, (n_in, n_out) in enumerate(zip(lengths, gen.n_generated)):
            tokens[k % len(tokens)][f"{who}_prefill_tokens"] += n_in
            tokens[k % len(tokens)][f"{who}_generated_tokens"] += n_out
        return gen

    def _message(self, gen) -> list[str]:
        """A generation as it is quoted to the other model (`message_text`)."""
        return gen.raw_texts if self.params.message_text == "raw" else gen.texts

    def _senders_say(
        self,
        texts: list[str],
        views: list[Example],
        n: int,
        tokens: list[dict],
        reuse: bool = False,
    ) -> list[str]:
        """The senders' messages for sender-major rows (row j*n + i: sender j of item i), one batch per
        sender model (one batch in all when every sender runs the same model)."""
        models = [self.pair.sender_for(j) for j in range(len(views) // n)]
        if all(m is models[0] for m in models):
            return self._message(
                self._generate(
                    models[0], texts, views, self.params.nld_max_tokens, tokens, "sender", reuse
                )
            )
        out: list[str] = []
        for j, lm in enumerate(models):
            part = slice(j * n, (j + 1) * n)
            out += self._message(
                self._generate(
                    lm,
                    texts[part],
                    views[part],
                    self.params.nld_max_tokens,
                    tokens,
                    "sender",
                    reuse and j == 0,
                )
            )
        return out

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        p = self.params
        b = self.pair.receiver
        n, senders = len(examples), sender_count(examples)
        keys = (
            "sender_prefill_tokens",
            "sender_generated_tokens",
            "receiver_prefill_tokens",
            "receiver_generated_tokens",
        )
        tokens = [dict.fromkeys(keys, 0) for _ in examples]
        # One row per (sender, item), sender-major: row j*n + i is sender j of item i.
        views = [e.as_sender(j) for j in range(senders) for e in examples]
        a_prompts = [first_sender_text(v, p) for v in views]
        b_prompts = [receiver_prompt(e) for e in examples]

        def heard(msgs: list[str], i: int, skip: int | None = None) -> list[str]:
            """What item i's reader hears from the senders (all but `skip`), in sender order."""
            return [msgs[j * n + i] for j in range(senders) if j != skip]

        # The first messages read the prompts other methods read too: their prefills are shared.
        a_msgs = self._senders_say(a_prompts, views, n, tokens, reuse=True)
        b_ans = self._message(
            self._generate(b, b_prompts, examples, p.nld_max_tokens, tokens, "receiver", reuse=True)
        )
        sent = [len(m.encode("utf-8")) for m in a_msgs]
        for r in range(1, p.rounds + 1):
            last = r == p.rounds
            new_b = self._generate(
                b,
                [
                    refinement_text(bp, ba, heard(a_msgs, i))
                    for i, (bp, ba) in enumerate(zip(b_prompts, b_ans))
                ],
                examples,
                None if last else p.nld_max_tokens,
                tokens,
                "receiver",
            )
            if not last:
                others = [[b_ans[k % n], *heard(a_msgs, k % n, k // n)] for k in range(len(views))]
                a_msgs = self._senders_say(
                    [refinement_text(ap, am, o) for ap, am, o in zip(a_prompts, a_msgs, others)],
                    views,
                    n,
                    tokens,
                )
                sent = [s + len(m.encode("utf-8")) for s, m in zip(sent, a_msgs)]
                b_ans = self._message(new_b)
            else:
                answers = new_b.texts  # the answer that is scored, stripped
        per_item = [sum(sent[j * n + i] for j in range(senders)) for i in range(n)]
        return [
            Prediction(
                e.example_id,
                ans,
                size,
                **tok,
                extra={"sender_message": "\n".join(heard(a_msgs, i))},
            )
            for i, (e, ans, size, tok) in enumerate(zip(examples, answers, per_item, tokens))
        ]
