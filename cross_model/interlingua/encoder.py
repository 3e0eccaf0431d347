"""The interlingua encoder: UTF-8 bytes -> M latent vectors of width d_z.

A byte embedding plus learned positions, `layers` pre-norm transformer layers and a cross-attention
pooler (M learned queries) over the bytes. Padding is masked everywhere (the public code's encoder and
pooler attend to it, so a row's latent depended on the rest of its batch): a row's latent is a function
of its own bytes only, up to float rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

PAD = 256  # byte values are 0..255


@dataclass(frozen=True)
class EncoderShape:
    m: int = 16  # latent vectors
    d_z: int = 64  # their width
    layers: int = 2
    heads: int = 4
    max_bytes: int = 512  # longer contexts keep their first max_bytes bytes

    def to_dict(self) -> dict:
        return asdict(self)


def encode_bytes(
    texts: list[str], max_bytes: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded byte ids (B x L) and the mask of real bytes. An empty text is one PAD byte, counted
    as real (attention over nothing would be NaN)."""
    rows = [list(t.encode("utf-8"))[:max_bytes] for t in texts]
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : max(1, len(r))] = True
    return ids.to(device), mask.to(device)


class LatentPooler(nn.Module):
    """M learned queries attend over the encoded bytes (padding masked), then a feed-forward block."""

    def __init__(self, m: int, d: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(m, d))
        self.norm_kv = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm_out = nn.LayerNorm(d)

    def forward(self, h_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(h_BLD.shape[0], -1, -1)
        kv = self.norm_kv(h_BLD)
        pooled, _ = self.attn(q, kv, kv, key_padding_mask=~mask_BL, need_weights=False)
        # No residual from the queries: they are the same for every row, and with them the latents of
        # different contexts started out nearly identical (cosine 0.98) and stayed so in training.
        z = pooled
        z = z + self.ff(self.norm_ff(z))
        return self.norm_out(z)


class InterlinguaEncoder(nn.Module):
    def __init__(self, shape: EncoderShape, seed: int = 0):
        super().__init__()
        self.shape = shape
        d = shape.d_z
        if d % shape.heads:
            raise ValueError(f"interlingua: d_z ({d}) must be divisible by heads ({shape.heads})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same seed gives the same encoder, whatever ran before
            self.byte_embed = nn.Embedding(PAD + 1, d, padding_idx=PAD)
            self.positions = nn.Parameter(torch.randn(shape.max_bytes, d) * 0.02)
            layer = nn.TransformerEncoderLayer(
                d,
                shape.heads,
                4 * d,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
                activation="gelu",
            )
            # No nested-tensor fast path: it changes how padded rows are computed between train and eval.
            self.layers = nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)
            self.pooler = LatentPooler(shape.m, d, shape.heads)

    def forward(self, ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        """Z: B x M x d_z (float32)."""
        h = self.byte_embed(ids_BL) + self.positions[: ids_BL.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask_BL)
        return self.pooler(h, mask_BL)

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids, mask = encode_bytes(texts, self.shape.max_bytes, self.positions.device)
        return self(ids, mask)
