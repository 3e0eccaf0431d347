"""Distributed runtime: torchrun environment, init/teardown, null-safe collectives, a rank-agreed stop flag.

Every helper works without a process group (rank 0 of a world of 1), so call sites never branch.
On CUDA the main group is nccl and a second gloo group carries Python objects; on CPU gloo does both.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from cross_model.platform import check_distinct_devices

log = logging.getLogger(__name__)

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
    """RANK/LOCAL_RANK/WORLD_SIZE as set by torchrun or srun; a world of one without them."""
    try:
        return DistEnv(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )
    except ValueError as err:
        raise ValueError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers: {err}") from err


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str, env: DistEnv | None = None, timeout_s: float = 1800,
                     device: torch.device | None = None) -> DistEnv:
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
    dist.init_process_group(
        backend=backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": device} if cuda and backend == "nccl" else {}),
    )
    _OBJECT_GROUP = dist.new_group(backend="gloo") if backend == "nccl" else None
    if cuda:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        check_distinct_devices(gather_object((socket.gethostname(), uuid)))
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
        raise PeerFailed(f"{what}: another rank failed (its log has the error); this rank stops too")
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
    handler.setFormatter(logging.Formatter("%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level.upper() if rank == 0 else "WARNING")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel("WARNING")
