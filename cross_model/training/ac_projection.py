"""Fitting the learned projection W (A's layer-k residual -> B's layer-j residual), data-parallel.

Recipe (METHODS.md, "AC's learned projection"): the same sentence goes to both frozen models; the
pair is (A's hidden_states[k], B's hidden_states[j]) at the last real token. Each frozen model runs
only up to its layer, under inference_mode, in the platform dtype (bf16 on GPU). The objective is the
mean squared error. `solver: lstsq` (default) minimises it exactly: every rank sums A^T A and A^T B
over its share of the pairs in float64, the sums are all-reduced, and all solve the same ridge system.
`solver: adam` is the paper's optimizer: only W is wrapped in DDP, every global batch is split over
ranks (no sentence twice per epoch) and each rank's loss is scaled so that DDP's gradient average
equals the gradient of the global-batch mean squared error.

Resume: started again with the same arguments, training continues from the newest complete
checkpoint; a finished projection (`final/`) is loaded, not retrained. SIGTERM/SIGUSR1 set a flag
that all ranks agree on every step; they save and leave together (`Preempted`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cross_model.checkpointing import FINAL, directory_slug, publish_once, verify, write_atomically
from cross_model.config import TrainConfig, resolved_train_config
from cross_model.data.corpus import load_corpus
from cross_model.distributed import (
    StopFlag,
    all_reduce_tensors,
    barrier,
    broadcast_object,
    gather_object,
    get_rank,
    get_world_size,
    is_initialized,
    is_main,
)
from cross_model.models import LoadedModel
from cross_model.projection import LearnedProjection, load_projection
from cross_model.prompting import pad_left
from cross_model.surgery import check_layer, last_token, partial_forward
from cross_model.training.loop import TrainJob, train_loop
from cross_model.training.trainables import Trainable, TrainOutcome, TrainRequest

log = logging.getLogger(__name__)

ACTIVATIONS = "activations"
RECIPE_KEYS = (
    "corpus",
    "corpus_path",
    "n_sentences",
    "heldout_fraction",
    "solver",
    "ridge",
    "epochs",
    "batch_size",
    "lr",
    "max_length",
    "seed",
)


# --- identity, recipe and where a projection lives ---------------------------------------------


def projection_identity(
    sender: LoadedModel, receiver: LoadedModel, k: int, j: int
) -> dict[str, Any]:
    s, r = sender.info, receiver.info
    return {
        "sender": s.name,
        "receiver": r.name,
        "sender_revision": s.revision,
        "receiver_revision": r.revision,
        "k": k,
        "j": j,
        "d_in": s.hidden_size,
        "d_out": r.hidden_size,
    }


def training_recipe(cfg: TrainConfig, seed: int) -> dict[str, Any]:
    recipe = {key: getattr(cfg, key) for key in RECIPE_KEYS if key != "seed"}
    return {**recipe, "seed": seed}


def projection_dir(
    checkpoint_dir: str | Path, identity: dict[str, Any], recipe: dict[str, Any]
) -> Path:
    """One directory per (pair, layers, recipe): a changed recipe never resumes another's checkpoints."""
    digest = hashlib.sha256(
        json.dumps({**identity, **recipe}, sort_keys=True).encode()
    ).hexdigest()[:10]
    name = f"{directory_slug(identity['sender'])}__{directory_slug(identity['receiver'])}__k{identity['k']}_j{identity['j']}__{digest}"
    return Path(checkpoint_dir).expanduser() / name


DATA_KEYS = ("corpus", "corpus_path", "n_sentences", "heldout_fraction", "max_length", "seed")


