"""The cache-to-cache projector: per receiver layer, A's keys (and, separately, values) for each
context token, heads flattened, through a linear map and a small residual MLP into B's head layout,
weighted per token and head, and gated per layer.

    K_l = g_l * w(K_A) * proj(K_A)          (the same for V, with its own weights)

C2C adds this to the receiver's own cache of the context, K_B + g w proj(K_A, K_B). Here B has not
read the context (the premise of every method in this framework), so its own part is absent and the
projector reads A's alone. Consequences, by design: a closed gate leaves the layer without context
keys at all (B as in the baseline), and with A = B an identity map (`identity_init`) and every gate
open hands B exactly A's cache (KVComm with every layer sent). w = 2 sigmoid(.) so that its zero
initialisation is 1. The gate is a Gumbel-sigmoid during training, annealed towards hard, applied as
log(g) added to the attention logits of the context keys (g -> 0 is exactly "absent", g = 1 exactly
"present"), and hard (logit > 0) at evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cross_model.checkpointing import verify

PAIRINGS = ("last_aligned", "nearest")
WEIGHTS_FILE = "projector.safetensors"  # beside meta.json in a finished projector's directory


def model_record(lm: Any) -> dict[str, Any]:
    """What a projector is made for, of each model: name, depth, KV layout and vocabulary."""
    i = lm.info
    return {
        "name": i.name,
        "num_layers": i.num_layers,
        "num_kv_heads": i.num_kv_heads,
        "head_dim": i.head_dim,
        "vocab_size": i.vocab_size,
    }


def new_projector(params: Any, a: Any, b: Any) -> "CacheProjector":
    """A fresh projector for the pair (a c2c method's parameters), initialised from `params.seed`."""
    torch.manual_seed(params.seed)
    return CacheProjector(
        model_record(a), model_record(b), params.pairing, params.hidden, params.gate_init
    )


def read_meta(directory: str | Path) -> dict[str, Any]:
    """A finished projector's metadata, its files' checksums verified."""
    meta, why = verify(Path(directory))
    if meta is None:
        raise ValueError(f"c2c: {directory} is not a finished projector: {why}")
    return meta


def pair_layers(l_a: int, l_b: int, rule: str) -> list[int]:
    """For each receiver layer, the sender layer it reads. `last_aligned` (C2C's): the last layers meet and earlier ones follow one for one; a deeper
    receiver's first layers all read sender layer 0, and a deeper sender's first layers are not read;
    `nearest`: each receiver layer reads the sender layer at the same depth."""
    if rule == "last_aligned":
        return [max(0, l - (l_b - l_a)) for l in range(l_b)]
    if rule == "nearest":
        return [min(l_a - 1, max(0, round((lb + 0.5) * l_a / l_b - 0.5))) for lb in range(l_b)]
    raise ValueError(f"c2c pairing: {rule!r} is not one of {', '.join(PAIRINGS)}")


class TensorMap(nn.Module):
    """One of a layer's two maps (keys or values): (B x N x H_A*D_A) -> (B x H_B x N x D_B)."""

    def __init__(self, d_in: int, heads: int, head_dim: int, hidden: int):
        super().__init__()
        d_out = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.linear = nn.Linear(d_in, d_out)
        self.mlp = nn.Sequential(nn.Linear(d_out, hidden), nn.GELU(), nn.Linear(hidden, d_out))
        self.weight = nn.Linear(d_out, heads)  # w per token and head, 2 sigmoid(.)
        for layer in (self.mlp[2], self.weight):  # the residual MLP and w start as 0 and 1
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def identity_init(self) -> None:
        if self.linear.in_features != self.linear.out_features:
            raise ValueError(
                f"c2c: an identity projector needs equal widths, got {self.linear.in_features} -> "
                f"{self.linear.out_features}"
            )
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(self.linear.in_features))
            self.linear.bias.zero_()

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        y = self.linear(x_BND)
        y = y + self.mlp(y)
        w = 2 * torch.sigmoid(self.weight(y))  # B x N x H
        b, n, _ = y.shape
        out = y.view(b, n, self.heads, self.head_dim) * w[..., None]
        return out.transpose(1, 2)


class CacheProjector(nn.Module):
    """Every receiver layer's key and value maps and its gate logit (layers without a partner have none)."""

    def __init__(self, sender: dict, receiver: dict, pairing: str, hidden: int, gate_init: float):
        super().__init__()
        self.sender, self.receiver, self.pairing = sender, receiver, pairing
        self.partners = pair_layers(sender["num_layers"], receiver["num_layers"], pairing)
        d_in = sender["num_kv_heads"] * sender["head_dim"]
        h, d = receiver["num_kv_heads"], receiver["head_dim"]
        self.keys = nn.ModuleDict(
            {str(l): TensorMap(d_in, h, d, hidden) for l in range(len(self.partners))}
        )
        self.values = nn.ModuleDict(
            {str(l): TensorMap(d_in, h, d, hidden) for l in range(len(self.partners))}
        )
        self.gate_logits = nn.Parameter(torch.full((receiver["num_layers"],), float(gate_init)))

    @property
    def layers(self) -> list[int]:
        """Receiver layers that read a sender layer: every one (both pairings give each a partner)."""
        return list(range(len(self.partners)))

    def identity_init(self) -> None:
        for m in [*self.keys.values(), *self.values.values()]:
            m.identity_init()

    def open_layers(self) -> list[int]:
        """The receiver layers whose hard gate is open (what evaluation sends)."""
        return [l for l in self.layers if float(self.gate_logits[l].detach()) > 0]

    def soft_gates(self, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gumbel-sigmoid gates (one per receiver layer) at temperature `tau`: logistic noise added to the
        logits, then sigmoid(./tau)."""
        u = (
            torch.rand(self.gate_logits.shape, generator=generator)
            .clamp(1e-6, 1 - 1e-6)
            .to(self.gate_logits.device)
        )
        noise = torch.log(u) - torch.log1p(-u)
        return torch.sigmoid((self.gate_logits + noise) / tau)

    def project(
        self, layer: int, aligned_k: torch.Tensor, aligned_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Receiver layer `layer`'s context keys and values from A's aligned ones (B x N x H_A*D_A)."""
        return self.keys[str(layer)](aligned_k), self.values[str(layer)](aligned_v)


def tau_at(step: int, steps: int, start: float, end: float) -> float:
    """The Gumbel temperature, annealed geometrically from `start` to `end` over training."""
    if steps <= 1:
        return end
    return start * math.exp(math.log(end / start) * min(step, steps - 1) / (steps - 1))
