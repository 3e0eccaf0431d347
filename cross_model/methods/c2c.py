"""C2C as thu-nics/C2C computes it (Fu et al., ICLR 2026; docs/METHODS.md): both models read B's
prompt; B's cache of it is fused, layer by layer, with A's cache of the same characters through a
trained fuser (`c2c.fuser`), and B answers from the fused cache. What crosses is A's cache of the
layers an open gate reads. The fuser is trained by the train stage (`projector: train`), or read from
a finished directory: ours, or a released C2C checkpoint (`projector_{i}.json/.pt` and
`projector_config.json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from cross_model.c2c.fuser import FUSER_DEFAULTS, is_released, new_fuser, read_released
from cross_model.c2c.fusion import fused_cache, shared_input
from cross_model.c2c.projector import PAIRINGS, WEIGHTS_FILE, model_record, read_meta
from cross_model.data.base import Example
from cross_model.generation import greedy_generate
from cross_model.kv_wire import KVPayload, QuantScheme, dtype_bits, dtype_name, payload_size
from cross_model.methods.base import Prediction
from cross_model.methods.learned_cache import FUSER_KEYS, LearnedCacheMethod, LearnedCacheParams
from cross_model.methods.other_item import donor_map, donors_of
from cross_model.methods.registry import register
from cross_model.models import LoadedModel
from cross_model.prompting import chat_text, chat_wrap, receiver_text, skyline_text


def shared_prompts(
    a: LoadedModel,
    b: LoadedModel,
    examples: list[Example],
    what: str,
    donors: dict[str, Example] | None,
    method: str,
) -> tuple[list[str], list[str] | None]:
    """B's chat-wrapped prompts (`what`: receiver, B's prompt as C2C; skyline, context and question) and,
    under the content control, the donors' prompts A reads instead."""
    text = receiver_text if what == "receiver" else skyline_text
    wrapped = [chat_wrap(b, text(e)) for e in examples]
    if donors is None:
        return wrapped, None
    return wrapped, [chat_text(b, text(d)) for d in donors_of(examples, donors, method)]