def activations_dir(
    checkpoint_dir: str | Path, identity: dict[str, Any], recipe: dict[str, Any]
) -> Path:
    """Where the frozen models' activations for (pair, layers, sentences) are cached: shared by every
    solver and optimizer setting, which change W but not the pairs it is fitted on."""
    key = {**identity, **{k: recipe[k] for k in DATA_KEYS}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{directory_slug(identity['sender'])}__{directory_slug(identity['receiver'])}__k{identity['k']}_j{identity['j']}__{digest}"
    return Path(checkpoint_dir).expanduser() / ACTIVATIONS / name


def final_projection_dir(
    checkpoint_dir: str | Path, identity: dict[str, Any], recipe: dict[str, Any]
) -> Path:
    return projection_dir(checkpoint_dir, identity, recipe) / FINAL


# --- activations ---------------------------------------------------------------------------------


def _encode_raw(
    lm: LoadedModel, texts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [lm.tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    batch = pad_left(ids, lm.tokenizer.pad_token_id, lm.device)
    return batch.input_ids, batch.attention_mask


def frozen_activations(
    sender: LoadedModel,
    receiver: LoadedModel,
    k: int,
    j: int,
    texts: list[str],
    max_length: int,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A's hidden_states[k], B's hidden_states[j]) at each text's last real token, fp32 on CPU."""
    a_parts, b_parts = [], []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        out = []
        for lm, layer in ((sender, k), (receiver, j)):
            ids, mask = _encode_raw(lm, chunk, max_length)
            with torch.inference_mode():
                h = last_token(partial_forward(lm, ids, mask, layer), mask)
            # A copy made outside inference mode, so that autograd may use it as an input.
            out.append(h.float().cpu().clone())
        a_parts.append(out[0])
        b_parts.append(out[1])
    d_a, d_b = sender.info.hidden_size, receiver.info.hidden_size
    return (
        torch.cat(a_parts) if a_parts else torch.zeros(0, d_a),
        torch.cat(b_parts) if b_parts else torch.zeros(0, d_b),
    )


def sharded_activations(compute: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]], n: int):
    """Every rank computes the items i % world == rank; all ranks get all n pairs, in order."""
    rank, world = get_rank(), get_world_size()
    mine = list(range(rank, n, world))
    a, b = compute(mine)
    parts = gather_object((mine, a, b))
    a_all = torch.empty(n, a.shape[-1])
    b_all = torch.empty(n, b.shape[-1])
    for idx, pa, pb in parts:
        if idx:
            a_all[idx], b_all[idx] = pa, pb
    return a_all, b_all


# --- fit statistics ------------------------------------------------------------------------------


@torch.no_grad()
def fit_statistics(proj: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Held-out MSE, R^2 (1 - SSE / SST about the per-dimension mean) and mean cosine similarity."""
    if len(a) == 0:
        return {"mse": float("nan"), "r2": float("nan"), "cosine": float("nan")}
    dev = next(proj.parameters()).device
    pred = proj(a.to(dev)).float().cpu()
    err = ((pred - b) ** 2).sum().item()
    sst = ((b - b.mean(0, keepdim=True)) ** 2).sum().item()
    cos = torch.nn.functional.cosine_similarity(pred, b, dim=-1).mean().item()
    return {
        "mse": err / b.numel(),
        "r2": 1.0 - err / sst if sst > 0 else float("nan"),
        "cosine": cos,
    }


# --- the data-parallel fit ---------------------------------------------------------------------------


@dataclass
class FitResult:
    projection: LearnedProjection
    meta: dict[str, Any]
    directory: Path
    resumed_from: int | None = None
    loaded_final: bool = False


def least_squares(
    train_pairs: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    n_train: int,
    d_in: int,
    d_out: int,
    ridge: float,
    chunk: int = 256,
) -> torch.Tensor:
    """The W (d_out x d_in) minimising sum ||W a - b||^2 + lam ||W||^2 over every training pair, with
    lam = ridge x mean diagonal of A^T A (scale-free). Each rank sums A^T A and A^T B over its pairs in
    float64; the sums are all-reduced and every rank solves the same system."""
    rank, world = get_rank(), get_world_size()
    mine = list(range(rank, n_train, world))
    gram = torch.zeros(d_in, d_in, dtype=torch.float64)
    cross = torch.zeros(d_in, d_out, dtype=torch.float64)
    for i in range(0, len(mine), chunk):
        a, b = train_pairs(mine[i : i + chunk])
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        gram += a.T @ a
        cross += a.T @ b
    gram, cross = all_reduce_tensors([gram, cross])
    lam = ridge * float(gram.diagonal().mean())
    # lstsq (not solve): with ridge 0 and fewer pairs than d_in the system is singular; gelsy copes.
    solution = torch.linalg.lstsq(
        gram + lam * torch.eye(d_in, dtype=torch.float64), cross, driver="gelsy"
    ).solution
    return solution.T.float().contiguous()


def _warn_if_unfitted(stats: dict[str, float], n_train: int, d_in: int, solver: str) -> None:
    if stats.get("r2", 0.0) < 0:
        fix = (
            "a larger train.ridge"
            if solver == "lstsq"
            else "train.solver: lstsq (the exact minimiser)"
        )
        log.warning(
            "train: held-out R^2 = %.3f < 0: W predicts B's residual worse than its mean does, so AC with it "
            "sends B an off-distribution vector. Fit with more sentences (%d training pairs for d_A = %d; the "
            "paper used 3072 for 3072) or %s.",
            stats["r2"],
            n_train,
            d_in,
            fix,
        )


def fit_projection(
    train_pairs: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    n_train: int,
    heldout: tuple[torch.Tensor, torch.Tensor],
    identity: dict[str, Any],
    recipe: dict[str, Any],
    directory: Path,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    stop: StopFlag | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    log_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Fit W on `train_pairs(indices) -> (a, b)` for indices in range(n_train), resuming from the
    newest complete checkpoint in `directory`. Collective: every rank calls it with the same arguments."""
    world = get_world_size()
    seed = recipe["seed"]
    proj = LearnedProjection(identity["d_in"], identity["d_out"], seed=seed).to(device)
    if cfg.solver == "lstsq":
        return _fit_exactly(proj, train_pairs, n_train, heldout, identity, recipe, directory, cfg)
    opt = torch.optim.Adam(proj.parameters(), lr=cfg.lr)
    total = math.ceil(n_train / cfg.batch_size) * cfg.epochs
    sidecar = {**identity, **recipe, "dtype": "float32", "bias": False, "total_steps": total}
    model: torch.nn.Module = proj
    if is_initialized():
        model = DDP(
            proj,
            device_ids=[torch.device(device).index]
            if torch.device(device).type == "cuda"
            else None,
        )

    def loss(step: int, rows: list[int], batch_rows: int) -> torch.Tensor:
        a, target = train_pairs(rows)
        pred = model(a.to(device))
        # Sum over this rank's rows / (global rows x width) x world: DDP's mean over ranks then gives
        # exactly the gradient of the global batch's MSE, however the batch was split.
        return (
            ((pred - target.to(device).float()) ** 2).sum()
            / (batch_rows * identity["d_out"])
            * world
        )

    def step_optimizer(value: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    def heldout_fit(step: int) -> dict[str, Any]:
        stats = {
            "epoch": step // job.steps_per_epoch,
            "step": step,
            **fit_statistics(proj, *heldout),
        }
        log.info(
            "train: epoch %d/%d held-out mse %.4g  R^2 %.4f  cosine %.4f",
            stats["epoch"],
            cfg.epochs,
            stats["mse"],
            stats["r2"],
            stats["cosine"],
        )
        return stats

    job = TrainJob(
        "train",
        f"train {identity['sender']}->{identity['receiver']}",
        directory,
        proj,
        loss,
        step_optimizer,
        opt.state_dict,
        opt.load_state_dict,
        n_train,
        cfg.batch_size,
        total,
        seed,
        cfg.checkpoint_every,
        cfg.keep_last,
        sidecar,
        tuple(identity) + RECIPE_KEYS,
        heldout=heldout_fit,
        heldout_every=math.ceil(n_train / cfg.batch_size),
        save_after_heldout=True,
        stop=stop,
        on_step=on_step,
        log_metrics=log_metrics,
    )
    done = train_loop(job)
    history = done.history
    meta = {
        **sidecar,
        "history": history,
        "final_step": done.step,
        "fit": history[-1] if history else {},
    }
    return _finish(proj, meta, directory, n_train, done.resumed_from)


def _fit_exactly(
    proj: LearnedProjection,
    train_pairs: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    n_train: int,
    heldout: tuple[torch.Tensor, torch.Tensor],
    identity: dict[str, Any],
    recipe: dict[str, Any],
    directory: Path,
    cfg: TrainConfig,
) -> FitResult:
    """solver lstsq: one pass over the pairs, no step checkpoints (a restart recomputes the sums from
    the activation cache in seconds)."""
    weight = least_squares(train_pairs, n_train, identity["d_in"], identity["d_out"], cfg.ridge)
    with torch.no_grad():
        proj.linear.weight.copy_(weight.to(proj.linear.weight.device))
    stats = {"epoch": 1, "step": 1, **fit_statistics(proj, *heldout)}
    log.info(
        "train: least squares (ridge %g) over %d pairs: held-out mse %.4g  R^2 %.4f  cosine %.4f",
        cfg.ridge,
        n_train,
        stats["mse"],
        stats["r2"],
        stats["cosine"],
    )
    meta = {
        **identity,
        **recipe,
        "dtype": "float32",
        "bias": False,
        "total_steps": 1,
        "history": [stats],
        "final_step": 1,
        "fit": stats,
    }
    return _finish(proj, meta, directory, n_train, None)


def _finish(
    proj: LearnedProjection,
    meta: dict[str, Any],
    directory: Path,
    n_train: int,
    resumed: int | None,
) -> FitResult:
    _warn_if_unfitted(meta["fit"], n_train, meta["d_in"], meta.get("solver", "adam"))
    if is_main():
        publish_final(proj, directory / FINAL, meta)
    barrier()
    return FitResult(proj.cpu().eval().requires_grad_(False), meta, directory, resumed_from=resumed)


def publish_final(proj: LearnedProjection, target: Path, meta: dict[str, Any]) -> None:
    """The finished W in the format `load_projection` reads, written atomically (checksummed)."""
    files = {
        "projection.safetensors": {k: v.detach() for k, v in proj.state_dict().items()},
        "projection.json": json.dumps(meta, indent=2, sort_keys=True),
    }
    publish_once(target, files, meta)


# --- the model-driven entry points ---------------------------------------------------------------


def train_projection(
    sender: LoadedModel,
    receiver: LoadedModel,
    k: int,
    j: int,
    cfg: TrainConfig,
    seed: int,
    stop: StopFlag | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    log_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Fit (or load, if already finished) W for A's layer k -> B's layer j on the configured corpus."""
    check_layer(sender, k, "k")
    check_layer(receiver, j, "j")
    identity, recipe = projection_identity(sender, receiver, k, j), training_recipe(cfg, seed)
    directory = projection_dir(cfg.checkpoint_dir, identity, recipe)
    final = directory / FINAL
    # Rank 0 decides about shared files and tells the others (it may be moving a damaged one aside).
    if broadcast_object(verify(final)[0] is not None if is_main() else None):
        proj, meta = load_projection(final, identity)
        log.info(
            "train: %s is already trained (R^2 %.4f); loaded, not retrained",
            final,
            meta.get("fit", {}).get("r2", float("nan")),
        )
        return FitResult(proj, meta, directory, loaded_final=True)

    # One rank reads the corpus (C4 streams from the hub) and every rank gets the same sentences.
    sentences = (
        load_corpus(cfg.corpus, cfg.n_sentences, seed, cfg.corpus_path) if is_main() else None
    )
    sentences = broadcast_object(sentences)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = max(1, round(len(sentences) * cfg.heldout_fraction))
    held_texts = [sentences[i] for i in order[:n_held]]
    train_texts = [sentences[i] for i in order[n_held:]]
    if len(train_texts) < 1:
        raise ValueError(
            f"train.n_sentences={cfg.n_sentences} leaves no training sentence after the held-out split"
        )

    def compute(texts: list[str]) -> Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]:
        return lambda idx: frozen_activations(
            sender, receiver, k, j, [texts[i] for i in idx], cfg.max_length
        )

    if cfg.cache_activations:
        cache = activations_dir(cfg.checkpoint_dir, identity, recipe)
        key = {**identity, **{k: recipe[k] for k in DATA_KEYS}}
        heldout = cached_activations(cache / "heldout", key, compute(held_texts), len(held_texts))
        a_all, b_all = cached_activations(
            cache / "train", key, compute(train_texts), len(train_texts)
        )
        train_pairs = lambda idx: (a_all[idx], b_all[idx])  # noqa: E731
    else:
        heldout = sharded_activations(compute(held_texts), len(held_texts))
        train_pairs = compute(train_texts)
    how = (
        f"{cfg.epochs} epochs of Adam"
        if cfg.solver == "adam"
        else f"least squares, ridge {cfg.ridge:g}"
    )
    log.info(
        "train: %s k=%d -> %s j=%d (%d -> %d), %d train / %d held-out sentences, %s",
        identity["sender"],
        k,
        identity["receiver"],
        j,
        identity["d_in"],
        identity["d_out"],
        len(train_texts),
        len(held_texts),
        how,
    )
    return fit_projection(
        train_pairs,
        len(train_texts),
        heldout,
        identity,
        recipe,
        directory,
        cfg,
        device=receiver.device,
        stop=stop,
        on_step=on_step,
        log_metrics=log_metrics,
    )


def cached_activations(
    directory: Path,
    key: dict[str, Any],
    compute: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All n pairs, from the on-disk cache when it verifies and matches, else computed (sharded over
    ranks) and written by rank 0."""
    from safetensors.torch import load_file

    usable, why = None, ""
    if is_main():
        meta, why = verify(directory)
        usable = meta is not None and meta.get("key") == key and meta.get("n") == n
    if broadcast_object(usable):  # rank 0 decides; the others read only what it found complete
        tensors = load_file(str(directory / "activations.safetensors"))
        log.info("train: frozen-model activations read from the cache %s", directory)
        return tensors["a"], tensors["b"]
    if directory.exists() and is_main():
        log.warning(
            "activation cache %s is not usable (%s); recomputing",
            directory,
            why or "different recipe",
        )
        os.rename(directory, directory.with_name(f"{directory.name}.stale-{time.time_ns()}"))
    a, b = sharded_activations(compute, n)
    if is_main():
        write_atomically(
            directory, {"activations.safetensors": {"a": a, "b": b}}, {"key": key, "n": n}
        )
    barrier()
    return a, b


def train_projections_for(request: TrainRequest, methods: list[tuple[str, Any]]) -> TrainOutcome:
    """The train stage's job for AC: one projection per distinct (pair, k, j) among `methods`; the
    record says, per method, where its W is and how it fits the held-out pairs."""
    fits: dict[str, dict[str, Any]] = {}
    artefacts: dict[str, Path] = {}
    done: dict[tuple, FitResult] = {}
    train_cfg = resolved_train_config(request.cfg)
    for name, params in methods:
        pair = request.model_pair(params)
        key = (pair.sender.info.name, pair.receiver.info.name, params.k, params.j)
        if key not in done:
            done[key] = train_projection(
                pair.sender,
                pair.receiver,
                params.k,
                params.j,
                train_cfg,
                request.cfg.seed,
                stop=request.stop,
                log_metrics=request.log_metrics,
            )
        result = done[key]
        artefacts[name] = result.directory / FINAL
        fit = result.meta.get("fit", {})
        log.info(
            "train: %s uses %s (held-out R^2 %.4f, cosine %.4f)",
            name,
            result.directory / FINAL,
            fit.get("r2", float("nan")),
            fit.get("cosine", float("nan")),
        )
        meta = result.meta
        fits[name] = {
            "directory": str(result.directory / FINAL),
            "fit": fit,
            "loaded_final": result.loaded_final,
            **{
                k: meta.get(k)
                for k in (
                    "sender",
                    "receiver",
                    "k",
                    "j",
                    "d_in",
                    "d_out",
                    "solver",
                    "ridge",
                    "corpus",
                    "n_sentences",
                    "epochs",
                )
            },
        }
    return TrainOutcome(artefacts, fits)


def locate_projection(request: TrainRequest, name: str, params: Any) -> Path:
    """Where a finished W for this method's pair, layers and the run's train settings lies."""
    pair = request.model_pair(params)
    identity = projection_identity(pair.sender, pair.receiver, params.k, params.j)
    train = resolved_train_config(request.cfg)
    return final_projection_dir(
        train.checkpoint_dir, identity, training_recipe(train, request.cfg.seed)
    )


TRAINABLE = Trainable(
    "projection",
    "train",
    "projection W",
    "projections.json",
    train_projections_for,
    locate_projection,
)
