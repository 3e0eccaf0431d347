"""Q-KVComm's fact side channel: what the extractor finds, what B reads (the facts, never the
context) and the bytes counted for it, alone (`facts_only`) and beside the quantized KV."""

import pytest

from cross_model.data import load_task_examples
from cross_model.facts import extract_facts, facts_text, simple_facts
from cross_model.methods.base import ModelPair
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model
from cross_model.prompting import recording_prompts

QK = {"selection": "range", "layer_from": 1, "layer_to": 2, "bits": 4}


@pytest.fixture(scope="module")
def examples():
    return (
        load_task_examples("countries", 2, 0, seed=3, max_new_tokens=3)[0]
        + load_task_examples("tipsheets", 1, 0, seed=3, max_new_tokens=3)[0]
    )


def _make(method, **params):
    lm = load_model("tiny-llama-64")
    cls, p = resolve_method(method, params)
    return cls(p, ModelPair(lm, lm))


def test_simple_facts_find_names_places_numbers_then_frequent_words():
    assert simple_facts("Uma is at the Eiffel Tower.", 8) == ["Uma", "Eiffel Tower"]
    text = "The Bank of England raised rates to 5.25% in 2023. Rates matter; rates rose."
    # Capitalised phrases ("The" dropped) and numbers in order, then the other words by frequency.
    assert simple_facts(text, 8) == [
        "Bank of England",
        "5.25%",
        "2023",
        "Rates",
        "raised",
        "matter",
        "rose",
    ]
    assert simple_facts(text, 2) == ["Bank of England", "5.25%"]


def test_optional_extractors_say_how_to_install_them_or_extract_from_the_text():
    text = "Uma is at the Eiffel Tower in Paris."
    for name in ("yake", "spacy"):
        try:
            __import__(name)
        except ImportError:
            with pytest.raises(ValueError, match=f"{name}.*pip install"):
                extract_facts(text, name)
            continue
        try:
            facts = extract_facts(text, name)
        except ValueError as err:  # spacy without its English model: the error says how to get it
            assert "pip install" in str(err) or "download" in str(err), err
            continue
        assert facts and all(f in text for f in facts), (
            facts
        )  # phrases of the text, nothing invented
    with pytest.raises(ValueError, match="not one of simple, yake, spacy"):
        extract_facts("x", "magic")


def test_facts_only_sends_the_facts_text_and_b_never_sees_the_context(examples):
    with recording_prompts() as prompts:
        preds = _make("facts_only").run_batch(examples)
    texts = [facts_text(e) for e in examples]
    assert all(t.startswith("Facts: ") for t in texts)
    assert [p.payload_bytes for p in preds] == [len(t.encode()) for t in texts]
    for e, t, prompt in zip(examples, texts, [p["text"] for p in prompts]):
        assert t in prompt and e.prompt_B in prompt and e.prompt_A not in prompt


def test_qkvcomm_with_facts_adds_their_bytes_and_puts_them_before_bs_question(examples):
    plain = _make("qkvcomm", **QK).run_batch(examples)
    with recording_prompts() as prompts:
        both = _make("qkvcomm", **QK, facts=True).run_batch(examples)
    texts = [facts_text(e) for e in examples]
    assert [p.payload_bytes for p in both] == [
        q.payload_bytes + len(t.encode()) for q, t in zip(plain, texts)
    ]
    assert [p.extra["facts"] for p in both] == texts
    b_prompts = [p["text"] for p in prompts if "Question: Facts: " in p["text"]]
    assert len(b_prompts) == len(examples) and all(
        e.prompt_A not in p for e, p in zip(examples, b_prompts)
    )
