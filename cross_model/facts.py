"""Q-KVComm's fact side channel: short facts drawn from A's context, sent as text beside (or instead
of) the KV cache and prepended to B's question. The public Q-KVComm extracts YAKE keywords and spaCy
entities; its receiver also read the whole context as text, so its KV never had to carry anything.
Here B reads the facts WITHOUT the context, and their UTF-8 bytes are counted in the payload, so
`facts_only` (the text alone) against `qkvcomm` with `facts: true` says whether the KV adds anything
over cheap text at about the same bytes.

Extractors: `simple` (no dependency: capitalised phrases and numbers in order of appearance, then the
most frequent longer words), `yake` (pip install yake) and `spacy` (pip install spacy and its
en_core_web_sm model).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from functools import lru_cache

from cross_model.data.base import Example

EXTRACTORS = ("simple", "yake", "spacy")
PREFIX = "Facts: "
_STOP = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being this that these those it "
    "its he she they them his her their we you i not no do does did has have had will would can could should may "
    "might must there here what which who whom whose when where why how all any each some such than then so very "
    "also into about over after before under between while during".split()
)
_CAPITALISED = re.compile(
    r"\b[A-Z][\w'-]*(?:\s+(?:of|the|de|la|du|von|van)?\s*[A-Z][\w'-]*)*|\b\d(?:[\d.,:/-]*\d)?%?"
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")


def simple_facts(text: str, limit: int) -> list[str]:
    """Capitalised phrases and numbers (sentence-initial stopwords dropped), then frequent long words."""
    facts: list[str] = []
    for m in _CAPITALISED.finditer(text):
        phrase = m.group(0).strip(" .,:/-")
        words = phrase.split()
        while words and words[0].lower() in _STOP:
            words = words[1:]
        phrase = " ".join(words)
        if phrase and phrase not in facts:
            facts.append(phrase)
    seen = {w.lower() for f in facts for w in f.split()}
    counts = Counter(
        w.lower() for w in _WORD.findall(text) if w.lower() not in _STOP and w.lower() not in seen
    )
    facts += [w for w, _ in counts.most_common()]
    return facts[:limit]


def _yake_facts(text: str, limit: int) -> list[str]:
    try:
        import yake
    except ImportError as err:
        raise ValueError(
            "facts_extractor: yake needs the yake package (pip install yake), or use 'simple'"
        ) from err
    return [kw for kw, _ in yake.KeywordExtractor(top=limit).extract_keywords(text)][:limit]


@lru_cache(maxsize=1)
def _spacy_model():
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError) as err:
        raise ValueError(
            "facts_extractor: spacy needs spacy and its model (pip install spacy && python -m spacy "
            "download en_core_web_sm), or use 'simple'"
        ) from err


def _spacy_facts(text: str, limit: int) -> list[str]:
    return list(dict.fromkeys(e.text for e in _spacy_model()(text).ents))[:limit]


def check_facts_settings(prefix: str, extractor: str, max_facts: int) -> None:
    """The settings a method with a fact side channel takes, checked with the key named."""
    if extractor not in EXTRACTORS:
        raise ValueError(
            f"{prefix}.facts_extractor: {extractor!r} is not one of {', '.join(EXTRACTORS)}"
        )
    if max_facts < 1:
        raise ValueError(f"{prefix}.max_facts: must be >= 1, got {max_facts}")


def extract_facts(text: str, extractor: str = "simple", limit: int = 8) -> list[str]:
    if extractor not in EXTRACTORS:
        raise ValueError(f"facts_extractor: {extractor!r} is not one of {', '.join(EXTRACTORS)}")
    return {"simple": simple_facts, "yake": _yake_facts, "spacy": _spacy_facts}[extractor](
        text, limit
    )


def facts_text(example: Example, extractor: str = "simple", limit: int = 8) -> str:
    """What crosses: 'Facts: a; b; c.' (empty when nothing was found)."""
    facts = extract_facts(example.prompt_A, extractor, limit)
    return f"{PREFIX}{'; '.join(facts)}." if facts else ""


def with_facts(example: Example, text: str) -> Example:
    """The example as B sees it: the facts before its question."""
    return replace(example, prompt_B=f"{text} {example.prompt_B}" if text else example.prompt_B)
