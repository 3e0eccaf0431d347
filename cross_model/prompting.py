"""Prompts shared by every method (METHODS.md, "Prompting"), chat templating and batch tokenisation."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch

from cross_model.data.base import CHOICE, CODE, MATH, QA, SUMMARY, Example
from cross_model.models import LoadedModel

QA_INSTRUCTION = (
    "Directly answer the question based on the context passage, no explanation is needed."
)
MATH_INSTRUCTION = "Answer the math problem step by step."
# RepoBench and SAMSum split one input between the agents: A has the cross-file code (the first half of
# the dialogue), B the in-file code (the second half).
CODE_INSTRUCTION = (
    "Complete the next line of code, using the code in the context; answer with that line only."
)
SUMMARY_INSTRUCTION = (
    "Summarize the whole dialogue, the part in the context and the part in the question, briefly."
)
# Multiple choice (C2C's benchmarks): both agents read the question; B's prompt is the benchmark's own
# answer template, read as it is (it carries its instructions), A's the question and its choices.
CHOICE_INSTRUCTION = "Read the multiple-choice question and its choices."
INSTRUCTIONS = {
    MATH: MATH_INSTRUCTION,
    CODE: CODE_INSTRUCTION,
    SUMMARY: SUMMARY_INSTRUCTION,
    CHOICE: CHOICE_INSTRUCTION,
}
SENDER_AWARE_INSTRUCTION = "Summarize the context passage in a concise way, as it will be used by another agent to answer the question."


# The public KVComm code's prompt families (`preset: kvcomm_public` marks its items with
# meta["prompt_family"] = "public"): per kind, the instruction and the labels of A's and B's parts.
PUBLIC_FAMILY = "public"
PUBLIC_PROMPTS = {
    QA: (QA_INSTRUCTION, "Context", "Question"),
    MATH: (MATH_INSTRUCTION, "Hint", "Question"),
    CODE: (
        "Complete ONLY THE NEXT LINE of the code snippet based on the context.",
        "Context",
        "Code Snippet",
    ),
    SUMMARY: (
        "Summarize the following content concisely with one sentence.",
        "Content part 1",
        "Content part 2",
    ),
}
PUBLIC_SENDER_AWARE = {
    QA: SENDER_AWARE_INSTRUCTION,
    MATH: "Summarize the hint in a concise way, as it will be used by another agent to answer the question.",
    CODE: "Summarize the code snippet in a concise way, as it will be used by another agent to complete the code.",
    SUMMARY: "Summarize the content in a concise way, as it will be used by another agent to understand the content.",
}


def _public(example: Example) -> bool:
    return example.meta.get("prompt_family") == PUBLIC_FAMILY


def _labels(example: Example) -> tuple[str, str, str]:
    if _public(example):
        return PUBLIC_PROMPTS.get(example.kind, PUBLIC_PROMPTS[QA])
    return INSTRUCTIONS.get(example.kind, QA_INSTRUCTION), "Context", "Question"


def instruction(example: Example) -> str:
    return _labels(example)[0]


def sender_aware_instruction(example: Example) -> str:
    """A told to summarise for another agent (NLD's `sender_aware`); the public family has one per kind."""
    return (
        PUBLIC_SENDER_AWARE.get(example.kind, SENDER_AWARE_INSTRUCTION)
        if _public(example)
        else SENDER_AWARE_INSTRUCTION
    )


def sender_text(example: Example, instr: str | None = None) -> str:
    """Query-blind: A never sees the question."""
    default, a_label, _ = _labels(example)
    return f"Instruction: {instr or default} {a_label}: {example.prompt_A}"


def receiver_text(example: Example) -> str:
    if example.kind == CHOICE:
        return example.prompt_B
    instr, _, b_label = _labels(example)
    return f"Instruction: {instr} {b_label}: {example.prompt_B}"


def baseline_text(example: Example) -> str:
    """B alone: its prompt in every method, except the public summary family's baseline, which labels B's
    part "Content" (the public BASELINE_SUMMARIZE template)."""
    if _public(example) and example.kind == SUMMARY:
        return f"Instruction: {instruction(example)} Content: {example.prompt_B}"
    return receiver_text(example)


def skyline_text(example: Example, context: str | None = None) -> str:
    instr, a_label, b_label = _labels(example)
    if example.kind == CHOICE:
        return f"{a_label}: {context if context is not None else example.prompt_A}\n\n{example.prompt_B}"
    return f"Instruction: {instr} {a_label}: {context if context is not None else example.prompt_A} {b_label}: {example.prompt_B}"


VECTOR_MARK = "\x00VECTORS\x00"  # where a method splices vectors into a prompt's text (CIPHER)
_PROMPT_LOG: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "cross_model_prompt_log", default=None
)


@contextlib.contextmanager
def recording_prompts() -> Iterator[list[dict[str, str]]]:
    """While active, every prompt a model is given (its exact text, chat template applied) is appended
    to the yielded list as {"model", "text"}, in the order the method builds them (`eval.log_prompts`)."""
    log: list[dict[str, str]] = []
    token = _PROMPT_LOG.set(log)
    try:
        yield log
    finally:
        _PROMPT_LOG.reset(token)


CHAT_KWARGS = (
    "chat_template_kwargs"  # LoadedModel.derived key: `models.chat_template_kwargs` of the run
)


def chat_text(lm: LoadedModel, text: str) -> str:
    """One user turn with the model's chat template and the generation prompt (and the run's
    `models.chat_template_kwargs`); plain text without one."""
    if lm.info.has_chat_template:
        text = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            **lm.derived.get(CHAT_KWARGS, {}),
        )
    return text


def chat_wrap(lm: LoadedModel, text: str) -> str:
    """`chat_text`, recorded while `recording_prompts` is active: the prompts a model is given."""
    text = chat_text(lm, text)
    log = _PROMPT_LOG.get()
    if log is not None:
        log.append({"model": lm.info.name, "text": text.replace(VECTOR_MARK, "[vectors]")})
    return text


@dataclass
class Batch:
    """Left-padded token ids: `input_ids_BT`, `attention_mask_BT` (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(-1).tolist()


def encode_texts(
    lm: LoadedModel, texts: list[str], max_length: int | None = None
) -> list[list[int]]:
    """Token ids of already chat-wrapped texts. Special tokens come from the template when there is
    one; plain-text models get the tokenizer's own (e.g. Gemma's <bos>)."""
    add_special = not lm.info.has_chat_template
    ids = [lm.tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
    if max_length is not None:
        ids = [truncate_middle(x, max_length) for x in ids]
    return ids


def truncate_middle(ids: list[int], max_length: int) -> list[int]:
    """Over-long prompts keep their first and last halves (the long-context papers' rule)."""
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + ids[len(ids) - (max_length - half) :]


def pad_left(ids: list[list[int]], pad_id: int, device: torch.device) -> Batch:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return Batch(input_ids.to(device), mask.to(device))


def tokenize_prompts(lm: LoadedModel, texts: list[str], max_length: int | None = None) -> Batch:
    """Chat-wrap, tokenise and left-pad a batch of prompts for `lm`."""
    ids = encode_texts(lm, [chat_wrap(lm, t) for t in texts], max_length)
    return pad_left(ids, lm.tokenizer.pad_token_id, lm.device)
