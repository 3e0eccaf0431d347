"""The public KVComm receiver (Zephyroam/KVComm's models.py and models_ms.py), rebuilt from Hugging Face
pieces for the tests, sharing no code with `cross_model`: batch 1, tiny Llama as A1, A2 and B."""

from __future__ import annotations

import torch

from cross_model.models import load_model


def public_receiver_logits(
    senders_ids: list[list[int]],
    b_ids: list[int],
    selected: set[int],
    sender: str = "tiny-llama-64",
    receiver: str = "tiny-llama-64",
) -> torch.Tensor:
    """B's logits over its prompt as the public receiver computes them: every sender prefills its own
    context from position 0; sender layer i goes to receiver layer round((i + 0.5) L_B / L_A - 0.5),
    several concatenated in order where the receiver is shallower (DynamicCache.update appends), none
    where it is deeper; per sender layer the cache holds each sender's keys/values in turn when i is
    selected (or 0) and only the first sender's first token otherwise; B's positions start at the length
    of layer 0's cache; and transformers' mask for that length is cut to each layer's length inside
    attention (what transformers 4.53's SDPA did, which the public code pins)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def cut_mask_sdpa(module, query, key, value, attention_mask, **kw):
        if attention_mask is not None and attention_mask.ndim == 4:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("public_kvcomm_test", cut_mask_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(
        "public_kvcomm_test",
        lambda *a, **kw: sdpa_mask(*a, **{**kw, "allow_is_causal_skip": False}),
    )
    try:
        return _public_forward(senders_ids, b_ids, selected, sender, receiver)
    finally:  # global registries: a later test must not find this attention registered
        AttentionInterface._global_mapping.pop("public_kvcomm_test", None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop("public_kvcomm_test", None)


def _public_forward(
    senders_ids: list[list[int]], b_ids: list[int], selected: set[int], sender: str, receiver: str
) -> torch.Tensor:
    from transformers import DynamicCache

    a_model = load_model(sender).model  # fresh instances: the shared ones keep their attention
    model = load_model(receiver).model
    model.set_attn_implementation("public_kvcomm_test")
    l_a, l_b = a_model.config.num_hidden_layers, model.config.num_hidden_layers
    with torch.inference_mode():
        caches = [
            a_model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
            for ids in senders_ids
        ]
        held: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(l_b)]
        for i in range(l_a):
            target = round((i + 0.5) * l_b / l_a - 0.5)
            for j, c in enumerate(caches):
                k, v = c.layers[i].keys, c.layers[i].values
                if i in selected or i == 0:
                    held[target].append((k, v))
                elif j == 0:  # keep the first token due to attention sink (the first sender's only)
                    held[target].append((k[:, :, :1], v[:, :, :1]))
        empty = caches[0].layers[0].keys[:, :, :0]
        cache = DynamicCache()
        for l, parts in enumerate(held):
            cache.update(
                torch.cat([k for k, _ in parts], 2) if parts else empty,
                torch.cat([v for _, v in parts], 2) if parts else empty,
                l,
            )
        n_a, q = cache.layers[0].keys.shape[2], len(b_ids)
        out = model(
            input_ids=torch.tensor([b_ids]),
            past_key_values=cache,
            attention_mask=torch.ones(1, n_a + q, dtype=torch.long),
            position_ids=torch.arange(n_a, n_a + q)[None],
            use_cache=True,
        )
    return out.logits[0]


def public_calibration_importance(a_ids: list[int], b_ids: list[int]) -> list[float]:
    """Per layer, the public calibration's measure for one item: B's prompt over A's whole cache, each
    layer's scores recomputed as the public `eager_attention_forward_without_value` does (Q K^T x scale
    plus transformers' boolean mask, True adding 1 and False 0, then softmax over every key), and the
    mass on A's keys after the first ([..., 1:-q]) summed over keys and averaged over heads and queries."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    importance: dict[int, float] = {}

    def tracing_sdpa(module, query, key, value, attention_mask, scaling=None, **kw):
        if query.shape[2] > 1:
            k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            scores = (query.float() @ k.float().transpose(2, 3)) * scaling
            scores = scores + attention_mask[:, :, :, : k.shape[-2]]  # a boolean mask, added as 0/1
            probs = scores.softmax(-1)
            importance[module.layer_idx] = float(probs[..., 1 : -query.shape[2]].sum(-1).mean())
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kw
        )

    AttentionInterface.register("public_calibration_test", tracing_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(
        "public_calibration_test",
        lambda *a, **kw: sdpa_mask(*a, **{**kw, "allow_is_causal_skip": False}),
    )
    try:
        model = load_model("tiny-llama-64").model
        model.set_attn_implementation("public_calibration_test")
        with torch.inference_mode():
            cache = model(input_ids=torch.tensor([a_ids]), use_cache=True).past_key_values
            n_a, q = len(a_ids), len(b_ids)
            model(
                input_ids=torch.tensor([b_ids]),
                past_key_values=cache,
                attention_mask=torch.ones(1, n_a + q, dtype=torch.long),
                position_ids=torch.arange(n_a, n_a + q)[None],
                use_cache=True,
            )
    finally:
        AttentionInterface._global_mapping.pop("public_calibration_test", None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop("public_calibration_test", None)
    return [importance[l] for l in sorted(importance)]
