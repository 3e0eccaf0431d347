"""LatentWire's decoding as its design describes it, beside our greedy default: the first answer token
sampled (temperature 0.7, nucleus top-p 0.95) and EOS banned for the first `eos_ban_steps` steps.

Sampling is reproducible and independent of batching: each row draws from a generator seeded by the
method's seed and the row's example id, so an item gets the same answer alone, in any batch, on any
rank.
"""

from __future__ import annotations

import hashlib

import torch

from cross_model.generation import ChooseFn


def row_generator(seed: int, example_id: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def nucleus_sample(
    logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One token from the smallest set of most likely tokens whose probability reaches `top_p`, at
    `temperature`."""
    probs = torch.softmax(logits_V.float().cpu() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # the mass of the tokens ranked above each one
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    pick = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(order[pick])


def design_chooser(
    eos_ids: set[int],
    eos_ban_steps: int,
    sample_first: bool,
    temperature: float,
    top_p: float,
    seed: int,
    example_ids: list[str],
) -> ChooseFn:
    """`greedy_generate`'s per-step rule for one batch: EOS masked for steps < `eos_ban_steps`; the first
    step sampled (`sample_first`), every later one greedy. Rows are the batch's, in `example_ids` order."""
    generators = [row_generator(seed, i) for i in example_ids] if sample_first else []
    banned = sorted(eos_ids)

    def choose(step: int, logits_BV: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if step < eos_ban_steps and banned:
            logits_BV = logits_BV.clone()
            logits_BV[:, banned] = float("-inf")
        if step == 0 and sample_first:
            picks = [
                nucleus_sample(logits_BV[i], temperature, top_p, generators[r])
                for i, r in enumerate(rows)
            ]
            return torch.tensor(picks, dtype=torch.long, device=logits_BV.device)
        return logits_BV.argmax(dim=-1)

    return choose
