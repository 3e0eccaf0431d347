"""Training C2C's fuser: the train stage's job for each `c2c` method with `projector: train`.

Both models frozen; only the fuser trains (DDP over ranks, one process plain), by the fitting routine
the translator uses (`c2c.train_projector.fit_projector`: rows, targets, checkpoints, resume, the
held-out losses with the hard gates and with every gate closed). Each row is read by both models as
evaluation reads it (`input`: B's prompt, or context and question); B's held-back last prompt token
and the target follow the fused cache, and the loss is B's cross-entropy on the target. The gates are
C2C's: a Gumbel sample per row, head and token on each layer's key and value logit, at a temperature
annealed from `tau_start` to `tau_end` over `anneal_steps`, and dropout in the fuser's blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cross_model.c2c.fuser import CacheFuser, new_fuser
from cross_model.c2c.fusion import fused_cache, gate_noise, shared_input
from cross_model.c2c.train_projector import LearnedCache, Mode, target_losses, trainable
from cross_model.data.base import Example
from cross_model.methods.c2c import shared_prompts
from cross_model.methods.learned_cache import FUSER_KEYS
from cross_model.models import LoadedModel


class FuserLoss(nn.Module):
    """The fuser and the loss of a batch of rows (the frozen models outside the module tree)."""

    what = "c2c"
    donors: dict[str, Example] = {}  # train_control shuffled_a: the row A reads instead of each row

    def __init__(self, fuser: CacheFuser, a: LoadedModel, b: LoadedModel, params: Any):
        super().__init__()
        self.projector = fuser  # the name fit_projector saves
        self._models = (a, b)
        self.params = params

    def open_layers(self) -> list[int]:
        return self.projector.open_layers()

    def forward(self, rows: list[Example], targets: list[list[int]], mode: Mode) -> torch.Tensor:
        a, b = self._models
        p, fuser = self.params, self.projector
        every = list(range(len(fuser.partners)))
        wrapped, donors = shared_prompts(a, b, rows, p.input, self.donors or None, self.what)
        inp = shared_input(a, b, wrapped, donors)
        noise, layers = None, []
        if mode.kind != "closed" and p.gates == "open":
            layers = every
        elif mode.kind == "soft" and p.gates == "learned":
            noise = gate_noise(
                fuser,
                inp,
                p.seed,
                mode.step,
                mode.row_ids,
                fuser.fusers[0].temperature_at(mode.step),
            )
            layers = every
        elif mode.kind == "hard" and p.gates == "learned":
            layers = fuser.open_layers()
        cache = fused_cache(
            fuser,
            a,
            b,
            inp,
            layers,
            noise,
            grad=True,
            force_open=p.gates == "open" and bool(layers),
        )
        rest = [[int(x)] + t for x, t in zip(inp.last_B1[:, 0].tolist(), targets)]
        width = max(len(r) for r in rest)
        ids = torch.full((len(rest), width), b.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rest), width), dtype=torch.long)
        for i, r in enumerate(
            rest
        ):  # right-padded after the prefix: causal reading never sees the padding
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(b.device), mask.to(b.device)
        start = inp.prefix.attention_mask.sum(-1, keepdim=True)
        out = b.model(
            input_ids=ids,
            attention_mask=torch.cat([inp.prefix.attention_mask, mask], dim=-1),
            position_ids=start + torch.arange(width, device=b.device)[None],
            past_key_values=cache,
            use_cache=True,
        )
        losses = target_losses(out.logits, targets, [len(r) for r in rest])
        return losses + 0.0 * fuser.gate_logits().sum()  # every parameter in the graph, for DDP


FUSER = LearnedCache("c2c", FUSER_KEYS, new_fuser, FuserLoss)
TRAINABLE = trainable("c2c", FUSER, "c2c fuser")
