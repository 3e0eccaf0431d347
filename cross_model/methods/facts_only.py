"""Facts only: B reads short facts extracted from A's context (cross_model.facts) before its question,
and nothing else. The text side channel of Q-KVComm on its own, at the bytes it costs."""

from __future__ import annotations

from dataclasses import dataclass, field

from cross_model.data.base import Example
from cross_model.facts import check_facts_settings, facts_text, with_facts
from cross_model.methods.base import Method, MethodParams, Prediction
from cross_model.methods.registry import register
from cross_model.prompting import receiver_text


@dataclass
class FactsParams(MethodParams):
    facts_extractor: str = field(
        default="simple", metadata={"help": "simple (no dependency), yake or spacy"}
    )
    max_facts: int = field(default=8, metadata={"help": "facts sent per example"})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_facts_settings(prefix, self.facts_extractor, self.max_facts)


@register("facts_only")
class FactsOnly(Method):
    Params = FactsParams

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        texts = [
            facts_text(e, self.params.facts_extractor, self.params.max_facts) for e in examples
        ]
        seen = [with_facts(e, t) for e, t in zip(examples, texts)]
        gen, lengths = self.answer_with(self.pair.receiver, [receiver_text(e) for e in seen], seen)
        return [
            Prediction(
                e.example_id,
                answer,
                len(t.encode("utf-8")),
                receiver_prefill_tokens=n_in,
                receiver_generated_tokens=n_out,
                extra={"facts": t},
            )
            for e, t, answer, n_in, n_out in zip(
                examples, texts, gen.texts, lengths, gen.n_generated
            )
        ]
