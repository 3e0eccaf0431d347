"""The public KVComm receiver (Zephyroam/KVComm's models.py and models_ms.py), rebuilt from Hugging Face
pieces for the tests, sharing no code with `cross_model`: batch 1, tiny Llama as A1, A2 and B."""

from __future__ import annotations

import torch

from cross_model.models import load_model


def public_receiver_logits(senders_ids: list[list[int]], b_ids: list[int], selected: set[int]) -> torch.Tensor:
    """B's logits over its prompt as the public receiver computes them: every sender prefills its own
    context from position 0; per layer the cache holds each sender's keys/values in turn for the sent
    layers and only the first sender's first token elsewhere; B's positions start at the length of
    layer 0's cache (every sender's tokens); and transformers' mask for that length is cut to each
    layer's length inside attention (what transformers 4.53's SDPA did, which the public code pins)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def cut_mask_sdpa(module, query, key, value, attention_mask, **kw):
        if attention_mask is not None and attention_mask.ndim == 4:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("public_kvcomm_test", cut_mask_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(
        "public_kvcomm_test", lambda *a, **kw: sdpa_mask(*a, **{**kw, "allow_is_causal_skip": False}))
    try:
        return _public_forward(senders_ids, b_ids, selected)
    finally:  # global registries: a later test must not find this attention registered
        AttentionInterface._global_mapping.pop("public_kvcomm_test", None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop("public_kvcomm_test", None)


def _public_forward(senders_ids: list[list[int]], b_ids: list[int], selected: set[int]) -> torch.Tensor:
    from transformers import DynamicCache

    model = load_model("tiny-llama-64").model  # a fresh instance: the shared one keeps its attention
    model.set_attn_implementation("public_kvcomm_test")
    with torch.inference_mode():
        caches = [model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values for ids in senders_ids]
        cache = DynamicCache()
        for l in range(len(caches[0].layers)):
            for j, c in enumerate(caches):
                k, v = c.layers[l].keys, c.layers[l].values
                if l not in selected:
                    if j:
                        continue
                    k, v = k[:, :, :1], v[:, :, :1]
                cache.update(k, v, l)
        n_a, q = cache.layers[0].keys.shape[2], len(b_ids)
        out = model(input_ids=torch.tensor([b_ids]), past_key_values=cache, attention_mask=torch.ones(1, n_a + q, dtype=torch.long),
                    position_ids=torch.arange(n_a, n_a + q)[None], use_cache=True)
    return out.logits[0]
