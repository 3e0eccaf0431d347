"""The training recipe both learned cache methods share (`kv_translate`'s projector and `c2c`'s fuser):
the rows, the targets and the optimizer, as method parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cross_model.methods.base import Method, MethodParams

RECIPE_FIELDS = (
    "steps",
    "batch_size_train",
    "lr",
    "weight_decay",
    "warmup_steps",
    "grad_clip",
    "schedule",
    "n_train",
    "n_heldout",
    "data",
    "question",
    "target_tokens",
    "target",
    "seed",
    "gates",
    "train_control",
)


@dataclass
class LearnedCacheParams(MethodParams):
    gates: str = field(
        default="learned",
        metadata={
            "help": "learned (hard at evaluation), open (every paired layer) or closed (none)"
        },
    )
    control: str | None = field(
        default=None,
        metadata={
            "help": "null, or other_item: A reads another test item's context "
            "(the content control at equal bytes, as KVComm's)"
        },
    )
    train_control: str | None = field(
        default=None,
        metadata={
            "help": "null, or shuffled_a: trained with A reading "
            "another training row's context (the training control)"
        },
    )
    steps: int = field(default=200, metadata={"help": "training: optimizer steps"})
    batch_size_train: int = field(
        default=8, metadata={"help": "training: global batch in rows, split over ranks"}
    )
    lr: float = field(default=1e-3, metadata={"help": "training: AdamW learning rate"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "training: AdamW weight decay (C2C trains with some)"}
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "training: linear learning-rate warm-up steps (C2C warms up)"}
    )
    grad_clip: float = field(
        default=0.0,
        metadata={"help": "training: clip the gradient norm to this (0: off; C2C clips)"},
    )
    schedule: str = field(
        default="constant",
        metadata={
            "help": "training: the rate after the warm-up: constant, linear "
            "(C2C's) or cosine, decaying to 0 at the last step"
        },
    )
    n_train: int = field(default=256, metadata={"help": "training rows"})
    n_heldout: int = field(
        default=32, metadata={"help": "held-out rows (loss each eval_every steps)"}
    )
    data: str = field(
        default="offline",
        metadata={
            "help": "offline (generated sentences), c4, tasks (the configured "
            "tasks' rows outside test/calibration), hub:<dataset> "
            "(e.g. hub:teknium/OpenHermes-2.5), or a JSONL path with "
            "context and question fields"
        },
    )
    question: str = field(
        default="Repeat the context word for word.",
        metadata={"help": "B's question for corpus rows"},
    )
    target_tokens: int = field(
        default=24,
        metadata={
            "help": "training target: B's own greedy continuation of context + "
            "question, this many tokens"
        },
    )
    target: str = field(
        default="own",
        metadata={
            "help": "training target: own (B's continuation, above) or gold (the "
            "row's gold answer and EOS, at most target_tokens; C2C trains "
            "on its chat data's responses)"
        },
    )
    eval_every: int = field(
        default=50, metadata={"help": "training: steps between held-out losses"}
    )
    checkpoint_every: int = field(
        default=50, metadata={"help": "training: steps between checkpoints"}
    )
    seed: int = field(default=0, metadata={"help": "training seed (data order, init, gate noise)"})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.gates not in ("learned", "open", "closed"):
            raise ValueError(f"{prefix}.gates: learned, open or closed, got {self.gates!r}")
        if self.control not in (None, "other_item"):
            raise ValueError(f"{prefix}.control: {self.control!r} is not one of null, other_item")
        if self.train_control not in (None, "shuffled_a"):
            raise ValueError(
                f"{prefix}.train_control: {self.train_control!r} is not one of null, shuffled_a"
            )
        for name in (
            "steps",
            "batch_size_train",
            "n_train",
            "target_tokens",
            "eval_every",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if (
            self.data not in ("offline", "c4", "tasks")
            and not self.data.startswith("hub:")
            and not self.data.endswith(".jsonl")
        ):
            raise ValueError(
                f"{prefix}.data: offline, c4, tasks, hub:<dataset> or a .jsonl path, got {self.data!r}"
            )
        if self.lr <= 0:
            raise ValueError(f"{prefix}.lr: must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"{prefix}.schedule: constant, linear or cosine, got {self.schedule!r}"
            )
        if self.target not in ("own", "gold"):
            raise ValueError(f"{prefix}.target: own or gold, got {self.target!r}")
        if min(self.weight_decay, self.warmup_steps, self.grad_clip) < 0:
            raise ValueError(f"{prefix}: weight_decay, warmup_steps and grad_clip must be >= 0")


# What a finished module must match to be resumed or used, beside the pair (its directory's identity).
TRANSLATOR_KEYS = ("pairing", "hidden", "rope", "gate_init", "tau_start", "tau_end", *RECIPE_FIELDS)
FUSER_KEYS = (
    "input",
    "pairing",
    "hidden_dim",
    "intermediate_dim",
    "num_layers",
    "dropout",
    "tau_start",
    "tau_end",
    "anneal_steps",
    *RECIPE_FIELDS,
)


class LearnedCacheMethod(Method):
    """What the two learned cache methods share as methods: their controls, training and tokenizers."""

    @classmethod
    def controls(cls, name: str, params: Any) -> dict[str, dict[str, Any]]:
        """Always on, for a module the train stage fits: the same module with A reading another test
        item's input (equal bytes, wrong content), and one trained with A reading other rows' (what B
        learns without A's content)."""
        if (
            params.control is not None
            or params.train_control is not None
            or params.projector != "train"
        ):
            return {}
        mine = cls.set_fields(params)
        return {
            f"{name}_other_item": {"method": cls.registry_name, **mine, "control": "other_item"},
            f"{name}_shuffled_a": {
                "method": cls.registry_name,
                **mine,
                "train_control": "shuffled_a",
            },
        }

    @classmethod
    def needs_training(cls, params: Any) -> bool:
        return params.projector == "train"

    def check_tokenizers(self) -> None:
        self.donors: dict[str, Any] = {}  # control: other_item
        for lm in (self.pair.sender, self.pair.receiver):
            if not getattr(lm.tokenizer, "is_fast", True):
                raise ValueError(
                    f"methods.{self.name}: {self.registry_name} aligns tokens by characters and needs a "
                    f"fast tokenizer; {lm.info.name}'s is not"
                )
