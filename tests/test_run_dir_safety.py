"""Nothing executes or escapes from a run directory: checkpoint files are read as tensors and plain data
only (a planted pickle is refused, never run), and every name that becomes a path (the run, a task's
key, a method instance) follows one rule, so no run writes outside its directory; a run directory, a
saved calibration or a results file that cannot be trusted stops the run with the file named."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cross_model.checkpointing import CheckpointManager, rng_state, set_rng_state, sha256
from cross_model.config import load_config
from tests.helpers import write_a_result_row

TINY = "configs/tiny.yaml"


class Payload:
    """What an attacker plants: unpickling it would create `marker` (i.e. run any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _checkpoint(tmp_path: Path) -> tuple[CheckpointManager, Path]:
    manager = CheckpointManager(tmp_path / "ckpt")
    step_dir = manager.save(
        1, {"w": torch.ones(2)}, {"identity": {}}, {"step": 1}, rng_per_rank=[rng_state()]
    )
    return manager, step_dir


def _plant(step_dir: Path, name: str, obj) -> None:
    """Replace one file and fix its checksum in meta.json, as anyone who can write the directory can."""
    torch.save(obj, step_dir / name)
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["checksums"][name] = sha256(step_dir / name)
    (step_dir / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["rng_rank0.pt", "trainer.pt"])
def test_a_pickle_planted_in_a_checkpoint_is_refused_and_never_runs(tmp_path, name):
    manager, step_dir = _checkpoint(tmp_path)
    marker = tmp_path / "ran"
    _plant(step_dir, name, {"python": Payload(marker)})
    with pytest.raises(ValueError, match=f"{name} holds objects other than tensors"):
        manager.load(1, rank=0, world_size=1)
    assert not marker.exists(), "the planted payload ran"
    # what the previous loader did with the RNG file: the payload runs
    torch.load(step_dir / name, weights_only=False)
    assert marker.exists()


def test_rng_states_saved_as_plain_data_restore_every_generator(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # each keeps a cached Gaussian
    manager, _ = _checkpoint(tmp_path)
    want = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(),
        np.random.standard_normal(),
        torch.rand(3),
    )
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(manager.load(1, rank=0, world_size=1).rng)
    got = (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(),
        np.random.standard_normal(),
        torch.rand(3),
    )
    assert got[:4] == want[:4] and torch.equal(got[4], want[4])


@pytest.mark.parametrize(
    "override,key",
    [
        (["--name", ".."], "name"),
        (["--name", "."], "name"),
        (["--name", "a/b"], "name"),
        (["--name", "a\\b"], "name"),
        (["--methods", '{"../../../escaped": {"method": "baseline"}}'], "methods.../../../escaped"),
        (["--methods", '{"..": {"method": "baseline"}}'], "methods..."),
        (["--tasks", '[{"name": "countries", "label": ".."}]'], "tasks.0.label"),
        (["--tasks", '[{"name": "countries", "label": "x/y"}]'], "tasks.0.label"),
        (["--tasks", '[{"name": "../countries"}]'], "tasks.0.name"),
    ],
)
def test_names_that_would_leave_the_run_directory_are_refused(override, key):
    with pytest.raises(ValueError) as err:
        load_config(TINY, override)
    assert str(err.value).startswith(f"{key}: ") and "no path separators" in str(err.value)


def test_the_rule_admits_every_name_the_shipped_configs_use():
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path)  # raises on a name the rule refuses


def _start(tmp_path: Path, *overrides: str, identity: dict | None = None) -> int:
    from cross_model.runinfo import prepare_run_dir

    cfg = load_config(TINY, ["--output_dir", str(tmp_path), *overrides])
    return prepare_run_dir(cfg, {}, identity or {"device": "cpu", "commit": "abc"})


def test_a_run_directory_without_results_is_taken_over_by_the_corrected_command(tmp_path):
    """A start that failed before any stage wrote anything (say a data error) leaves config.yaml and
    identity.json; the corrected command with the same --name takes the directory over."""
    _start(tmp_path, "--seed", "1")
    assert _start(tmp_path, "--seed", "2", identity={"device": "cpu", "commit": "def"}) == 1
    saved = yaml.safe_load((tmp_path / "tiny" / "config.yaml").read_text())
    assert saved["seed"] == 2
    assert json.loads((tmp_path / "tiny" / "identity.json").read_text())["commit"] == "def"
    write_a_result_row(
        tmp_path / "tiny"
    )  # from now on the directory holds results: same config only
    with pytest.raises(ValueError, match="different config"):
        _start(tmp_path, "--seed", "3")


def test_a_directory_with_results_and_no_identity_is_refused(tmp_path):
    _start(tmp_path)
    write_a_result_row(tmp_path / "tiny")
    (tmp_path / "tiny" / "identity.json").unlink()
    with pytest.raises(
        ValueError, match="results/countries/baseline/rank0.jsonl but no identity.json"
    ):
        _start(tmp_path)


