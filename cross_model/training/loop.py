"""The one training loop: every trainer (AC's projection, LatentWire's interlingua, C2C's projector)
supplies a `TrainJob` (its module, its loss on a batch, its optimizer step, its held-out statistics)
and this loop does the rest in one place: resume from the newest complete checkpoint (identity
checked, optimizer and RNG states restored), the epoch order of the training rows, each rank's share
of a global batch, the step, the stop flag that every rank agrees on, checkpoint-after-step, the
held-out evaluations and their history. The trainer publishes the final artefact from the result.

Resume: started again with the same job, training continues from the newest complete checkpoint in
`directory`; the rows each step reads depend only on the seed and the step, so a resumed run takes
the same steps as an uninterrupted one. SIGTERM/SIGUSR1 set a flag checked after every step: every
rank saves and leaves together (`Preempted`), and the next start resumes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cross_model.checkpointing import (
    Checkpoint,
    CheckpointManager,
    check_identity,
    rng_state,
    set_rng_state,
)
from cross_model.distributed import (
    Preempted,
    StopFlag,
    barrier,
    broadcast_object,
    gather_object,
    get_rank,
    get_world_size,
    is_main,
)
from cross_model.progress import Progress, test_step_delay

log = logging.getLogger(__name__)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n training rows in `epoch`: a function of the seed and the epoch only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The multiple of the base learning rate at `step` (from 0): linear warm-up to 1 over `warmup`
    steps, then constant, or a cosine or linear decay reaching 0 after the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    if schedule == "linear":
        return 1.0 - (step - warmup) / max(total - warmup, 1)
    return 1.0


def set_learning_rate(
    optimizer: Any, base_lrs: list[float], step: int, warmup: int, total: int, schedule: str
) -> None:
    """The rate of the step about to be taken, on every parameter group (a function of the step
    alone: a resumed run takes the same rates without a scheduler state to restore)."""
    factor = lr_factor(step, warmup, total, schedule)
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


@dataclass
class TrainJob:
    """What a trainer gives the loop. `loss(step, rows, batch_rows)` returns this rank's loss on its
    `rows` (indices into the training rows) of a global batch of `batch_rows`, scaled so that the
    average of the gradients over ranks is the gradient of the global batch's mean loss."""

    what: str  # the log prefix: "train", "interlingua", "c2c"
    label: str  # the progress bar's
    directory: Path  # its checkpoints (and, the trainer's, `final/`)
    module: torch.nn.Module  # what is checkpointed (its state_dict)
    loss: Callable[[int, list[int], int], torch.Tensor]
    step_optimizer: Callable[[torch.Tensor], None]  # backward and the optimizer step
    optimizer_state: Callable[[], Any]  # collective (a ZeRO optimizer gathers its parts)
    load_optimizer_state: Callable[[Any], None]
    n_rows: int
    batch_size: int
    total_steps: int
    seed: int
    checkpoint_every: int
    keep_last: int
    sidecar: dict[str, Any]  # saved with every checkpoint
    identity_keys: tuple[str, ...]  # the sidecar keys a checkpoint must match to be resumed
    heldout: Callable[[int], dict[str, Any]] | None = (
        None  # statistics at a step (collective); logged by it
    )
    heldout_every: int = 0  # steps between evaluations (and always after the last step); 0: never
    heldout_at_start: bool = False  # also before the first step of a fresh run
    save_after_heldout: bool = False  # also checkpoint whenever the held-out statistics are taken
    stop: StopFlag | None = None
    on_step: Callable[[int, torch.nn.Module], None] | None = None
    log_metrics: Callable[[dict[str, Any]], None] | None = None
    schedule: Callable[[int], None] | None = (
        None  # sets the learning rate of the step about to be taken
    )

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)


@dataclass
class LoopResult:
    step: int  # the last step taken (= total_steps)
    history: list[dict[str, Any]] = field(default_factory=list)  # the held-out statistics, in order
    resumed_from: int | None = None  # the checkpoint's step, when the run resumed


