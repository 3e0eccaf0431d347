"""Training LatentWire's encoder and adapters: the train stage's job.

The frozen receivers run in the platform dtype under no parameter gradients; only the encoder and the
adapters train (DDP over ranks, or DeepSpeed with `interlingua.engine: deepspeed`). Each global batch
is split over ranks and each rank's summed row losses are scaled so that the gradient average over
ranks is the gradient of the global batch's mean loss. Resume, stop signals and the final artefact
work as in projection training (`cross_model.training.loop`): one directory per (receivers, shape, recipe,
data), atomic step checkpoints, a checksummed `final/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from cross_model.checkpointing import FINAL, Trained, directory_slug, publish_once, verify
from cross_model.config import InterlinguaConfig
from cross_model.data import load_task_examples
from cross_model.data.base import Example
from cross_model.data.training_rows import check_disjoint, task_rows
from cross_model.distributed import (
    StopFlag,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_object,
    get_rank,
    get_world_size,
    is_initialized,
    is_main,
)
from cross_model.interlingua.encoder import EncoderShape
from cross_model.interlingua.model import (
    META_FILE,
    WEIGHTS_FILE,
    LatentWire,
    TeacherCache,
    receiver_record,
)
from cross_model.interlingua.receiver_io import answer_text, question_text
from cross_model.training.loop import TrainJob, set_learning_rate, train_loop
from cross_model.training.trainables import Trainable, TrainOutcome, TrainRequest

log = logging.getLogger(__name__)

RECIPE_KEYS = (
    "n_train",
    "n_heldout",
    "steps",
    "batch_size",
    "lr",
    "encoder_lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "grad_clip",
    "first_weight",
    "k_weight",
    "k_tokens",
    "kd_weight",
    "tau",
    "calibrate",
    "bos",
    "engine",
    "zero_stage",
    "seed",
)


# --- what is trained on --------------------------------------------------------------------------------


def training_data(cfg: Any) -> tuple[list[Example], list[Example]]:
    """(training rows, held-out rows) over `interlingua.train_tasks`, disjoint from every test and
    calibration item of the run (checked, not assumed)."""
    ic = cfg.interlingua
    names = ic.train_tasks or [t.key for t in cfg.tasks]
    by_name = {t.key: t for t in cfg.tasks}
    train, held, taken = [], [], []
    for name in names:
        if name not in by_name:
            raise ValueError(
                f"interlingua.train_tasks: {name!r} is not among the configured tasks "
                f"({', '.join(by_name)}); add it under tasks:"
            )
        t = by_name[name]
        seed = t.seed if t.seed is not None else cfg.seed
        test, calib = load_task_examples(t.name, t.n_test, t.n_calib, seed, t.path)
        taken += test + calib
        rows = task_rows(t.name, ic.n_train + ic.n_heldout, seed, t.path)
        train += rows[: ic.n_train]
        held += rows[ic.n_train :]
    check_disjoint(train + held, taken, "interlingua")
    return train, held


# --- identity and where it lives ----------------------------------------------------------------------------


def interlingua_seed(cfg: Any) -> int:
    return cfg.interlingua.seed if cfg.interlingua.seed is not None else cfg.seed


def receiver_names(cfg: Any) -> list[str]:
    return list(cfg.interlingua.receivers) or [cfg.models.receiver]


def shape_of(ic: InterlinguaConfig) -> EncoderShape:
    return EncoderShape(
        m=ic.m, d_z=ic.d_z, layers=ic.layers, heads=ic.heads, max_bytes=ic.max_bytes
    )


def identity_of(cfg: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed or used: receivers, shape, recipe and data."""
    ic = cfg.interlingua
    recipe = {k: getattr(ic, k) for k in RECIPE_KEYS if k != "seed"}
    data = [
        (t.name, t.seed, t.path)
        for t in cfg.tasks
        if t.key in (ic.train_tasks or [x.key for x in cfg.tasks])
    ]
    return {
        "receivers": receiver_names(cfg),
        "shape": shape_of(ic).to_dict(),
        **recipe,
        "seed": interlingua_seed(cfg),
        "data": json.loads(json.dumps(data)),
        **cfg.models.template_identity(),
    }


def checkpoint_root(cfg: Any) -> Path:
    path = Path(cfg.interlingua.checkpoint_dir).expanduser()
    return path if path.is_absolute() else Path(cfg.output_dir) / path


