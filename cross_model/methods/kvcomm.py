"""KVComm (Shi et al., ICLR 2026): B reads a selected subset of A's KV-cache layers.

A prefills its prompt once, up to the highest layer that is sent (no LM head). B's cache holds, per
receiver layer, all of A's keys/values for selected layers and only A's first token (the attention
sink) elsewhere. B's tokens take positions after A's context and attend causally, layer by layer, to
exactly what that layer holds (see `kv_layout.KVLayout`): causal for every layer selection, unlike the
public code. Layers are chosen by hand, at random, or by calibration on a split disjoint from the test
items: attention mass of B's prompt on A's tokens (sink excluded, causal mask applied), min-max
normalised and blended with a Gaussian prior over depth.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from cross_model.data.base import Example, by_length, sender_count
from cross_model.distributed import (
    agreed,
    all_reduce_sum,
    broadcast_object,
    gather_object,
    is_main,
    shard,
)
from cross_model.facts import check_facts_settings, facts_text, with_facts
from cross_model.failures import measure_in_batches
from cross_model.generation import greedy_generate
from cross_model.kv_layout import (
    Sources,
    assemble_from_sources,
    join_receiver_caches,
    layer_sources,
    layout_forward,
    use_cross_model_attention,
)
from cross_model.kv_wire import KVPayload, dtype_bits, dtype_name, payload_size
from cross_model.methods.base import Method, MethodParams, Prediction
from cross_model.methods.other_item import donor_map, with_donor_contexts
from cross_model.methods.registry import register
from cross_model.models import LoadedModel
from cross_model.prefill_memo import Prefill, run_prefill
from cross_model.progress import Progress
from cross_model.prompting import pad_left, receiver_text, sender_text, tokenize_prompts
from cross_model.surgery import partial_forward

SELECTIONS = ("calibrate", "layers", "range", "random", "all", "online")
RECEIVER_MASKS = ("causal", "public")
MULTI_SENDER_CACHES = ("ordered", "public")
DEPTH_MAPS = ("nearest", "public")


@dataclass
class KVCommParams(MethodParams):
    selection: str = field(
        default="calibrate",
        metadata={
            "help": "calibrate, layers (layers_list), range, random, all, or "
            "online (re-selected on the test prompts, no labels)"
        },
    )
    calib_interval: int = field(
        default=1,
        metadata={
            "help": "online: items between re-selections (online_rule batch: "
            "on this rank, in the order it answers them)"
        },
    )
    online_rule: str = field(
        default="batch",
        metadata={
            "help": "online: batch (re-ranked on the batch's own prompts) or "
            "public (every calib_interval-th item of the task's "
            "order ranks the layers alone, as com_online.py)"
        },
    )
    layers_list: list[int] | None = field(
        default=None, metadata={"help": "receiver layers to send (selection: layers)"}
    )
    layer_from: int | None = field(
        default=None, metadata={"help": "first receiver layer sent (selection: range)"}
    )
    layer_to: int | None = field(
        default=None, metadata={"help": "last receiver layer sent, inclusive (selection: range)"}
    )
    top_layers: float = field(
        default=0.3, metadata={"help": "fraction of layers kept (calibrate, random)"}
    )
    alpha: float = field(
        default=0.5, metadata={"help": "weight of measured importance against the depth prior"}
    )
    mu: float = field(default=0.5, metadata={"help": "prior centre as a fraction of depth"})
    sigma: float = field(default=10.0, metadata={"help": "prior width in layers"})
    prior: str = field(
        default="max",
        metadata={
            "help": "how the depth prior is scaled before the blend: max (divided by "
            "its peak) or minmax (to [0, 1], as the public code)"
        },
    )
    always_send_layer0: bool = field(
        default=True, metadata={"help": "send layer 0 in full (as the public code)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for random selection"})
    receiver_mask: str = field(
        default="causal",
        metadata={
            "help": "causal (ours), or public: the public code's first pass, where B's prompt "
            "tokens see later ones in sink-only layers (docs/METHODS.md)"
        },
    )
    calibration_mask: str = field(
        default="causal",
        metadata={
            "help": "calibration's attention on A: causal (later B tokens masked; ours) or "
            "public (the public recompute adds its boolean mask as +1, so B's "
            "later tokens share the softmax)"
        },
    )
    depth_map: str = field(
        default="nearest",
        metadata={
            "help": "models of different depths: nearest (each receiver layer reads one sender "
            "layer; ours) or public (each sender layer goes to receiver layer "
            "round((l + 0.5) L_B / L_A - 0.5), several concatenated, as models.py)"
        },
    )
    multi_sender_cache: str = field(
        default="ordered",
        metadata={
            "help": "several senders: ordered (A2 at the positions after A1's, every sender's "
            "sink; ours) or public (A2 from position 0, only A1's sink in unsent "
            "layers, as com_ms.py)"
        },
    )
    control: str | None = field(
        default=None,
        metadata={
            "help": "null, or other_item: B reads the cache A built from "
            "another test item's context (the next by length)"
        },
    )
    facts: bool = field(
        default=False,
        metadata={
            "help": "also send facts from A's context as text before B's question "
            "(Q-KVComm's side channel; bytes counted)"
        },
    )
    facts_extractor: str = field(
        default="simple", metadata={"help": "simple (no dependency), yake or spacy"}
    )
    max_facts: int = field(default=8, metadata={"help": "facts sent per example (facts: true)"})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"{prefix}.selection: {self.selection!r} is not one of {', '.join(SELECTIONS)}"
            )
        if self.selection == "layers" and not self.layers_list:
            raise ValueError(
                f"{prefix}.layers_list: required (a non-empty list) when selection is 'layers'"
            )
        if self.selection == "range" and (
            self.layer_from is None or self.layer_to is None or self.layer_from > self.layer_to
        ):
            raise ValueError(
                f"{prefix}.layer_from/layer_to: required with layer_from <= layer_to when selection is 'range'"
            )
        if not 0.0 <= self.top_layers <= 1.0:
            raise ValueError(f"{prefix}.top_layers: a fraction in [0, 1], got {self.top_layers}")
        if self.calib_interval < 1:
            raise ValueError(f"{prefix}.calib_interval: must be >= 1, got {self.calib_interval}")
        if self.online_rule not in ("batch", "public"):
            raise ValueError(f"{prefix}.online_rule: batch or public, got {self.online_rule!r}")
        if self.receiver_mask not in RECEIVER_MASKS:
            raise ValueError(
                f"{prefix}.receiver_mask: one of {', '.join(RECEIVER_MASKS)}, got {self.receiver_mask!r}"
            )
        if not 0.0 <= self.alpha <= 1.0 or self.sigma <= 0:
            raise ValueError(f"{prefix}.alpha must be in [0, 1] and {prefix}.sigma > 0")
        if self.calibration_mask not in RECEIVER_MASKS:
            raise ValueError(
                f"{prefix}.calibration_mask: one of {', '.join(RECEIVER_MASKS)}, got {self.calibration_mask!r}"
            )
        if self.depth_map not in DEPTH_MAPS:
            raise ValueError(
                f"{prefix}.depth_map: one of {', '.join(DEPTH_MAPS)}, got {self.depth_map!r}"
            )
        if self.multi_sender_cache not in MULTI_SENDER_CACHES:
            raise ValueError(
                f"{prefix}.multi_sender_cache: one of {', '.join(MULTI_SENDER_CACHES)}, "
                f"got {self.multi_sender_cache!r}"
            )
        if self.prior not in ("max", "minmax"):
            raise ValueError(f"{prefix}.prior: {self.prior!r} is not max or minmax")
        check_facts_settings(prefix, self.facts_extractor, self.max_facts)
        if self.control not in (None, "other_item"):
            raise ValueError(f"{prefix}.control: {self.control!r} is not one of null, other_item")


@dataclass(frozen=True)
class SenderSide:
    """One sender of an item: its model, per receiver layer the sender layer that layer reads, whether
    its first token goes to the unsent layers (`multi_sender_cache: public` sends only A1's), and under
    `depth_map: public` the sender layers each receiver layer holds instead."""

    model: LoadedModel
    layer_map: list[int]
    sinks: bool = True
    groups: list[list[int]] | None = None

    def sources(self, selected: set[int]) -> Sources:
        """Per receiver layer, the sender layers it holds, in full or as their sink."""
        if self.groups is None:
            return layer_sources(self.layer_map, selected, self.sinks)
        # The public code applies the selected indices (a ranking of B's layers) to A's layers.
        return [
            [(la, la in selected) for la in group if la in selected or self.sinks]
            for group in self.groups
        ]


def layer_map(l_a: int, l_b: int) -> list[int]:
    """For each receiver layer, the sender layer it reads (A layer l maps to B layer
    round((l + 0.5) L_B / L_A - 0.5); this is that rule read from B's side)."""
    return [min(l_a - 1, max(0, round((lb + 0.5) * l_a / l_b - 0.5))) for lb in range(l_b)]


def public_depth_map(l_a: int, l_b: int) -> list[list[int]]:
    """Per receiver layer, the sender layers the public models.py puts in it: A layer l goes to B layer
    round((l + 0.5) L_B / L_A - 0.5) (Python's rounding, as there); a shallower receiver gets several,
    concatenated in order, and a deeper one has layers that get none."""
    groups: list[list[int]] = [[] for _ in range(l_b)]
    for la in range(l_a):
        groups[round((la + 0.5) * l_b / l_a - 0.5)].append(la)
    return groups


def _min_max(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in values]


def blend_scores(
    importance: list[float], alpha: float, mu: float, sigma: float, prior_scale: str = "max"
) -> list[float]:
    """alpha x the measured importance (min-max scaled) + (1 - alpha) x a Gaussian prior over depth,
    scaled by its peak (`max`) or to [0, 1] (`minmax`, the public code's)."""
    n = len(importance)
    imp = _min_max(importance)
    prior = [math.exp(-0.5 * ((l - mu * (n - 1)) / sigma) ** 2) for l in range(n)]
    prior = _min_max(prior) if prior_scale == "minmax" else [p / max(prior) for p in prior]
    return [alpha * i + (1 - alpha) * p for i, p in zip(imp, prior)]


@register("kvcomm")
class KVComm(Method):
    public_settings = {
        "receiver_mask": "public",
        "alpha": 1.0,
        "prior": "minmax",
        "online_rule": "public",
        "multi_sender_cache": "public",
        "calibration_mask": "public",
        "depth_map": "public",
    }
    Params = KVCommParams

    @classmethod
    def needs_calibration(cls, params: KVCommParams) -> bool:
        return params.selection == "calibrate"

    @property
    def multi_sender(self) -> bool:
        """Several senders, each its own cache; the fact side channel and the other-item control read one."""
        return not self.params.facts and self.params.control is None

    def check_pair(self) -> None:
        b = self.pair.receiver.info
        for a in (s.info for s in self.pair.senders):
            if (a.num_kv_heads, a.head_dim) != (b.num_kv_heads, b.head_dim):
                raise ValueError(
                    f"methods.{self.name}: KVComm needs the same KV shape in both models; {a.name} has "
                    f"{a.num_kv_heads} KV heads x {a.head_dim} dims, {b.name} has {b.num_kv_heads} x {b.head_dim}. "
                    "Caches of different shapes cannot be shared without a learned KV projector (method c2c)."
                )
        # Per sender model (`senders`), the sender layer each receiver layer reads.
        self.layer_maps = [layer_map(s.info.num_layers, b.num_layers) for s in self.pair.senders]
        self.depth_groups = [
            public_depth_map(s.info.num_layers, b.num_layers)
            if self.params.depth_map == "public"
            else None
            for s in self.pair.senders
        ]
        p = self.params
        # The layers a selection names: the receiver's, or under depth_map public the sender's (the public
        # code's layers_list indexes A's layers; a calibrated ranking of B's layers is applied to them too).
        named, n = (
            (self.pair.sender, max(s.info.num_layers for s in self.pair.senders))
            if p.depth_map == "public"
            else (self.pair.receiver, b.num_layers)
        )
        self.index_depth = n
        for layer in (p.layers_list or []) + [
            x for x in (p.layer_from, p.layer_to) if x is not None
        ]:
            if not 0 <= layer < n:
                raise ValueError(
                    f"methods.{self.name}: layer {layer} is outside {named.info.name}'s 0..{n - 1}"
                )
        self.ranking: list[int] | None = None
        self.calibration: dict[str, Any] = {}
        self.measured_ids: list[
            str
        ] = []  # the calibration items this rank measured (in its last calibration)
        self.online_seen = 0  # items answered with selection: online, on this rank
        self.online_ids: set[str] = set()
        self.task_items: list[
            Example
        ] = []  # the task's test items in its order (online_rule: public)
        self.task_index: dict[str, int] = {}
        self.anchor_rankings: dict[int, list[int]] = {}
        self.donors: dict[str, Example] = {}  # control: other_item
        use_cross_model_attention(self.pair.receiver)

    # --- which layers ---------------------------------------------------------------------------
    def n_keep(self) -> int:
        return int(self.params.top_layers * self.pair.receiver.info.num_layers)

    def selected_layers(self) -> set[int]:
        p, n = self.params, self.index_depth
        if p.selection == "all":
            chosen = set(range(n))
        elif p.selection == "layers":
            chosen = set(p.layers_list)
        elif p.selection == "range":
            chosen = set(range(p.layer_from, p.layer_to + 1))
        elif p.selection == "random":
            keep = (
                self.n_keep() if n == self.pair.receiver.info.num_layers else int(p.top_layers * n)
            )
            chosen = set(random.Random(p.seed).sample(range(n), keep))
        else:
            if self.ranking is None:
                raise ValueError(
                    f"methods.{self.name}: layer selection needs calibration; run the calibrate stage first"
                )
            chosen = set(self.ranking[: self.n_keep()])
        if p.always_send_layer0:
            chosen.add(0)
        return chosen

    # --- sender ---------------------------------------------------------------------------------
    def sender_side(self, j: int = 0) -> SenderSide:
        """Sender j's model and layer map (its own model under `senders`; senders without one run
        sender 0's). Under `multi_sender_cache: public` only sender 0 sends its sink."""
        own = j if 0 < j < len(self.layer_maps) else 0
        sinks = j == 0 or self.params.multi_sender_cache == "ordered"
        return SenderSide(
            self.pair.sender_for(j), self.layer_maps[own], sinks, self.depth_groups[own]
        )

    @property
    def layer_map(self) -> list[int]:
        """Sender 0's: the sender layer each receiver layer reads."""
        return self.layer_maps[0]

    def sender_cache(
        self,
        examples: list[Example],
        selected: set[int],
        offset_B: torch.Tensor | None = None,
        side: SenderSide | None = None,
    ) -> tuple[Prefill, Any, dict]:
        """A's prefill, stopping after the highest sent layer (or shared with a method that ran more);
        the sinks of higher layers come from a one-token forward (A's first token attends only to
        itself, so its keys/values are the same). `offset_B`: A's context starts at this position in
        each row (a later sender of a multi-sender item; its prefill is its own, never shared).
        `side`: which sender (default sender 0)."""
        side = side or self.sender_side()
        a, sources = side.model, side.sources(selected)
        top = max((la for entries in sources for la, in_full in entries if in_full), default=-1) + 1
        texts = [sender_text(e) for e in examples]
        if offset_B is None:
            pre = self.prefill(a, texts, layers=top)
        else:
            ids = self.prompt_ids(a, texts)
            pre = run_prefill(
                a,
                pad_left(ids, a.tokenizer.pad_token_id, a.device),
                ids,
                top,
                offset_B.to(a.device),
            )
        sink_kv = {}
        sink_layers = {la for entries in sources for la, in_full in entries if not in_full}
        if any(la >= pre.layers for la in sink_layers):
            ids = torch.tensor(pre.first_ids, dtype=torch.long, device=a.device)[:, None]
            sink_cache = DynamicCache()
            pos = None if offset_B is None else offset_B.to(a.device)[:, None]
            partial_forward(
                a,
                ids,
                torch.ones_like(ids),
                max(sink_layers) + 1,
                cache=sink_cache,
                position_ids_BT=pos,
            )
            sink_kv = {
                la: (sink_cache.layers[la].keys, sink_cache.layers[la].values)
                for la in sink_layers
                if la >= pre.layers
            }
        return pre, pre.kv_view(), sink_kv

    def wire_payload(
        self,
        selected: set[int],
        n_tokens: int,
        bits: list[int] | None = None,
        side: SenderSide | None = None,
    ) -> KVPayload:
        """The payload's description (no tensors yet): what `kv_wire.encode` frames."""
        side = side or self.sender_side()
        a, b = side.model, self.pair.receiver
        sources = side.sources(selected)
        sent = [(l, la) for l, entries in enumerate(sources) for la, in_full in entries if in_full]
        sinks = [
            (l, la) for l, entries in enumerate(sources) for la, in_full in entries if not in_full
        ]
        dt = dtype_name(a.model.dtype)
        return KVPayload(
            a.info.name,
            b.info.name,
            [l for l, _ in sent],
            [la for _, la in sent],
            [l for l, _ in sinks],
            [la for _, la in sinks],
            dt,
            bits or [dtype_bits(dt)] * len(sent),
            kv_heads=a.info.num_kv_heads,
            head_dim=a.info.head_dim,
            tokens=n_tokens,
        )

    def payload_bytes(
        self, n_tokens: int, selected: set[int], side: SenderSide | None = None
    ) -> int:
        """The length of the encoded payload: sent layers and sinks raw, plus header and checksum."""
        return payload_size(self.wire_payload(selected, n_tokens, side=side).header())

    def transmit(
        self,
        pre: Prefill,
        cache: Any,
        sink_kv: dict,
        selected: set[int],
        texts: list[str] | None = None,
        side: SenderSide | None = None,
    ) -> tuple[Any, dict, list[int], list[dict]]:
        """What crosses from A to B (from sender `side`): B's view of A's cache and sinks, and each row's
        payload bytes. KVComm sends A's tensors as they are, so B's view is A's cache."""
        return (
            cache,
            sink_kv,
            [self.payload_bytes(n, selected, side) for n in pre.prompt_lengths],
            [{} for _ in pre.prompt_lengths],
        )

    def merge_extras(self, earlier: dict, later: dict) -> dict:
        """One row's extra fields from two senders' payloads (KVComm's transmit adds none)."""
        return {**earlier, **later}

    # --- receiver -------------------------------------------------------------------------------
    def receiver_cache(self, examples: list[Example], selected: set[int], as_sent: bool = True):
        """B's cache and layout from every sender's A-side work, with B's position offset, each row's
        sender prompt tokens, payload bytes and extra fields.

        Several senders: sender j prefills its own context at the positions after senders 0..j-1's
        (the receiver tells it where to start), sends its own payload, and B's cache holds, per layer,
        sender 0's part and then sender 1's: what one forward over [A1 | A2 | B] would hold in which
        A2 does not see A1. B's positions continue after all of them; bytes add up.
        `multi_sender_cache: public` (com_ms.py): every sender prefills from position 0 (A2's keys
        overlap A1's positions), the unsent layers hold only A1's sink, and B still starts after
        N1 + N2 (the length of layer 0, which holds every sender's tokens)."""
        senders = sender_count(examples)
        parts, sizes, extras, a_len = (
            [],
            [0] * len(examples),
            [{} for _ in examples],
            [0] * len(examples),
        )
        per_sender: list[list[int]] = []
        offset = None
        from_zero = self.params.multi_sender_cache == "public"
        for j in range(senders):
            views = [e.as_sender(j) for e in examples]
            side = self.sender_side(j)
            start = None if from_zero else offset
            a_pre, a_cache, sink_kv = self.sender_cache(views, selected, start, side)
            if as_sent:
                a_cache, sink_kv, got, more = self.transmit(
                    a_pre, a_cache, sink_kv, selected, [sender_text(e) for e in views], side
                )
                sizes = [x + y for x, y in zip(sizes, got)]
                extras = more if j == 0 else [self.merge_extras(x, y) for x, y in zip(extras, more)]
                per_sender.append(got)
            a_mask = a_pre.full_mask
            parts.append(
                assemble_from_sources(
                    a_cache,
                    a_mask,
                    side.sources(selected),
                    sink_kv,
                    self.params.receiver_mask,
                    start,
                )
            )
            a_len = [x + y for x, y in zip(a_len, a_pre.prompt_lengths)]
            real = a_mask.sum(-1)
            offset = real if offset is None else offset.to(real.device) + real
        cache, layout = join_receiver_caches(parts)
        if from_zero or self.params.depth_map == "public":
            # the public receiver starts B at the length of its layer 0 (every sender's tokens, or every
            # sender layer mapped to it), whatever positions the keys carry
            offset = layout.key_valid[0].sum(-1)
        if senders > 1 and as_sent:
            extras = [
                {**x, "bytes_per_sender": [s[i] for s in per_sender]} for i, x in enumerate(extras)
            ]
        return cache, layout, offset.to(self.pair.receiver.device), a_len, sizes, extras

    def _receive(
        self,
        examples: list[Example],
        selected: set[int],
        record: bool = False,
        max_new: list[int] | None = None,
        as_sent: bool = True,
        receiver_examples: list[Example] | None = None,
    ):
        """B's greedy answers reading A's cache, with each row's payload bytes and extra fields;
        `as_sent=False` reads A's tensors as they are (calibration). `receiver_examples`: what B reads
        when it is not the examples themselves (the facts before the question)."""
        cache, layout, offset, a_len, sizes, extras = self.receiver_cache(
            examples, selected, as_sent
        )
        layout.record_attention = record
        layout.record_mask = self.params.calibration_mask
        b = self.pair.receiver
        b_batch = tokenize_prompts(
            b,
            [receiver_text(e) for e in receiver_examples or examples],
            self.params.max_prompt_tokens,
        )
        limits = max_new or [self.max_new_tokens(e) for e in examples]
        gen = greedy_generate(  # B's positions continue after every sender's context
            b,
            b_batch.input_ids,
            b_batch.attention_mask,
            max(limits),
            cache=cache,
            position_offset_B=offset,
            forward=layout_forward(b, layout),
            max_new_tokens_B=limits,
        )
        return gen, a_len, b_batch.lengths, layout, sizes, extras

    def set_task_items(self, items: list[Example]) -> None:
        self.donors = donor_map(items)  # control: other_item (cross_model.methods.other_item)
        self.task_items, self.anchor_rankings = list(items), {}
        self.task_index = {e.example_id: i for i, e in enumerate(items)}

    def sender_examples(self, examples: list[Example]) -> list[Example]:
        """What A reads: the examples, or under control: other_item each one's donor's context."""
        if self.params.control != "other_item":
            return examples
        return with_donor_contexts(examples, self.donors, self.name)

    def rank_layers(self, importance: list[float]) -> list[int]:
        """Receiver layers by blended score (measured attention on A against the depth prior), best first."""
        p = self.params
        scores = blend_scores(importance, p.alpha, p.mu, p.sigma, p.prior)
        return sorted(range(len(scores)), key=lambda l: (-scores[l], l))

    def select_online(self, examples: list[Example]) -> bool:
        """selection: online, as the public com_online.py: when this batch reaches the next multiple of
        calib_interval items, B reads all of A's layers for the batch's own prompts (no labels), and the
        layers are re-ranked by its attention on A's tokens; the batch is answered with the new
        ranking. Returns whether it re-selected."""
        # Items count once: a failed batch's examples rerun one at a time are not new items.
        fresh = [e.example_id for e in examples if e.example_id not in self.online_ids]
        self.online_ids.update(fresh)
        start, interval = self.online_seen, self.params.calib_interval
        self.online_seen += len(fresh)
        if self.ranking is not None and (
            not fresh
            or (start // interval == (self.online_seen - 1) // interval and start % interval)
        ):
            return False
        sums = self.importance_sums(examples, self.params.batch_size or len(examples))
        self.ranking = self.rank_layers([t / len(examples) for t in sums])
        return True

    def _run_public_online(self, examples: list[Example]) -> list[Prediction]:
        """online_rule: public, as com_online.py walks a task: item k of the task's order is answered
        with the ranking B's attention gave on item k - k mod calib_interval alone (that item answered
        too, after ranking on itself). Each item's layers depend on its place in the task only, so
        batches, their order and the ranks' shares give every item the same ones."""
        index = self.task_index
        missing = [e.example_id for e in examples if e.example_id not in index]
        if missing:
            raise ValueError(
                f"methods.{self.name}: online_rule public ranks on the task's own items in their order; "
                f"{missing[0]} is not one of them (the evaluator hands the method the test list)"
            )
        interval = self.params.calib_interval
        groups: dict[int, list[Example]] = {}
        for e in examples:
            groups.setdefault(index[e.example_id] - index[e.example_id] % interval, []).append(e)
        answers: dict[str, Prediction] = {}
        for anchor, group in sorted(groups.items()):
            if anchor not in self.anchor_rankings:
                self.anchor_rankings[anchor] = self.rank_layers(
                    self.importance_sums([self.task_items[anchor]], 1)
                )
            self.ranking = self.anchor_rankings[anchor]
            for p in self._answer(group, {"online_anchor": self.task_items[anchor].example_id}):
                answers[p.example_id] = p
        return [answers[e.example_id] for e in examples]

    def _run_batch(self, examples: list[Example]) -> list[Prediction]:
        if self.params.selection == "online" and self.params.online_rule == "public":
            return self._run_public_online(examples)
        reselected = self.select_online(examples) if self.params.selection == "online" else None
        return self._answer(
            examples, {} if reselected is None else {"online_reselected": reselected}
        )

    def _answer(self, examples: list[Example], marks: dict[str, Any]) -> list[Prediction]:
        """The batch answered with the current selection; `marks` go into every row's extra."""
        selected = self.selected_layers()
        sent = self.sender_examples(examples)
        seen = examples if sent is not examples else None
        if self.params.facts:  # drawn from what A read (under the control, the donor's context)
            texts = [
                facts_text(e, self.params.facts_extractor, self.params.max_facts) for e in sent
            ]
            seen = [with_facts(e, t) for e, t in zip(examples, texts)]
        gen, a_len, b_len, _, sizes, extras = self._receive(sent, selected, receiver_examples=seen)
        if self.params.facts:
            sizes = [n + len(t.encode("utf-8")) for n, t in zip(sizes, texts)]
            extras = [
                {**x, "facts": t, "facts_bytes": len(t.encode("utf-8"))}
                for x, t in zip(extras, texts)
            ]
        extras = [{**x, **marks} for x in extras]
        context_bytes = [sum(len(c.encode("utf-8")) for c in e.contexts) for e in examples]
        extras = [
            {**x, "text_bytes": t, "payload_vs_text": round(n / t, 3) if t else None}
            for x, t, n in zip(extras, context_bytes, sizes)
        ]
        return [
            Prediction(
                e.example_id,
                text,
                size,
                sender_prefill_tokens=n_a,
                receiver_prefill_tokens=n_b,
                receiver_generated_tokens=n_out,
                extra={"layers": sorted(selected), **extra},
            )
            for e, text, n_a, n_b, n_out, size, extra in zip(
                examples, gen.texts, a_len, b_len, gen.n_generated, sizes, extras
            )
        ]

    # --- calibration ------------------------------------------------------------------------------
    def importance_sums(
        self, examples: list[Example], batch_size: int = 8, bar: Progress | None = None
    ) -> list[float]:
        """Per receiver layer, the attention mass of B's prompt tokens on A's tokens (sink excluded),
        summed over `examples` (each example: its mean over B's prompt tokens and heads), in batches
        of `batch_size` that halve on out-of-memory."""
        n = self.pair.receiver.info.num_layers

        def measure(chunk: list[Example]) -> list[float]:
            every = set(
                range(self.index_depth)
            )  # every layer crosses (the sender's under depth_map public)
            layout = self._receive(
                chunk, every, record=True, max_new=[1] * len(chunk), as_sent=False
            )[3]
            return [float(torch.cat(layout.attention_on_A[l]).double().sum()) for l in range(n)]

        totals = [0.0] * n
        for part, sums in measure_in_batches(
            examples, batch_size, measure, f"calibrate {self.name}", bar
        ):
            totals = [t + s for t, s in zip(totals, sums)]
            self.measured_ids += [e.example_id for e in part]
        return totals

    def layer_importance(self, examples: list[Example], batch_size: int = 8) -> list[float]:
        """Mean attention mass on A's tokens per receiver layer over `examples`, each rank measuring
        its share (sorted by length, so batches pad little) and the sums added over ranks. A rank
        that fails makes every rank stop here, instead of leaving the others in the sum."""
        mine = by_length(shard(examples))
        with Progress(len(mine), f"calibrate {self.name}: attention on A", unit="items") as bar:
            sums = agreed(
                lambda: self.importance_sums(mine, batch_size, bar), f"calibrate {self.name}"
            )
        *totals, count = all_reduce_sum(sums + [len(mine)])
        return [t / max(count, 1) for t in totals]

    def calibrate(self, examples: list[Example], batch_size: int | None = None) -> dict[str, Any]:
        """Measure on every rank's share, decide on rank 0, and give every rank that decision.
        `batch_size`: items per forward (None: the method's batch_size, else 8)."""
        if not examples:
            raise ValueError(
                f"methods.{self.name}: calibration needs calibration items (tasks.N.n_calib > 0)"
            )
        self.measured_ids = []
        importance = self.layer_importance(examples, batch_size or self.params.batch_size or 8)
        items_per_rank = gather_object(len(shard(examples)))
        measured = gather_object(
            self.measured_ids
        )  # what each rank really measured, not what it was given
        decision = None
        if is_main():
            p = self.params
            scores = blend_scores(importance, p.alpha, p.mu, p.sigma, p.prior)
            self.ranking = self.rank_layers(importance)
            decision = {
                "importance": importance,
                "scores": scores,
                "ranking": self.ranking,
                "selected": sorted(self.selected_layers()),
                "calibration_ids": [e.example_id for e in examples],
                "items_per_rank": items_per_rank,
                "measured_per_rank": measured,
            }
        self.load_calibration(broadcast_object(decision))
        return self.calibration

    def load_calibration(self, data: dict[str, Any]) -> None:
        ranking = data.get("ranking")
        if not isinstance(ranking, list) or sorted(ranking) != list(range(self.index_depth)):
            raise ValueError(
                f"its ranking must order every one of the {self.index_depth} layers once, "
                f"got {ranking!r}"
            )
        self.ranking = list(ranking)
        if "selected" in data and sorted(data["selected"]) != sorted(self.selected_layers()):
            raise ValueError(
                f"it selected layers {data['selected']}, but its ranking gives "
                f"{sorted(self.selected_layers())} under this config's top_layers"
            )
        self.calibration = data
