import pytest

from cross_model.metrics import (
    exact_match,
    extract_number,
    f1_match,
    first_named_match,
    lemma_set_f1,
    normalize_answer,
    numeric_match,
    rouge_l_recall,
    score_prediction,
    token_f1,
    wilson_interval,
)


def test_normalisation():
    assert normalize_answer("The  Eiffel-Tower, in  PARIS!") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"


def test_token_f1_hand_checked():
    assert token_f1("The capital is Paris", "Paris") == pytest.approx(0.5)  # P=1/3, R=1
    assert token_f1("Paris", "Paris") == 1.0
    assert token_f1("New York City", "York New") == pytest.approx(0.8)  # P=2/3, R=1
    assert token_f1("", "Paris") == 0.0 and token_f1("", "") == 1.0


def test_f1_match_is_strictly_above_half():
    assert f1_match("The capital is Paris", ["Paris"]) == 0.0  # F1 exactly 0.5 is not a match
    assert f1_match("Paris, France", ["Paris"]) == 1.0  # 2/3
    assert f1_match("It is Paris", ["London", "Paris"]) == 0.0  # {it, be, paris}: F1 = 0.5
    assert f1_match("in Paris", ["London", "Paris"]) == 1.0  # max over gold answers: 2/3
    assert f1_match("", ["Paris"]) == 0.0


def test_f1_match_lemmatises_and_uses_sets():
    assert lemma_set_f1("companies", "company") == 1.0
    assert lemma_set_f1("Paris Paris Paris", "Paris") == 1.0  # sets, not multisets
    assert token_f1("Paris Paris Paris", "Paris") == pytest.approx(0.5)


def test_exact_and_numeric_match():
    assert exact_match("The Broncos.", ["Broncos"]) == 1.0
    assert exact_match("Denver Broncos", ["Broncos"]) == 0.0
    assert extract_number("so the answer is 3,600 pens") == 3600.0
    assert extract_number("work... #### 72") == 72.0
    assert numeric_match("She earned $10.", ["10"]) == 1.0
    assert numeric_match("about 11", ["10"]) == 0.0
    assert numeric_match("no number", ["10"]) == 0.0


def test_rouge_l_recall():
    assert rouge_l_recall("x equals 3", ["x = 3"]) == pytest.approx(
        1.0
    )  # "x 3" after normalisation
    assert rouge_l_recall(
        "first 4 times 2 then add 3", ["First 4 * 2 = 8, then 3 + 8 = 11."]
    ) == pytest.approx(5 / 8)  # gold: first 4 2 8 then 3 8 11; LCS: first 4 2 then 3
    assert rouge_l_recall("", ["a b"]) == 0.0


def test_first_named_match():
    cands = ["Zentech", "Alcorp", "Briolabs"]
    assert first_named_match("Alcorp. Zentech was bad.", ["Alcorp"], cands) == 1.0
    assert first_named_match("Zentech, Alcorp or Briolabs", ["Alcorp"], cands) == 0.0
    assert first_named_match("I am not sure.", ["Alcorp"], cands) == 0.0
    assert first_named_match("Sofia is in China. Not Japan.", ["China"], ["Japan", "China"]) == 1.0


def test_score_prediction_reports_all_three():
    s = score_prediction("f1_match", "The capital is Paris", ["Paris"])
    assert s == {"score": 0.0, "token_f1": pytest.approx(0.5), "first_named": 1.0}
    with pytest.raises(ValueError, match="unknown metric"):
        score_prediction("bleu", "a", ["a"])


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_edit_similarity_reads_the_first_code_line_as_repobench_does():
    from cross_model.metrics import edit_similarity, first_code_line

    completion = '\n# compute it\n"""\ndocstring\n"""\n```python\n    return helper(y)\nprint(1)'
    assert first_code_line(completion) == "    return helper(y)"
    assert first_code_line("# only\n# comments") == "# only"
    assert edit_similarity(completion, ["    return helper(y)"]) == 1.0
    # 2 x LCS / (len + len): "abcd" vs "abxd" share "abd" -> 6 / 8, rounded to whole percent.
    assert edit_similarity("abcd", ["abxd"]) == 0.75
    assert edit_similarity("kitten", ["sitting"]) == round(100 * 2 * 4 / 13) / 100
    assert edit_similarity("", ["x"]) == 0.0