def interlingua_dir(cfg: Any) -> Path:
    ident = identity_of(cfg)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return (
        checkpoint_root(cfg)
        / f"latentwire__{'+'.join(directory_slug(n)[-24:] for n in ident['receivers'])}__{digest}"
    )


def final_dir(cfg: Any) -> Path:
    return interlingua_dir(cfg) / FINAL


# --- held-out statistics ------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_stats(net: LatentWire, rows: list[Example], batch_size: int) -> dict[str, float]:
    """Mean held-out loss and gold NLL with the true latent and with the latent of another row
    (rolled by one within each batch), sharded over ranks and summed."""
    mine = rows[get_rank() :: get_world_size()]
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, nll true, nll shuffled, rows
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        contexts, qs, ans = (
            [e.prompt_A for e in chunk],
            [question_text(e) for e in chunk],
            [answer_text(e) for e in chunk],
        )
        z = net.latent(contexts)
        for r in range(len(net.receivers)):
            true = net.row_losses(z, r, qs, ans, contexts)
            rolled = net.row_losses(z.roll(1, 0), r, qs, ans) if len(chunk) > 1 else true
            sums[0] += float(true["loss"].sum()) / len(net.receivers)
            sums[1] += float(true["nll"].sum()) / len(net.receivers)
            sums[2] += float(rolled["nll"].sum()) / len(net.receivers)
        sums[3] += len(chunk)
    total = all_reduce_sum(sums) if is_initialized() else sums
    n = max(total[3], 1.0)
    return {
        "heldout_loss": total[0] / n,
        "heldout_nll": total[1] / n,
        "heldout_nll_shuffled": total[2] / n,
    }


# --- the loop ---------------------------------------------------------------------------------------------


TrainedInterlingua = Trained  # what the train stage gets back


class _Engine:
    """The optimizer step under DDP (or one process) or DeepSpeed, behind one interface."""

    def __init__(self, net: LatentWire, ic: InterlinguaConfig, world: int, device: torch.device):
        self.net, self.ds = net, None
        encoder = [p for p in net.encoder.parameters() if p.requires_grad]
        mine = {id(p) for p in encoder}
        rest = [p for p in net.parameters() if p.requires_grad and id(p) not in mine]
        groups = [{"params": encoder, "lr": ic.encoder_lr or ic.lr}, {"params": rest, "lr": ic.lr}]
        self.opt = torch.optim.AdamW(groups, lr=ic.lr, weight_decay=ic.weight_decay)
        self.base_lrs = [g["lr"] for g in groups]
        self.ic = ic
        self.model: torch.nn.Module = net
        if ic.engine == "deepspeed":
            if device.type == "cpu":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed looks for CUDA
            try:
                import deepspeed
            except ImportError as err:
                raise ImportError(
                    "interlingua.engine: deepspeed needs DeepSpeed: `DS_BUILD_OPS=0 pip install "
                    "--no-build-isolation -r requirements-deepspeed.txt` (or engine: ddp)"
                ) from err

            micro = math.ceil(ic.batch_size / world)
            config = {
                "train_micro_batch_size_per_gpu": micro,
                "gradient_accumulation_steps": 1,
                "train_batch_size": micro * world,
                "zero_optimization": {"stage": ic.zero_stage},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
                "wall_clock_breakdown": False,
            }
            if (
                ic.grad_clip > 0
            ):  # DeepSpeed clips the global norm over every rank's partition itself
                config["gradient_clipping"] = ic.grad_clip
            self.ds, self.opt, _, _ = deepspeed.initialize(
                model=net, optimizer=self.opt, config=config
            )
            self.model = self.ds
        elif is_initialized():
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    def schedule(self, step: int) -> None:
        """The learning rate of the step about to be taken (`step` counts from 0)."""
        set_learning_rate(
            self.opt, self.base_lrs, step, self.ic.warmup_steps, self.ic.steps, self.ic.schedule
        )

    def step(self, loss: torch.Tensor) -> None:
        if self.ds is not None:
            # DeepSpeed averages gradients over ranks like DDP (one micro-batch, no accumulation), and
            # our loss is already scaled for that average.
            self.ds.backward(loss)
            self.ds.step()
            return
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if (
            self.ic.grad_clip > 0
        ):  # DDP's gradients are already the ranks' mean: every rank clips alike
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.opt.param_groups for p in g["params"]], self.ic.grad_clip
            )
        self.opt.step()

    def optimizer_state(self) -> dict[str, Any]:
        """Collective. ZeRO partitions the optimizer state over ranks: every rank's part is gathered, so
        one checkpoint holds all of them (resumable at the same world size)."""
        if self.ds is None or self.ds.zero_optimization_stage() == 0:
            return {"torch": self.opt.state_dict()}
        return {
            "zero_per_rank": gather_object(plain_zero_state(self.opt.state_dict())),
            "world_size": get_world_size(),
        }

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if ("zero_per_rank" in state) != (
            self.ds is not None and self.ds.zero_optimization_stage() > 0
        ):
            raise ValueError(
                "interlingua: the checkpoint's optimizer state was saved under another engine or ZeRO "
                "stage; resume with the same interlingua.engine / zero_stage"
            )
        if "torch" in state:
            self.opt.load_state_dict(state["torch"])
            return
        if state["world_size"] != get_world_size():
            raise ValueError(
                f"interlingua: ZeRO optimizer state was partitioned over {state['world_size']} ranks, this "
                f"run has {get_world_size()}; resume with the same number of processes"
            )
        # Our weights are fp32, so the fp32 partitions the optimizer updates are restored from the state too.
        self.opt.load_state_dict(
            state["zero_per_rank"], load_optimizer_states=True, load_from_fp32_weights=True
        )


