"""Receiver caches whose layers hold different things: `KVLayout` says, per layer and key, its
position, whether it is real and its origin (B's tokens, A's tokens, A's attention sink), and the
registered attention function `cross_model` honours it, so B attends causally to exactly what each
layer holds (KVComm's selected layers, C2C's projected layers, several senders side by side).

Legend: B batch, T tokens, H heads, D head dim, L layers.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from cross_model.generation import positions_from_mask
from cross_model.models import LoadedModel

ATTN_IMPLEMENTATION = "cross_model"

SRC_B, SRC_A, SRC_SINK = 0, 1, 2


@dataclass
class KVLayout:
    """What each layer's cache holds: per key, its position, whether it is real, and its origin."""

    key_pos: list[torch.Tensor]  # per layer, B x T_l
    key_valid: list[torch.Tensor]  # per layer, B x T_l (bool)
    key_src: list[torch.Tensor]  # per layer, B x T_l (SRC_*)
    query_pos: torch.Tensor | None = None  # B x q, for the forward in progress
    record_attention: bool = False
    # How the recorded attention is masked: "causal" (each query's softmax over the keys it may see; the
    # mass on A's tokens, every sender's sink excluded) or "public" (the public KVComm recompute adds
    # transformers' boolean mask to the scores, +1 where a key may be seen and 0 elsewhere, so B's later
    # prompt tokens share the softmax; padding keys, which its batch of one never has, stay out; the
    # mass on every key before B's but the layer's first).
    record_mask: str = "causal"
    # "causal": each key at its own position, B attends only backwards. "public": as the public KVComm
    # receiver, whose transformers builds one mask for layer 0's cache (A's whole context) and cuts it to
    # each layer's length, so a key's place in its layer's cache stands in for its position: in a
    # sink-only layer B's prompt tokens then see later prompt tokens during the prefill.
    receiver_mask: str = "causal"
    attention_on_A: dict[int, list[torch.Tensor]] = field(
        default_factory=dict
    )  # layer -> per-call B x H
    # Per layer, None or B x T_l added to the attention logits of those keys (C2C's soft gates: log g).
    key_bias: list[torch.Tensor | None] | None = None
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)  # this step's masks

    def append(self, pos_BT: torch.Tensor, valid_BT: torch.Tensor) -> None:
        """Register new (receiver) tokens in every layer before the forward that adds them. Layers that
        hold the same keys (every sent layer; every sink-only layer) share one tensor of each kind, so
        this is one concatenation per kind of layer, not per layer."""
        self.query_pos = pos_BT
        valid = valid_BT.bool()
        src = torch.full_like(pos_BT, SRC_B)
        old = (
            list(self.key_pos),
            list(self.key_valid),
            list(self.key_src),
        )  # their ids stay unique below
        grown: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for l, (p, v, s) in enumerate(zip(*old)):
            key = (id(p), id(v), id(s))
            if key not in grown:
                grown[key] = (
                    torch.cat([p, pos_BT], dim=1),
                    torch.cat([v, valid], dim=1),
                    torch.cat([s, src], dim=1),
                )
            self.key_pos[l], self.key_valid[l], self.key_src[l] = grown[key]
        if self.key_bias is not None:  # B's own tokens are never gated
            zeros: dict[int, torch.Tensor] = {}
            for l, bias in enumerate(self.key_bias):
                if bias is not None:
                    if id(bias) not in zeros:
                        zeros[id(bias)] = torch.cat([bias, bias.new_zeros(pos_BT.shape)], dim=1)
                    self.key_bias[l] = zeros[id(bias)]
        self._query_valid = valid
        self._masks = {}

    def mask(self, layer: int, q_len: int, sliding_window: int | None) -> torch.Tensor:
        """B x 1 x q x T_l boolean: key real, not after the query, inside the sliding window. Built once
        per step for each distinct (keys, window) and shared by the layers that have them."""
        kpos, kvalid = self.key_pos[layer], self.key_valid[layer]
        bias = self.key_bias[layer] if self.key_bias is not None else None
        masks = self._masks
        key = (id(kpos), id(kvalid), q_len, sliding_window, id(bias))
        if key in masks:
            return masks[key]
        qpos = self.query_pos[:, -q_len:]
        if self.receiver_mask == "public":
            kpos = kvalid.long().cumsum(-1) - 1  # the key's place among its layer's keys
        m = kvalid[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
        if sliding_window:
            m = m & (qpos[:, :, None] - kpos[:, None, :] < sliding_window)
        # Padding queries see nothing; give them everything so softmax stays finite (their outputs are unused).
        empty = ~m.any(-1, keepdim=True)
        m = m | empty
        if bias is not None:  # an additive float mask: the bias where allowed, -inf elsewhere
            m = torch.where(
                m, bias[:, None, :].to(torch.float32), torch.tensor(float("-inf"), device=m.device)
            )
        masks[key] = m[:, None, :, :]
        return masks[key]

    def folded_mask(self, mask_B1QT: torch.Tensor, groups: int) -> torch.Tensor:
        """`mask_B1QT` repeated for `groups` query heads folded into the query axis (B x 1 x G*q x T),
        made once per step and mask."""
        key = ("folded", id(mask_B1QT), groups)
        if key not in self._masks:
            b, _, q, t = mask_B1QT.shape
            self._masks[key] = (
                mask_B1QT[:, :, None].expand(b, 1, groups, q, t).reshape(b, 1, groups * q, t)
            )
        return self._masks[key]


_ACTIVE: contextvars.ContextVar[KVLayout | None] = contextvars.ContextVar(
    "cross_model_layout", default=None
)


@contextlib.contextmanager
def active_layout(layout: KVLayout) -> Iterator[KVLayout]:
    token = _ACTIVE.set(layout)
    try:
        yield layout
    finally:
        _ACTIVE.reset(token)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def cross_model_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, but with masks from the active `KVLayout` when there is one (else plain SDPA)."""
    layout = _ACTIVE.get()
    if layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = module.layer_idx
    q_len = query.shape[2]
    assert key.shape[2] == layout.key_pos[layer].shape[1], (
        "cache and layout disagree on the key count"
    )
    mask_B1QT = layout.mask(layer, q_len, getattr(module, "sliding_window", None))
    if (
        mask_B1QT.dtype != torch.bool and mask_B1QT.dtype != query.dtype
    ):  # a gated layer's float mask
        mask_B1QT = mask_B1QT.to(query.dtype)
    groups = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if (
        layout.record_attention and q_len > 1
    ):  # calibration only: the probabilities themselves are needed
        k = _repeat_kv(key, groups)
        scores = (query.float() @ k.float().transpose(-1, -2)) * scale
        if layout.record_mask == "public":
            scores = scores + mask_B1QT.to(scores.dtype)
            scores = scores.masked_fill(~layout.key_valid[layer][:, None, None, :], float("-inf"))
        else:
            scores = scores.masked_fill(~mask_B1QT, float("-inf"))
        probs = scores.softmax(-1)  # B x H x q x T
        if (
            layout.record_mask == "public"
        ):  # the public measure: every A key after the layer's first
            place = layout.key_valid[layer].long().cumsum(-1) - 1
            on_a = ((layout.key_src[layer] != SRC_B) & (place > 0))[:, None, None, :]
        else:
            on_a = (layout.key_src[layer] == SRC_A)[:, None, None, :]
        mass = (probs * on_a).sum(-1)  # B x H x q
        qvalid = layout._query_valid[:, -q_len:]
        per_row = (mass * qvalid[:, None, :]).sum(-1) / qvalid.sum(-1).clamp(min=1)[:, None]
        layout.attention_on_A.setdefault(layer, []).append(
            per_row.mean(1).cpu()
        )  # B, averaged over heads
    if groups == 1:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask_B1QT, scale=scale)
        return out.transpose(1, 2).contiguous(), None
    # Grouped-query attention without copying K and V once per query head: the G query heads that read
    # one KV head become G x q queries of that head (query head h reads KV head h // G, as HF's
    # repeat_kv). Every SDPA backend takes this with a mask, unlike `enable_gqa`.
    bsz, n_heads, _, dim = query.shape
    q_fold = query.reshape(bsz, key.shape[1], groups * q_len, dim)
    out = F.scaled_dot_product_attention(
        q_fold, key, value, attn_mask=layout.folded_mask(mask_B1QT, groups), scale=scale
    )
    return out.reshape(bsz, n_heads, q_len, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, cross_model_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_cross_model_attention(lm: LoadedModel) -> None:
    """Switch a model to our attention function (plain SDPA until a layout is active)."""
    if lm.model.config._attn_implementation != ATTN_IMPLEMENTATION:
        lm.model.set_attn_implementation(ATTN_IMPLEMENTATION)


def layout_forward(
    lm: LoadedModel, layout: KVLayout, all_logits: bool = False
) -> Callable[..., torch.Tensor]:
    """A `generation.greedy_generate` forward that registers each step's tokens in `layout` and runs
    with it active. The 2-D mask is not used by attention (the layout is); a 4-D placeholder makes
    transformers skip building its own. `all_logits` returns B x T x V (tests) instead of B x V."""

    def forward(
        cache: Any,
        full_mask_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        input_ids_BT: torch.Tensor | None = None,
        inputs_embeds_BTD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = position_ids_BT.shape[1]
        layout.append(position_ids_BT, full_mask_BT[:, -q:])
        placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=position_ids_BT.device)
        with active_layout(layout):
            out = lm.model(
                input_ids=input_ids_BT,
                inputs_embeds=inputs_embeds_BTD,
                attention_mask=placeholder,
                position_ids=position_ids_BT,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
        return out.logits if all_logits else out.logits[:, -1, :]

    return forward


# Per receiver layer, what it holds from one sender, in order: (sender layer, True) for that layer's
# keys/values in full, (sender layer, False) for its first real token only (the attention sink).
Sources = list[list[tuple[int, bool]]]


def layer_sources(layer_map: list[int], selected: set[int], sinks: bool = True) -> Sources:
    """One sender layer per receiver layer (`layer_map`): in full where the receiver layer is selected,
    else its sink, or nothing when `sinks` is false (a later sender under the public multi-sender rule)."""
    return [
        [(la, True)] if l in selected else [(la, False)] if sinks else []
        for l, la in enumerate(layer_map)
    ]


def assemble_receiver_cache(
    sender_cache: Any,
    sender_mask_BT: torch.Tensor,
    layer_map: list[int],
    selected: set[int],
    sink_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    receiver_mask: str = "causal",
    position_offset_B: torch.Tensor | None = None,
    sinks: bool = True,
) -> tuple[DynamicCache, KVLayout]:
    """B's cache from A's: receiver layer l holds all of A's layer `layer_map[l]` when l is selected,
    else only A's first real token (the attention sink), or nothing when `sinks` is false. See
    `assemble_from_sources`."""
    return assemble_from_sources(
        sender_cache,
        sender_mask_BT,
        layer_sources(layer_map, selected, sinks),
        sink_kv,
        receiver_mask,
        position_offset_B,
    )


def assemble_from_sources(
    sender_cache: Any,
    sender_mask_BT: torch.Tensor,
    sources: Sources,
    sink_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    receiver_mask: str = "causal",
    position_offset_B: torch.Tensor | None = None,
) -> tuple[DynamicCache, KVLayout]:
    """B's cache from A's: receiver layer l holds, in order, what `sources[l]` names: sender layers in
    full or as their sink (several, as the public code maps a deeper sender; none, for a receiver layer
    no sender layer maps to). Positions are A's own (0..N-1, or from `position_offset_B` when A
    prefilled at an offset: a second sender after the first). `sink_kv[la]` gives the sink's
    keys/values (B x H x 1 x D) of A layers the full forward skipped."""
    bsz = sender_mask_BT.shape[0]
    device = sender_mask_BT.device
    start = (
        torch.zeros(bsz, dtype=torch.long, device=device)
        if position_offset_B is None
        else position_offset_B.to(device=device, dtype=torch.long)
    )
    pos_a = positions_from_mask(sender_mask_BT, start)
    valid_a = sender_mask_BT.bool()
    first_real = sender_mask_BT.long().argmax(
        -1
    )  # the first real token (left padding or a shared prefix)
    rows = torch.arange(bsz, device=device)
    # One tensor of each kind per kind of layer (see `KVLayout.append`): layers holding the same pattern
    # of full and sink-only sender layers share their position, validity and origin tensors.
    full = (pos_a, valid_a, torch.where(pos_a == start[:, None], SRC_SINK, SRC_A))
    sink = (
        start[:, None].clone(),
        torch.ones((bsz, 1), dtype=torch.bool, device=device),
        torch.full((bsz, 1), SRC_SINK, device=device),
    )
    patterns: dict[tuple[bool, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def layout_of(pattern: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if pattern not in patterns:
            parts = [full if f else sink for f in pattern] or [tuple(t[:, :0] for t in sink)]
            patterns[pattern] = tuple(torch.cat(kind, dim=1) for kind in zip(*parts))
        return patterns[pattern]

    def kv(la: int, in_full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if in_full:
            return sender_cache.layers[la].keys, sender_cache.layers[la].values
        if sink_kv and la in sink_kv:
            return sink_kv[la]
        keys, values = sender_cache.layers[la].keys, sender_cache.layers[la].values
        return keys[rows, :, first_real][:, :, None, :], values[rows, :, first_real][:, :, None, :]

    named = [entry for entries in sources for entry in entries]
    if not named:
        raise ValueError(
            "a sender that sends no layer and no sink sends nothing; select a layer "
            "(or keep always_send_layer0)"
        )
    nothing = kv(*named[0])[0][:, :, :0]  # B x H x 0 x D, for a receiver layer that gets nothing
    cache = DynamicCache()
    key_pos, key_valid, key_src = [], [], []
    for l, entries in enumerate(sources):
        pairs = [kv(la, f) for la, f in entries]
        if len(pairs) == 1:
            k, v = pairs[0]
        elif pairs:
            k, v = torch.cat([x[0] for x in pairs], dim=2), torch.cat([x[1] for x in pairs], dim=2)
        else:
            k = v = nothing
        cache.update(k, v, l)
        kp, kvalid, src = layout_of(tuple(f for _, f in entries))
        key_pos.append(kp)
        key_valid.append(kvalid)
        key_src.append(src)
    return cache, KVLayout(key_pos, key_valid, key_src, receiver_mask=receiver_mask)


def join_receiver_caches(
    parts: list[tuple[DynamicCache, KVLayout]],
) -> tuple[DynamicCache, KVLayout]:
    """Several senders' receiver caches as one: per layer, the first sender's keys, then the second's
    (each part's positions as assembled; padding stays masked wherever it sits). Layers that shared a
    layout tensor in every part share the joined one too (see `KVLayout.append`)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0][1]
    cache = DynamicCache()
    joined: dict[tuple, torch.Tensor] = {}

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(id(t) for t in tensors)
        if key not in joined:
            joined[key] = torch.cat(tensors, dim=1)
        return joined[key]

    key_pos, key_valid, key_src = [], [], []
    for l in range(len(first.key_pos)):
        cache.update(
            torch.cat([c.layers[l].keys for c, _ in parts], dim=2),
            torch.cat([c.layers[l].values for c, _ in parts], dim=2),
            l,
        )
        key_pos.append(cat([lay.key_pos[l] for _, lay in parts]))
        key_valid.append(cat([lay.key_valid[l] for _, lay in parts]))
        key_src.append(cat([lay.key_src[l] for _, lay in parts]))
    return cache, KVLayout(key_pos, key_valid, key_src, receiver_mask=first.receiver_mask)
