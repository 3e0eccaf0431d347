"""Skyline: B reads the context itself. The context crosses as UTF-8 text. In a multi-sender task B
reads every sender's context, one after the other, and all their bytes count."""

from __future__ import annotations

from cross_model.data.base import Example
from cross_model.methods.base import Method, Prediction
from cross_model.methods.registry import register
from cross_model.prompting import skyline_text


@register("skyline")
class Skyline(Method):
    multi_sender = True

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        texts = [skyline_text(e, "\n".join(e.contexts)) for e in examples]
        gen, lengths = self.answer_with(self.pair.receiver, texts, examples)
        return [
            Prediction(
                e.example_id,
                text,
                sum(len(c.encode("utf-8")) for c in e.contexts),
                receiver_prefill_tokens=n_in,
                receiver_generated_tokens=n_out,
            )
            for e, text, n_in, n_out in zip(examples, gen.texts, lengths, gen.n_generated)
        ]
