"""Text for projection training: C4 streamed from the hub (real runs), local files, or an offline
corpus we generate (quickstart and tests). Chosen by `train.corpus`, never silently swapped."""

from __future__ import annotations

import random
import re
from pathlib import Path

from cross_model.data.hub import REVISIONS, hub_errors

_SENT = re.compile(r"(?<=[.!?])\s+")


def c4_sentences(n: int, seed: int, min_words: int = 5, max_words: int = 60) -> list[str]:
    """`n` random sentences from allenai/c4 (en, train), streamed; seeded shuffle buffer."""
    import datasets

    try:
        stream = datasets.load_dataset(
            "allenai/c4", "en", split="train", streaming=True, revision=REVISIONS["allenai/c4"]
        )
        stream = stream.shuffle(seed=seed, buffer_size=10_000)
        rng = random.Random(seed)
        out: list[str] = []
        for doc in stream:
            sentences = [
                s for s in _SENT.split(doc["text"]) if min_words <= len(s.split()) <= max_words
            ]
            if sentences:
                out.append(rng.choice(sentences))
            if len(out) >= n:
                return out
    except hub_errors() as err:
        raise FileNotFoundError(
            f"could not stream allenai/c4 from the hub ({type(err).__name__}: {err}). Without network access set "
            f"train.corpus to 'offline' (generated text) or 'local' with train.corpus_path."
        ) from err
    raise ValueError(
        f"allenai/c4 yielded only {len(out)} usable sentences; lower train.n_sentences"
    )


def local_sentences(path: str, n: int, seed: int) -> list[str]:
    """Sentences from local .txt files (or a single file), seeded sample."""
    p = Path(path).expanduser()
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    sentences = []
    for f in files:
        sentences.extend(s.strip() for s in _SENT.split(f.read_text()) if len(s.split()) >= 3)
    if len(sentences) < n:
        raise ValueError(
            f"train.corpus_path: {p} has {len(sentences)} sentences, fewer than train.n_sentences={n}"
        )
    return random.Random(seed).sample(sentences, n)


_SUBJECTS = (
    "The committee",
    "My neighbour",
    "A young engineer",
    "The old library",
    "Our team",
    "The city council",
    "A local bakery",
    "The research group",
    "Her brother",
    "The river",
    "The museum",
    "A small startup",
)
_VERBS = (
    "announced",
    "discovered",
    "built",
    "rejected",
    "celebrated",
    "studied",
    "described",
    "painted",
    "delivered",
    "questioned",
    "repaired",
    "visited",
)
_OBJECTS = (
    "a new bridge",
    "the annual report",
    "an unusual fossil",
    "the winter festival",
    "a faster algorithm",
    "the abandoned factory",
    "a rare manuscript",
    "the harbour",
    "a community garden",
    "the final draft",
)
_TAILS = (
    "last week.",
    "after a long debate.",
    "despite the rain.",
    "for the first time.",
    "with great care.",
    "before anyone noticed.",
    "in front of a crowd.",
    "without any help.",
    "near the old station.",
    "at dawn.",
)


def offline_sentences(n: int, seed: int) -> list[str]:
    """Generated English sentences: no network, deterministic for a seed, varied enough to fit a map."""
    rng = random.Random(f"offline-corpus-{seed}")
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        for _ in range(n)
    ]


def load_corpus(kind: str, n: int, seed: int, path: str | None = None) -> list[str]:
    if kind == "c4":
        return c4_sentences(n, seed)
    if kind == "local":
        if not path:
            raise ValueError("train.corpus_path: required when train.corpus is 'local'")
        return local_sentences(path, n, seed)
    if kind == "offline":
        return offline_sentences(n, seed)
    raise ValueError(f"train.corpus: {kind!r} is not one of c4, offline, local")