def test_a_damaged_results_line_stops_the_run_and_names_it(tmp_path):
    from cross_model.failures import RunRefused
    from cross_model.result_files import read_results

    rows = tmp_path / "rows"
    rows.mkdir()
    good = json.dumps({"example_id": "a", "score": 1.0})
    (rows / "rank0.jsonl").write_text(good + "\n" + '{"example_id": "b", "sco' + "\n")
    assert list(read_results(rows)) == ["a"]  # a partial last line: another rank is writing it
    (rows / "rank0.jsonl").write_text(
        good + "\n" + "not json\n" + json.dumps({"example_id": "c"}) + "\n"
    )
    with pytest.raises(RunRefused, match=r"rank0.jsonl:2: not a JSON row"):
        read_results(rows)
    (rows / "rank0.jsonl").write_text(json.dumps({"score": 1.0}) + "\n" + good + "\n")
    with pytest.raises(RunRefused, match=r"rank0.jsonl:1: a row without an example_id"):
        read_results(rows)


def test_a_saved_calibration_that_does_not_fit_the_method_is_refused(tmp_path):
    from cross_model.calibration import calibrate_methods
    from cross_model.failures import RunRefused
    from tests.test_methods import make

    kvcomm = make("kvcomm", selection="calibrate", top_layers=0.5)
    for saved, why in (
        ('{"ranking": [0]}', "must order every one of the 4 layers once"),
        ('{"ranking": [0, 1, 2, 3], "selected": [2, 3]}', "its ranking gives \\[0, 1\\]"),
        ("{not json", "is not JSON"),
    ):
        (tmp_path / "calibration-kvcomm.json").write_text(saved)
        with pytest.raises(RunRefused, match=f"calibration-kvcomm.json.*{why}"):
            calibrate_methods(tmp_path, {"kvcomm": kvcomm}, ["kvcomm"], [], 2)
    (tmp_path / "calibration-kvcomm.json").write_text('{"ranking": [3, 1, 0, 2]}')
    calibrate_methods(tmp_path, {"kvcomm": kvcomm}, ["kvcomm"], [], 2)
    assert kvcomm.selected_layers() == {0, 1, 3}  # its top two, and layer 0 (always_send_layer0)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntasks: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML: .*line 3"):
        load_config(bad)


def test_repeated_example_ids_in_a_local_file_are_refused(tmp_path):
    from cross_model.data import load_task_examples

    row = {"id": "a", "prompt_A": "c", "prompt_B": "q", "answers": ["x"]}
    (tmp_path / "items.jsonl").write_text((json.dumps(row) + "\n") * 2)
    with pytest.raises(ValueError, match=r"example ids \['jsonl-a'\] occur more than once"):
        load_task_examples("jsonl", 2, 0, path=str(tmp_path / "items.jsonl"))


def _git(repo: Path, *args: str) -> None:
    import subprocess

    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def test_a_commit_that_changes_no_code_path_does_not_stop_a_requeue(tmp_path):
    """The identity compares the content of the code paths, not the commit: an empty commit or a docs
    commit between a job's start and its requeue resumes; a change under cross_model/ is refused."""
    from cross_model.runinfo import check_identity, git_commit, run_identity

    repo = tmp_path / "repo"
    (repo / "cross_model").mkdir(parents=True)
    (repo / "cross_model" / "x.py").write_text("A = 1\n")
    (repo / "run_experiments.py").write_text("")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")

    def identity():
        return run_identity({"git": git_commit(repo), "world_size": 1}, "cpu", "float32")

    first = identity()
    _git(repo, "commit", "-q", "--allow-empty", "-m", "empty")
    (repo / "README.md").write_text("docs\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "docs")
    later = identity()
    assert later["commit"] != first["commit"] and later["code"] == first["code"]
    check_identity(tmp_path, first, later, allow_code_change=False)
    (repo / "cross_model" / "x.py").write_text("A = 2\n")
    _git(repo, "commit", "-qam", "code")
    with pytest.raises(ValueError, match="started with other code"):
        check_identity(tmp_path, first, identity(), allow_code_change=False)


def test_a_half_precision_resume_with_another_number_of_ranks_is_refused(tmp_path):
    """Each rank batches its own share: in bf16 other batches change sums and near-tied answers, so a
    resize is refused unless asked for; in float32 it resumes (docs/RUNNING.md), with a warning."""
    from cross_model.runinfo import check_identity

    first = {"device": "cuda", "dtype": "bfloat16", "world_size": 4, "code": "c", "changes": None}
    check_identity(tmp_path, first, dict(first), allow_code_change=False)
    with pytest.raises(ValueError, match=r"4 ranks -> 2.*--allow-code-change"):
        check_identity(tmp_path, first, {**first, "world_size": 2}, allow_code_change=False)
    check_identity(tmp_path, first, {**first, "world_size": 2}, allow_code_change=True)
    fp32 = {**first, "device": "cpu", "dtype": "float32"}
    check_identity(tmp_path, fp32, {**fp32, "world_size": 2}, allow_code_change=False)
