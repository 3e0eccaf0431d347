"""Paired comparisons of two methods on the same items: bootstrap interval and McNemar's exact test."""

import math

import numpy as np
import pytest

from cross_model.paired import (
    format_paired,
    mcnemar_exact_p,
    paired_difference,
    paired_rows,
    verdict,
)


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)


def test_paired_interval_agrees_with_the_normal_approximation_and_sees_what_wilson_cannot():
    rng = np.random.default_rng(1)
    a = (rng.random(200) < 0.30).astype(float)
    b = a.copy()
    flip = rng.choice(
        np.flatnonzero(a == 0), 16, replace=False
    )  # B right where A was wrong, 16 times
    b[flip] = 1.0
    res = paired_difference(a, b)
    d = b - a
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert res["diff"] == pytest.approx(0.08)
    assert res["ci95"][0] == pytest.approx(0.08 - half, abs=0.01) and res["ci95"][
        1
    ] == pytest.approx(0.08 + half, abs=0.01)
    assert (res["a_only"], res["b_only"]) == (0, 16) and res["mcnemar_p"] < 1e-4
    assert verdict(res) == "better" and verdict(paired_difference(b, a)) == "worse"
    same = paired_difference(a, a)
    assert same["ci95"] == (0.0, 0.0) and verdict(same) == "no difference shown"
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1, 0], [1])


def test_paired_rows_compare_each_method_with_the_reference_on_shared_items():
    rows = {
        "t": {
            "base": [
                {"example_id": f"e{i}", "score": 0.0, "first_named": float(i % 2)}
                for i in range(20)
            ],
            "m": [
                {
                    "example_id": f"e{i}",
                    "score": 1.0 if i < 10 else 0.0,
                    "first_named": float(i % 2),
                }
                for i in range(20)
            ],
        }
    }
    (line,) = paired_rows(rows, "base")
    assert (
        line["n"] == 20
        and line["score"]["diff"] == pytest.approx(0.5)
        and line["score"]["verdict"] == "better"
    )
    assert (
        line["first_named"]["diff"] == 0.0
        and line["first_named"]["verdict"] == "no difference shown"
    )
    text = format_paired([line])
    assert "| t | m | 20 | +50.0 [" in text and "better" in text


def test_a_verdict_needs_the_interval_and_mcnemar_to_agree():
    a = np.zeros(100)
    b = a.copy()
    b[:4] = 1.0  # 4 discordant items: a bootstrap interval excludes 0, McNemar's p = 0.125 does not
    res = paired_difference(a, b)
    assert res["ci95"][0] > 0 and res["mcnemar_p"] == pytest.approx(0.125)
    assert verdict(res) == "no difference shown"


def test_one_comparison_whatever_order_the_rows_arrive_in():
    """Rank-file order, test order or any other: the same items give the same interval (pairing is by
    id, in sorted order, before the seeded bootstrap)."""
    import random

    from cross_model.paired import PairedResult, compare

    rng = random.Random(3)
    ref = [{"example_id": f"t-{i:03d}", "score": float(rng.random() < 0.5)} for i in range(60)]
    got = [{"example_id": f"t-{i:03d}", "score": float(rng.random() < 0.6)} for i in range(60)]
    first = compare(ref, got)
    assert isinstance(first, PairedResult) and first.ids == tuple(
        sorted(r["example_id"] for r in ref)
    )
    for _ in range(5):
        a, b = ref[:], got[:]
        rng.shuffle(a)
        rng.shuffle(b)
        again = compare(a, b)
        assert again == first and again.ci95 == first.ci95
    with pytest.raises(Exception):
        first.diff = 0.0  # immutable
    # Order used to matter: the same scores in two orders gave two intervals.
    x, y = [r["score"] for r in ref], [r["score"] for r in got]
    intervals = set()
    for _ in range(10):
        perm = list(range(60))
        rng.shuffle(perm)
        intervals.add(paired_difference([x[i] for i in perm], [y[i] for i in perm])["ci95"])
    assert len(intervals) > 1


def test_holm_adjusts_a_tables_p_values_step_down():
    from cross_model.paired import holm

    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == [] and holm([0.9, 0.9]) == [1.0, 1.0]
