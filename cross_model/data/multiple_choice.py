"""C2C's multiple-choice benchmarks as tasks (thu-nics/C2C evaluates its fusers on them): MMLU-Redux
2.0 (`edinburgh-dawg/mmlu-redux-2.0`, its 57 subjects, test), ARC-Challenge (`allenai/ai2_arc`, test)
and OpenBookQA (`allenai/openbookqa`, main, test).

Both agents read the question with its lettered choices (in C2C both models read the input): A as its
context, B inside C2C's answer template ("Accurately answer the following question: ... The correct
answer is"). The gold is the choice's letter, scored as C2C scores it (`metrics.choice_letter`: the
letter its extraction rules find in the answer); the gold choice's text is the second answer and the
choices' texts the candidates, for the lenient first-named column. Items without a usable gold are
left out when the task is read, as C2C's parser gives them none: MMLU-Redux rows its annotators marked
`no_correct_answer` or `expert`, and ARC/OpenBookQA rows whose answer key is not a letter A-D (a few
ARC rows use 1-4); a row marked `wrong_groundtruth` takes its corrected answer. As C2C evaluates them,
every row is an item, in the split's order (subjects in turn for MMLU-Redux), but the calibration
reserve at the back; no rows are kept for training.
"""

from __future__ import annotations

import hashlib

from cross_model.data.base import CHOICE
from cross_model.data.hub import HubSource, _register

LETTERS = "ABCD"
# C2C's answer template (rosetta/utils/evaluate.py, without chain of thought), a fact of its evaluation.
TEMPLATE = """Accurately answer the following question:

{question}

Choices:
{choices}

Instructions:
- Carefully read the question and all options.
- Select the single most correct answer.
- Respond ONLY in the following format: "The correct answer is A/B/C/D".
- Do not include any explanations, additional text, or punctuation besides the answer.

The correct answer is"""

MMLU_REDUX_SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)


def lettered(choices: list[str]) -> str:
    return "".join(f"{chr(65 + i)}. {c}\n" for i, c in enumerate(choices))


def choice_item(
    rid: str, question: str, choices: list[str], gold: int
) -> tuple[str, str, str, list[str]]:
    """(id, A's context, B's prompt, [gold letter, gold text]) of one multiple-choice row."""
    block = lettered(choices)
    return (
        rid,
        f"{question}\n\nChoices:\n{block}".rstrip(),
        TEMPLATE.format(question=question, choices=block),
        [LETTERS[gold], choices[gold]],
    )


def _row_id(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:12]


def mmlu_redux_gold(row: dict) -> int | None:
    """The index of the right choice as C2C reads it: none for `no_correct_answer` and `expert` rows, the
    corrected answer (a digit or a letter) for `wrong_groundtruth` rows, else `answer`."""
    kind = row.get("error_type") or ""
    if kind in ("no_correct_answer", "expert"):
        return None
    corrected = row.get("correct_answer")
    if kind == "wrong_groundtruth" and corrected not in (None, ""):
        value = str(corrected).strip()
        gold = int(value) if value.isdigit() else ord(value.upper()) - ord("A")
    else:
        gold = int(row["answer"])
    return gold if 0 <= gold < min(len(row["choices"]), len(LETTERS)) else None


def parse_mmlu_redux(row: dict) -> tuple[str, str, str, list[str]]:
    choices = list(row["choices"])
    rid = _row_id(row.get("subject", ""), row["question"], *choices)
    return choice_item(rid, row["question"], choices, mmlu_redux_gold(row))


def keyed_gold(row: dict) -> int | None:
    """ARC and OpenBookQA: the answer key's place among the labels, when it is a letter A-D."""
    key, labels = row.get("answerKey"), list(row["choices"]["label"])
    if key not in LETTERS or key not in labels:
        return None
    gold = labels.index(key)
    return gold if gold < len(LETTERS) else None


def parse_keyed(question_field: str):
    def parse(row: dict) -> tuple[str, str, str, list[str]]:
        return choice_item(
            str(row["id"]), row[question_field], list(row["choices"]["text"]), keyed_gold(row)
        )

    return parse


CHOICE_TOKENS = 16  # "The correct answer is" continues with a letter and perhaps its text
_register(
    "mmlu_redux",
    HubSource("edinburgh-dawg/mmlu-redux-2.0", MMLU_REDUX_SUBJECTS, "test"),
    parse_mmlu_redux,
    "choice_letter",
    CHOICE_TOKENS,
    kind=CHOICE,
    sample=False,
    keep=lambda r: mmlu_redux_gold(r) is not None,
    candidates_of=lambda r: list(r["choices"]),
)
_register(
    "arc_challenge",
    HubSource("allenai/ai2_arc", "ARC-Challenge", "test"),
    parse_keyed("question"),
    "choice_letter",
    CHOICE_TOKENS,
    kind=CHOICE,
    sample=False,
    keep=lambda r: keyed_gold(r) is not None,
    candidates_of=lambda r: list(r["choices"]["text"]),
)
_register(
    "openbookqa",
    HubSource("allenai/openbookqa", "main", "test"),
    parse_keyed("question_stem"),
    "choice_letter",
    CHOICE_TOKENS,
    kind=CHOICE,
    sample=False,
    keep=lambda r: keyed_gold(r) is not None,
    candidates_of=lambda r: list(r["choices"]["text"]),
)
