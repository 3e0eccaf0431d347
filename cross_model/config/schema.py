"""The experiment configuration's schema: one dataclass per section, each field with its default and
help text (`metadata["help"]`), each section with the checks of its own values (`validate`).

Reading YAML, dotted overrides, sweeps and type checking live in `cross_model.config.loading`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("train", "calibrate", "evaluate", "report")
PRESETS = ("kvcomm_public",)


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with a help text (mutable defaults go through default_factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class PlatformConfig:
    device: str = _f("auto", "auto (cuda, then mps, then cpu), or one of cuda, mps, cpu")
    dtype: str = _f(
        "auto", "auto (bf16 on cuda when supported, fp32 on mps/cpu), or float32, bfloat16, float16"
    )

    def validate(self, prefix: str) -> None:
        _choice(f"{prefix}.device", self.device, ("auto", "cuda", "mps", "cpu"))
        _choice(f"{prefix}.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class ModelsConfig:
    sender: str = _f(
        "smollm2-135m-instruct",
        "model A (sees prompt_A): packaged name, tiny-* test model, HF id or local dir",
    )
    receiver: str = _f(
        "smollm2-135m-instruct", "model B (sees prompt_B, answers): same kinds of spec as sender"
    )
    sender_revision: str | None = _f(
        None, "HF revision (commit or tag) of the sender, recorded with every result"
    )
    receiver_revision: str | None = _f(None, "HF revision of the receiver")
    chat_template_kwargs: dict[str, Any] = _f(
        {},
        "extra variables for every model's chat template, e.g. "
        "{enable_thinking: false} for Qwen3 as C2C evaluates it",
    )

    def template_identity(self) -> dict[str, Any]:
        """What a trained artefact's identity adds for the prompts' templates: nothing by default, so
        artefacts trained before the option existed keep their identity."""
        return (
            {"chat_template_kwargs": dict(self.chat_template_kwargs)}
            if self.chat_template_kwargs
            else {}
        )

    def validate(self, prefix: str) -> None:
        for name in ("sender", "receiver"):
            if not getattr(self, name):
                raise ValueError(
                    f"{prefix}.{name}: must name a model (e.g. smollm2-135m-instruct or tiny-llama-64)"
                )


@dataclass
class TaskConfig:
    name: str = _f("countries", "task registry name (countries, tipsheets, hotpotqa, ..., jsonl)")
    n_test: int | None = _f(None, "number of test items (None: the task's default)")
    n_calib: int = _f(8, "number of calibration items, drawn disjoint from the test items")
    max_new_tokens: int | None = _f(None, "receiver's answer length (None: the task's default)")
    path: str | None = _f(None, "local file or directory for tasks read from disk (jsonl, tmath)")
    seed: int | None = _f(None, "generator seed for synthetic tasks (None: the experiment seed)")
    label: str | None = _f(
        None,
        "what results directories and tables call it (None: its name); lets one run hold a task twice",
    )
    metric: str | None = _f(
        None,
        "score with this metric instead of the task's own (None: the task's; preset kvcomm_public sets the public code's)",
    )
    prompts: str | None = _f(
        None,
        "ours (None) or public: the public KVComm code's prompt templates for math, code and "
        "summaries (preset kvcomm_public sets it)",
    )
    max_context_chars: int | None = _f(
        None,
        "cut every sender context to this many characters, its first and last "
        "halves kept, so every method of the run reads the same text (None: whole)",
    )
    calibrate_on: str | None = _f(
        None,
        "calibration (None): the task's calibration items; test_item_0: its first test item, "
        "and every row scored when n_test is null (the public countries/tip-sheets runs; "
        "preset kvcomm_public sets it on them, and the report marks the task)",
    )

    @property
    def key(self) -> str:
        return self.label or self.name

    def validate(self, prefix: str) -> None:
        if not self.name:
            raise ValueError(f"{prefix}.name: must name a task")
        check_path_name(f"{prefix}.label" if self.label is not None else f"{prefix}.name", self.key)
        if self.n_test is not None and self.n_test < 1:
            raise ValueError(f"{prefix}.n_test: must be >= 1 or null, got {self.n_test}")
        if self.n_calib < 0:
            raise ValueError(f"{prefix}.n_calib: must be >= 0, got {self.n_calib}")
        if self.prompts not in (None, "ours", "public"):
            raise ValueError(f"{prefix}.prompts: null, ours or public, got {self.prompts!r}")
        if self.calibrate_on not in (None, "calibration", "test_item_0"):
            raise ValueError(
                f"{prefix}.calibrate_on: null, calibration or test_item_0, got {self.calibrate_on!r}"
            )
        if self.max_context_chars is not None and self.max_context_chars < 2:
            raise ValueError(
                f"{prefix}.max_context_chars: must be >= 2 or null, got {self.max_context_chars}"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(
                f"{prefix}.max_new_tokens: must be >= 1 or null, got {self.max_new_tokens}"
            )
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ValueError(
                f"{prefix}.path: {self.path!r} does not exist; point it at the task's local file or directory"
            )


@dataclass
class TrainConfig:
    corpus: str = _f(
        "c4",
        "projection training text: c4 (allenai/c4 streamed from the hub) or offline (generated, no network)",
    )
    corpus_path: str | None = _f(
        None, "local text/jsonl files used instead of the hub for corpus=local"
    )
    n_sentences: int = _f(3072, "sentences drawn from the corpus (paper: 3072)")
    heldout_fraction: float = _f(0.1, "fraction of sentences held out for MSE / R^2 / cosine")
    epochs: int = _f(10, "passes over the training sentences (paper: 10)")
    batch_size: int = _f(32, "global batch size in sentences, split over ranks (paper: 32)")
    lr: float = _f(1e-3, "Adam learning rate (paper: 1e-3; solver adam)")
    solver: str = _f(
        "lstsq",
        "lstsq: the exact minimiser of the MSE (ridge-regularised, float64 sums over every rank's pairs); adam: the paper's recipe (epochs, batch_size, lr)",
    )
    ridge: float = _f(
        1e-3,
        "lstsq's ridge, relative to the mean diagonal of A^T A (0: plain least squares; 1e-3 chosen by make projection-ridge)",
    )
    max_length: int = _f(64, "tokens kept per sentence")
    checkpoint_dir: str = _f(
        "checkpoints",
        "where projection checkpoints live, one sub-directory per pair, layers and recipe (relative: under output_dir)",
    )
    checkpoint_every: int = _f(50, "optimizer steps between checkpoints")
    keep_last: int = _f(3, "complete checkpoints kept (older ones are pruned)")
    cache_activations: bool = _f(
        True,
        "cache frozen-model activations (training and held-out) on disk, shared by every solver setting, so later epochs, restarts and refits skip the models",
    )

    def validate(self, prefix: str) -> None:
        _choice(f"{prefix}.corpus", self.corpus, ("c4", "offline", "local"))
        if self.corpus == "local" and not self.corpus_path:
            raise ValueError(f"{prefix}.corpus_path: required when {prefix}.corpus is 'local'")
        for name in (
            "n_sentences",
            "epochs",
            "batch_size",
            "max_length",
            "checkpoint_every",
            "keep_last",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(
                f"{prefix}.heldout_fraction: must be in (0, 1), got {self.heldout_fraction}"
            )
        if self.lr <= 0:
            raise ValueError(f"{prefix}.lr: must be > 0, got {self.lr}")
        _choice(f"{prefix}.solver", self.solver, ("lstsq", "adam"))
        if self.ridge < 0:
            raise ValueError(f"{prefix}.ridge: must be >= 0, got {self.ridge}")


@dataclass
class InterlinguaConfig:
    receivers: list[str] = _f(
        [],
        "frozen receivers the encoder serves (empty: [models.receiver]); packaged names, tiny-*, HF ids",
    )
    m: int = _f(16, "latent vectors per context (paper: 32)")
    d_z: int = _f(64, "width of each latent vector (paper: 256)")
    layers: int = _f(2, "encoder transformer layers")
    heads: int = _f(4, "encoder attention heads")
    max_bytes: int = _f(512, "context bytes the encoder reads (the rest is cut)")
    train_tasks: list[str] = _f(
        [],
        "configured tasks (by label) whose rows past the test items train it (empty: every configured task)",
    )
    n_train: int = _f(512, "training rows per task, disjoint from its test and calibration items")
    n_heldout: int = _f(
        64, "held-out rows per task (after the training rows) for the loss each epoch"
    )
    steps: int = _f(300, "optimizer steps")
    batch_size: int = _f(16, "global batch in rows, split over ranks")
    lr: float = _f(
        1e-3, "AdamW learning rate of the adapters (and of the encoder unless encoder_lr)"
    )
    encoder_lr: float | None = _f(None, "the encoder's own learning rate (None: lr)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(
        0,
        "linear learning-rate warm-up over the first N steps (0: none; LatentWire's paper config: 500)",
    )
    schedule: str = _f(
        "constant",
        "learning rate after the warm-up: constant, or cosine or linear (decays to 0 at the last step)",
    )
    grad_clip: float = _f(
        0.0, "clip the global gradient norm to this before each step (0: off; LatentWire: 1.0)"
    )
    first_weight: float = _f(1.0, "extra cross-entropy weight on the first answer token")
    k_weight: float = _f(0.5, "extra weight on each of the first k_tokens answer tokens")
    k_tokens: int = _f(4, "K of the first-K weighting")
    kd_weight: float = _f(
        0.0, "weight of distillation from the same receiver reading the full text (0: off)"
    )
    tau: float = _f(1.0, "distillation temperature")
    kd_cache_mb: int = _f(
        1024,
        "memory per rank for the teacher's answer logits, computed once per row (rows past it are recomputed)",
    )
    calibrate: bool = _f(True, "scale soft tokens to each receiver's embedding RMS, per example")
    bos: str = _f(
        "auto",
        "BOS before the soft tokens: auto (as the tokenizer does), always (also where it does not), never, "
        "or after_prefix (the LatentWire design's append_bos_after_prefix: between them and the question)",
    )
    engine: str = _f(
        "ddp", "ddp (torch DistributedDataParallel) or deepspeed (ZeRO, stage zero_stage)"
    )
    zero_stage: int = _f(
        2,
        "DeepSpeed ZeRO stage 0, 1 or 2 (engine: deepspeed): shards the optimizer state (1) and gradients (2)",
    )
    checkpoint_dir: str = _f(
        "checkpoints", "where interlingua checkpoints live (relative: under output_dir)"
    )
    checkpoint_every: int = _f(50, "optimizer steps between checkpoints")
    keep_last: int = _f(3, "complete checkpoints kept")
    eval_every: int = _f(50, "steps between held-out losses (also at the end)")
    seed: int | None = _f(None, "initialisation and data-order seed (None: the experiment seed)")

    def validate(self, prefix: str) -> None:
        for name in (
            "m",
            "d_z",
            "layers",
            "heads",
            "max_bytes",
            "n_train",
            "steps",
            "batch_size",
            "k_tokens",
            "checkpoint_every",
            "keep_last",
            "eval_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_z % self.heads:
            raise ValueError(
                f"{prefix}.d_z ({self.d_z}) must be divisible by {prefix}.heads ({self.heads})"
            )
        if self.n_heldout < 0:
            raise ValueError(f"{prefix}.n_heldout: must be >= 0, got {self.n_heldout}")
        if self.encoder_lr is not None and self.encoder_lr <= 0:
            raise ValueError(f"{prefix}.encoder_lr: must be > 0 or null, got {self.encoder_lr}")
        for name in ("lr", "tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name}: must be > 0, got {getattr(self, name)}")
        for name in (
            "weight_decay",
            "first_weight",
            "k_weight",
            "kd_weight",
            "kd_cache_mb",
            "warmup_steps",
            "grad_clip",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")
        _choice(f"{prefix}.engine", self.engine, ("ddp", "deepspeed"))
        _choice(f"{prefix}.schedule", self.schedule, ("constant", "cosine", "linear"))
        if self.warmup_steps >= self.steps and self.schedule != "constant":
            raise ValueError(
                f"{prefix}.warmup_steps ({self.warmup_steps}) must be below steps ({self.steps}) for the "
                f"{self.schedule} schedule to decay"
            )
        _choice(f"{prefix}.bos", self.bos, ("auto", "always", "never", "after_prefix"))
        if self.zero_stage == 3:
            raise ValueError(
                f"{prefix}.zero_stage: 3 partitions the trainable parameters, which this job reads whole "
                f"for held-out statistics and checkpoints; use 0, 1 or 2 (the receivers are not sharded "
                f"by any stage here)"
            )
        _choice(f"{prefix}.zero_stage", self.zero_stage, (0, 1, 2))


@dataclass
class EvalConfig:
    batch_size: int = _f(
        8, "examples per batch for every method (methods may override with their own batch_size)"
    )
    limit: int | None = _f(None, "evaluate only the first N test items of each task (None: all)")
    reuse_prefills: int = _f(
        4,
        "prefills of one batch kept for the other methods reading the same prompts (each holds a batch's "
        "KV cache; freed after the batch; 0: off)",
    )
    fail_fast_items: int = _f(
        16,
        "after a method's first N items on a rank, stop the run if nearly all failed (0: never stop)",
    )
    fail_fast_ratio: float = _f(
        0.9, "the share of those first items that must fail to stop the run"
    )
    log_prompts: bool = _f(
        False, "write the exact text of every prompt each model was given beside each answer"
    )

    def validate(self, prefix: str) -> None:
        if self.fail_fast_items < 0:
            raise ValueError(f"{prefix}.fail_fast_items: a count >= 0, got {self.fail_fast_items}")
        if not 0.0 < self.fail_fast_ratio <= 1.0:
            raise ValueError(
                f"{prefix}.fail_fast_ratio: a share in (0, 1], got {self.fail_fast_ratio}"
            )
        if self.reuse_prefills < 0:
            raise ValueError(f"{prefix}.reuse_prefills: a count >= 0, got {self.reuse_prefills}")
        if self.batch_size < 1:
            raise ValueError(f"{prefix}.batch_size: must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"{prefix}.limit: must be >= 1 or null, got {self.limit}")


@dataclass
class LoggingConfig:
    level: str = _f("INFO", "log level on rank 0 (other ranks log warnings and above)")
    wandb: bool = _f(
        False, "log metrics to Weights & Biases (rank 0 only; needs `pip install wandb`)"
    )
    wandb_project: str = _f("cross_model", "wandb project")
    wandb_mode: str = _f("offline", "wandb mode: online, offline or disabled")
    progress_every_s: float = _f(
        60.0,
        "off a terminal (SLURM logs), rank 0 logs done/total, rate and ETA this often (seconds)",
    )

    def validate(self, prefix: str) -> None:
        if self.progress_every_s < 0:
            raise ValueError(
                f"{prefix}.progress_every_s: seconds >= 0, got {self.progress_every_s}"
            )
        _choice(f"{prefix}.level", self.level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"))
        _choice(f"{prefix}.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))


@dataclass
class ExperimentConfig:
    name: str = _f("experiment", "run name; the run directory is <output_dir>/<name>")
    output_dir: str = _f("runs", "parent directory of run directories")
    seed: int = _f(0, "global seed (task generation, sampling, initialisation)")
    preset: str | None = _f(
        None,
        f"{' or '.join(PRESETS)}: every behaviour of the public KVComm code this project reproduces, at once "
        f"(docs/METHODS.md lists them and what still differs); None: the project's defaults",
    )
    stages: list[str] = _f(list(STAGES), f"stages to run, in order, from {', '.join(STAGES)}")
    controls: bool = _f(
        True,
        "add every control a method declares (LatentWire's shuffled and zero latent per receiver, "
        "C2C's other item and shuffled-A training); false runs only the methods named (tests, quick checks)",
    )
    platform: PlatformConfig = field(
        default_factory=PlatformConfig, metadata={"help": "device and dtype"}
    )
    models: ModelsConfig = field(
        default_factory=ModelsConfig, metadata={"help": "the sender/receiver pair"}
    )
    tasks: list[TaskConfig] = field(
        default_factory=lambda: [TaskConfig()], metadata={"help": "tasks to evaluate"}
    )
    methods: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"baseline": {}, "skyline": {}},
        metadata={
            "help": "method instances: name -> parameters; `method:` names the registry entry (default: the name)"
        },
    )
    train: TrainConfig = field(
        default_factory=TrainConfig, metadata={"help": "projection training"}
    )
    interlingua: InterlinguaConfig = field(
        default_factory=InterlinguaConfig,
        metadata={"help": "LatentWire's encoder and its training"},
    )
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})
    logging: LoggingConfig = field(
        default_factory=LoggingConfig, metadata={"help": "logging and tracking"}
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def validate(self) -> None:
        check_path_name("name", self.name)
        if self.preset is not None:
            _choice("preset", self.preset, PRESETS)
        for stage in self.stages:
            _choice("stages", stage, STAGES)
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages: each stage at most once, got {self.stages}")
        self.platform.validate("platform")
        self.models.validate("models")
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        for i, task in enumerate(self.tasks):
            task.validate(f"tasks.{i}")
        keys = [t.key for t in self.tasks]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"tasks: each task at most once, got {keys}; give a repeated task a distinct label:"
            )
        if not self.methods:
            raise ValueError("methods: at least one method is needed")
        for name, params in self.methods.items():
            check_path_name(f"methods.{name}", name)
            if not isinstance(params, dict):
                raise ValueError(
                    f"methods.{name}: must be a mapping of parameters, got {type(params).__name__}"
                )
        self.train.validate("train")
        self.interlingua.validate("interlingua")
        self.eval.validate("eval")
        self.logging.validate("logging")
        # Method parameters are checked by `context.load_experiment` against each method's own typed
        # parameters: config stays a leaf that knows no method.


PATH_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def check_path_name(key: str, value: Any) -> None:
    """The one rule for every name that becomes a file or directory name (the run, a task's key, a method
    instance): letters, digits and _.+- only, and not `.` or `..`, so no name leaves its directory."""
    if not isinstance(value, str) or not PATH_NAME.fullmatch(value) or value.strip(".") == "":
        raise ValueError(
            f"{key}: {value!r} names a file or directory, so it must be letters, digits or _.+- "
            f"(no path separators, not '.' or '..'); rename it, e.g. {_suggest(value)!r}"
        )


def _suggest(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(value)).strip("._") or "run"


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
        )
