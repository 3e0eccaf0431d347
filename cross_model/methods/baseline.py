"""Baseline: B answers alone, without the context. Nothing crosses."""

from __future__ import annotations

from cross_model.data.base import Example
from cross_model.methods.base import Method, Prediction
from cross_model.methods.registry import register
from cross_model.prompting import baseline_text


@register("baseline")
class Baseline(Method):
    multi_sender = True  # no sender is read, so any number of them
    reads_context = False

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        gen, lengths = self.answer_with(
            self.pair.receiver, [baseline_text(e) for e in examples], examples, reuse=True
        )
        return [
            Prediction(
                e.example_id, text, 0, receiver_prefill_tokens=n_in, receiver_generated_tokens=n_out
            )
            for e, text, n_in, n_out in zip(examples, gen.texts, lengths, gen.n_generated)
        ]
