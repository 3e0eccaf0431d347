"""Every table in README.md and docs/ equals what its results file renders (the command that writes
the file is named beside each table: make demo, make pareto, make bench)."""

import json

import pytest

from cross_model import doc_tables


def test_every_published_table_matches_its_results_file():
    assert doc_tables.stale_blocks() == [], (
        "run the command named beside the table, or `make docs-tables`"
    )


def test_the_readme_results_and_performance_tables_are_generated_not_typed():
    readme = (doc_tables.ROOT / "README.md").read_text()
    results = (doc_tables.ROOT / "docs" / "RESULTS.md").read_text()
    perf = (doc_tables.ROOT / "docs" / "PERFORMANCE.md").read_text()
    assert readme.count("<!-- table: ") >= 2 and results.count("<!-- table: ") >= 20
    assert perf.count("<!-- table: bench ") >= 2


def test_the_readme_is_a_front_door():
    readme = (doc_tables.ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for page in (
        "ARCHITECTURE",
        "RESULTS",
        "USING_METHODS",
        "METHODS",
        "RUNNING",
        "REPRODUCING",
        "PERFORMANCE",
    ):
        assert f"(docs/{page}.md)" in readme and (doc_tables.ROOT / "docs" / f"{page}.md").exists()


def test_a_changed_number_is_caught_and_rewritten(tmp_path, monkeypatch):
    data = {
        "summary": [
            {
                "task": "t",
                "method": "m",
                "n": 2,
                "accuracy": 0.5,
                "ci95_low": 0.1,
                "ci95_high": 0.9,
                "first_named": 0.5,
                "first_named_ci95_low": 0.1,
                "first_named_ci95_high": 0.9,
                "token_f1": 0.5,
                "payload_bytes": 10,
                "sender_tokens": 1,
                "receiver_tokens": 1,
                "seconds_per_example": 0.1,
                "errors": 0,
            }
        ]
    }
    (tmp_path / "r.json").write_text(json.dumps(data))
    doc = tmp_path / "README.md"
    doc.write_text("text\n<!-- table: summary r.json -->\n| stale |\n<!-- /table -->\nmore\n")
    monkeypatch.setattr(doc_tables, "ROOT", tmp_path)
    monkeypatch.setattr(doc_tables, "DOCUMENTS", ("README.md",))
    assert doc_tables.stale_blocks() == ["README.md: table 'summary r.json'"]
    assert doc_tables.main(["--check"]) == 1
    assert doc_tables.main(["--write"]) == 0 and doc_tables.stale_blocks() == []
    assert "| t | m | 2 | 50.0 [10.0, 90.0]" in doc.read_text() and doc.read_text().endswith(
        "more\n"
    )
    with pytest.raises(ValueError, match="no renderer 'nope'"):
        doc_tables.render("nope r.json")


def test_a_table_whose_results_lack_its_key_is_stale_not_empty(tmp_path, monkeypatch):
    from cross_model import doc_tables

    monkeypatch.setattr(doc_tables, "ROOT", tmp_path)
    (tmp_path / "r.json").write_text(json.dumps({"summary": [], "paired": []}))
    for spec in ("controls r.json", "timings r.json", "paired r.json", "c2c r.json"):
        with pytest.raises(doc_tables.MissingResults):
            doc_tables.render(spec)


def test_publishing_a_run_from_a_dirty_tree_is_refused(tmp_path, capsys):
    from cross_model import doc_tables

    run = tmp_path / "run"
    run.mkdir()
    clean = {
        "commit": "abc",
        "dirty": True,
        "changes": None,
    }  # dirty docs (another target's output), clean code
    data = {
        "summary": [],
        "examples": {},
        "starts": [{"git": clean}, {"git": {**clean, "changes": "f00d"}}],
    }
    (run / "results.json").write_text(json.dumps(data))
    assert doc_tables.main(["--publish", str(run), str(tmp_path / "docs")]) == 2
    assert "start(s) 1 ran with uncommitted changes to the code" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists()
    data["starts"][1]["git"]["changes"] = None
    (run / "results.json").write_text(json.dumps(data))
    assert doc_tables.main(["--publish", str(run), str(tmp_path / "docs")]) == 0
    assert (
        json.loads((tmp_path / "docs" / "results.json").read_text())["starts"][0]["git"]["commit"]
        == "abc"
    )


def test_results_prose_states_no_number_that_a_table_should_render():
    """Intervals, p-values and point differences appear only inside rendered blocks of the pages that
    publish results: a number in prose is not checked against its results file."""
    import re

    typed = re.compile(
        r"\[[+-]?\d+(\.\d+)?, [+-]?\d|\bp ?= ?0\.\d|[+-]\d+(\.\d+)? points|\d+(\.\d+)?x fewer"
    )
    for name in ("README.md", "docs/RESULTS.md"):
        text = doc_tables.BLOCK.sub("", (doc_tables.ROOT / name).read_text())
        found = [line for line in text.splitlines() if typed.search(line)]
        assert not found, f"{name}: numbers typed into prose: {found}"


def test_a_pair_of_two_non_reference_methods_is_published_and_rendered_in_its_own_block(
    tmp_path, monkeypatch
):
    """`--pair A:B` adds A against B on the same items (B need not be the report's reference); the
    report's own paired block still renders only its reference's rows."""
    from cross_model import doc_tables
    from cross_model.paired import compare

    def rows(correct):
        return [
            {"example_id": f"e{i}", "score": 0.0, "first_named": float(c)}
            for i, c in enumerate(correct)
        ]

    examples = {
        "t": {"base": rows([0] * 10), "a": rows([1] * 8 + [0] * 2), "b": rows([1] * 3 + [0] * 7)}
    }
    run = tmp_path / "run"
    run.mkdir()
    data = {
        "summary": [{"task": "t", "method": m, "first_named": 0.0} for m in examples["t"]],
        "examples": examples,
        "starts": [{"git": {"commit": "abc", "changes": None}}],
        "paired": [
            {
                "task": "t",
                "method": m,
                "reference": "base",
                "n": 10,
                "first_named": compare(
                    {r["example_id"]: r for r in examples["t"]["base"]},
                    {r["example_id"]: r for r in examples["t"][m]},
                    "first_named",
                ).to_dict(),
            }
            for m in ("a", "b")
        ],
    }
    (run / "results.json").write_text(json.dumps(data))
    assert doc_tables.main(["--publish", str(run), str(tmp_path / "docs"), "--pair", "a:b"]) == 0
    published = json.loads((tmp_path / "docs" / "results.json").read_text())
    extra = [p for p in published["paired"] if p["reference"] == "b"]
    assert [(p["method"], p["first_named"]["diff"]) for p in extra] == [("a", 0.5)]
    assert extra[0]["first_named"]["b_only"] == 5 and extra[0]["first_named"]["a_only"] == 0
    monkeypatch.setattr(doc_tables, "ROOT", tmp_path)
    own = doc_tables.render("paired docs/results.json")
    assert "base (points)" in own and "| a |" in own and "| b |" in own
    assert "| a | 10 | " in doc_tables.render(
        "paired docs/results.json b"
    ) and "b (points)" in doc_tables.render("paired docs/results.json b")
    assert doc_tables.main(["--publish", str(run), str(tmp_path / "d2"), "--pair", "a:nope"]) == 2
    # The sweep's sentences are about the report's reference only, with or without the added pair.
    assert doc_tables.render_sweep(published) == doc_tables.render_sweep(
        {**published, "paired": data["paired"]}
    )
    assert "2 instances" in doc_tables.render_sweep(published)
