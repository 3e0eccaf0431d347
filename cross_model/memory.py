"""What tensors an object keeps alive, counted by storage: the measure behind the memory tests and
the dry run's estimate. A view counts its whole storage (that is what it pins); storages shared by
several tensors count once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from cross_model.models import model_config, text_config


def tensor_storages(*objects: Any) -> dict[int, int]:
    """data pointer -> bytes of every distinct tensor storage reachable from `objects` through
    dataclass fields, lists, tuples, dicts and objects' attributes (cycles are visited once)."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            stack.extend(vars(obj).values())
    return found


def held_bytes(*objects: Any) -> int:
    """Bytes of every distinct tensor storage `objects` keep alive (models themselves excluded)."""
    return sum(tensor_storages(*objects).values())


# --- what a run will need, from the models' configs (the dry run) ------------------------------------

GIB = 2**30


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config (no weights)."""

    name: str
    parameters: int  # unique parameters (tied embeddings once)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    source: str = ""

    @property
    def layer_activations_per_token(self) -> int:
        """Elements every module of one decoder layer outputs per token, as if all were alive at once
        (a bound on the prefill's transient memory): seven of the width (the norms, attention's and the
        MLP's outputs, o_proj, down_proj, the layer's), queries, keys and values, and the MLP's gate, up
        and activation."""
        return (
            7 * self.hidden_size
            + (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
            + 3 * self.intermediate_size
        )

    def kv_bytes_per_token(self, element: int) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


def shape_of(spec: str) -> ModelShape:
    """The model's shape, its parameters counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    config, source = model_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return _shape(spec, model, source)


def shape_of_model(lm: Any) -> ModelShape:
    """The shape of a loaded model (`models.LoadedModel`), counted as `shape_of` counts it."""
    return _shape(lm.info.name, lm.model, "loaded")


def _shape(spec: str, model: Any, source: str) -> ModelShape:
    config = model.config
    # .parameters() yields a tied weight once
    parameters = sum(param.numel() for param in model.parameters())
    text = text_config(config)
    heads = text.num_attention_heads
    return ModelShape(
        spec,
        parameters,
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
        heads,
        getattr(text, "num_key_value_heads", None) or heads,
        getattr(text, "head_dim", None) or text.hidden_size // heads,
        text.vocab_size,
        source,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at the run's largest batch and context (every rank loads every model)."""

    weights: int
    kv: int  # the batch memo's prefills, the cache being decoded and B's assembled cache
    prefill: int  # one layer's activations during the longest prefill (SDPA: no T x T scores)
    hidden_rows: int  # each memo prefill's last-token row per layer
    decode: int  # a decoding step's logits
    batch: int
    tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.prefill + self.hidden_rows + self.decode

    def lines(self) -> list[str]:
        parts = ", ".join(
            f"{k} {size(getattr(self, k))}"
            for k in ("weights", "kv", "prefill", "hidden_rows", "decode")
        )
        return [
            f"{size(self.total)} per rank at batch {self.batch} x {self.tokens} tokens ({parts})"
        ]


def estimate(
    shapes: list[ModelShape],
    element: int,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    memo_entries: int,
) -> MemoryEstimate:
    """Upper bounds per rank: weights of every distinct model; KV for the memo's prefills plus the
    cache being decoded and B's assembled cache (A's tokens and B's), each at batch x (prompt + new)
    tokens of the widest cache; one layer's prefill activations (`layer_activations_per_token`); the
    memo's last-token rows; one step's fp32 logits."""
    tokens = prompt_tokens + new_tokens
    kv = max(s.kv_bytes_per_token(element) for s in shapes) * batch * tokens * (memo_entries + 2)
    prefill = max(batch * prompt_tokens * s.layer_activations_per_token * element for s in shapes)
    hidden = (
        max((s.num_layers + 1) * batch * s.hidden_size * element for s in shapes) * memo_entries
    )
    decode = max(batch * s.vocab_size * 4 for s in shapes)
    return MemoryEstimate(
        sum(s.parameters for s in shapes) * element, kv, prefill, hidden, decode, batch, tokens
    )


def device_memory(device: torch.device) -> int | None:
    """The rank's device memory in bytes (CUDA), or None where it is not a fixed budget (CPU, MPS)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None
