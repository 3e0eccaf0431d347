"""Answer agreement between methods of a finished run, read from the per-rank result files."""

import json

import pytest

from cross_model import agreement


def write(run, task, method, answers, rank=0):
    d = run / "results" / task / method
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"rank{rank}.jsonl", "a") as f:
        for i, a in answers.items():
            f.write(json.dumps({"example_id": i, "answer": a}) + "\n")


def test_agreement_counts_identical_answers_on_shared_items(tmp_path, capsys):
    write(tmp_path, "t", "ref", {"a": "x", "b": "y", "c": "z", "d": "w"})
    write(tmp_path, "t", "m", {"a": "x", "b": "no"})
    write(tmp_path, "t", "m", {"c": "z"}, rank=1)  # another rank's file counts too
    write(tmp_path, "u", "m", {"a": "x"})  # a task without the reference is left out
    rows = {r["method"]: r for r in agreement.agreement(tmp_path, "ref")}
    assert (rows["m"]["same"], rows["m"]["n"]) == (
        2,
        3,
    )  # item d has no answer from m: not compared
    assert rows["ref"]["same_pct"] == 100 and rows["m"]["ci"][0] < 200 / 3 < rows["m"]["ci"][1]
    assert agreement.main([str(tmp_path), "ref"]) == 0
    assert "| t | m | 67 [" in capsys.readouterr().out


def test_agreement_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results/ folder"):
        agreement.agreement(tmp_path, "ref")
    write(tmp_path, "t", "m", {"a": "x"})
    with pytest.raises(ValueError, match=r"no task has results for 'kvcomm'.*\['m'\]"):
        agreement.agreement(tmp_path, "kvcomm")


def test_agreement_reports_the_paired_accuracy_difference_when_rows_are_scored(tmp_path, capsys):
    d = tmp_path / "results" / "t"
    for method, scores in {"ref": [0, 0, 1, 0], "m": [1, 1, 1, 0]}.items():
        (d / method).mkdir(parents=True)
        (d / method / "rank0.jsonl").write_text(
            "".join(
                json.dumps({"example_id": str(i), "answer": str(s), "score": s, "first_named": s})
                + "\n"
                for i, s in enumerate(scores)
            )
        )
    rows = {r["method"]: r for r in agreement.agreement(tmp_path, "ref")}
    assert rows["m"]["score"]["diff"] == 0.5 and (
        rows["m"]["score"]["a_only"],
        rows["m"]["score"]["b_only"],
    ) == (0, 2)
    assert agreement.main([str(tmp_path), "ref"]) == 0
    assert "+50.0 [" in capsys.readouterr().out
