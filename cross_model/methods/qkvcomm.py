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

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from cross_model.data.base import Example, by_length
from cross_model.distributed import (
    agreed,
    all_reduce_sum,
    broadcast_object,
    gather_object,
    is_main,
    shard,
)
from cross_model.failures import measure_in_batches
from cross_model.generation import positions_from_mask
from cross_model.kv_layout import assemble_receiver_cache, layout_forward
from cross_model.kv_wire import QUANT_BITS, KVPayload, QuantScheme, dtype_bits, payload_size
from cross_model.kv_wire_batch import decode_batch, encode_batch
from cross_model.methods.kvcomm import KVComm, KVCommParams, SenderSide
from cross_model.methods.registry import register
from cross_model.prefill_memo import KVView, LayerKV, Prefill
from cross_model.progress import Progress
from cross_model.prompting import receiver_text, tokenize_prompts


@dataclass
class QKVCommParams(KVCommParams):
    bits: int = field(
        default=4, metadata={"help": "bits of every sent layer (2-8) unless target_bits is set"}
    )
    value_bits: int | None = field(
        default=None,
        metadata={"help": "the values' own width, 2-8 (None: as the keys'); keys then take `bits`"},
    )
    byte_budget: int | None = field(
        default=None,
        metadata={"help": "per example: the widest of bit_choices whose payload fits these bytes"},
    )
    payload_cache_mb: float = field(
        default=64.0,
        metadata={
            "help": "encoded payloads kept by (sender, context, layers, widths, scheme), LRU; 0: off"
        },
    )
    target_bits: float | None = field(
        default=None,
        metadata={"help": "average bits over the sent layers, allocated per layer by calibration"},
    )
    bit_choices: list[int] = field(
        default_factory=lambda: [2, 3, 4, 8],
        metadata={"help": "widths calibration may give a layer"},
    )
    sink_dtype: str = field(
        default="float16",
        metadata={
            "help": "how sinks travel when the model runs wider than 16 bits (float16 or bfloat16)"
        },
    )
    key_group: int = field(
        default=0,
        metadata={"help": "tokens per key quantization group, per channel (0: all tokens)"},
    )
    value_group: str = field(
        default="head",
        metadata={"help": "values quantized per token and head (head) or over all heads (token)"},
    )
    rotate: bool = field(
        default=True,
        metadata={"help": "Hadamard rotation over the head dimension before quantizing"},
    )
    raw_first: int = field(
        default=1, metadata={"help": "leading context tokens sent unquantized (A's attention sink)"}
    )
    clip: bool = field(
        default=True, metadata={"help": "least-squares clipping of each group's range"}
    )
    sink_bits: int = field(
        default=8,
        metadata={
            "help": "the unsent layers' sink tokens: 8 (per head) or 16 (raw, in sink_dtype)"
        },
    )

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.bits not in QUANT_BITS:
            raise ValueError(f"{prefix}.bits: one of {QUANT_BITS}, got {self.bits}")
        if self.value_bits is not None and self.value_bits not in QUANT_BITS:
            raise ValueError(
                f"{prefix}.value_bits: one of {QUANT_BITS} or null, got {self.value_bits}"
            )
        if self.byte_budget is not None and (
            self.byte_budget < 1 or self.target_bits is not None or self.value_bits is not None
        ):
            raise ValueError(
                f"{prefix}.byte_budget: a positive number of bytes, without target_bits or value_bits "
                f"(the budget picks one width per example), got {self.byte_budget}"
            )
        if self.payload_cache_mb < 0:
            raise ValueError(
                f"{prefix}.payload_cache_mb: must be >= 0, got {self.payload_cache_mb}"
            )
        if self.value_bits is not None and self.target_bits is not None:
            raise ValueError(
                f"{prefix}.value_bits: set per layer by target_bits' calibration; use one or the other"
            )
        if not self.bit_choices or any(b not in QUANT_BITS for b in self.bit_choices):
            raise ValueError(
                f"{prefix}.bit_choices: a non-empty list drawn from {QUANT_BITS}, got {self.bit_choices}"
            )
        if self.sink_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"{prefix}.sink_dtype: float16 or bfloat16, got {self.sink_dtype!r}")
        try:
            self.scheme().check(64)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from None
        if self.target_bits is not None and not min(self.bit_choices) <= self.target_bits <= max(
            self.bit_choices
        ):
            raise ValueError(
                f"{prefix}.target_bits: between {min(self.bit_choices)} and {max(self.bit_choices)} "
                f"(the bit_choices), got {self.target_bits}"
            )

    def scheme(self) -> QuantScheme:
        return QuantScheme(
            self.key_group, self.value_group, self.rotate, self.raw_first, self.clip, self.sink_bits
        )


