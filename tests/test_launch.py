"""Launchers and the papers' configs: every config passes --dry-run, the torchrun/sbatch/submitit
commands are well formed, and (under `make test-slurm`, as root, where Debian's slurm-wlm can be
installed) a real one-node SLURM runs a tiny experiment with sbatch and with submitit, and a requeued job
resumes."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_passes_dry_run(config, capsys):
    import run_experiments

    assert run_experiments.main(["--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# planned stages:" in out


def test_papers_configs_say_what_hardware_they_need():
    for config in CONFIGS:
        head = config.read_text().split("\nname:")[0]
        assert "Needs:" in head, f"{config.name} does not say what it needs"


@pytest.mark.parametrize("gpus,expected", [(0, 1), (1, 1), (4, 4)])
def test_local_launcher_builds_the_torchrun_command(capsys, monkeypatch, gpus, expected):
    """`auto` is the number of visible GPUs, or 1 without (the device count is patched: none here)."""
    import torch

    from launch import local

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert local.main(["--config", "configs/tiny.yaml", "--print", "--eval.limit", "2"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert f"--nproc_per_node={expected}" in cmd and cmd[-2:] == ["--eval.limit", "2"]
    assert local.main(["--config", "configs/tiny.yaml", "--nproc_per_node", "two", "--print"]) == 2


def test_rendezvous_port_is_derived_from_the_job_id():
    from launch.submit import rendezvous_port

    assert rendezvous_port("123") == rendezvous_port(123) == 20123
    assert 20000 <= rendezvous_port("987654_3") < 40000


def test_plain_srun_tasks_become_ranks_and_torchrun_or_a_batch_shell_is_left_alone():
    from cross_model.distributed import adopt_slurm_env, first_host, tasks_per_node

    srun = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "4242",
    }
    env = dict(srun)
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (
        "5",
        "1",
        "8",
        "4",
    )
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "24242"
    torchrun = {**srun, "RANK": "0"}  # torchrun under srun (our sbatch scripts): its variables win
    assert (
        not adopt_slurm_env(torchrun) and torchrun["RANK"] == "0" and "WORLD_SIZE" not in torchrun
    )
    batch_shell = {
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_ID": "1",
    }
    assert (
        not adopt_slurm_env(batch_shell) and "RANK" not in batch_shell
    )  # the batch script itself: one process
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        adopt_slurm_env({k: v for k, v in srun.items() if k != "SLURM_STEP_NODELIST"})
    assert tasks_per_node("4(x2),3") == [4, 4, 3]
    assert first_host("node1,node2") == "node1"


@pytest.mark.parametrize("script", sorted((ROOT / "slurm").glob("*.s*")), ids=lambda p: p.name)
def test_slurm_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("cpus", ["8", None])
def test_the_sbatch_body_passes_the_jobs_cpus_per_task_on_to_srun(tmp_path, cpus):
    """Slurm 22.05-23.02 give srun one CPU unless told: the step must ask for the job's
    --cpus-per-task. The local SLURM binds no CPUs (task/none), so a recording `srun` stands in for
    it here; the real one runs the same script in the slurm tests."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/srun.args\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "CONFIG": "configs/tiny.yaml",
        "STAGES": "[evaluate]",
        "NPROC_PER_NODE": "2",
        "EXTRA_ARGS": "",
    }
    env.pop("SLURM_CPUS_PER_TASK", None)
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    subprocess.run(["bash", str(ROOT / "slurm" / "_torchrun.sh")], env=env, check=True, timeout=60)
    args = (tmp_path / "srun.args").read_text().split()
    assert args[:1] == ["--ntasks-per-node=1"] and "--nproc_per_node=2" in args
    assert ("--cpus-per-task=8" in args) == (cpus == "8")


# --- a real SLURM on this machine ------------------------------------------------------------


def _cluster():
    # Starting the cluster apt-installs slurm-wlm and munge and writes /etc/munge/munge.key: a change to the
    # system that `make test` must not make. Only `make test-slurm` asks for it.
    if os.environ.get("CROSS_MODEL_SLURM_TESTS") != "1":
        pytest.skip(
            "the real-SLURM tests install slurm-wlm and munge system-wide: run them with `make test-slurm` (as root)"
        )
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root to install slurm-wlm/munge and run its daemons")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("no slurm-wlm and no apt-get to install it")
    res = subprocess.run(
        ["bash", str(ROOT / "slurm" / "local_cluster.sh"), "start"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if (
        res.returncode != 0
    ):  # as root with the packages at hand, a cluster that does not start is a failure
        pytest.fail(f"could not start a local SLURM: {res.stderr.strip()[-2000:]}")
    conf = res.stdout.strip().split("SLURM_CONF=")[-1]
    return {**os.environ, "SLURM_CONF": conf}


@pytest.fixture(scope="module")
def slurm_env():
    env = _cluster()
    yield env
    subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "stop"], capture_output=True)


