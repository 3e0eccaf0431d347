"""Shared by the tests that kill real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def entry(config: Path, nproc: int = 1, delay: float = 0.0, **env: str) -> subprocess.Popen:
    """`run_experiments.py --config config` in a new process (`nproc` > 1: under torchrun on gloo);
    `delay` seconds after each training step let a test kill it mid-training."""
    env = {**os.environ, "CROSS_MODEL_TEST_STEP_DELAY": str(delay), "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, str(ROOT / "run_experiments.py"), "--config", str(config)]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *cmd[1:],
        ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_entry(config: Path, nproc: int = 1, **env: str) -> str:
    """The same, to the end; fails the test with the output's tail if it does not succeed."""
    proc = entry(config, nproc, **env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def descendants(pid: int) -> list[int]:
    """Every process started by `pid`, its children's children included (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_9_after_first_checkpoint(
    proc: subprocess.Popen, checkpoints: Path, timeout: float = 180
) -> None:
    """SIGKILL `proc` and every process it started (torchrun's workers) as soon as a complete step
    checkpoint appears under `checkpoints`, and check that it had not finished."""
    deadline = time.time() + timeout
    while not list(checkpoints.glob("*/step_*/meta.json")):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    # torchrun starts each worker in a session of its own, so neither a kill of the launcher nor of its
    # process group reaches them: every descendant is killed by pid.
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    assert not list(checkpoints.glob("*/final")), "killed before the end"


def kill_9_and_resume(config: Path, checkpoints: Path, nproc: int = 1, **env: str) -> str:
    """Start a training run (`nproc` ranks), SIGKILL all its processes after its first checkpoint, run
    it again to the end and check that it resumed; returns the second run's output."""
    kill_9_after_first_checkpoint(entry(config, nproc, delay=0.3, **env), checkpoints)
    out = run_entry(config, nproc, **env)
    assert "resumed" in out
    return out


def two_gloo_ranks(target, *args) -> dict:
    """`target(rank, port, *args, queue)` in two spawned processes that form one gloo group (each sets
    its own RANK/WORLD_SIZE from `rank` and `port`); returns rank -> what it put on the queue."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return got


MUTABLE = (
    "id",
    "_id",
    "pid",
    "question",
    "question_stem",
    "input",
    "problem",
    "dialogue",
    "cropped_code",
    "prompt_B",
    "sentence",
    "text",
)


def distinct_copies(rows: list[dict], n: int) -> list[dict]:
    """`n` distinct rows from a fixture's: the identifying and question fields changed per copy, so that
    every copy is a different item by id and by content (a source large enough to keep reserves)."""
    out = []
    for k in range(n):
        row = json.loads(json.dumps(rows[k % len(rows)]))
        for key in MUTABLE:
            if isinstance(row.get(key), str):
                row[key] = (
                    f"{row[key]}\\n# {k}"
                    if key in ("dialogue", "cropped_code")
                    else f"{row[key]} v{k}"
                )
        if isinstance(row.get("idx"), int):  # SST-2's integer id
            row["idx"] = row["idx"] * 10_000 + k  # distinct also for copies of copies (k < 10000)
        out.append(row)
    return out


def write_copies(fixture: Path, out: Path, n: int) -> str:
    rows = [json.loads(line) for line in fixture.read_text().splitlines() if line.strip()]
    out.write_text("".join(json.dumps(r) + "\n" for r in distinct_copies(rows, n)))
    return str(out)


def write_a_result_row(run_dir: Path) -> None:
    """A row in the run's results, as the evaluate stage leaves it: a run directory with results is one
    a later start must match (an empty one is taken over)."""
    rows = Path(run_dir) / "results" / "countries" / "baseline"
    rows.mkdir(parents=True, exist_ok=True)
    (rows / "rank0.jsonl").write_text(json.dumps({"example_id": "countries-0"}) + "\n")