def latest_checkpoint(
    directory: Path, keep_last: int, sidecar: dict[str, Any], keys: tuple[str, ...]
) -> Checkpoint | None:
    """The newest complete checkpoint in `directory` (rank 0 picks it, every rank loads it), refused
    when it was made for another job. Collective. Trainers that prepare data before training call it
    first, so a mismatched checkpoint is refused before anything is computed."""
    manager = CheckpointManager(directory, keep_last)
    latest = broadcast_object(manager.latest_step() if is_main() else None)
    if latest is None:
        return None
    ckpt = manager.load(latest, get_rank(), get_world_size())
    check_identity(ckpt.meta, sidecar, f"checkpoint {ckpt.path}", keys=keys)
    return ckpt


def train_loop(job: TrainJob, checkpoint: Checkpoint | None = None) -> LoopResult:
    """Run `job` to its last step, resuming from `checkpoint` (default: the newest one in its
    directory). Collective: every rank calls it with the same job."""
    rank, world = get_rank(), get_world_size()
    manager = CheckpointManager(job.directory, job.keep_last)
    ckpt = checkpoint or latest_checkpoint(
        job.directory, job.keep_last, job.sidecar, job.identity_keys
    )
    step, resumed, history = 0, None, []
    if ckpt is not None:
        job.module.load_state_dict(ckpt.tensors)
        job.load_optimizer_state(ckpt.trainer["optimizer"])
        if ckpt.rng is not None:
            set_rng_state(ckpt.rng)
        step, resumed, history = ckpt.trainer["step"], ckpt.step, ckpt.meta.get("history", [])
        log.info(
            "%s: resumed %s at step %d of %d", job.what, job.directory.name, step, job.total_steps
        )
    per_epoch = job.steps_per_epoch

    def save(at: int) -> None:
        rngs = gather_object(rng_state())
        optimizer = job.optimizer_state()
        if is_main():
            trainer = {
                "optimizer": optimizer,
                "step": at,
                "epoch": at // per_epoch,
                "batch_in_epoch": at % per_epoch,
            }
            manager.save(
                at,
                {k: v.detach().cpu() for k, v in job.module.state_dict().items()},
                {**job.sidecar, "history": history},
                trainer,
                rngs,
            )
        barrier()

    def evaluate(at: int) -> None:
        stats = job.heldout(at)
        history.append(stats)
        if job.log_metrics is not None and is_main():
            job.log_metrics({f"{job.what}/{k}": v for k, v in stats.items()})

    delay = test_step_delay()
    bar = Progress(job.total_steps, job.label, unit="steps", initial=step)
    if step == 0 and job.heldout is not None and job.heldout_at_start:
        evaluate(0)
    last_saved = resumed
    while step < job.total_steps:
        epoch, b = divmod(step, per_epoch)
        batch = epoch_order(job.n_rows, job.seed, epoch)[
            b * job.batch_size : (b + 1) * job.batch_size
        ]
        if job.schedule is not None:
            job.schedule(step)
        job.step_optimizer(job.loss(step, batch[rank::world], len(batch)))
        step += 1
        bar.update(1)
        if job.on_step is not None:
            job.on_step(step, job.module)
        if delay:
            time.sleep(delay)
        evaluated = (
            job.heldout is not None
            and job.heldout_every > 0
            and (step % job.heldout_every == 0 or step == job.total_steps)
        )
        if evaluated:
            evaluate(step)
        stopping = job.stop is not None and job.stop.should_stop()
        if (
            step == job.total_steps
            or stopping
            or step % job.checkpoint_every == 0
            or (evaluated and job.save_after_heldout)
        ):
            save(step)
            last_saved = step
        if stopping:
            bar.close()
            log.warning(
                "%s: stop signal; saved step %d of %d in %s, exiting to resume later",
                job.what,
                step,
                job.total_steps,
                job.directory,
            )
            raise Preempted(
                f"{job.what} training stopped at step {step} of {job.total_steps}; checkpoint saved in "
                f"{job.directory}"
            )
    bar.close()
    if last_saved != step:
        save(step)
    return LoopResult(step, history, resumed)
