"""What natural-language debate and CIPHER share: parameters and the refinement prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

from cross_model.data.base import Example
from cross_model.methods.base import MethodParams
from cross_model.prompting import receiver_text, sender_aware_instruction, sender_text

PREVIOUS = "\nYour previous answer:\n"
OTHERS = "\nOther agents' answers (for your consideration):\n"
ANOTHER = (
    "\nAnother agent's answer (for your consideration):\n"  # one block per message, several senders
)
REVISE = "\nIf needed, revise your answer. Your new answer is:"


@dataclass
class DebateParams(MethodParams):
    rounds: int = field(
        default=1, metadata={"help": "refinement rounds (Du et al.); the last one is B's answer"}
    )
    sender_aware: bool = field(
        default=False, metadata={"help": "A is told to summarise for another agent"}
    )
    nld_max_tokens: int = field(
        default=256, metadata={"help": "length of the first messages and of A's revisions"}
    )
    message_text: str = field(
        default="raw",
        metadata={
            "help": "messages quoted in a refinement prompt: raw (decoded "
            "as they are, as the public code) or stripped"
        },
    )

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.message_text not in ("raw", "stripped"):
            raise ValueError(f"{prefix}.message_text: raw or stripped, got {self.message_text!r}")
        if self.rounds < 1 or self.nld_max_tokens < 1:
            raise ValueError(f"{prefix}.rounds and {prefix}.nld_max_tokens must be >= 1")


def first_sender_text(example: Example, params: DebateParams) -> str:
    return sender_text(example, sender_aware_instruction(example) if params.sender_aware else None)


def refinement_parts(own_prompt: str, n_others: int = 1) -> list[str]:
    """The refinement prompt's text around its messages: [before one's own answer, before each other
    message, after the last]. One other message sits under "Other agents' answers"; several (a
    multi-sender task) each get their own "Another agent's answer" block, as the public com_ms.py's
    template writes them."""
    headers = [OTHERS] if n_others == 1 else [ANOTHER] * n_others
    return [own_prompt + PREVIOUS, *headers, REVISE]


def refinement_text(own_prompt: str, own_answer: str, others: list[str]) -> str:
    texts = refinement_parts(own_prompt, len(others))
    return texts[0] + own_answer + "".join(h + m for h, m in zip(texts[1:-1], others)) + texts[-1]


def receiver_prompt(example: Example) -> str:
    return receiver_text(example)
