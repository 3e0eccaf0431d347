"""The learned projection W (d_B x d_A, no bias, Xavier init, fp32) and its checked loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cross_model.checkpointing import META, check_identity, verify


class LearnedProjection(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool = False, seed: int | None = None):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            # Xavier-uniform with our own generator so that the init is reproducible per seed.
            bound = (6.0 / (d_in + d_out)) ** 0.5
            self.linear.weight.copy_(torch.rand(d_out, d_in, generator=gen) * 2 * bound - bound)
            if bias:
                self.linear.bias.zero_()

    @property
    def d_in(self) -> int:
        return self.linear.in_features

    @property
    def d_out(self) -> int:
        return self.linear.out_features

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.linear(a.float())


IDENTITY_KEYS = (
    "sender",
    "receiver",
    "sender_revision",
    "receiver_revision",
    "k",
    "j",
    "d_in",
    "d_out",
)


def save_projection(proj: LearnedProjection, directory: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in proj.state_dict().items()},
        str(directory / "projection.safetensors"),
    )
    (directory / "projection.json").write_text(json.dumps(meta, indent=2))


def load_projection(
    directory: str | Path, expected: dict[str, Any]
) -> tuple[LearnedProjection, dict[str, Any]]:
    """Load W and refuse it when it was fitted for another pair, other layers or other widths, or when
    its files do not match their checksums (when it was written by the trainer)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, weights_path = directory / "projection.json", directory / "projection.safetensors"
    if not meta_path.exists() or not weights_path.exists():
        raise FileNotFoundError(
            f"no projection in {directory} (expected projection.json and projection.safetensors)"
        )
    if (directory / META).exists():
        ok, why = verify(directory)
        if ok is None:
            raise ValueError(f"projection {directory} is damaged: {why}; delete it and train again")
    meta = json.loads(meta_path.read_text())
    check_identity(meta, expected, f"projection {directory}", IDENTITY_KEYS)
    state = load_file(str(weights_path))
    proj = LearnedProjection(meta["d_in"], meta["d_out"], bias="linear.bias" in state)
    proj.load_state_dict(state)
    return proj.eval().requires_grad_(False), meta
