"""Skyline: B reads the context itself. The context crosses as UTF-8 text."""

from __future__ import annotations

from cross_model.data.base import Example
from cross_model.methods.base import Method, Prediction
from cross_model.methods.registry import register
from cross_model.prompting import skyline_text


@register("skyline")
class Skyline(Method):
    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        gen, lengths = self.answer_with(self.pair.receiver, [skyline_text(e) for e in examples], examples)
        return [
            Prediction(
                e.example_id, text, len(e.prompt_A.encode("utf-8")),
                receiver_prefill_tokens=n_in, receiver_generated_tokens=n_out,
            )
            for e, text, n_in, n_out in zip(examples, gen.texts, lengths, gen.n_generated)
        ]
