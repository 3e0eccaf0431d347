"""Task generators and loaders: determinism, disjoint splits, and parsing of the hubs' record formats."""

import pytest

from cross_model.data import available_tasks, load_task_examples
from cross_model.data.corpus import load_corpus
from tests.conftest import ROOT

FIX = ROOT / "tests" / "fixtures"


@pytest.mark.parametrize("task", ["countries", "tipsheets"])
def test_generators_are_deterministic_and_splits_disjoint(task):
    a_test, a_cal = load_task_examples(task, 50, 10, seed=7)
    b_test, b_cal = load_task_examples(task, 50, 10, seed=7)
    assert a_test == b_test and a_cal == b_cal
    c_test, _ = load_task_examples(task, 50, 10, seed=8)
    assert [e.prompt_A for e in c_test] != [e.prompt_A for e in a_test]
    assert not {e.example_id for e in a_test} & {e.example_id for e in a_cal}
    # calibration content never repeats a test item either
    assert not {(e.prompt_A, e.prompt_B) for e in a_test} & {(e.prompt_A, e.prompt_B) for e in a_cal}
    assert len({e.example_id for e in a_test}) == 50


def test_default_sizes_and_shapes():
    countries, _ = load_task_examples("countries")
    tips, _ = load_task_examples("tipsheets")
    assert len(countries) == 200 and len(tips) == 500
    e = countries[0]
    person = e.meta["person"]
    assert e.prompt_A == f"{person} is at the {e.meta['landmark']}."
    assert e.prompt_B == f"Which country is {person} located in?"
    t = tips[0]
    assert t.answers[0] in t.prompt_A and all(c in t.prompt_B for c in t.meta["candidates"])


def test_countries_test_items_do_not_depend_on_calibration_size():
    a, _ = load_task_examples("countries", 20, 0, seed=1)
    b, _ = load_task_examples("countries", 20, 30, seed=1)
    assert a == b


def test_too_many_items_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds"):
        load_task_examples("countries", 5000, 10)


def test_max_new_tokens_override():
    test, _ = load_task_examples("countries", 3, 0, max_new_tokens=16)
    assert {e.max_new_tokens for e in test} == {16}


EXPECTED = {
    "hotpotqa": ("The Eiffel Tower is in France. Its capital is Paris.", "Which city is the capital of the country where the Eiffel Tower is?", ("Paris",)),
    "musique": ("Matterhorn: The Matterhorn lies in Switzerland.", "In which country is the Matterhorn?", ("Switzerland",)),
    "qasper": ("The encoder has 12 layers.", "How many layers?", ("12",)),
    "squad": ("The game was played in Santa Clara.", "Where was it played?", ("Santa Clara",)),
}


@pytest.mark.parametrize("task,file", [("hotpotqa", "hotpotqa"), ("musique", "musique"), ("qasper", "qasper"),
                                       ("multifieldqa_en", "qasper"), ("twowikimqa", "qasper"), ("squad", "squad"),
                                       ("gsm8k", "gsm8k")])
def test_hub_loaders_parse_their_record_format(task, file):
    test, calib = load_task_examples(task, 2, 1, path=str(FIX / f"{file}.jsonl"))
    assert len(test) == 2 and len(calib) == 1
    everything = test + calib
    assert not {e.example_id for e in test} & {e.example_id for e in calib}
    by_b = {e.prompt_B: e for e in everything}
    if file in EXPECTED:
        prompt_a, prompt_b, answers = EXPECTED[file]
        assert by_b[prompt_b].prompt_A == prompt_a
        assert by_b[prompt_b].answers == answers
    if task == "gsm8k":
        golds = sorted(e.answers[0] for e in everything)
        assert golds == ["10", "3,600", "72"]
        assert all(e.prompt_A == e.prompt_B for e in everything) and everything[0].kind == "math"
    if task == "musique":
        e = by_b["What river flows through Cairo?"]
        assert e.answers == ("Nile", "the Nile") and "Unrelated" not in e.prompt_A
    # the papers' subset: shuffled with seed 42 -> the same order every time
    again, _ = load_task_examples(task, 2, 1, path=str(FIX / f"{file}.jsonl"))
    assert again == test


def test_hotpotqa_uses_only_supporting_sentences():
    test, calib = load_task_examples("hotpotqa", 3, 0, path=str(FIX / "hotpotqa.jsonl"))
    for e in test:
        assert "Noise" not in e.prompt_A and "Other." not in e.prompt_A and "Zero." not in e.prompt_A


def test_hub_without_network_says_how_to_use_a_local_copy():
    with pytest.raises(FileNotFoundError, match="set the task's `path`"):
        load_task_examples("hotpotqa", 2, 0)


def test_jsonl_and_tmath():
    test, calib = load_task_examples("jsonl", 10, 5, path=str(FIX / "custom.jsonl"))
    assert [e.example_id for e in test] == ["jsonl-a", "jsonl-b"] and [e.example_id for e in calib] == ["jsonl-c"]
    assert test[1].answers == ("under the mat",) and test[1].max_new_tokens == 8
    t, _ = load_task_examples("tmath", 2, 0, path=str(FIX / "tmath.jsonl"))
    assert t[0].metric == "rouge_l_recall" and "What is 4 * 2?" in t[0].prompt_A and t[0].prompt_B == "What is 3 + 4 * 2?"


def test_jsonl_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_A": "x", "answers": ["y"]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: record lacks prompt_B"):
        load_task_examples("jsonl", 1, 0, path=str(bad))
    with pytest.raises(ValueError, match="set `path`"):
        load_task_examples("jsonl", 1, 0)


def test_registry_lists_the_papers_tasks():
    assert {"countries", "tipsheets", "hotpotqa", "musique", "qasper", "multifieldqa_en", "twowikimqa",
            "squad", "gsm8k", "tmath", "jsonl"} <= set(available_tasks())
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task_examples("nope")


def test_corpus_offline_is_deterministic_and_c4_fails_clearly(tmp_path):
    a = load_corpus("offline", 100, seed=3)
    assert a == load_corpus("offline", 100, seed=3) and a != load_corpus("offline", 100, seed=4)
    assert len(set(a)) > 80
    (tmp_path / "t.txt").write_text("One two three four. Five six seven eight. Nine ten eleven twelve.")
    assert sorted(load_corpus("local", 3, 0, str(tmp_path))) == sorted(
        ["One two three four.", "Five six seven eight.", "Nine ten eleven twelve."])
    with pytest.raises(FileNotFoundError, match="train.corpus"):
        load_corpus("c4", 10, 0)