class PayloadCache:
    """Encoded payloads, least recently used first out once their bytes pass `budget`; hits and
    misses counted (the rows say which were hits: `payload_cache_hit`)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.entries: OrderedDict[tuple, bytes] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        blob = self.entries.get(key)
        if blob is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return blob

    def put(self, key: tuple, blob: bytes) -> None:
        if key in self.entries or len(blob) > self.budget:
            return
        self.entries[key] = blob
        self.used += len(blob)
        while self.used > self.budget:
            _, old = self.entries.popitem(last=False)
            self.used -= len(old)


def allocate_bits(
    sensitivity: dict[int, dict[int, float]], target: float, choices: list[int]
) -> dict[int, int]:
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
    # The public code has no quantized KV: the preset sets KVComm's receiver and calibration here too,
    # but its widths are per receiver layer, so the public depth map (several sender layers in one
    # receiver layer) stays KVComm's.
    public_settings = {k: v for k, v in KVComm.public_settings.items() if k != "depth_map"}

    @classmethod
    def needs_calibration(cls, params: QKVCommParams) -> bool:
        return params.selection == "calibrate" or params.target_bits is not None

    @property
    def multi_sender(self) -> bool:
        """As KVComm (each sender quantizes its own payload), except with calibrated widths, whose
        sensitivity probe reads one sender."""
        return super().multi_sender and self.params.target_bits is None

    def check_pair(self) -> None:
        super().check_pair()
        if self.params.depth_map == "public" and any(
            s.info.num_layers != self.pair.receiver.info.num_layers for s in self.pair.senders
        ):
            raise ValueError(
                f"methods.{self.name}: depth_map public puts several sender layers in one receiver layer, "
                "and Q-KVComm's widths are per receiver layer; use depth_map nearest (the default)"
            )
        self.layer_bits: dict[int, int] | None = None
        mb = self.params.payload_cache_mb
        self.payload_cache = PayloadCache(int(mb * 2**20)) if mb > 0 else None
        try:
            self.params.scheme().check(self.pair.sender.info.head_dim)
        except ValueError as e:
            raise ValueError(f"methods.{self.name}: {e}") from None

    def bits_for(self, selected: set[int]) -> list[int]:
        layers = sorted(selected)
        if self.params.target_bits is None:
            return [self.params.bits] * len(layers)
        if self.layer_bits is None:
            raise ValueError(
                f"methods.{self.name}: target_bits needs calibration; run the calibrate stage first"
            )
        missing = [l for l in layers if l not in self.layer_bits]
        if missing:
            raise ValueError(
                f"methods.{self.name}: no calibrated width for layers {missing}; calibrate again"
            )
        return [self.layer_bits[l] for l in layers]

    def transmit(
        self,
        pre: Prefill,
        cache: Any,
        sink_kv: dict,
        selected: set[int],
        texts: list[str] | None = None,
        side: SenderSide | None = None,
    ):
        return self.send_quantized(
            pre,
            cache,
            sink_kv,
            selected,
            self.bits_for(selected),
            texts,
            as_configured=True,
            side=side,
        )

    def _template(
        self,
        selected: set[int],
        bits: list[int],
        value_bits: list[int] | None,
        side: SenderSide | None = None,
    ) -> KVPayload:
        p = self.wire_payload(selected, 0, bits, side)
        p.value_bits = value_bits
        p.sink_dtype = self.params.sink_dtype if dtype_bits(p.dtype) > 16 else None
        p.scheme = self.params.scheme()
        return p

    def row_widths(
        self,
        selected: set[int],
        bits: list[int],
        lengths: list[int],
        side: SenderSide | None = None,
    ) -> list[tuple[list[int], list[int] | None, bool]]:
        """Per row, (key widths, value widths, within budget). Without `byte_budget` every row sends
        `bits` (values at `value_bits`); with it, each row takes the widest of `bit_choices` whose payload
        fits the budget at its own token count (the narrowest, marked over budget, when none does)."""
        value_bits = (
            [self.params.value_bits] * len(bits) if self.params.value_bits is not None else None
        )
        if self.params.byte_budget is None:
            return [(bits, value_bits, True) for _ in lengths]
        out = []
        for n in lengths:
            fits = [
                w
                for w in sorted(self.params.bit_choices, reverse=True)
                if payload_size(
                    {**self._template(selected, [w] * len(bits), None, side).header(), "tokens": n}
                )
                <= self.params.byte_budget
            ]
            w = fits[0] if fits else min(self.params.bit_choices)
            out.append(([w] * len(bits), None, bool(fits)))
        return out

    def send_quantized(
        self,
        pre: Prefill,
        cache: Any,
        sink_kv: dict,
        selected: set[int],
        bits: list[int],
        texts: list[str] | None = None,
        as_configured: bool = False,
        side: SenderSide | None = None,
    ):
        """Encode each row's payload, decode it as B would, and return B's view: a copy of A's cache
        whose sent layers hold the decoded tensors, and every sink as decoded. The arithmetic runs for
        the rows sharing widths at once on the device (`kv_wire_batch`); each row still gets its own
        frame. A row whose payload is in the payload cache (the same sender, text A read, layers, widths
        and scheme: a context asked again) is not encoded again; `texts` are what A read (no cache without).
        `as_configured`: the method's own `value_bits` and `byte_budget` apply (calibration's probes send
        exactly `bits`). `side`: which sender (default sender 0)."""
        side = side or self.sender_side()
        b = self.pair.receiver.info
        a = side.model.info
        b_heads, head_dim = a.num_kv_heads, a.head_dim
        mask = pre.full_mask.bool()
        rows = torch.arange(mask.shape[0], device=mask.device)
        first = mask.long().argmax(-1)  # each row's first real token (A's attention sink)
        lengths = [int(x) for x in mask.sum(-1).tolist()]
        widths = (
            self.row_widths(selected, bits, lengths, side)
            if as_configured
            else [(bits, None, True)] * len(lengths)
        )
        p = self._template(selected, bits, None, side)
        keys = [cache.layers[la].keys for la in p.sender_layers]
        values = [cache.layers[la].values for la in p.sender_layers]
        sink_keys, sink_values = [], []
        for la in p.sink_sender_layers:
            if la in sink_kv:
                k, v = sink_kv[la]
            else:
                k, v = (
                    x[rows, :, first][:, :, None, :]
                    for x in (cache.layers[la].keys, cache.layers[la].values)
                )
            sink_keys.append(k)
            sink_values.append(v)
        # B's view: copies of the sent layers, overwritten with what arrived; A's cache stays as it was.
        sent = set(p.sender_layers)
        view = KVView(
            [
                LayerKV(e.keys.clone(), e.values.clone()) if la in sent else e
                for la, e in enumerate(cache.layers)
            ]
        )
        sink_view = {
            la: (k.clone(), v.clone())
            for la, k, v in zip(p.sink_sender_layers, sink_keys, sink_values)
        }
        blobs: list[bytes] = [b""] * len(lengths)
        hits = [False] * len(lengths)
        groups: dict[tuple, list[int]] = {}
        for i, (kb, vb, _) in enumerate(widths):
            groups.setdefault((tuple(kb), tuple(vb) if vb else None), []).append(i)
        for (kb, vb), idx in groups.items():
            t = self._template(selected, list(kb), list(vb) if vb else None, side)
            ids = (
                [self._cache_key(texts[i], t) for i in idx]
                if self.payload_cache is not None and texts
                else None
            )
            todo, first_of = [], {}  # rows to encode: one per distinct payload in the group
            for j in range(len(idx)):
                if ids is None:
                    todo.append(j)
                elif ids[j] not in first_of and self.payload_cache.get(ids[j]) is None:
                    first_of[ids[j]] = j
                    todo.append(j)
            if todo:
                sub = torch.tensor([idx[j] for j in todo], device=mask.device)
                new = encode_batch(
                    t,
                    [x[sub] for x in keys],
                    [x[sub] for x in values],
                    [x[sub] for x in sink_keys],
                    [x[sub] for x in sink_values],
                    mask[sub],
                )
                for j, blob in zip(todo, new):
                    blobs[idx[j]] = blob
                    if ids is not None:
                        self.payload_cache.put(ids[j], blob)
            for j, i in enumerate(idx):
                if not blobs[
                    i
                ]:  # in the cache, or the same payload as an earlier row of this batch
                    blobs[i], hits[i] = (
                        self.payload_cache.get(ids[j]) or blobs[idx[first_of[ids[j]]]],
                        True,
                    )
            got_k, got_v, got_sk, got_sv, _, _ = decode_batch(
                [blobs[i] for i in idx], b.name, b.num_kv_heads, b.head_dim, device=mask.device
            )
            sub = torch.tensor(idx, device=mask.device)
            sub_mask = mask[sub]
            row_i, pos_i = sub_mask.nonzero(as_tuple=True)  # real tokens, in each row's order
            tok_i = (sub_mask.long().cumsum(-1) - 1)[
                row_i, pos_i
            ]  # their place among the row's real tokens
            for la, k, v in zip(p.sender_layers, got_k, got_v):
                view.layers[la].keys[sub[row_i], :, pos_i] = k[row_i, :, tok_i]
                view.layers[la].values[sub[row_i], :, pos_i] = v[row_i, :, tok_i]
            for la, k, v in zip(p.sink_sender_layers, got_sk, got_sv):
                sink_view[la][0][sub], sink_view[la][1][sub] = k, v
        sizes, extras = [], []
        for n, blob, (kb, vb, fits), hit in zip(lengths, blobs, widths, hits):
            t = self._template(selected, kb, vb, side)
            t.tokens = n
            n_layers = len(kb)
            same_layers = {k: v for k, v in t.header().items() if k != "value_bits"}
            bf16 = payload_size(
                {
                    **same_layers,
                    "dtype": "bfloat16",
                    "sink_dtype": "bfloat16",
                    "bits": [16] * n_layers,
                }
            )
            # A's whole cache as it holds it: every layer's keys and values, raw, no header.
            full = 2 * a.num_layers * b_heads * n * head_dim * dtype_bits(t.dtype) // 8
            sizes.append(len(blob))
            all_widths = [*kb, *(vb or kb)]
            extra = {
                "mean_bits": sum(all_widths) / max(len(all_widths), 1),
                "compression_vs_bf16": round(bf16 / len(blob), 3),
                "compression_vs_full_cache": round(full / len(blob), 3),
                "bf16_bytes": bf16,
                "full_cache_bytes": full,
                "wire_bytes": len(blob),
            }
            if self.params.byte_budget is not None and as_configured:
                extra.update(within_budget=fits, bits=kb[0] if kb else None)
            if self.payload_cache is not None and texts:
                extra["payload_cache_hit"] = hit
            extras.append(extra)
        return view, sink_view, sizes, extras

    def merge_extras(self, earlier: dict, later: dict) -> dict:
        """Two senders' payload fields as one row's: bytes add, ratios are of the sums, widths are the
        mean over senders, and a row is within budget (or a cache hit) only when every payload is."""
        out = {**earlier, **later}
        for key in ("bf16_bytes", "full_cache_bytes", "wire_bytes"):
            out[key] = earlier[key] + later[key]
        out["compression_vs_bf16"] = round(out["bf16_bytes"] / out["wire_bytes"], 3)
        out["compression_vs_full_cache"] = round(out["full_cache_bytes"] / out["wire_bytes"], 3)
        n = earlier.get("payloads", 1)
        out["payloads"] = n + 1
        out["mean_bits"] = (earlier["mean_bits"] * n + later["mean_bits"]) / (n + 1)
        for key in ("within_budget", "payload_cache_hit"):
            if key in earlier:
                out[key] = earlier[key] and later[key]
        if "bits" in earlier:  # the narrowest width any sender had to take
            out["bits"] = min(
                (b for b in (earlier["bits"], later["bits"]) if b is not None), default=None
            )
        return out

    @staticmethod
    def _cache_key(text: str, t: KVPayload) -> tuple:
        """What a payload depends on: the sender, the text it read, the layers, widths and scheme."""
        return (
            t.sender,
            t.receiver,
            text,
            tuple(t.layers),
            tuple(t.bits),
            tuple(t.value_bits or ()),
            t.sink_dtype,
            t.scheme,
        )

    # --- calibration: which layers (KVComm's), then how many bits each -------------------------------
    def first_logits(
        self, examples: list[Example], selected: set[int], bits: list[int] | None
    ) -> torch.Tensor:
        """B's logits for its first answer token, reading A's layers quantized to `bits` (None: raw)."""
        pre, cache, sink_kv = self.sender_cache(examples, selected)
        if bits is not None:
            cache, sink_kv, _, _ = self.send_quantized(pre, cache, sink_kv, selected, bits)
        b_cache, layout = assemble_receiver_cache(
            cache, pre.full_mask, self.layer_map, selected, sink_kv, self.params.receiver_mask
        )
        b = self.pair.receiver
        batch = tokenize_prompts(
            b, [receiver_text(e) for e in examples], self.params.max_prompt_tokens
        )
        pos = positions_from_mask(batch.attention_mask, pre.full_mask.sum(-1).to(b.device))
        with torch.inference_mode():
            return layout_forward(b, layout)(
                cache=b_cache,
                full_mask_BT=batch.attention_mask,
                position_ids_BT=pos,
                input_ids_BT=batch.input_ids,
            )

    def sensitivity(
        self, examples: list[Example], selected: set[int], batch_size: int | None = None
    ) -> dict[int, dict[int, float]]:
        """Per sent layer and width: mean KL(B's next-token distribution unquantized || with only that
        layer quantized), over `examples` (each rank measures its share, sorted by length, in batches
        that halve on out-of-memory; the sums are added, and one rank's failure stops every rank)."""
        layers = sorted(selected)
        raw = dtype_bits(self.wire_payload(selected, 0).dtype)
        choices = self.params.bit_choices

        def measure(chunk: list[Example]) -> list[float]:
            ref = self.first_logits(chunk, selected, None).float().log_softmax(-1)
            out = []
            for i in range(len(layers)):
                for c in choices:
                    bits = [raw] * len(layers)
                    bits[i] = c
                    got = self.first_logits(chunk, selected, bits).float().log_softmax(-1)
                    out.append(float((ref.exp() * (ref - got)).sum(-1).clamp(min=0).double().sum()))
            return out

        mine = by_length(shard(examples))
        flat = [0.0] * (len(layers) * len(choices))
        with Progress(len(mine), f"calibrate {self.name}: bit sensitivity", unit="items") as bar:
            parts = agreed(
                lambda: measure_in_batches(
                    mine,
                    batch_size or self.params.batch_size or 8,
                    measure,
                    f"calibrate {self.name}",
                    bar,
                ),
                f"calibrate {self.name}",
            )
        for _, sums in parts:
            flat = [t + s for t, s in zip(flat, sums)]
        flat = all_reduce_sum(flat)
        return {
            l: {c: flat[i * len(choices) + j] / len(examples) for j, c in enumerate(choices)}
            for i, l in enumerate(layers)
        }

    def calibrate(self, examples: list[Example], batch_size: int | None = None) -> dict[str, Any]:
        if not examples:
            raise ValueError(
                f"methods.{self.name}: calibration needs calibration items (tasks.N.n_calib > 0)"
            )
        calibration = (
            super().calibrate(examples, batch_size) if self.params.selection == "calibrate" else {}
        )
        if self.params.target_bits is not None:
            selected = self.selected_layers()
            profile = self.sensitivity(examples, selected, batch_size)
            items_per_rank = gather_object(len(shard(examples)))
            decision = None
            if is_main():
                layer_bits = allocate_bits(
                    profile, self.params.target_bits, self.params.bit_choices
                )
                decision = {
                    **calibration,
                    "sensitivity": {
                        str(l): {str(c): v for c, v in per.items()} for l, per in profile.items()
                    },
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
            bits = {int(layer): int(b) for layer, b in data["layer_bits"].items()}
            wrong = {layer: b for layer, b in bits.items() if b not in self.params.bit_choices}
            if wrong:
                raise ValueError(
                    f"layer_bits {wrong} are not among bit_choices {self.params.bit_choices}"
                )
            self.layer_bits = bits
        self.calibration = data
