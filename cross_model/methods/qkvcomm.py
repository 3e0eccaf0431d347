"""Q-KVComm: KVComm's selected layers, quantized before they cross and de-quantized on B's side.

Each example's payload is framed by `kv_wire.encode` (header, bit-packed codes, float16 scales and
zero points, sinks raw, CRC-32) and B reads what `kv_wire.decode` gives back, so the bytes reported
are the bytes B used. Keys are grouped per channel, values per token (KIVI's finding: keys have
outlier channels, values do not), after a Hadamard rotation over the head dimension, with A's first
token sent raw and each group's range clipped to least squared error (`kv_wire.QuantScheme`; each
of these measured on SmolLM2, see docs/METHODS.md). The unsent layers' sinks travel in 8 bits per
head (`sink_bits`; 16: raw, in float16 when the model runs in float32, `sink_dtype`). Bit widths: one for every sent layer (`bits`), or a target average
(`target_bits`) allocated per layer from a sensitivity profile measured on the calibration split: for
each sent layer and each width, the KL divergence of B's next-token distribution from KVComm's when
only that layer is quantized; widths are lowered greedily where that costs the least KL per bit saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from cross_model.data.base import Example
from cross_model.distributed import all_reduce_sum, broadcast_object, gather_object, is_main, shard
from cross_model.generation import positions_from_mask
from cross_model.kv_wire import QUANT_BITS, QuantScheme, dtype_bits, payload_size
from cross_model.kv_wire_batch import decode_batch, encode_batch
from cross_model.methods.kvcomm import KVComm, KVCommParams
from cross_model.methods.registry import register
from cross_model.progress import Progress
from cross_model.prompt_prefill import KVView, LayerKV, Prefill
from cross_model.prompting import receiver_text, tokenize_prompts
from cross_model.surgery import assemble_receiver_cache, layout_forward


@dataclass
class QKVCommParams(KVCommParams):
    bits: int = field(default=4, metadata={"help": "bits of every sent layer (2-8) unless target_bits is set"})
    value_bits: int | None = field(
        default=None, metadata={"help": "the values' own width, 2-8 (None: as the keys'); keys then take `bits`"}
    )
    target_bits: float | None = field(
        default=None, metadata={"help": "average bits over the sent layers, allocated per layer by calibration"}
    )
    bit_choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8], metadata={"help": "widths calibration may give a layer"})
    sink_dtype: str = field(
        default="float16", metadata={"help": "how sinks travel when the model runs wider than 16 bits (float16 or bfloat16)"}
    )
    key_group: int = field(default=0, metadata={"help": "tokens per key quantization group, per channel (0: all tokens)"})
    value_group: str = field(default="head", metadata={"help": "values quantized per token and head (head) or over all heads (token)"})
    rotate: bool = field(default=True, metadata={"help": "Hadamard rotation over the head dimension before quantizing"})
    raw_first: int = field(default=1, metadata={"help": "leading context tokens sent unquantized (A's attention sink)"})
    clip: bool = field(default=True, metadata={"help": "least-squares clipping of each group's range"})
    sink_bits: int = field(default=8, metadata={"help": "the unsent layers' sink tokens: 8 (per head) or 16 (raw, in sink_dtype)"})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.bits not in QUANT_BITS:
            raise ValueError(f"{prefix}.bits: one of {QUANT_BITS}, got {self.bits}")
        if self.value_bits is not None and self.value_bits not in QUANT_BITS:
            raise ValueError(f"{prefix}.value_bits: one of {QUANT_BITS} or null, got {self.value_bits}")
        if self.value_bits is not None and self.target_bits is not None:
            raise ValueError(f"{prefix}.value_bits: set per layer by target_bits' calibration; use one or the other")
        if not self.bit_choices or any(b not in QUANT_BITS for b in self.bit_choices):
            raise ValueError(f"{prefix}.bit_choices: a non-empty list drawn from {QUANT_BITS}, got {self.bit_choices}")
        if self.sink_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"{prefix}.sink_dtype: float16 or bfloat16, got {self.sink_dtype!r}")
        try:
            self.scheme().check(64)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from None
        if self.target_bits is not None and not min(self.bit_choices) <= self.target_bits <= max(self.bit_choices):
            raise ValueError(
                f"{prefix}.target_bits: between {min(self.bit_choices)} and {max(self.bit_choices)} "
                f"(the bit_choices), got {self.target_bits}"
            )

    def scheme(self) -> QuantScheme:
        return QuantScheme(self.key_group, self.value_group, self.rotate, self.raw_first, self.clip, self.sink_bits)


def allocate_bits(sensitivity: dict[int, dict[int, float]], target: float, choices: list[int]) -> dict[int, int]:
    """Per-layer widths with mean <= target: start at the widest, then repeatedly narrow the layer
    whose next narrower width adds the least sensitivity per bit saved."""
    choices = sorted(choices)
    bits = {layer: choices[-1] for layer in sensitivity}
    while bits and sum(bits.values()) / len(bits) > target:
        best = None
        for layer, b in sorted(bits.items()):
            narrower = [c for c in choices if c < b]
            if not narrower:
                continue
            c = narrower[-1]
            cost = (sensitivity[layer][c] - sensitivity[layer][b]) / (b - c)
            if best is None or cost < best[0]:
                best = (cost, layer, c)
        if best is None:
            break
        bits[best[1]] = best[2]
    return bits


@register("qkvcomm")
class QKVComm(KVComm):
    Params = QKVCommParams

    @classmethod
    def needs_calibration(cls, params: QKVCommParams) -> bool:
        return params.selection == "calibrate" or params.target_bits is not None

    def check_pair(self) -> None:
        super().check_pair()
        self.layer_bits: dict[int, int] | None = None
        try:
            self.params.scheme().check(self.pair.sender.info.head_dim)
        except ValueError as e:
            raise ValueError(f"methods.{self.name}: {e}") from None

    def bits_for(self, selected: set[int]) -> list[int]:
        layers = sorted(selected)
        if self.params.target_bits is None:
            return [self.params.bits] * len(layers)
        if self.layer_bits is None:
            raise ValueError(f"methods.{self.name}: target_bits needs calibration; run the calibrate stage first")
        missing = [l for l in layers if l not in self.layer_bits]
        if missing:
            raise ValueError(f"methods.{self.name}: no calibrated width for layers {missing}; calibrate again")
        return [self.layer_bits[l] for l in layers]

    def transmit(self, pre: Prefill, cache: Any, sink_kv: dict, selected: set[int]):
        return self.send_quantized(pre, cache, sink_kv, selected, self.bits_for(selected))

    def send_quantized(self, pre: Prefill, cache: Any, sink_kv: dict, selected: set[int], bits: list[int]):
        """Encode each row's payload, decode it as B would, and return B's view: a copy of A's cache
        whose sent layers hold the decoded tensors, and every sink as decoded. The arithmetic runs for
        the whole batch at once on the device (`kv_wire_batch`); each row still gets its own frame."""
        b = self.pair.receiver.info
        b_heads, head_dim = self.pair.sender.info.num_kv_heads, self.pair.sender.info.head_dim
        mask = pre.full_mask.bool()
        rows = torch.arange(mask.shape[0], device=mask.device)
        first = mask.long().argmax(-1)  # each row's first real token (A's attention sink)
        p = self.wire_payload(selected, 0, bits)
        if self.params.value_bits is not None and bits == self.bits_for(selected):
            p.value_bits = [self.params.value_bits] * len(bits)  # calibration's probes keep one width per layer
        p.sink_dtype = self.params.sink_dtype if dtype_bits(p.dtype) > 16 else None
        p.scheme = self.params.scheme()
        keys = [cache.layers[la].keys for la in p.sender_layers]
        values = [cache.layers[la].values for la in p.sender_layers]
        sink_keys, sink_values = [], []
        for la in p.sink_sender_layers:
            if la in sink_kv:
                k, v = sink_kv[la]
            else:
                k, v = (x[rows, :, first][:, :, None, :] for x in (cache.layers[la].keys, cache.layers[la].values))
            sink_keys.append(k)
            sink_values.append(v)
        blobs = encode_batch(p, keys, values, sink_keys, sink_values, mask)
        got_k, got_v, got_sk, got_sv, lengths, _ = decode_batch(blobs, b.name, b.num_kv_heads, b.head_dim, device=mask.device)
        # B's view: copies of the sent layers, overwritten with what arrived; A's cache stays as it was.
        sent = set(p.sender_layers)
        view = KVView([LayerKV(e.keys.clone(), e.values.clone()) if la in sent else e for la, e in enumerate(cache.layers)])
        row_i, pos_i = mask.nonzero(as_tuple=True)  # real tokens, in each row's order
        tok_i = (mask.long().cumsum(-1) - 1)[row_i, pos_i]  # their place among the row's real tokens
        for la, k, v in zip(p.sender_layers, got_k, got_v):
            view.layers[la].keys[row_i, :, pos_i] = k[row_i, :, tok_i]
            view.layers[la].values[row_i, :, pos_i] = v[row_i, :, tok_i]
        sink_view = {la: (k, v) for la, k, v in zip(p.sink_sender_layers, got_sk, got_sv)}
        sizes, extras = [], []
        for n, blob in zip(lengths, blobs):
            p.tokens = n
            bf16 = payload_size({**p.header(), "dtype": "bfloat16", "sink_dtype": "bfloat16", "bits": [16] * len(p.bits),
                                 "value_bits": [16] * len(p.bits)})
            # A's whole cache as it holds it: every layer's keys and values, raw, no header.
            full = 2 * self.pair.sender.info.num_layers * b_heads * n * head_dim * dtype_bits(p.dtype) // 8
            sizes.append(len(blob))
            widths = [*bits, *(p.value_bits or bits)]
            extras.append({"mean_bits": sum(widths) / max(len(widths), 1), "compression_vs_bf16": round(bf16 / len(blob), 3),
                           "compression_vs_full_cache": round(full / len(blob), 3)})
        return view, sink_view, sizes, extras

    # --- calibration: which layers (KVComm's), then how many bits each -------------------------------
    def first_logits(self, examples: list[Example], selected: set[int], bits: list[int] | None) -> torch.Tensor:
        """B's logits for its first answer token, reading A's layers quantized to `bits` (None: raw)."""
        pre, cache, sink_kv = self.sender_cache(examples, selected)
        if bits is not None:
            cache, sink_kv, _, _ = self.send_quantized(pre, cache, sink_kv, selected, bits)
        b_cache, layout = assemble_receiver_cache(cache, pre.full_mask, self.layer_map, selected, sink_kv,
                                                  self.params.receiver_mask)
        b = self.pair.receiver
        batch = tokenize_prompts(b, [receiver_text(e) for e in examples], self.params.max_prompt_tokens)
        pos = positions_from_mask(batch.attention_mask, pre.full_mask.sum(-1).to(b.device))
        with torch.inference_mode():
            return layout_forward(b, layout)(
                cache=b_cache, full_mask_BT=batch.attention_mask, position_ids_BT=pos, input_ids_BT=batch.input_ids
            )

    def sensitivity(self, examples: list[Example], selected: set[int]) -> dict[int, dict[int, float]]:
        """Per sent layer and width: mean KL(B's next-token distribution unquantized || with only that
        layer quantized), over `examples` (each rank measures its share; the sums are added)."""
        layers = sorted(selected)
        raw = dtype_bits(self.wire_payload(selected, 0).dtype)
        size = self.params.batch_size or 8
        choices = self.params.bit_choices
        totals = {l: {c: 0.0 for c in choices} for l in layers}
        mine = shard(examples)
        with Progress(len(mine), f"calibrate {self.name}: bit sensitivity", unit="items") as bar:
            for start in range(0, len(mine), size):
                chunk = mine[start : start + size]
                ref = self.first_logits(chunk, selected, None).float().log_softmax(-1)
                for i, layer in enumerate(layers):
                    for c in choices:
                        bits = [raw] * len(layers)
                        bits[i] = c
                        got = self.first_logits(chunk, selected, bits).float().log_softmax(-1)
                        totals[layer][c] += float((ref.exp() * (ref - got)).sum(-1).clamp(min=0).double().sum())
                bar.update(len(chunk))
        flat = all_reduce_sum([totals[l][c] for l in layers for c in choices])
        return {l: {c: flat[i * len(choices) + j] / len(examples) for j, c in enumerate(choices)}
                for i, l in enumerate(layers)}

    def calibrate(self, examples: list[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError(f"methods.{self.name}: calibration needs calibration items (tasks.N.n_calib > 0)")
        calibration = super().calibrate(examples) if self.params.selection == "calibrate" else {}
        if self.params.target_bits is not None:
            selected = self.selected_layers()
            profile = self.sensitivity(examples, selected)
            items_per_rank = gather_object(len(shard(examples)))
            decision = None
            if is_main():
                layer_bits = allocate_bits(profile, self.params.target_bits, self.params.bit_choices)
                decision = {
                    **calibration,
                    "sensitivity": {str(l): {str(c): v for c, v in per.items()} for l, per in profile.items()},
                    "layer_bits": {str(l): b for l, b in sorted(layer_bits.items())},
                    "calibration_ids": [e.example_id for e in examples],
                    "items_per_rank": items_per_rank,
                }
            self.load_calibration(broadcast_object(decision))
            return self.calibration
        self.calibration = calibration
        return calibration

    def load_calibration(self, data: dict[str, Any]) -> None:
        if "ranking" in data:
            super().load_calibration(data)
        if "layer_bits" in data:
            self.layer_bits = {int(l): int(b) for l, b in data["layer_bits"].items()}
        self.calibration = data

