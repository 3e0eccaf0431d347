"""Training the learned cache modules: `kv_translate`'s projector (here) and `c2c`'s fuser
(`c2c.train_fuser`), each method instance with `projector: train`, by one fitting routine.

Both models are frozen (inference mode for A, no parameter gradients for B); only the projector trains,
under DDP across ranks (one process: plain). Each row is (context, question): A reads the context as in
evaluation, B reads the question, and the target is B's own greedy continuation of context + question
(`target_tokens` tokens, computed once by B reading both, sharded over ranks, and stored beside the
checkpoints). The loss is B's next-token cross-entropy on the target while reading the projected cache,
the gates Gumbel-sigmoid and annealed. Checkpoints, resume after kill -9 or SIGTERM, refusal of a
checkpoint made for another pair or recipe, and the final artefact work as in projection training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cross_model.c2c.projector import (
    WEIGHTS_FILE,
    CacheProjector,
    model_record,
    new_projector,
    tau_at,
)
from cross_model.c2c.transfer import receiver_cache, sender_side
from cross_model.checkpointing import FINAL, Trained, directory_slug, publish_once, verify
from cross_model.config import resolved_train_config
from cross_model.data import load_task_examples
from cross_model.data.base import QA, Example
from cross_model.data.corpus import load_corpus
from cross_model.data.hub import REVISIONS
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
from cross_model.generation import greedy_generate
from cross_model.kv_layout import layout_forward, use_cross_model_attention
from cross_model.methods.learned_cache import TRANSLATOR_KEYS
from cross_model.methods.other_item import donor_map, with_donor_contexts
from cross_model.models import LoadedModel
from cross_model.prefill_memo import run_prefill
from cross_model.progress import Progress
from cross_model.prompting import (
    chat_wrap,
    encode_texts,
    pad_left,
    receiver_text,
    sender_text,
    skyline_text,
    tokenize_prompts,
)
from cross_model.result_files import write_json_atomically
from cross_model.training.loop import TrainJob, latest_checkpoint, set_learning_rate, train_loop
from cross_model.training.trainables import Trainable, TrainOutcome, TrainRequest

log = logging.getLogger(__name__)

RECIPE_KEYS = TRANSLATOR_KEYS


# --- data ---------------------------------------------------------------------------------------------------


def _examples(rows: list[tuple[str, str, str]], params: Any) -> list[Example]:
    """(context, question, gold answer or "") rows as examples (the gold is `target: gold`'s target)."""
    return [
        Example(f"c2c-{i}", c, q, (g,), "c2c_corpus", params.target_tokens, "f1_match", QA)
        for i, (c, q, g) in enumerate(rows)
    ]


def conversation_pair(row: dict, question: str) -> tuple[str, str, str]:
    """A hub row as (context, question, gold response): `context`/`question`/`answer` fields, or a chat
    dataset's first user turn as the context (OpenHermes-2.5's `conversations`, C2C's training data)
    with `question`, and the assistant turn after it as the gold ("" where there is none)."""
    if "context" in row:
        return row["context"], row.get("question") or question, row.get("answer") or ""
    turns = row.get("conversations") or row.get("messages") or []
    text = lambda t: t.get("value") or t.get("content") or ""  # noqa: E731
    for i, t in enumerate(turns):
        if (t.get("from") or t.get("role")) in ("human", "user"):
            reply = next(
                (
                    text(r)
                    for r in turns[i + 1 :]
                    if (r.get("from") or r.get("role")) in ("gpt", "assistant")
                ),
                "",
            )
            return text(t), question, reply
    raise ValueError(
        f"c2c data: a hub row with neither context nor a user turn (fields: {sorted(row)})"
    )


def hub_pairs(name: str, n: int, question: str) -> list[tuple[str, str, str]]:
    """The first `n` rows of a hub dataset's train split (streamed), as (context, question, gold)."""
    from datasets import load_dataset

    out = []
    for row in load_dataset(name, split="train", streaming=True, revision=REVISIONS.get(name)):
        context, q, gold = conversation_pair(row, question)
        if context.strip():
            out.append((context, q, gold))
        if len(out) == n:
            return out
    raise ValueError(f"c2c data hub:{name}: {len(out)} usable rows, n_train + n_heldout needs {n}")


def task_pairs(cfg: Any, n: int) -> list[tuple[str, str, str]]:
    """Training rows of the configured tasks (`data.training_rows`: never a test or calibration item of
    any run; checked against this run's), as many from each task, interleaved: A reads each row's
    context, B its question."""
    per = -(-n // len(cfg.tasks))
    taken, parts = [], []
    for t in cfg.tasks:
        seed = t.seed if t.seed is not None else cfg.seed
        test, calib = load_task_examples(t.name, t.n_test, t.n_calib, seed, t.path)
        taken += test + calib
        parts.append(task_rows(t.name, per, seed, t.path))
    rows = [r for group in zip(*parts) for r in group][:n]
    check_disjoint(rows, taken, "c2c")
    if len(rows) < n:
        raise ValueError(
            f"c2c data tasks: {len(rows)} rows set aside, n_train + n_heldout needs {n}"
        )
    return [(e.prompt_A, e.prompt_B, e.answers[0] if e.answers else "") for e in rows]


def training_rows(params: Any, cfg: Any = None) -> tuple[list[Example], list[Example]]:
    """(training, held-out) rows from `params.data`: offline or c4 sentences as contexts with
    `params.question`; a JSONL file's context and question fields; `hub:<dataset>`; or `tasks` (the
    configured tasks' rows outside their test and calibration items)."""
    n = params.n_train + params.n_heldout
    if params.data == "tasks":
        if cfg is None:
            raise ValueError("c2c data: tasks needs the experiment's tasks")
        pairs = task_pairs(cfg, n)
    elif params.data.startswith("hub:"):
        pairs = hub_pairs(params.data[4:], n, params.question)
    elif params.data.endswith(".jsonl"):
        lines = [json.loads(x) for x in Path(params.data).read_text().splitlines() if x.strip()]
        bad = [i for i, r in enumerate(lines) if not {"context", "question"} <= set(r)]
        if bad:
            raise ValueError(
                f"c2c data {params.data}: line {bad[0] + 1} lacks a context or question field"
            )
        if len(lines) < n:
            raise ValueError(
                f"c2c data {params.data}: {len(lines)} rows, n_train + n_heldout needs {n}"
            )
        pairs = [(r["context"], r["question"], r.get("answer") or "") for r in lines[:n]]
    else:
        pairs = [(s, params.question, "") for s in load_corpus(params.data, n, params.seed)]
    rows = _examples(pairs, params)
    return rows[: params.n_train], rows[params.n_train :]


@torch.inference_mode()
def gold_targets(b: LoadedModel, rows: list[Example], tokens: int) -> list[list[int]]:
    """Each row's gold answer in B's tokens, then B's EOS, at most `tokens` (C2C's training targets are
    its chat data's responses)."""
    out = []
    for row in rows:
        if not row.answers or not row.answers[0]:
            raise ValueError(
                f"c2c target: gold, but training row {row.example_id} has no gold answer (corpus "
                f"sentences have none; JSONL rows need an `answer` field); use target: own"
            )
        ids = b.tokenizer(row.answers[0], add_special_tokens=False)["input_ids"] + [
            b.tokenizer.eos_token_id
        ]
        out.append(ids[:tokens])
    return out


def receiver_targets(
    b: LoadedModel, rows: list[Example], tokens: int, batch_size: int = 8
) -> list[list[int]]:
    """B's own greedy continuation of each row's context + question, sharded over ranks and gathered."""
    rank, world = get_rank(), get_world_size()
    mine = list(range(rank, len(rows), world))
    out: dict[int, list[int]] = {}
    with Progress(len(mine), "c2c: the receiver's targets", unit="rows") as bar:
        for s in range(0, len(mine), batch_size):
            idx = mine[s : s + batch_size]
            batch = tokenize_prompts(b, [skyline_text(rows[i]) for i in idx])
            gen = greedy_generate(b, batch.input_ids, batch.attention_mask, tokens)
            for i, ids in zip(idx, gen.token_ids):
                out[i] = ids or [b.tokenizer.eos_token_id]
            bar.update(len(idx))
    merged: dict[int, list[int]] = {}
    for part in gather_object(out) if is_initialized() else [out]:
        merged.update(part)
    return [merged[i] for i in range(len(rows))]


# --- the losses ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How a loss reads the gates: `soft` (training: noise drawn from the seed, the step and the rows'
    indices `row_ids`), `hard` (as evaluation sends) or `closed` (every gate shut: B without A)."""

    kind: str
    step: int = 0
    row_ids: tuple[int, ...] = ()


HARD, CLOSED = Mode("hard"), Mode("closed")


class TranslatorLoss(nn.Module):
    """The projector and the loss of a batch of rows; the frozen models are held outside the module
    tree, so DDP sees (and synchronises) the projector's parameters only."""

    what = "kv_translate"  # the log prefix and the method a control names
    donors: dict[str, Example] = {}  # train_control shuffled_a: the row A reads instead of each row

    def __init__(self, projector: CacheProjector, a: LoadedModel, b: LoadedModel, params: Any):
        super().__init__()
        self.projector = projector
        self._models = (a, b)
        self.params = params
        # B must read the projected cache through our attention (its layout and the gates' log g bias):
        # under plain SDPA the gates would get no gradient and the layout would be ignored, silently.
        use_cross_model_attention(b)

    def open_layers(self) -> list[int]:
        return self.projector.open_layers()

    def forward(self, rows: list[Example], targets: list[list[int]], mode: Mode) -> torch.Tensor:
        """Per row, the mean target cross-entropy of B reading the projected cache."""
        p, proj = self.params, self.projector
        gates, layers = None, []
        if mode.kind == "soft" and p.gates == "learned":
            # The gate noise depends on the seed and the step only: every rank draws the same, and a
            # resumed run the same as an uninterrupted one.
            g = torch.Generator().manual_seed(p.seed * 1_000_003 + mode.step)
            gates = proj.soft_gates(tau_at(mode.step, p.steps, p.tau_start, p.tau_end), g)
        elif mode.kind == "hard":
            layers = proj.open_layers()
        elif mode.kind == "soft":
            layers = proj.layers if p.gates == "open" else []
        losses = self.losses(rows, targets, gates, proj.layers if gates is not None else layers)
        return losses + 0.0 * proj.gate_logits.sum()  # every parameter in the graph, for DDP

    def losses(
        self,
        rows: list[Example],
        targets: list[list[int]],
        gates: torch.Tensor | None,
        chosen: list[int],
    ) -> torch.Tensor:
        a, b = self._models
        read = with_donor_contexts(rows, self.donors, self.what) if self.donors else rows
        texts = [sender_text(e) for e in read]
        wrapped = [chat_wrap(a, t) for t in texts]
        ids = encode_texts(a, wrapped)
        top = max((self.projector.partners[l] for l in chosen), default=-1) + 1
        with torch.inference_mode():
            pre = run_prefill(a, pad_left(ids, a.tokenizer.pad_token_id, a.device), ids, top)
        pre.kv = [(k.clone(), v.clone()) for k, v in pre.kv]  # out of inference mode, for autograd
        side = sender_side(a, b, wrapped, ids, pre)
        cache, layout, offset = receiver_cache(
            self.projector, b, side, chosen, gates, a=a, rope=self.params.rope
        )
        prompts = encode_texts(b, [chat_wrap(b, receiver_text(e)) for e in rows])
        full = [p + t for p, t in zip(prompts, targets)]
        batch = pad_left(full, b.tokenizer.pad_token_id, b.device)
        pos = offset.to(b.device)[:, None] + (batch.attention_mask.long().cumsum(-1) - 1).clamp(
            min=0
        )
        logits = layout_forward(b, layout, all_logits=True)(
            cache=cache,
            full_mask_BT=batch.attention_mask,
            position_ids_BT=pos,
            input_ids_BT=batch.input_ids,
        )
        return target_losses(logits, targets)


def target_losses(
    logits_BTV: torch.Tensor, targets: list[list[int]], ends: list[int] | None = None
) -> torch.Tensor:
    """Per row, the mean cross-entropy of its target, which ends at column `ends[i]` (default: the last):
    position p predicts token p + 1."""
    losses = []
    width = logits_BTV.shape[1]
    for i, t in enumerate(targets):
        end = width if ends is None else ends[i]
        pred = logits_BTV[i, end - len(t) - 1 : end - 1].float()
        losses.append(F.cross_entropy(pred, torch.tensor(t, device=pred.device)))
    return torch.stack(losses)


# --- identity and where it lives ----------------------------------------------------------------------------


def identity_of(
    params: Any,
    a: LoadedModel,
    b: LoadedModel,
    cfg: Any = None,
    keys: tuple[str, ...] = RECIPE_KEYS,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed or used: the pair, the recipe and (data: tasks) the tasks."""
    p = asdict(params)
    out = {"sender": model_record(a), "receiver": model_record(b), **{k: p[k] for k in keys}}
    if params.data == "tasks" and cfg is not None:
        # training rows are a split of their own: they depend on the task, its seed and source, not on sizes
        out["tasks"] = [
            [t.name, t.seed if t.seed is not None else cfg.seed, t.path] for t in cfg.tasks
        ]
    return {**out, **(cfg.models.template_identity() if cfg is not None else {})}


def learned_dir(root: str | Path, identity: dict[str, Any], prefix: str) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return (
        Path(root)
        / f"{prefix}__{directory_slug(identity['sender']['name'])[-24:]}__{directory_slug(identity['receiver']['name'])[-24:]}__{digest}"
    )


@torch.no_grad()
def heldout_losses(
    net: nn.Module, rows: list[Example], targets: list[list[int]], batch_size: int
) -> dict[str, float]:
    """Mean held-out target cross-entropy with the hard gates (what evaluation sends) and with every gate
    closed (B without A: the baseline's loss on the same targets), sharded over ranks and summed."""
    idx = list(range(get_rank(), len(rows), get_world_size()))
    sums = [0.0, 0.0, 0.0]
    for s in range(0, len(idx), batch_size):
        part = idx[s : s + batch_size]
        r, t = [rows[i] for i in part], [targets[i] for i in part]
        sums[0] += float(net(r, t, HARD).sum())
        sums[1] += float(net(r, t, CLOSED).sum())
        sums[2] += len(part)
    total = all_reduce_sum(sums) if is_initialized() else sums
    n = max(total[2], 1.0)
    return {
        "heldout_loss": total[0] / n,
        "heldout_loss_closed": total[1] / n,
        "open_layers": len(net.open_layers()),
    }


TrainedProjector = Trained  # what the train stage gets back


def fit_projector(
    net: nn.Module,
    b: LoadedModel,
    params: Any,
    identity: dict[str, Any],
    directory: Path,
    rows: tuple[list[Example], list[Example]] | None = None,
    keep_last: int = 3,
    stop: StopFlag | None = None,
    log_metrics: Any = None,
) -> TrainedProjector:
    """Train `net.projector` (the translator's projector or C2C's fuser) on `rows` (training, held-out;
    default `training_rows(params)`), resuming from the newest checkpoint in `directory`. Collective."""
    world = get_world_size()
    projector, what = net.projector, net.what
    ckpt = latest_checkpoint(
        directory, keep_last, identity, tuple(identity)
    )  # refused before anything is computed
    train, held = rows if rows is not None else training_rows(params)
    targets_file = directory / "targets.json"
    if broadcast_object(targets_file.exists() if is_main() else None):
        targets = json.loads(targets_file.read_text())
    else:
        targets = (
            gold_targets(b, train + held, params.target_tokens)
            if params.target == "gold"
            else receiver_targets(b, train + held, params.target_tokens)
        )
        if is_main():
            directory.mkdir(parents=True, exist_ok=True)
            write_json_atomically(targets_file, targets)
    train_t, held_t = targets[: len(train)], targets[len(train) :]
    if (
        params.train_control == "shuffled_a"
    ):  # A reads another row's input; B reads its own, targets its own
        net.donors = {**donor_map(train), **donor_map(held)}
    projector.to(b.device).train()
    model: nn.Module = net
    if is_initialized():
        model = DDP(net, device_ids=[b.device.index] if b.device.type == "cuda" else None)
    trained = [p for p in projector.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(train) / params.batch_size_train)

    def loss(step: int, mine: list[int], batch_rows: int) -> torch.Tensor:
        rows = model(
            [train[i] for i in mine], [train_t[i] for i in mine], Mode("soft", step, tuple(mine))
        )
        # Each rank's share of the global batch's mean; DDP averages over ranks, hence the factor `world`.
        return rows.sum() / batch_rows * world

    def step_optimizer(value: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        value.backward()
        if (
            params.grad_clip > 0
        ):  # DDP's gradients are already the ranks' mean: every rank clips alike
            torch.nn.utils.clip_grad_norm_(trained, params.grad_clip)
        opt.step()

    def schedule(step: int) -> None:
        set_learning_rate(
            opt, [params.lr], step, params.warmup_steps, params.steps, params.schedule
        )

    def heldout(at: int) -> dict[str, Any]:
        projector.eval()
        stats = {
            "step": at,
            "epoch": at / steps_per_epoch,
            **heldout_losses(net, held, held_t, params.batch_size_train),
        }
        projector.train()
        log.info(
            "%s: step %d/%d held-out loss %.4f (every gate closed: %.4f), %d layers open",
            what,
            at,
            params.steps,
            stats["heldout_loss"],
            stats["heldout_loss_closed"],
            stats["open_layers"],
        )
        return stats

    job = TrainJob(
        what,
        f"train {what} {identity['sender']['name']} -> {identity['receiver']['name']}",
        directory,
        projector,
        loss,
        step_optimizer,
        opt.state_dict,
        opt.load_state_dict,
        len(train),
        params.batch_size_train,
        params.steps,
        params.seed,
        params.checkpoint_every,
        keep_last,
        identity,
        tuple(identity),
        heldout=heldout if held else None,
        heldout_every=steps_per_epoch,
        heldout_at_start=True,
        stop=stop,
        log_metrics=log_metrics,
        schedule=schedule,
    )
    done = train_loop(job, ckpt)
    projector.eval()
    meta = {
        **identity,
        "history": done.history,
        "final_step": done.step,
        "open_layers": net.open_layers(),
        "partners": projector.partners,
        "identity": identity,
    }
    if is_main():
        publish_once(
            directory / FINAL,
            {WEIGHTS_FILE: {k: v.detach().cpu() for k, v in projector.state_dict().items()}},
            meta,
        )
    barrier()
    return TrainedProjector(directory, meta, resumed_from=done.resumed_from)


@dataclass(frozen=True)
class LearnedCache:
    """What differs between the two learned cache methods' training: the directory prefix, the recipe
    keys a checkpoint must match, a fresh module for a pair and the loss around it."""

    prefix: str
    keys: tuple[str, ...]
    new: Callable[[Any, LoadedModel, LoadedModel], nn.Module]
    net: Callable[[nn.Module, LoadedModel, LoadedModel, Any], nn.Module]


TRANSLATOR = LearnedCache("kv_translate", RECIPE_KEYS, new_projector, TranslatorLoss)


def train_learned(
    request: TrainRequest,
    name: str,
    params: Any,
    a: LoadedModel,
    b: LoadedModel,
    spec: LearnedCache,
) -> TrainedProjector:
    """One method instance's learned cache module (its sender `a`, receiver `b`): trained, or found finished."""
    cfg = request.cfg
    for lm in (a, b):
        lm.model.requires_grad_(False)
    identity = identity_of(params, a, b, cfg, spec.keys)
    train_cfg = resolved_train_config(cfg)
    directory = learned_dir(train_cfg.checkpoint_dir, identity, spec.prefix)
    final = directory / FINAL
    if broadcast_object(verify(final)[0] is not None if is_main() else None):
        log.info("%s: %s is already trained; loaded, not retrained", spec.prefix, final)
        return TrainedProjector(directory, verify(final)[0] or {}, loaded_final=True)
    module = spec.new(params, a, b)
    log.info(
        "methods.%s: %s %s -> %s (%s pairing, %d receiver layers paired), %d trainable parameters",
        name,
        spec.prefix,
        a.info.name,
        b.info.name,
        params.pairing,
        len(module.partners),
        sum(p.numel() for p in module.parameters()),
    )
    return fit_projector(
        spec.net(module, a, b, params),
        b,
        params,
        identity,
        directory,
        training_rows(params, cfg),
        train_cfg.keep_last,
        request.stop,
        request.log_metrics,
    )


def train_methods(
    request: TrainRequest, methods: list[tuple[str, Any]], spec: LearnedCache
) -> TrainOutcome:
    """A train stage job: each method instance its own module (its pair and recipe decide where)."""
    artefacts, record = {}, {}
    for name, params in methods:
        pair = request.model_pair(params)
        trained = train_learned(request, name, params, pair.sender, pair.receiver, spec)
        artefacts[name] = trained.directory / FINAL
        record[name] = {
            "directory": str(trained.directory / FINAL),
            "history": trained.meta.get("history", []),
            "open_layers": trained.meta.get("open_layers"),
            "loaded_final": trained.loaded_final,
        }
    return TrainOutcome(artefacts, record)


def final_dir(
    cfg: Any, params: Any, a: LoadedModel, b: LoadedModel, spec: LearnedCache = TRANSLATOR
) -> Path:
    root = Path(resolved_train_config(cfg).checkpoint_dir)
    return learned_dir(root, identity_of(params, a, b, cfg, spec.keys), spec.prefix) / FINAL


def trainable(name: str, spec: LearnedCache, what: str) -> Trainable:
    def locate(request: TrainRequest, instance: str, params: Any) -> Path:
        pair = request.model_pair(params)
        return final_dir(request.cfg, params, pair.sender, pair.receiver, spec)

    return Trainable(
        name,
        f"methods.<{name} instance> and train",
        what,
        f"{name}.json",
        lambda request, methods: train_methods(request, methods, spec),
        locate,
    )


TRAINABLE = trainable("kv_translate", TRANSLATOR, "kv_translate projector")
