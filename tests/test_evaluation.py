"""Sharded, resumable evaluation and its reports: a real two-rank torchrun, a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

VOLATILE = (
    "seconds",
    "rank",
    "start",
)  # wall time, which rank and which start ran it may differ; nothing else may


def _run(
    tmp_path: Path, name: str, nproc: int = 1, extra=(), delay: float = 0.0, wait: bool = True
):
    args = [
        "--config",
        "configs/tiny.yaml",
        "--output_dir",
        str(tmp_path),
        "--name",
        name,
        "--eval.batch_size",
        "2",
        *extra,
    ]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "run_experiments.py",
            *args,
        ]
    else:
        cmd = [sys.executable, "run_experiments.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CROSS_MODEL_TEST_STEP_DELAY": str(delay)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _examples(run_dir: Path) -> dict:
    """task -> method -> [rows in test order], from results.json, without the volatile fields."""
    data = json.loads((run_dir / "results.json").read_text())
    return {
        t: {
            m: [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]
            for m, rows in ms.items()
        }
        for t, ms in data["examples"].items()
    }


def _wait_for_files(proc, results: Path, pattern: str, n: int, timeout: float = 300) -> None:
    """Until `n` result files match `pattern` (the run is part-way), failing if the run ends or stalls."""
    deadline = time.time() + timeout
    while len(list(results.glob(pattern))) < n:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "evaluation did not progress"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    _run(tmp, "one")
    return tmp, _examples(tmp / "one")


def test_two_ranks_give_the_same_results_as_one_example_by_example(unsharded):
    tmp, one = unsharded
    _run(tmp, "two", nproc=2)
    two = _examples(tmp / "two")
    assert two == one
    # Both ranks really worked: each wrote the items i % 2 == rank.
    rank_files = sorted((tmp / "two" / "results" / "countries" / "kvcomm").glob("rank*.jsonl"))
    assert [p.name for p in rank_files] == ["rank0.jsonl", "rank1.jsonl"]
    for r, path in enumerate(rank_files):
        assert {json.loads(line)["index"] % 2 for line in path.read_text().splitlines()} == {r}


def test_kill_9_during_evaluation_then_restart_loses_nothing_and_duplicates_nothing(unsharded):
    tmp, one = unsharded
    proc = _run(tmp, "killed", delay=0.3, wait=False)
    results = tmp / "killed" / "results"
    # Kill once a few methods are done and one is part-way (at least one batch written).
    _wait_for_files(proc, results, "countries/*/rank0.jsonl", 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp / "killed" / "results.json").exists()
    # As if the kill had hit while a line was being written:
    partial = sorted(results.glob("countries/*/rank0.jsonl"), key=os.path.getmtime)[-1]
    with open(partial, "a") as f:
        f.write('{"example_id": "countries-')
    out = _run(tmp, "killed")
    assert "partial line" in out and "already done; resuming" in out
    assert _examples(tmp / "killed") == one
    for path in results.glob("*/*/rank0.jsonl"):
        ids = [json.loads(line)["example_id"] for line in path.read_text().splitlines()]
        assert len(ids) == len(set(ids)), f"duplicate ids in {path}"


def test_every_example_is_reported_once_per_method_including_failures(unsharded):
    tmp, one = unsharded
    data = json.loads((tmp / "one" / "results.json").read_text())
    n = {"countries": 6, "tipsheets": 4}
    for task, methods in data["examples"].items():
        assert set(methods) == set(data["config"]["methods"])
        for method, rows in methods.items():
            assert [r["index"] for r in rows] == list(range(n[task]))
    assert {(s["task"], s["method"]) for s in data["summary"]} == {
        (t, m) for t in n for m in data["config"]["methods"]
    }
    assert data["versions"]["torch"] and "commit" in data["git"]


def test_failed_examples_are_scored_wrong_not_dropped(tmp_path):
    """A method that fails on some items: every item is still in the report, the failures as errors."""
    from cross_model.methods.baseline import Baseline
    from cross_model.methods.registry import _METHODS, register

    @register("fails_on_odd")
    class FailsOnOdd(Baseline):
        def _run_batch(self, examples):
            if any(int(e.example_id.rsplit("-", 1)[-1]) % 2 for e in examples):
                raise RuntimeError("this item is odd")
            return super()._run_batch(examples)

    import run_experiments

    try:
        rc = run_experiments.main(
            [
                "--config",
                "configs/tiny.yaml",
                "--output_dir",
                str(tmp_path),
                "--stages",
                "[evaluate,report]",
                "--methods",
                '{"baseline": {}, "flaky": {"method": "fails_on_odd"}}',
                "--eval.batch_size",
                "3",
            ]
        )
    finally:
        _METHODS.pop("fails_on_odd")
    assert rc == 0
    data = json.loads((tmp_path / "tiny" / "results.json").read_text())
    for task, n in (("countries", 6), ("tipsheets", 4)):
        rows = data["examples"][task]["flaky"]
        assert len(rows) == n and len({r["example_id"] for r in rows}) == n
        failed = [r for r in rows if r["error"]]
        assert failed and all(r["score"] == 0 and "this item is odd" in r["error"] for r in failed)
        assert all(int(r["example_id"].rsplit("-", 1)[-1]) % 2 for r in failed)
        # The batch with one odd item was re-run one by one: its even items were answered.
        assert [r["answer"] for r in rows if not r["error"]] == [
            r["answer"]
            for r in data["examples"][task]["baseline"]
            if not int(r["example_id"].rsplit("-", 1)[-1]) % 2
        ]
        line = next(s for s in data["summary"] if s["task"] == task and s["method"] == "flaky")
        assert line["n"] == n and line["errors"] == len(failed)


def test_pareto_front_keeps_only_undominated_points(tmp_path):
    from cross_model.report_files import pareto_front, plot_accuracy_vs_bytes

    points = [
        (1, 10.0, "baseline"),
        (30, 40.0, "skyline"),
        (900_000, 35.0, "kvcomm"),
        (200_000, 45.0, "qkvcomm-4"),
        (50_000, 40.0, "qkvcomm-2"),
        (30, 20.0, "nld"),
    ]
    assert [p[2] for p in pareto_front(points)] == ["baseline", "skyline", "qkvcomm-4"]
    summary = [
        {
            "task": "t",
            "method": m,
            "payload_bytes": x,
            "accuracy": y / 100,
            "ci95_low": 0.0,
            "ci95_high": 1.0,
            "first_named": 0.0,
            "first_named_ci95_low": 0.0,
            "first_named_ci95_high": 0.0,
        }
        for x, y, m in points
    ]
    plot_accuracy_vs_bytes(tmp_path / "p.png", summary)
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_an_evaluation_preempted_on_two_ranks_resumes_on_one_with_the_same_results(unsharded):
    """README: a run resumes at another world size. Two ranks are stopped (SIGTERM, as a preemption)
    part-way; one rank finishes; every item equals the uninterrupted one-rank run."""
    tmp, one = unsharded
    proc = _run(tmp, "resized", nproc=2, delay=0.3, wait=False)
    results = tmp / "resized" / "results"
    _wait_for_files(proc, results, "countries/*/rank1.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert not (tmp / "resized" / "results.json").exists(), out[-3000:]
    out = _run(tmp, "resized")
    assert "already done; resuming" in out
    assert _examples(tmp / "resized") == one
    ranks = {
        json.loads(line)["rank"]
        for p in results.glob("countries/*/rank*.jsonl")
        for line in p.read_text().splitlines()
    }
    assert ranks == {0, 1}, "rows of both the two-rank and the one-rank start are in the report"


def test_the_report_is_rebuilt_from_the_run_directory_alone(unsharded, tmp_path, capsys):
    import shutil

    from cross_model import report

    src, _ = unsharded
    run = tmp_path / "copied"
    shutil.copytree(src / "one", run)
    before = json.loads((run / "results.json").read_text())
    for name in ("results.json", "results.md", "results.csv"):
        (run / name).unlink()
    assert report.main([str(run)]) == 0
    after = json.loads((run / "results.json").read_text())
    assert after["summary"] == before["summary"] and after["examples"] == before["examples"]
    assert after["paired"] and all(p["reference"] == "baseline" for p in after["paired"])
    assert "Paired differences against baseline" in (run / "results.md").read_text()
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


def test_one_task_twice_under_two_labels_gets_its_own_results_and_rows(tmp_path):
    """Two entries of one task (here: the generator with two seeds) are told apart by their labels in
    the result directories, the tables and results.json; an unlabelled entry keeps its name."""
    cfg = {
        "name": "labels",
        "output_dir": str(tmp_path),
        "seed": 0,
        "stages": ["evaluate", "report"],
        "models": {"sender": "tiny-llama-64", "receiver": "tiny-llama-64"},
        "tasks": [
            {
                "name": "countries",
                "n_test": 3,
                "n_calib": 0,
                "max_new_tokens": 2,
                "label": "countries_s0",
            },
            {
                "name": "countries",
                "n_test": 3,
                "n_calib": 0,
                "max_new_tokens": 2,
                "seed": 5,
                "label": "countries_s5",
            },
            {"name": "tipsheets", "n_test": 2, "n_calib": 0, "max_new_tokens": 2},
        ],
        "methods": {"baseline": {}},
    }
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "run_experiments.py", "--config", str(path)],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "labels"
    assert sorted(p.name for p in (run / "results").iterdir()) == [
        "countries_s0",
        "countries_s5",
        "tipsheets",
    ]
    examples = _examples(run)
    from cross_model.data import load_task_examples

    for label, seed in (("countries_s0", 0), ("countries_s5", 5)):
        expected = [e.example_id for e in load_task_examples("countries", 3, 0, seed)[0]]
        assert sorted(r["example_id"] for r in examples[label]["baseline"]) == sorted(expected)
    assert {r["example_id"] for r in examples["countries_s0"]["baseline"]} != {
        r["example_id"] for r in examples["countries_s5"]["baseline"]
    }
    assert "| countries_s5 | baseline |" in (run / "results.md").read_text()


def test_a_multi_sender_task_runs_the_methods_that_serve_it_and_refuses_the_others(tmp_path):
    fixture = str(ROOT / "tests" / "fixtures" / "hotpotqa.jsonl")

    def run(methods, name):
        cfg = {
            "name": name,
            "output_dir": str(tmp_path),
            "stages": ["evaluate", "report"],
            "models": {"sender": "tiny-llama-64", "receiver": "tiny-llama-64"},
            "tasks": [
                {
                    "name": "hotpotqa_ms",
                    "path": fixture,
                    "n_test": 3,
                    "n_calib": 0,
                    "max_new_tokens": 2,
                }
            ],
            "methods": methods,
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return subprocess.run(
            [sys.executable, "run_experiments.py", "--config", str(path)],
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    ok = run(
        {
            "baseline": {},
            "skyline": {},
            "nld": {"nld_max_tokens": 3},
            "cipher": {"nld_max_tokens": 3},
            "kvcomm": {"selection": "all"},
            "kvcomm_two_models": {
                "method": "kvcomm",
                "selection": "all",
                "senders": ["tiny-llama-64", "tiny-qwen2-64"],
            },
        },
        "ms",
    )
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    from cross_model.data import load_task_examples

    test, _ = load_task_examples("hotpotqa_ms", 3, 0, path=fixture)
    rows = {r["example_id"]: r for r in _examples(tmp_path / "ms")["hotpotqa_ms"]["skyline"]}
    for e in test:  # B read both senders' contexts, and both count
        assert rows[e.example_id]["payload_bytes"] == len(e.prompt_A.encode()) + len(
            e.more_senders[0].encode()
        )
    kv = {r["example_id"]: r for r in _examples(tmp_path / "ms")["hotpotqa_ms"]["kvcomm"]}
    assert all(
        sum(kv[e.example_id]["bytes_per_sender"]) == kv[e.example_id]["payload_bytes"] for e in test
    )
    two = {
        r["example_id"]: r for r in _examples(tmp_path / "ms")["hotpotqa_ms"]["kvcomm_two_models"]
    }
    assert all(
        two[i]["bytes_per_sender"] == kv[i]["bytes_per_sender"] for i in kv
    )  # same shapes, same bytes
    assert any(two[i]["answer"] != kv[i]["answer"] for i in kv)  # A2 is another model
    refused = run({"baseline": {}, "kvcomm": {"selection": "all", "facts": True}}, "ms_kv")
    assert refused.returncode != 0
    assert (
        "methods.kvcomm: task hotpotqa_ms gives each item 2 senders' contexts"
        in refused.stdout + refused.stderr
    )
    three = run({"kvcomm": {"selection": "all", "senders": ["tiny-llama-64"] * 3}}, "ms_three")
    assert (
        three.returncode != 0 and "methods.kvcomm.senders: 3 models" in three.stdout + three.stderr
    )


def test_a_context_cap_cuts_every_senders_context_once_for_every_method(tmp_path):
    """tasks.N.max_context_chars: the contexts are cut (first and last halves kept) when the task is read,
    so skyline, KVComm's sender and NLD's senders all read the same cut text, both senders of a
    multi-sender item included; an item under the cap is left as it is."""
    from cross_model.config import load_config
    from cross_model.evaluation import cut_middle, load_splits
    from cross_model.methods.base import ModelPair
    from cross_model.methods.registry import resolve_method
    from cross_model.models import load_model
    from cross_model.prompting import recording_prompts

    assert (
        cut_middle("abcdefghij", 4) == "abij"
        and cut_middle("abc", 4) == "abc"
        and cut_middle("abcdefg", 5) == "abefg"
    )

    def splits(cap: int | None) -> dict:
        task = {
            "name": "hotpotqa_ms",
            "path": str(ROOT / "tests" / "fixtures" / "hotpotqa.jsonl"),
            "n_test": 2,
            "n_calib": 0,
            "max_context_chars": cap,
        }
        cfg = {
            "name": "cap",
            "output_dir": str(tmp_path),
            "methods": {"baseline": {}},
            "controls": False,
            "models": {"sender": "tiny-llama-64", "receiver": "tiny-llama-64"},
            "tasks": [
                task,
                {"name": "countries", "n_test": 2, "n_calib": 0, "max_context_chars": cap and 1000},
            ],
        }
        path = tmp_path / f"cap{cap}.json"
        path.write_text(json.dumps(cfg))
        return load_splits(load_config(str(path)))

    cut, whole = splits(20), splits(None)
    for c, full in zip(cut["hotpotqa_ms"][0], whole["hotpotqa_ms"][0]):
        assert max(map(len, full.contexts)) > 20
        assert c.contexts == tuple(cut_middle(x, 20) for x in full.contexts)
        assert c.meta["context_chars"] == max(len(x) for x in full.contexts)
    assert cut["countries"] == whole["countries"]  # under the cap: as read
    lm = load_model("tiny-llama-64")
    item = cut["hotpotqa_ms"][0][0]
    for name, params in (
        ("skyline", {}),
        ("kvcomm", {"selection": "all"}),
        ("nld", {"nld_max_tokens": 2}),
    ):
        cls, p = resolve_method(name, {**params, "max_new_tokens": 2})
        with recording_prompts() as log:
            cls(p, ModelPair(lm, lm)).run_batch([item])
        text = "\n".join(entry["text"] for entry in log)
        assert all(c in text for c in item.contexts), name