# What a ZeRO-1/2 optimizer's state_dict holds besides plain data, and why it can be left out: our
# checkpoints are read with torch.load(weights_only=True), which refuses DeepSpeed's objects.
_ZERO_OBJECTS = {
    "loss_scaler": "a static scaler without state in fp32 training (a dynamic one is refused below)",
    "zero_stage": "an enum DeepSpeed writes and does not read back; the run's own config says the stage",
    "param_slice_mappings": "fragment addresses for DeepSpeed's universal checkpoints, which we do not use",
}


def plain_zero_state(state: dict[str, Any]) -> dict[str, Any]:
    """A ZeRO-1/2 optimizer state of tensors and plain Python values only, which DeepSpeed's
    `load_state_dict` restores (it keeps its own loss scaler when the state has none). Dynamic loss
    scaling (fp16) carries state in its scaler object, so it is refused rather than lost."""
    if state.get("dynamic_loss_scale"):
        raise ValueError(
            "interlingua: DeepSpeed's dynamic loss scaling (fp16) keeps its state in an object our "
            "checkpoints do not store; train in fp32 or bf16"
        )
    out = {k: v for k, v in state.items() if k not in _ZERO_OBJECTS}

    def check(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                check(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                check(v, f"{where}[{i}]")
        elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float, str))):
            raise TypeError(
                f"interlingua: the ZeRO optimizer state holds a {type(value).__name__} at {where}, "
                f"which a weights-only checkpoint cannot store; add it to _ZERO_OBJECTS with the reason "
                f"it can be left out, or convert it"
            )

    check(out, "state")
    return out


