"""Paired comparisons of two methods on the same items: bootstrap interval and McNemar's exact test."""

import math

import numpy as np
import pytest

from cross_model.paired import format_paired, mcnemar_exact_p, paired_difference, paired_rows, verdict


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)


def test_paired_interval_agrees_with_the_normal_approximation_and_sees_what_wilson_cannot():
    rng = np.random.default_rng(1)
    a = (rng.random(200) < 0.30).astype(float)
    b = a.copy()
    flip = rng.choice(np.flatnonzero(a == 0), 16, replace=False)  # B right where A was wrong, 16 times
    b[flip] = 1.0
    res = paired_difference(a, b)
    d = b - a
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert res["diff"] == pytest.approx(0.08)
    assert res["ci95"][0] == pytest.approx(0.08 - half, abs=0.01) and res["ci95"][1] == pytest.approx(0.08 + half, abs=0.01)
    assert (res["a_only"], res["b_only"]) == (0, 16) and res["mcnemar_p"] < 1e-4
    assert verdict(res) == "better" and verdict(paired_difference(b, a)) == "worse"
    same = paired_difference(a, a)
    assert same["ci95"] == (0.0, 0.0) and verdict(same) == "no difference shown"
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1, 0], [1])


def test_paired_rows_compare_each_method_with_the_reference_on_shared_items():
    rows = {"t": {
        "base": [{"example_id": f"e{i}", "score": 0.0, "first_named": float(i % 2)} for i in range(20)],
        "m": [{"example_id": f"e{i}", "score": 1.0 if i < 10 else 0.0, "first_named": float(i % 2)} for i in range(20)],
    }}
    (line,) = paired_rows(rows, "base")
    assert line["n"] == 20 and line["score"]["diff"] == pytest.approx(0.5) and line["score"]["verdict"] == "better"
    assert line["first_named"]["diff"] == 0.0 and line["first_named"]["verdict"] == "no difference shown"
    text = format_paired([line])
    assert "| t | m | 20 | +50.0 [" in text and "better" in text


def test_a_verdict_needs_the_interval_and_mcnemar_to_agree():
    a = np.zeros(100)
    b = a.copy()
    b[:4] = 1.0  # 4 discordant items: a bootstrap interval excludes 0, McNemar's p = 0.125 does not
    res = paired_difference(a, b)
    assert res["ci95"][0] > 0 and res["mcnemar_p"] == pytest.approx(0.125)
    assert verdict(res) == "no difference shown"
