"""Model surgery through the public transformers 5.x API, in one place:

1. `partial_forward`: run the decoder only up to layer k (a forward hook stops it), no LM head;
2. `residual_edit`: change the residual entering decoder block j at the last prompt token (prefill);

Per-layer caches of different lengths and origins (KVComm, C2C) live in `cross_model.kv_layout`.

Legend: B batch, T tokens, H heads, D hidden / head dim, L layers.
`hidden_states[k]` follows Hugging Face: index 0 is the embeddings, index k the output of block k-1.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from cross_model.generation import positions_from_mask
from cross_model.models import LoadedModel


def decoder(lm: LoadedModel) -> Any:
    return lm.model.get_decoder()


def decoder_layers(lm: LoadedModel) -> Any:
    return decoder(lm).layers


def input_embeddings(lm: LoadedModel) -> torch.Tensor:
    """E_VD times the model's embedding scale (Gemma multiplies by sqrt(d) inside its embedding); the
    scaled copy is made once per model, an unscaled table is the weight itself."""
    emb = lm.model.get_input_embeddings()
    scale = getattr(emb, "embed_scale", None)
    if scale is None:
        return emb.weight
    return lm.cached("scaled_input_embeddings", lambda: emb.weight * scale.to(emb.weight.dtype))


def embed_ids(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """The input embeddings of `ids` (N x D), scaled as the model scales them, without building a table."""
    emb = lm.model.get_input_embeddings()
    with torch.inference_mode():
        return emb(torch.tensor(ids, dtype=torch.long, device=emb.weight.device))


# --- 1. partial forward -----------------------------------------------------------------------


class _StopForward(Exception):
    pass


def check_layer(lm: LoadedModel, index: int, key: str, allow_last: bool = True) -> None:
    top = lm.info.num_layers if allow_last else lm.info.num_layers - 1
    if not 0 <= index <= top:
        raise ValueError(
            f"{key}={index} is outside {lm.info.name}'s depth: it has {lm.info.num_layers} layers, "
            f"so {key} must be in 0..{top}"
        )


@torch.inference_mode()
def partial_forward(
    lm: LoadedModel,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    stop_after: int,
    cache: Any = None,
    position_ids_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """`hidden_states[stop_after]` (B x T x D), computing no layer above it and no LM head.
    With `cache`, the keys/values of layers below `stop_after` are stored in it."""
    check_layer(lm, stop_after, "layer")
    if position_ids_BT is None:
        position_ids_BT = positions_from_mask(attention_mask_BT)
    captured: dict[str, torch.Tensor] = {}
    dec = decoder(lm)
    if stop_after == 0:
        target = dec.embed_tokens
    else:
        target = dec.layers[stop_after - 1]

    def hook(module: Any, args: Any, output: Any) -> None:
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    handle = target.register_forward_hook(hook)
    try:
        dec(
            input_ids=input_ids_BT,
            attention_mask=attention_mask_BT,
            position_ids=position_ids_BT,
            past_key_values=cache,
            use_cache=cache is not None,
        )
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"]


def last_token(h_BTD: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Each row's last real token (robust to left or right padding)."""
    idx = attention_mask_BT.long().sum(-1) - 1
    if attention_mask_BT[:, -1].all():  # left padding: the last column is real for every row
        return h_BTD[:, -1, :]
    return h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), idx]


# --- 2. residual edit at block j during prefill ----------------------------------------------


@contextlib.contextmanager
def residual_edit(
    lm: LoadedModel, j: int, edit: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[dict]:
    """While active, the residual entering block j (= `hidden_states[j]`) at the last position of
    each row (left padding: the last prompt token) is replaced by `edit(h_BD)`. Enter it around the
    prefill only, so decoding proceeds normally. Yields a record of the edit (before/after)."""
    check_layer(lm, j, "j", allow_last=False)
    record: dict[str, torch.Tensor] = {}

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> Any:
        if args:
            h, rest = args[0], args[1:]
        else:
            h, rest = kwargs["hidden_states"], None
        h = h.clone()
        record["before"] = h[:, -1, :].clone()
        h[:, -1, :] = edit(h[:, -1, :]).to(h.dtype)
        record["after"] = h[:, -1, :].clone()
        if rest is None:
            kwargs = dict(kwargs, hidden_states=h)
            return args, kwargs
        return (h, *rest), kwargs

    handle = decoder_layers(lm)[j].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()
