"""What natural-language debate and CIPHER share: parameters and the refinement prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

from cross_model.data.base import Example
from cross_model.methods.base import MethodParams
from cross_model.prompting import SENDER_AWARE_INSTRUCTION, receiver_text, sender_text

PREVIOUS = "\nYour previous answer:\n"
OTHERS = "\nOther agents' answers (for your consideration):\n"
REVISE = "\nIf needed, revise your answer. Your new answer is:"


@dataclass
class DebateParams(MethodParams):
    rounds: int = field(default=1, metadata={"help": "refinement rounds (Du et al.); the last one is B's answer"})
    sender_aware: bool = field(default=False, metadata={"help": "A is told to summarise for another agent"})
    nld_max_tokens: int = field(default=256, metadata={"help": "length of the first messages and of A's revisions"})
    message_text: str = field(default="raw", metadata={"help": "messages quoted in a refinement prompt: raw (decoded "
                                                                "as they are, as the public code) or stripped"})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.message_text not in ("raw", "stripped"):
            raise ValueError(f"{prefix}.message_text: raw or stripped, got {self.message_text!r}")
        if self.rounds < 1 or self.nld_max_tokens < 1:
            raise ValueError(f"{prefix}.rounds and {prefix}.nld_max_tokens must be >= 1")


def first_sender_text(example: Example, params: DebateParams) -> str:
    return sender_text(example, SENDER_AWARE_INSTRUCTION if params.sender_aware else None)


def refinement_parts(own_prompt: str) -> tuple[str, str, str]:
    """The prompt around the two messages: (before own answer, between, after other's message)."""
    return own_prompt + PREVIOUS, OTHERS, REVISE


def refinement_text(own_prompt: str, own_answer: str, other_message: str) -> str:
    before, between, after = refinement_parts(own_prompt)
    return f"{before}{own_answer}{between}{other_message}{after}"


def receiver_prompt(example: Example) -> str:
    return receiver_text(example)
