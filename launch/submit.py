"""Submit an experiment to SLURM with submitit: one task per GPU on each node, the rendezvous taken
from the allocation, logs in the run directory, and requeued (resuming from its checkpoints and
finished results) when it is preempted or reaches its time limit.

    python -m launch.submit --config configs/ac_llama3_projection.yaml --nodes 2 --gpus-per-node 4 \\
        --partition gpu --time 240 [--wait] [--section.key value ...]

Without GPUs (`--gpus-per-node 0`) it starts `--tasks-per-node` CPU processes (gloo).
Needs `pip install submitit` (the `slurm` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cross_model.distributed import rendezvous_port  # one rule for the port, shared with plain srun

ROOT = Path(__file__).resolve().parent.parent


class Experiment:
    """The submitted callable: sets the torch.distributed environment from SLURM, runs the pipeline;
    `checkpoint` is what submitit calls on preemption/timeout, and resubmits the same run."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        os.environ.update(
            RANK=str(env.global_rank),
            LOCAL_RANK=str(env.local_rank),
            WORLD_SIZE=str(env.num_tasks),
            # tasks on this node, so the device rule can refuse more ranks than GPUs (platform.py)
            LOCAL_WORLD_SIZE=str(env.num_tasks // max(env.num_nodes, 1)),
            MASTER_ADDR=env.hostnames[0],
            MASTER_PORT=str(rendezvous_port(env.job_id)),
        )
        os.chdir(ROOT)
        sys.path.insert(0, str(ROOT))
        import run_experiments

        rc = run_experiments.main(self.argv)
        if rc != 0:
            raise RuntimeError(f"run_experiments exited with {rc}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        # Everything finished so far is on disk (checkpoints, per-rank results); the same arguments resume.
        return submitit.helpers.DelayedSubmission(Experiment(self.argv))


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m launch.submit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="GPUs per node; one task per GPU (0: CPU tasks)",
    )
    p.add_argument(
        "--tasks-per-node", type=int, default=1, help="processes per node when --gpus-per-node is 0"
    )
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--time", type=int, default=240, help="minutes")
    p.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="warning before the time limit, to save and requeue",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument(
        "--cluster",
        default="slurm",
        choices=("slurm", "local"),
        help="slurm, or local (no scheduler)",
    )
    return p.parse_known_args(argv)


def run_directory(config: str, overrides: list[str]) -> Path:
    from cross_model.config import load_config

    return load_config(config, overrides).run_dir


def main(argv: list[str] | None = None) -> int:
    args, rest = parse(argv)
    try:
        import submitit
    except ImportError:
        print(
            "launch.submit needs submitit: pip install submitit (or pip install -e '.[slurm]')",
            file=sys.stderr,
        )
        return 2
    try:
        run_dir = run_directory(args.config, rest)
    except (ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    tasks = args.gpus_per_node or args.tasks_per_node
    folder = str(run_dir / "slurm" / "%j")
    # The executors directly: submitit's AutoExecutor discovers plugins through pkg_resources, which
    # recent setuptools no longer ship.
    if args.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            nodes=1,
            tasks_per_node=tasks,
            timeout_min=args.time,
            gpus_per_node=args.gpus_per_node or 0,
        )
    else:
        executor = submitit.SlurmExecutor(folder=folder)
        params: dict[str, Any] = dict(
            nodes=args.nodes,
            ntasks_per_node=tasks,
            time=args.time,
            signal_delay_s=args.signal_delay_s,
            job_name=run_dir.name,
        )
        if args.gpus_per_node:
            params["gpus_per_node"] = args.gpus_per_node
        if args.cpus_per_task:
            params["cpus_per_task"] = args.cpus_per_task
        if args.mem_gb:
            params["mem"] = f"{args.mem_gb}GB"
        for key in ("partition", "account", "qos"):
            if getattr(args, key):
                params[key] = getattr(args, key)
        executor.update_parameters(**params)
    job = executor.submit(Experiment(["--config", args.config, *rest]))
    print(f"submitted job {job.job_id}; logs in {run_dir / 'slurm' / str(job.job_id)}", flush=True)
    if args.wait:
        wait_for(job)
        try:
            job.results()  # one per task
        except Exception as err:  # noqa: BLE001 - the job's own failure, shown with where its logs are
            print(
                f"job {job.job_id} failed: {err}\nlogs: {run_dir / 'slurm' / str(job.job_id)}",
                file=sys.stderr,
            )
            return 1
        print(f"job {job.job_id} finished; results in {run_dir}", flush=True)
    return 0


def wait_for(job: Any, poll_s: float = 5.0) -> None:
    """Until the job has left the queue. `squeue` works where accounting (`sacct`, which submitit's own
    watcher uses) is off, as on small clusters; requeued jobs stay in the queue and are waited for."""
    import shutil
    import subprocess
    import time

    if not shutil.which("squeue"):
        job.wait()
        return
    while True:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job.job_id), "-o", "%T"], capture_output=True, text=True
        )
        if out.returncode == 0 and not out.stdout.strip():
            return
        time.sleep(poll_s)


if __name__ == "__main__":
    sys.exit(main())
