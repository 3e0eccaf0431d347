"""Distributed runtime: torchrun environment, init/teardown, null-safe collectives, a rank-agreed stop flag.

Every helper works without a process group (rank 0 of a world of 1), so call sites never branch.
On CUDA the main group is nccl and a second gloo group carries Python objects; on CPU gloo does both.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from cross_model.platform import check_distinct_devices

log = logging.getLogger(__name__)
T = TypeVar("T")

_OBJECT_GROUP: Any = None  # gloo group for object collectives when the main backend is nccl


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def read_env() -> DistEnv:
    """RANK/LOCAL_RANK/WORLD_SIZE as torchrun sets them, else as plain `srun` sets SLURM's (see
    `adopt_slurm_env`); a world of one without either."""
    adopt_slurm_env()
    try:
        return DistEnv(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )
    except ValueError as err:
        raise ValueError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers: {err}") from err


def rendezvous_port(job_id: str | int) -> int:
    """A port derived from the job id, so that jobs sharing a node do not collide."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed per-node task counts ("4(x2),3" -> [4, 4, 3])."""
    out: list[int] = []
    for part in spec.split(","):
        count, _, times = part.partition("(x")
        out += [int(count)] * (int(times.rstrip(")")) if times else 1)
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[03-05,07],cpu1" -> "gpu03"), as `scontrol show
    hostnames` gives it when scontrol is there."""
    try:
        import subprocess

        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = (
        nodelist.split(",")[0]
        if "[" not in nodelist.split(",")[0]
        else nodelist[: nodelist.index("]") + 1]
    )
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


def adopt_slurm_env(environ: dict[str, str] | None = None) -> bool:
    """Plain `srun` (one task per GPU, as the error messages advise) sets SLURM_PROCID, SLURM_LOCALID
    and SLURM_STEP_NUM_TASKS, not torchrun's RANK/LOCAL_RANK/WORLD_SIZE: without this each task would
    run alone as rank 0 and all would append to one rank0.jsonl. Sets torchrun's variables (and the
    rendezvous: the step's first host, a port from the job id) from SLURM's when srun started several
    tasks and nothing set RANK; returns whether it did. A batch script's own shell (no step) and
    torchrun under srun (RANK set) are left alone."""
    env = os.environ if environ is None else environ
    if "RANK" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) <= 1:
        return False
    missing = [
        k
        for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID")
        if k not in env
    ]
    if missing:
        raise ValueError(
            f"srun started {env['SLURM_STEP_NUM_TASKS']} tasks but {', '.join(missing)} is not set; "
            f"start the ranks with torchrun (slurm/*.sbatch do) or set RANK/LOCAL_RANK/WORLD_SIZE"
        )
    env["RANK"], env["LOCAL_RANK"] = env["SLURM_PROCID"], env["SLURM_LOCALID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    if "SLURM_STEP_TASKS_PER_NODE" in env:
        per_node = tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
        env["LOCAL_WORLD_SIZE"] = str(
            per_node[min(int(env.get("SLURM_NODEID", 0)), len(per_node) - 1)]
        )
    env.setdefault("MASTER_ADDR", first_host(env["SLURM_STEP_NODELIST"]))
    env.setdefault("MASTER_PORT", str(rendezvous_port(env["SLURM_JOB_ID"])))
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(
    backend: str,
    env: DistEnv | None = None,
    timeout_s: float = 1800,
    device: torch.device | None = None,
) -> DistEnv:
    """Start the process group if the environment says there are several ranks.

    `device` is the rank's device as `platform.detect_platform` decided it (the one rule for it): on
    CUDA it becomes the current device and nccl's `device_id`, so that every rank binds its own GPU
    from the start. After the group is up, ranks that landed on the same GPU are refused by name.
    The rendezvous address comes from the environment (torchrun / our sbatch scripts), never a
    hard-coded port.
    """
    global _OBJECT_GROUP
    env = env or read_env()
    if not env.is_distributed or is_initialized():
        return env
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    # No `device_id`: it would create nccl's communicators now, and ranks that share one GPU must be
    # refused (below, over gloo) before nccl starts, not hang or fail inside it. nccl then starts on
    # its first collective, on the device set above.
    dist.init_process_group(
        backend=backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _OBJECT_GROUP = dist.new_group(backend="gloo") if backend == "nccl" else None
    if cuda:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        try:
            check_distinct_devices(gather_object((socket.gethostname(), uuid)))
        except ValueError:
            destroy_distributed()
            raise
    return env


def destroy_distributed() -> None:
    global _OBJECT_GROUP
    if is_initialized():
        dist.destroy_process_group()
    _OBJECT_GROUP = None


@contextlib.contextmanager
def distributed_session(backend: str, device: torch.device | None = None) -> Iterator[DistEnv]:
    """`with distributed_session("gloo") as env:` - init, then teardown in `finally`."""
    env = init_distributed(backend, device=device)
    try:
        yield env
    finally:
        destroy_distributed()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier(group=_OBJECT_GROUP)


_RANK0_FIRST = itertools.count()


def rank0_first(work: Callable[[], T], what: str, timeout_s: float) -> T:
    """`work()` on rank 0, then on every other rank (a download and cache that one rank does for all).
    The others wait on the rendezvous store for up to `timeout_s`, not in a collective bound by the
    process group's timeout (30 minutes), and a failure on rank 0 reaches them at once. Every rank
    must call it in the same order (the store key counts the calls)."""
    if not is_initialized():
        return work()
    key = f"cross_model/rank0_first/{next(_RANK0_FIRST)}"
    store = dist.distributed_c10d._get_default_store()
    if is_main():
        try:
            out = work()
        except BaseException as err:
            store.set(key, f"failed: {type(err).__name__}: {err}")
            raise
        store.set(key, "ok")
        return out
    log.info("waiting for rank 0: %s (up to %.1f h)", what, timeout_s / 3600)
    store.wait([key], datetime.timedelta(seconds=timeout_s))
    status = store.get(key).decode()
    if status != "ok":
        raise RuntimeError(f"rank 0 {status} (while {what}); this rank stops with it")
    return work()


def gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` without a process group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_OBJECT_GROUP)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_OBJECT_GROUP)
    return box[0]