@dataclass
class C2CParams(LearnedCacheParams):
    projector: str = field(
        default="train",
        metadata={
            "help": "train (the train stage fits it) or a finished directory: "
            "ours, or a released C2C fuser (projector_config.json)"
        },
    )
    input: str = field(
        default="receiver",
        metadata={
            "help": "what both models read: receiver (B's prompt, as C2C) or "
            "skyline (context and question)"
        },
    )
    pairing: str = field(
        default="last_aligned",
        metadata={"help": "receiver layer -> sender layer: last_aligned (C2C's) or nearest"},
    )
    hidden_dim: int = field(
        default=FUSER_DEFAULTS["hidden_dim"], metadata={"help": "the fuser's width (C2C: 1024)"}
    )
    intermediate_dim: int = field(
        default=FUSER_DEFAULTS["intermediate_dim"],
        metadata={"help": "its FFN blocks' inner width (C2C: 1024)"},
    )
    num_layers: int = field(
        default=FUSER_DEFAULTS["num_layers"],
        metadata={"help": ">= 3: the projection branch has num_layers - 2 blocks (C2C: 3)"},
    )
    dropout: float = field(
        default=FUSER_DEFAULTS["dropout"],
        metadata={"help": "dropout in the fuser's blocks while training (C2C: 0.1)"},
    )
    tau_start: float = field(
        default=FUSER_DEFAULTS["initial_temperature"],
        metadata={"help": "gate temperature at step 0 (C2C: 1.0)"},
    )
    tau_end: float = field(
        default=FUSER_DEFAULTS["final_temperature"],
        metadata={"help": "... annealed geometrically to this (C2C: 0.001)"},
    )
    anneal_steps: int | None = field(
        default=None, metadata={"help": "steps the annealing takes (None: `steps`)"}
    )

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.input not in ("receiver", "skyline"):
            raise ValueError(f"{prefix}.input: receiver or skyline, got {self.input!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(
                f"{prefix}.pairing: one of {', '.join(PAIRINGS)}, got {self.pairing!r}"
            )
        if self.num_layers < 3 or min(self.hidden_dim, self.intermediate_dim) < 1:
            raise ValueError(
                f"{prefix}: num_layers >= 3 and positive widths, got {self.num_layers}, "
                f"{self.hidden_dim}, {self.intermediate_dim}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{prefix}.dropout: in [0, 1), got {self.dropout}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"{prefix}: needs 0 < tau_end <= tau_start")
        if self.anneal_steps is not None and self.anneal_steps < 1:
            raise ValueError(f"{prefix}.anneal_steps: >= 1 or null, got {self.anneal_steps}")
        if self.max_prompt_tokens is not None:
            raise ValueError(
                f"{prefix}.max_prompt_tokens: c2c cuts no prompt (A reads the characters B reads); "
                f"cap the contexts with tasks.N.max_context_chars"
            )


@register("c2c")
class C2C(LearnedCacheMethod):
    Params = C2CParams
    trained_by = "c2c"

    def check_pair(self) -> None:
        self.check_tokenizers()
        a, b = self.pair.sender, self.pair.receiver
        source = self.trained or (
            None if self.params.projector == "train" else self.params.projector
        )
        if source is not None and not Path(source).is_dir():
            raise ValueError(
                f"methods.{self.name}.projector: {source} is not a directory (a released C2C fuser's, "
                f"with projector_config.json, or a finished one of ours)"
            )
        if source is not None and is_released(source):
            self.fuser = read_released(source, model_record(a), model_record(b))
        else:
            self.fuser = new_fuser(self.params, a, b)
            if source is not None:
                self.load_ours(Path(source))
        self.fuser.to(b.device).eval().requires_grad_(False)

    def load_ours(self, path: Path) -> None:
        meta = read_meta(path)
        want = {
            "sender": model_record(self.pair.sender),
            "receiver": model_record(self.pair.receiver),
            **{k: getattr(self.params, k) for k in FUSER_KEYS},
        }
        diff = [k for k in want if meta.get(k) != want[k]]
        if diff:
            raise ValueError(
                f"methods.{self.name}: the fuser in {path} was trained for another setting "
                f"({', '.join(diff)}: {[meta.get(k) for k in diff]} there, {[want[k] for k in diff]} here)"
            )
        self.fuser.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        self.trained_meta = meta

    def active_layers(self) -> list[int]:
        g = self.params.gates
        return (
            list(range(len(self.fuser.partners)))
            if g == "open"
            else []
            if g == "closed"
            else self.fuser.open_layers()
        )

    def set_task_items(self, items: list[Example]) -> None:
        self.donors = donor_map(items)  # control: other_item

    def payload_bytes(self, sender_layers: list[int], tokens: list[int]) -> list[int]:
        """A's cache of the layers an open gate reads, each once, in the kv_wire format, per row."""
        if not sender_layers:
            return [0] * len(tokens)
        a = self.pair.sender
        dt = dtype_name(a.model.dtype)
        bits = [dtype_bits(dt)] * len(sender_layers)
        return [
            payload_size(
                KVPayload(
                    a.info.name,
                    self.pair.receiver.info.name,
                    sender_layers,
                    sender_layers,
                    [],
                    [],
                    dt,
                    bits,
                    kv_heads=a.info.num_kv_heads,
                    head_dim=a.info.head_dim,
                    tokens=n,
                    scheme=QuantScheme(),
                ).header()
            )
            for n in tokens
        ]

    @torch.inference_mode()
    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        a, b = self.pair.sender, self.pair.receiver
        layers = self.active_layers()
        wrapped, donors = shared_prompts(
            a,
            b,
            examples,
            self.params.input,
            self.donors if self.params.control == "other_item" else None,
            self.name,
        )
        inp = shared_input(a, b, wrapped, donors)
        cache = fused_cache(self.fuser, a, b, inp, layers, force_open=self.params.gates == "open")
        sender_layers = sorted({self.fuser.partners[l] for l in layers})
        a_tokens = [len(x) if layers else 0 for x in inp.a_ids]  # A runs only for an open gate
        limits = [self.max_new_tokens(e) for e in examples]
        ones = torch.ones_like(inp.last_B1)
        gen = greedy_generate(
            b,
            inp.last_B1,
            ones,
            max(limits),
            cache=cache,
            past_mask_BP=inp.prefix.attention_mask,
            position_offset_B=inp.prefix.attention_mask.sum(-1),
            max_new_tokens_B=limits,
        )
        stats = inp.stats.to_dict()
        return [
            Prediction(
                e.example_id,
                text,
                size,
                sender_prefill_tokens=n_a,
                receiver_prefill_tokens=len(ids) + 1,
                receiver_generated_tokens=n_out,
                extra={
                    "layers": layers,
                    "sender_layers": sender_layers,
                    "alignment_mismatch": stats["mismatch_fraction"],
                },
            )
            for e, text, size, n_a, ids, n_out in zip(
                examples,
                gen.texts,
                self.payload_bytes(sender_layers, a_tokens),
                a_tokens,
                inp.prefix_ids,
                gen.n_generated,
            )
        ]
