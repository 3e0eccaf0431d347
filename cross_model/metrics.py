"""Scorers: SQuAD normalisation, token F1, the KVComm papers' f1_match, EM, numeric match,
ROUGE-L recall, a lenient first-named match, and Wilson 95% intervals."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD: lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def optional_module(name: str, needed_by: str):
    """A library only some metrics need, imported where it is used: a machine without it (the bare
    GPU images) runs everything else, and a metric that needs it says which package to install."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"{needed_by} needs the {name!r} package, which is not installed here: "
            f"pip install -r requirements.txt (or just {name})"
        ) from err


@lru_cache(maxsize=1)
def _rouge_scorer():
    return optional_module("rouge", "rouge_l_recall_public").Rouge(metrics=["rouge-l"])


@lru_cache(maxsize=65536)
def _lemma(word: str) -> str:
    return optional_module("simplemma", "lemmatised f1_match").lemmatize(word, lang="en")


def _tokens(text: str, lemmatize: bool) -> list[str]:
    toks = normalize_answer(text).split()
    return [_lemma(t) for t in toks] if lemmatize else toks


def _f1(pred: Counter, gold: Counter) -> float:
    common = sum((pred & gold).values())
    if common == 0:
        return 0.0
    precision = common / sum(pred.values())
    recall = common / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 over token multisets. Two empty strings agree (1.0); one empty scores 0."""
    p, g = _tokens(prediction, False), _tokens(gold, False)
    if not p or not g:
        return float(p == g)
    return _f1(Counter(p), Counter(g))


def lemma_set_f1(prediction: str, gold: str) -> float:
    """F1 between lemmatised token *sets* (the KVComm papers' variant)."""
    p, g = set(_tokens(prediction, True)), set(_tokens(gold, True))
    if not p or not g:
        return float(p == g)
    return _f1(Counter(p), Counter(g))


def f1_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the lemmatised set F1 against any gold answer is strictly above 0.5."""
    return float(any(lemma_set_f1(prediction, a) > 0.5 for a in answers))


def max_token_f1(prediction: str, answers: Sequence[str]) -> float:
    return max((token_f1(prediction, a) for a in answers), default=0.0)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    """The answer's number: after '####' if present (GSM8k style), else the last number in the text."""
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def numeric_match(prediction: str, answers: Sequence[str]) -> float:
    got = extract_number(prediction)
    if got is None:
        return 0.0
    for answer in answers:
        want = extract_number(answer)
        if want is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-6):
            return 1.0
    return 0.0


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_recall(prediction: str, answers: Sequence[str]) -> float:
    """LCS(prediction, gold) / len(gold) over normalised tokens, max over gold answers."""
    best = 0.0
    p = _tokens(prediction, False)
    for answer in answers:
        g = _tokens(answer, False)
        if g:
            best = max(best, _lcs(p, g) / len(g))
    return best


def first_code_line(code: str) -> str:
    """RepoBench's reading of a completion: its first line that is not blank, a comment, a docstring
    line or a Markdown fence (the first line when every line is)."""
    lines = code.lstrip("\n").split("\n")
    in_docstring = False
    for line in lines:
        s = line.strip()
        if not s:
            continue
        if not in_docstring and s.startswith(('"""', "'''")):
            in_docstring = True
            continue
        if in_docstring:
            if s.endswith(('"""', "'''")):
                in_docstring = False
            continue
        if s.startswith("#") or s.startswith("```"):
            continue
        return line
    return lines[0]


def edit_similarity(prediction: str, answers: Sequence[str]) -> float:
    """RepoBench's score: the first code line of the prediction against the gold line, `fuzz.ratio` as
    the public code computes it (2 x LCS(chars) / (len + len), the Levenshtein ratio with substitutions
    costing two edits, rounded to whole percent; rapidfuzz's implementation); max over gold answers."""
    fuzz = optional_module("rapidfuzz", "edit_similarity").fuzz
    line = first_code_line(prediction)
    return max(
        (round(fuzz.ratio(line, answer)) / 100 for answer in answers if line or answer), default=0.0
    )