def fit_interlingua(
    net: LatentWire,
    train: list[Example],
    held: list[Example],
    ic: InterlinguaConfig,
    identity: dict[str, Any],
    directory: Path,
    device: torch.device,
    stop: StopFlag | None = None,
    log_metrics: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, LatentWire], None] | None = None,
) -> TrainedInterlingua:
    """Train `net` (receivers attached) on `train`, resuming from the newest checkpoint in `directory`.
    Collective: every rank calls it with the same arguments."""
    world = get_world_size()
    net.loss_weights = {
        "first_weight": ic.first_weight,
        "k_weight": ic.k_weight,
        "k": ic.k_tokens,
        "kd_weight": ic.kd_weight,
        "tau": ic.tau,
    }
    net.teacher = TeacherCache(ic.kd_cache_mb * 2**20)
    net.to(device).train()
    engine = _Engine(net, ic, world, device)
    steps_per_epoch = math.ceil(len(train) / ic.batch_size)
    sidecar = {**identity, "receiver_records": net.records, "total_steps": ic.steps}

    def loss(step: int, rows: list[int], batch_rows: int) -> torch.Tensor:
        mine = [train[i] for i in rows]
        losses = engine.model(
            [e.prompt_A for e in mine],
            [question_text(e) for e in mine],
            [answer_text(e) for e in mine],
        )
        return losses.sum() / batch_rows * world

    def heldout(at: int) -> dict[str, Any]:
        net.eval()
        stats = {
            "step": at,
            "epoch": at / steps_per_epoch,
            **heldout_stats(net, held, ic.batch_size),
        }
        net.train()
        log.info(
            "interlingua: step %d/%d held-out loss %.4f  gold NLL %.4f (another row's latent: %.4f)",
            at,
            ic.steps,
            stats["heldout_loss"],
            stats["heldout_nll"],
            stats["heldout_nll_shuffled"],
        )
        t = net.teacher
        if ic.kd_weight > 0 and t.hits + t.misses:
            log.info(
                "interlingua: teacher logits: %d rows kept (%.0f MB), %.0f%% of lookups served from them",
                len(t.rows),
                t.used / 2**20,
                100 * t.hits / (t.hits + t.misses),
            )
        return stats

    job = TrainJob(
        "interlingua",
        f"train interlingua -> {', '.join(identity['receivers'])}",
        directory,
        net,
        loss,
        engine.step,
        engine.optimizer_state,
        engine.load_optimizer_state,
        len(train),
        ic.batch_size,
        ic.steps,
        identity["seed"],
        ic.checkpoint_every,
        ic.keep_last,
        sidecar,
        tuple(identity),
        heldout=heldout if held else None,
        heldout_every=ic.eval_every,
        heldout_at_start=True,
        stop=stop,
        on_step=on_step,
        log_metrics=log_metrics,
        schedule=engine.schedule,
    )
    done = train_loop(job)
    meta = {
        **sidecar,
        "history": done.history,
        "final_step": done.step,
        "receivers": net.records,
        "shape": net.shape.to_dict(),
        "calibrate": ic.calibrate,
        "bos_policy": net.bos_policy,
        "identity": identity,
    }
    if is_main():
        publish_final(net, directory / FINAL, meta)
    barrier()
    return TrainedInterlingua(directory, meta, resumed_from=done.resumed_from)


def publish_final(net: LatentWire, target: Path, meta: dict[str, Any]) -> None:
    files = {
        WEIGHTS_FILE: {k: v.detach().cpu() for k, v in net.state_dict().items()},
        META_FILE: json.dumps(meta, indent=2, sort_keys=True),
    }
    publish_once(target, files, meta)


def train_interlingua(request: TrainRequest, methods: list[tuple[str, Any]]) -> TrainOutcome:
    """The train stage's LatentWire job: trains (or finds finished) the run's one interlingua, which
    every LatentWire method of the run reads."""
    cfg, ic = request.cfg, request.cfg.interlingua
    directory = interlingua_dir(cfg)
    final = directory / FINAL
    if broadcast_object(verify(final)[0] is not None if is_main() else None):
        meta = json.loads((final / META_FILE).read_text())
        log.info("interlingua: %s is already trained; loaded, not retrained", final)
        trained = TrainedInterlingua(directory, meta, loaded_final=True)
    else:
        receivers = [request.load_model(n) for n in receiver_names(cfg)]
        for lm in receivers:
            lm.model.requires_grad_(False)
        identity = identity_of(cfg)
        train, held = training_data(cfg)
        net = LatentWire(
            shape_of(ic),
            [receiver_record(lm) for lm in receivers],
            ic.calibrate,
            identity["seed"],
            ic.bos,
        )
        net.attach(receivers)
        log.info(
            "interlingua: M=%d d_z=%d, %d encoder layers, %d trainable parameters; %d training / %d held-out rows; "
            "receivers %s; engine %s",
            ic.m,
            ic.d_z,
            ic.layers,
            sum(p.numel() for p in net.parameters()),
            len(train),
            len(held),
            ", ".join(identity["receivers"]),
            ic.engine,
        )
        trained = fit_interlingua(
            net,
            train,
            held,
            ic,
            identity,
            directory,
            receivers[0].device,
            stop=request.stop,
            log_metrics=request.log_metrics,
        )
    record = {
        "directory": str(trained.directory / FINAL),
        "history": trained.meta.get("history", []),
        "identity": trained.meta.get("identity", {}),
        "loaded_final": trained.loaded_final,
    }
    return TrainOutcome({name: trained.directory / FINAL for name, _ in methods}, record)


TRAINABLE = Trainable(
    "interlingua",
    "interlingua",
    "interlingua",
    "interlingua.json",
    train_interlingua,
    lambda request, name, params: final_dir(request.cfg),
)
