"""One config at several seeds: the mean and spread over seeds of every method's accuracy and of
LatentWire's control gaps, from results files; runs that differ in more than their seed are refused."""

from __future__ import annotations

import copy
import json
import statistics

import pytest

from cross_model.doc_tables import render
from cross_model.seed_spread import aggregate, format_spread, main


def _run(
    seed: int, accuracy: float, first: float, gap: float, crossed: bool, commit: str = "abc"
) -> dict:
    return {
        "name": f"ladder_s{seed}",
        "config": {"seed": seed},
        "starts": [{"git": {"commit": commit, "changes": None}}],
        "summary": [
            {
                "task": "secret_word",
                "method": "latentwire",
                "n": 100,
                "accuracy": accuracy,
                "first_named": first,
            },
            {
                "task": "secret_word",
                "method": "baseline",
                "n": 100,
                "accuracy": 0.0,
                "first_named": 0.0,
            },
        ],
        "latentwire_controls": [
            {
                "task": "secret_word",
                "method": "latentwire",
                "control": "latentwire_shuffled",
                "nll_gap": {"diff": gap, "ci95": [gap - 0.05, gap + 0.05]},
                "information_crossed": crossed,
            }
        ],
    }


def test_the_interlinguas_own_seed_names_a_run_where_it_is_set():
    from cross_model.seed_spread import run_seed

    assert run_seed({"config": {"seed": 0, "interlingua": {"seed": 2}}}) == 2
    assert run_seed({"config": {"seed": 5, "interlingua": {"seed": None}}}) == 5


def test_the_spread_is_the_mean_and_sample_sd_over_seeds():
    runs = [
        _run(0, 0.02, 0.04, 0.11, True),
        _run(1, 0.05, 0.06, 0.02, False),
        _run(2, 0.08, 0.05, 0.09, True),
    ]
    got = aggregate(runs)
    lw = next(r for r in got["rows"] if r["method"] == "latentwire")
    assert lw["accuracy"]["mean"] == pytest.approx(0.05) and lw["accuracy"]["sd"] == pytest.approx(
        0.03
    )
    assert (lw["accuracy"]["min"], lw["accuracy"]["max"]) == (0.02, 0.08)
    assert lw["first_named"]["sd"] == pytest.approx(statistics.stdev([0.04, 0.06, 0.05]))
    (c,) = got["controls"]
    assert c["nll_gap"]["mean"] == pytest.approx(0.0733333, abs=1e-6) and c["seeds_crossed"] == 2
    text = format_spread(got)
    assert "| secret_word | latentwire | 100 | 5.0 (3.0) [2, 8] |" in text and "| 2 of 3 |" in text


def test_runs_that_differ_in_more_than_their_seed_or_ran_uncommitted_code_are_refused(tmp_path):
    a, b = _run(0, 0.1, 0.1, 0.1, True), _run(1, 0.1, 0.1, 0.1, True)
    with pytest.raises(ValueError, match="seeds repeat"):
        aggregate([a, copy.deepcopy(a)])
    other = copy.deepcopy(b)
    other["summary"][0]["method"] = "latentwire_8bit"
    with pytest.raises(ValueError, match="different tasks or methods"):
        aggregate([a, other])
    fewer = copy.deepcopy(b)
    fewer["summary"][0]["n"] = 50
    with pytest.raises(ValueError, match="different numbers of items"):
        aggregate([a, fewer])
    with pytest.raises(ValueError, match="two or more seeds"):
        aggregate([a])
    dirty = copy.deepcopy(b)
    dirty["starts"][0]["git"]["changes"] = "deadbeef"
    for i, run in enumerate((a, dirty)):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(json.dumps(run))
    assert main([str(tmp_path / "out"), str(tmp_path / "r0"), str(tmp_path / "r1")]) == 2
    assert not (tmp_path / "out" / "seeds.json").exists()
    (tmp_path / "r1" / "results.json").write_text(json.dumps(b))
    assert main([str(tmp_path / "out"), str(tmp_path / "r0"), str(tmp_path / "r1")]) == 0
    assert json.loads((tmp_path / "out" / "seeds.json").read_text())["seeds"] == [0, 1]


def test_the_seeds_table_renders_from_its_file(tmp_path, monkeypatch):
    import cross_model.doc_tables as dt

    (tmp_path / "seeds.json").write_text(
        json.dumps(aggregate([_run(0, 0.02, 0.04, 0.1, True), _run(1, 0.04, 0.06, 0.2, True)]))
    )
    monkeypatch.setattr(dt, "ROOT", tmp_path)
    assert render("seeds seeds.json").startswith(
        "| task | method | items | accuracy % over 2 seeds"
    )
