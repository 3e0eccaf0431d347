"""Natural-language debate: A sends text messages; B revises its answer in their light.
Payload: the UTF-8 bytes of every message A sent."""

from __future__ import annotations

from cross_model.data.base import Example
from cross_model.methods.base import Method, Prediction
from cross_model.methods.debate import DebateParams, first_sender_text, receiver_prompt, refinement_text
from cross_model.methods.registry import register


@register("nld")
class NaturalLanguageDebate(Method):
    Params = DebateParams

    def _generate(self, lm, texts: list[str], examples: list[Example], limit: int | None, tokens: dict, who: str,
                  reuse: bool = False):
        gen, lengths = self.answer_with(lm, texts, examples, limit=limit, reuse=reuse)  # None: the task's length
        for i, (n_in, n_out) in enumerate(zip(lengths, gen.n_generated)):
            tokens[i][f"{who}_prefill_tokens"] += n_in
            tokens[i][f"{who}_generated_tokens"] += n_out
        return gen

    def _message(self, gen) -> list[str]:
        """A generation as it is quoted to the other model (`message_text`)."""
        return gen.raw_texts if self.params.message_text == "raw" else gen.texts

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        p = self.params
        a, b = self.pair.sender, self.pair.receiver
        keys = ("sender_prefill_tokens", "sender_generated_tokens", "receiver_prefill_tokens", "receiver_generated_tokens")
        tokens = [dict.fromkeys(keys, 0) for _ in examples]
        a_prompts = [first_sender_text(e, p) for e in examples]
        b_prompts = [receiver_prompt(e) for e in examples]
        # The first messages read the prompts other methods read too: their prefills are shared.
        a_msgs = self._message(self._generate(a, a_prompts, examples, p.nld_max_tokens, tokens, "sender", reuse=True))
        b_ans = self._message(self._generate(b, b_prompts, examples, p.nld_max_tokens, tokens, "receiver", reuse=True))
        sent = [len(m.encode("utf-8")) for m in a_msgs]
        for r in range(1, p.rounds + 1):
            last = r == p.rounds
            new_b = self._generate(
                b, [refinement_text(bp, ba, am) for bp, ba, am in zip(b_prompts, b_ans, a_msgs)], examples,
                None if last else p.nld_max_tokens, tokens, "receiver",
            )
            if not last:
                a_msgs = self._message(self._generate(
                    a, [refinement_text(ap, am, ba) for ap, am, ba in zip(a_prompts, a_msgs, b_ans)], examples,
                    p.nld_max_tokens, tokens, "sender",
                ))
                sent = [s + len(m.encode("utf-8")) for s, m in zip(sent, a_msgs)]
                b_ans = self._message(new_b)
            else:
                answers = new_b.texts  # the answer that is scored, stripped
        return [
            Prediction(e.example_id, ans, n, **tok, extra={"sender_message": msg})
            for e, ans, n, tok, msg in zip(examples, answers, sent, tokens, a_msgs)
        ]