def _tiny_args(tmp_path: Path, name: str) -> str:
    return f"--output_dir {tmp_path} --name {name} --eval.batch_size 2"


def _wait_job(env, job_id: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True
        ).stdout.strip()
        if not state:
            return "DONE"
        time.sleep(2)
    raise AssertionError(f"job {job_id} still running after {timeout}s")


def _check_results(run_dir: Path) -> dict:
    data = json.loads((run_dir / "results.json").read_text())
    for task, methods in data["examples"].items():
        for method, rows in methods.items():
            ids = [r["example_id"] for r in rows]
            assert len(ids) == len(set(ids)) == {"countries": 6, "tipsheets": 4}[task]
    return data


@pytest.mark.slurm
def test_sbatch_runs_the_pipeline(slurm_env, tmp_path):
    env = {
        **slurm_env,
        "CONFIG": "configs/tiny.yaml",
        "NPROC_PER_NODE": "2",
        "EXTRA_ARGS": _tiny_args(tmp_path, "sb"),
    }
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={tmp_path}/%j.out",
            "slurm/pipeline.sbatch",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job = out.stdout.strip().split(";")[0]
    _wait_job(slurm_env, job)
    log = (tmp_path / f"{job}.out").read_text()
    assert (tmp_path / "sb" / "results.json").exists(), log[-3000:]
    data = _check_results(tmp_path / "sb")
    assert data["starts"][-1]["world_size"] == 2 and data["starts"][-1]["slurm_job_id"] == job


@pytest.mark.slurm
def test_plain_srun_runs_one_rank_per_task(slurm_env, tmp_path):
    """`srun --ntasks=2 python run_experiments.py` (no torchrun): two ranks of one run, not two rank 0s."""
    res = subprocess.run(
        [
            "srun",
            "--ntasks=2",
            "--cpus-per-task=1",
            sys.executable,
            "run_experiments.py",
            "--config",
            "configs/tiny.yaml",
            *_tiny_args(tmp_path, "srun").split(),
        ],
        cwd=ROOT,
        env={**slurm_env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    data = _check_results(tmp_path / "srun")
    assert data["starts"][-1]["world_size"] == 2
    files = sorted(
        p.name
        for p in (tmp_path / "srun" / "results" / "countries" / "baseline").glob("rank*.jsonl")
    )
    assert files == ["rank0.jsonl", "rank1.jsonl"]


@pytest.mark.slurm
def test_submitit_launcher_runs_the_pipeline(slurm_env, tmp_path):
    pytest.importorskip("submitit")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.submit",
            "--config",
            "configs/tiny.yaml",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--time",
            "20",
            "--wait",
            *_tiny_args(tmp_path, "sub").split(),
        ],
        cwd=ROOT,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    data = _check_results(tmp_path / "sub")
    assert data["starts"][-1]["world_size"] == 2
    assert list((tmp_path / "sub" / "slurm").glob("*/*_log.out")), (
        "submitit's logs are in the run directory"
    )


@pytest.mark.slurm
def test_a_requeued_job_resumes_rather_than_restarts(slurm_env, tmp_path):
    env = {
        **slurm_env,
        "CONFIG": "configs/tiny.yaml",
        "NPROC_PER_NODE": "1",
        "CROSS_MODEL_TEST_STEP_DELAY": "0.5",
        "EXTRA_ARGS": _tiny_args(tmp_path, "rq"),
    }
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            f"--output={tmp_path}/%j.out",
            "slurm/pipeline.sbatch",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job = out.stdout.strip().split(";")[0]
    results = tmp_path / "rq" / "results"
    deadline = time.time() + 600
    while len(list(results.glob("countries/*/rank0.jsonl"))) < 3:
        assert time.time() < deadline, (tmp_path / f"{job}.out").read_text()[-3000:]
        time.sleep(1)
    subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True)
    _wait_job(slurm_env, job, timeout=900)
    log = (tmp_path / f"{job}.out").read_text()
    starts = [
        json.loads(line) for line in (tmp_path / "rq" / "runs.jsonl").read_text().splitlines()
    ]
    assert len(starts) == 2, log[-3000:]
    assert "already done; resuming" in log and "restart 1" in log
    _check_results(tmp_path / "rq")
