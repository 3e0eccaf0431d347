"""The benchmark harness: our batched methods give the reference's answers (one example at a time,
no cache, full logits), and the table has a number for every method."""

import json

from bench import run


def test_bench_runs_and_ours_equals_the_reference(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        run.main(
            ["--models", "tiny", "--n", "4", "--ref-n", "3", "--batch", "4", "--json", str(out)]
        )
        == 0
    )
    rows = json.loads(out.read_text())["results"]["tiny-llama-64"]
    assert [r["method"] for r in rows] == list(run.METHODS)
    for r in rows:
        assert r["ours_ex_per_s"] > 0 and r["errors"] == 0
        if r["method"] in run.REFERENCES:
            assert r["same_answers"] == "3/3", r
    assert "| kvcomm |" in capsys.readouterr().out