def rouge_l_recall_public(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L recall as the public KVComm code scores it, with the `rouge` package: case-sensitive
    whitespace tokens, both texts split into sentences at ".", the union LCS of each reference sentence
    with the response's sentences, over the number of distinct reference words; an empty response
    scores 0 (the package refuses it). Max over gold answers. `preset: kvcomm_public` uses it."""
    if not prediction.strip():
        return 0.0
    best = 0.0
    for answer in answers:
        if answer.strip():
            best = max(best, _rouge_scorer().get_scores(prediction, answer)[0]["rouge-l"]["r"])
    return best


_SENTENCE_END = re.compile(r"(?<=[.!?\n])\s")


def first_sentence(text: str) -> str:
    text = text.strip()
    return _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""


def _first_position(haystack: str, needle: str) -> int | None:
    if not needle:
        return None
    m = re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack)
    return m.start() if m else None


def first_named_match(
    prediction: str, answers: Sequence[str], candidates: Iterable[str] = ()
) -> float:
    """Lenient: 1.0 when, in the answer's first sentence, a gold answer is named before any other
    candidate (e.g. the other companies of a tip sheet). Without candidates: a gold answer is named."""
    sentence = normalize_answer(first_sentence(prediction))
    gold = {normalize_answer(a) for a in answers}
    positions = {}
    for name in set(candidates) | set(answers):
        pos = _first_position(sentence, normalize_answer(name))
        if pos is not None:
            positions[normalize_answer(name)] = pos
    if not positions:
        return 0.0
    first = min(positions.values())
    return float(any(positions.get(g) == first for g in gold))


# C2C's answer extraction (thu-nics/C2C, rosetta/utils/evaluate.py), as rules: the first of these cues
# (any case) whose rest of line holds a capital A-D gives it; else a lone letter (any case) at the end
# or before punctuation, the last one; else any lone a-d, the last; else the last capital A-D anywhere.
# Lone letters are not taken from text that looks like arithmetic without a word of answering.
_CHOICE_CUES = [
    re.compile(p + r"\s*(.*)", re.IGNORECASE)
    for p in (
        r"Answer:",
        r"Your answer:",
        r"The answer is",
        r"Correct answer is",
        r"Correct answer is:",
        r"Correct answer:",
        r"Jibu lako:",
        r"Jibu:",
        r"Jibu sahihi:",
        r"Response:",
        r"Choice:",
        r"Option:",
    )
]
_LONE_LETTER = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\b([A-D])(?:\s*[.,!?:)]?\s*$)",
        r"\b([A-D])(?:\s*[.,!?:)]\s)",
        r"(?:^|\s)([A-D])(?:\s*$)",
    )
]
_ANY_LETTER = re.compile(r"\b([A-D])\b", re.IGNORECASE)
_MATH_SIGNS = ("+", "-", "*", "/", "=", "^", "x^", "y^", "z^", "mod", "sqrt", "sin", "cos", "tan")
_ANSWER_WORDS = ("jibu", "answer", "choice", "option", "response", "correct", "sahihi")


def extract_choice_letter(text: str) -> str | None:
    """The letter A-D a multiple-choice answer gives, by C2C's rules (above)."""
    text = text.strip()
    if not text:
        return None
    for cue in _CHOICE_CUES:
        m = cue.search(text)
        if m:
            letter = next((c for c in m.group(1).strip() if c in "ABCD"), None)
            if letter:
                return letter
    arithmetic = any(s in text for s in _MATH_SIGNS) and not any(
        w in text.lower() for w in _ANSWER_WORDS
    )
    for pattern in _LONE_LETTER:
        found = pattern.findall(text)
        if found and not arithmetic:
            return found[-1].upper()
    found = _ANY_LETTER.findall(text)
    if found:
        return None if arithmetic else found[-1].upper()
    return next((c for c in reversed(text) if c in "ABCD"), None)


def choice_letter(prediction: str, answers: Sequence[str]) -> float:
    """Multiple choice as C2C scores it: the extracted letter is the gold letter (`answers[0]`)."""
    return float(extract_choice_letter(prediction) == answers[0])


METRICS = {
    "f1_match": f1_match,
    "exact_match": exact_match,
    "numeric_match": numeric_match,
    "rouge_l_recall": rouge_l_recall,
    "rouge_l_recall_public": rouge_l_recall_public,
    "edit_similarity": edit_similarity,
    "choice_letter": choice_letter,
}
# What `preset: kvcomm_public` scores a task with instead of its own metric.
PUBLIC_METRICS = {"rouge_l_recall": "rouge_l_recall_public"}


def score_prediction(
    metric: str, prediction: str, answers: Sequence[str], candidates: Iterable[str] = ()
) -> dict[str, float]:
    """The task's primary score plus token F1 and the lenient first-named match, for every example."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; available: {', '.join(METRICS)}")
    return {
        "score": METRICS[metric](prediction, answers),
        "token_f1": max_token_f1(prediction, answers),
        "first_named": first_named_match(prediction, answers, candidates),
    }


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95% interval for a proportion; (0, 0) for n = 0."""
    if n <= 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