def all_reduce_max(value: float) -> float:
    if not is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_OBJECT_GROUP)
    return float(t.item())


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks, in float64 (the values themselves without a process group)."""
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_OBJECT_GROUP)
    return t.tolist()


def all_reduce_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums over ranks of CPU tensors (through the gloo group; themselves without one)."""
    if not is_initialized():
        return tensors
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_OBJECT_GROUP)
    return tensors


class PeerFailed(RuntimeError):
    """Another rank failed; this one stops with it instead of waiting in a collective until the timeout."""


def agreed(fn: Callable[[], Any], what: str) -> Any:
    """`fn()` on every rank, then one collective that tells every rank whether any rank failed: the
    failing rank raises its own error and the others `PeerFailed`, so none is left in the next
    collective for the process group's timeout (30 minutes) while the failed one is gone."""
    try:
        result, failure = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
        result, failure = None, exc
    if all_reduce_max(1.0 if failure is not None else 0.0) > 0:
        if failure is not None:
            raise failure
        raise PeerFailed(
            f"{what}: another rank failed (its log has the error); this rank stops too"
        )
    return result


def shard(items: list) -> list:
    """This rank's share of `items`: those at index i with i % world_size == rank."""
    return items[get_rank() :: get_world_size()]


class Preempted(Exception):
    """A stop signal arrived; every rank saved its progress. The run exits 0 and resumes when restarted."""


class StopFlag:
    """Preemption: a signal handler only sets a local flag; `should_stop()` makes every rank agree.

    `should_stop()` is a collective: every rank must call it at the same points (e.g. every few
    steps), and then all ranks leave their loop together, save, and exit 0.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self._local = False
        self._signals = signals
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopFlag":
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self._local = True

    def set(self) -> None:
        self._local = True

    @property
    def local(self) -> bool:
        return self._local

    def should_stop(self) -> bool:
        return all_reduce_max(1.0 if self._local else 0.0) > 0.0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = get_rank()
        return True


def setup_logging(level: str = "INFO") -> None:
    """INFO (or `level`) from rank 0, WARNING and above from every rank, each record with its rank."""
    rank = read_env().rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter())
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    root.addHandler(handler)
    root.setLevel(level.upper() if rank == 0 else "WARNING")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel("WARNING")
