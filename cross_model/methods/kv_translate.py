"""KV translation between models of different shapes (`kv_translate`; docs/METHODS.md): C2C-style maps
(Fu et al., ICLR 2026) that make A's cache B's whole context cache, B never reading the context.

A prefills its prompt up to the highest layer a receiver layer reads, and sends those layers of its
cache (kv_wire, raw or quantized like Q-KVComm); the trained projector runs on B's side and fills, per
open receiver layer, B's cache with B's tokens of A's prompt text (aligned by characters). B's prompt
takes positions after them and decodes normally. The open gates are the layer selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from cross_model.c2c.projector import PAIRINGS, WEIGHTS_FILE, model_record, new_projector, read_meta
from cross_model.c2c.transfer import receiver_cache, sender_side
from cross_model.data.base import Example
from cross_model.generation import greedy_generate
from cross_model.kv_layout import layout_forward, use_cross_model_attention
from cross_model.kv_wire import KVPayload, QuantScheme, dtype_bits, dtype_name, payload_size
from cross_model.kv_wire_batch import decode_batch, encode_batch
from cross_model.methods.base import Prediction
from cross_model.methods.learned_cache import LearnedCacheMethod, LearnedCacheParams
from cross_model.methods.other_item import donor_map, with_donor_contexts
from cross_model.methods.registry import register
from cross_model.prompting import (
    chat_text,
    encode_texts,
    receiver_text,
    sender_text,
    tokenize_prompts,
)


@dataclass
class KVTranslateParams(LearnedCacheParams):
    projector: str = field(
        default="train",
        metadata={
            "help": "train (the train stage fits it), identity (untrained, "
            "A and B of one KV shape: KVComm-all), or a finished directory"
        },
    )
    pairing: str = field(
        default="last_aligned",
        metadata={"help": "receiver layer -> sender layer: last_aligned or nearest"},
    )
    hidden: int = field(default=256, metadata={"help": "width of each map's residual MLP"})
    gate_init: float = field(
        default=0.0,
        metadata={
            "help": "initial gate logit (> 0: open; 0, the default, starts every layer half open in training and closed at step 0)"
        },
    )
    rope: str = field(
        default="as_cached",
        metadata={
            "help": "as_cached (A's keys projected as A cached them, as C2C) "
            "or reapply (A's rotary embedding taken off, B's put on)"
        },
    )
    bits: int | None = field(
        default=None,
        metadata={"help": "null (A's dtype, raw) or 2..8: A's layers quantized as Q-KVComm's"},
    )
    tau_start: float = field(
        default=1.0, metadata={"help": "Gumbel-sigmoid temperature at the first step"}
    )
    tau_end: float = field(default=0.1, metadata={"help": "... and at the last"})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.pairing not in PAIRINGS:
            raise ValueError(
                f"{prefix}.pairing: one of {', '.join(PAIRINGS)}, got {self.pairing!r}"
            )
        if self.rope not in ("as_cached", "reapply"):
            raise ValueError(f"{prefix}.rope: as_cached or reapply, got {self.rope!r}")
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise ValueError(f"{prefix}.bits: null or 2..8, got {self.bits}")
        if self.hidden < 1:
            raise ValueError(f"{prefix}.hidden: must be >= 1, got {self.hidden}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"{prefix}: needs 0 < tau_end <= tau_start")


@register("kv_translate")
class KVTranslate(LearnedCacheMethod):
    Params = KVTranslateParams
    trained_by = "kv_translate"

    def check_pair(self) -> None:
        self.check_tokenizers()
        a, b = self.pair.sender, self.pair.receiver
        self.projector = new_projector(self.params, a, b).to(b.device)
        self.projector.requires_grad_(False)
        if self.params.projector == "identity":
            self.projector.identity_init()
        elif self.params.projector != "train" or self.trained:
            self.set_projection_from(self.trained or self.params.projector)
        use_cross_model_attention(b)

    def set_projection_from(self, directory: str) -> None:
        """Load a finished projector, refusing one made for another pair, pairing or width."""
        path = Path(directory)
        meta = read_meta(path)
        want = {
            "sender": model_record(self.pair.sender),
            "receiver": model_record(self.pair.receiver),
            "pairing": self.params.pairing,
            "hidden": self.params.hidden,
            "rope": self.params.rope,
        }
        diff = [k for k in want if meta.get(k) != want[k]]
        if diff:
            raise ValueError(
                f"methods.{self.name}: the projector in {path} was trained for another setting "
                f"({', '.join(diff)}: {[meta.get(k) for k in diff]} there, {[want[k] for k in diff]} here)"
            )
        self.projector.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        self.projector.to(self.pair.receiver.device)
        self.trained_meta = meta

    def active_layers(self) -> list[int]:
        g = self.params.gates
        if g == "open" or (g == "learned" and self.params.projector == "identity"):
            return self.projector.layers
        return [] if g == "closed" else self.projector.open_layers()

    def sender_layers(self, layers: list[int]) -> list[int]:
        """A's layers that cross: the partners of the open receiver layers, each once."""
        return sorted({self.projector.partners[l] for l in layers})

    def wire(self, sender_layers: list[int], tokens: int) -> KVPayload:
        a = self.pair.sender
        dt = dtype_name(a.model.dtype)
        bits = [self.params.bits or dtype_bits(dt)] * len(sender_layers)
        return KVPayload(
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
            tokens=tokens,
            scheme=QuantScheme(),
        )

    def transmit(self, side, sender_layers: list[int]) -> tuple[dict | None, list[int]]:
        """Each row's payload bytes and, when quantized, A's layers as B decodes them (Q-KVComm's
        batched wire path: one frame per row, encoded and decoded for the whole batch)."""
        lengths = [int(n) for n in side.pre.full_mask.sum(-1).tolist()]
        if self.params.bits is None or not sender_layers:
            return None, [
                payload_size(self.wire(sender_layers, n).header()) if sender_layers else 0
                for n in lengths
            ]
        mask = side.pre.full_mask.bool()
        a = self.pair.sender
        blobs = encode_batch(
            self.wire(sender_layers, 0),
            [side.pre.kv[la][0] for la in sender_layers],
            [side.pre.kv[la][1] for la in sender_layers],
            [],
            [],
            mask,
        )
        got_k, got_v, _, _, _, _ = decode_batch(
            blobs,
            self.pair.receiver.info.name,
            a.info.num_kv_heads,
            a.info.head_dim,
            device=mask.device,
        )
        row_i, pos_i = mask.nonzero(as_tuple=True)  # real tokens, in each row's order
        tok_i = (mask.long().cumsum(-1) - 1)[
            row_i, pos_i
        ]  # their place among the row's real tokens
        sent = {}
        for la, k, v in zip(sender_layers, got_k, got_v):
            keys, values = side.pre.kv[la][0].clone(), side.pre.kv[la][1].clone()
            keys[row_i, :, pos_i] = k[row_i, :, tok_i].to(keys.dtype)
            values[row_i, :, pos_i] = v[row_i, :, tok_i].to(values.dtype)
            sent[la] = (keys, values)
        return sent, [len(b) for b in blobs]

    def set_task_items(self, items: list[Example]) -> None:
        self.donors = donor_map(items)  # control: other_item

    def sender(self, examples: list[Example], layers: list[int]):
        a, b = self.pair.sender, self.pair.receiver
        top = max((self.projector.partners[l] for l in layers), default=-1) + 1
        texts = [sender_text(e) for e in examples]
        pre = self.prefill(a, texts, layers=top)
        wrapped = [chat_text(a, t) for t in texts]  # what the prefill read (it logged it already)
        return sender_side(
            a, b, wrapped, encode_texts(a, wrapped, self.params.max_prompt_tokens), pre
        )

    @torch.inference_mode()
    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        b = self.pair.receiver
        layers = self.active_layers()
        read = (
            with_donor_contexts(examples, self.donors, self.name)
            if self.params.control == "other_item"
            else examples
        )
        side = self.sender(read, layers)
        a_layers = self.sender_layers(layers)
        sent, sizes = self.transmit(side, a_layers)
        cache, layout, offset = receiver_cache(
            self.projector, b, side, layers, sent=sent, a=self.pair.sender, rope=self.params.rope
        )
        batch = tokenize_prompts(
            b, [receiver_text(e) for e in examples], self.params.max_prompt_tokens
        )
        limits = [self.max_new_tokens(e) for e in examples]
        gen = greedy_generate(
            b,
            batch.input_ids,
            batch.attention_mask,
            max(limits),
            cache=cache,
            position_offset_B=offset.to(b.device),
            forward=layout_forward(b, layout),
            max_new_tokens_B=limits,
        )
        stats = side.stats.to_dict()
        return [
            Prediction(
                e.example_id,
                text,
                size,
                sender_prefill_tokens=n_a,
                receiver_prefill_tokens=n_b,
                receiver_generated_tokens=n_out,
                extra={
                    "layers": layers,
                    "sender_layers": a_layers,
                    "context_tokens_B": int(n_ctx),
                    "alignment_mismatch": stats["mismatch_fraction"],
                },
            )
            for e, text, size, n_a, n_b, n_out, n_ctx in zip(
                examples,
                gen.texts,
                sizes,
                side.pre.prompt_lengths,
                batch.lengths,
                gen.n_generated,
                offset.tolist(),
            )
        ]
