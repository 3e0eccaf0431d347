"""Character-level alignment of one text tokenised by two tokenisers.

Each receiver token reads the sender token(s) whose characters overlap its own; a zero-width token (a
BOS the tokenizer adds) reads the sender's zero-width token at the same place, else the sender token
starting there. The alignment is exact where a receiver token has exactly one sender token of the same
span; everything else is counted as a mismatch (`AlignmentStats`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from cross_model.models import LoadedModel

Span = tuple[int, int]


def token_spans(lm: LoadedModel, text: str) -> tuple[list[int], list[Span]]:
    """`text`'s token ids as `prompting.encode_texts` makes them (the same special-token policy), with
    each token's character span in `text`."""
    enc = lm.tokenizer(
        text, add_special_tokens=not lm.info.has_chat_template, return_offsets_mapping=True
    )
    return list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]


def align_spans(sender: list[Span], receiver: list[Span]) -> list[list[int]]:
    """For each receiver token, the sender tokens it reads (never empty when the sender has tokens).
    Spans are in text order, so each lookup is a bisection: linear in the tokens, not quadratic."""
    if not sender:
        raise ValueError("alignment: the sender's text has no tokens")
    wide = [(a, b, k) for k, (a, b) in enumerate(sender) if b > a]
    ends = [b for _, b, _ in wide]
    starts = [a for a, _, _ in wide]
    empty: dict[int, list[int]] = {}
    for k, (a, b) in enumerate(sender):
        if a == b:
            empty.setdefault(a, []).append(k)
    out = []
    for s, e in receiver:
        hit: list[int] = []
        if e > s:
            j = bisect.bisect_right(ends, s)
            while j < len(wide) and wide[j][0] < e:
                hit.append(wide[j][2])
                j += 1
        else:
            hit = list(empty.get(s, []))
        if (
            not hit
        ):  # a zero-width token, or characters no sender token covers (rare: stripped spaces)
            j = bisect.bisect_left(starts, s)
            hit = [wide[j][2] if j < len(wide) else len(sender) - 1]
        out.append(hit)
    return out


@dataclass
class AlignmentStats:
    receiver_tokens: int = 0
    exact: int = 0  # receiver tokens with exactly one sender token of the same span
    many: int = 0  # receiver tokens reading several sender tokens

    def add(self, sender: list[Span], receiver: list[Span], alignment: list[list[int]]) -> None:
        for span, hit in zip(receiver, alignment):
            self.receiver_tokens += 1
            self.exact += len(hit) == 1 and sender[hit[0]] == span
            self.many += len(hit) > 1

    def to_dict(self) -> dict[str, float]:
        n = max(self.receiver_tokens, 1)
        return {
            "receiver_tokens": self.receiver_tokens,
            "exact_fraction": round(self.exact / n, 4),
            "mismatch_fraction": round(1 - self.exact / n, 4),
            "many_fraction": round(self.many / n, 4),
        }


@dataclass(frozen=True)
class TokenPool:
    """Which sender tokens each receiver token averages, as flat index lists (no B x N_B x T_A matrix):
    pair j adds `weight[j]` x sender column `col[j]` of row `row[j]` to receiver token `dst[j]`
    (left-padded to `width`). Memory grows with the aligned pairs, not with N_B x T_A."""

    row: torch.Tensor
    dst: torch.Tensor
    col: torch.Tensor
    weight: torch.Tensor
    batch: int
    width: int

    def __call__(self, x_BHTD: torch.Tensor) -> torch.Tensor:
        """B x width x (H*D): each receiver token's mean over its sender tokens, heads flattened."""
        b, h, _, d = x_BHTD.shape
        picked = x_BHTD[self.row, :, self.col].reshape(-1, h * d) * self.weight[:, None].to(
            x_BHTD.dtype
        )
        out = x_BHTD.new_zeros((b * self.width, h * d))
        out.index_add_(0, self.row * self.width + self.dst, picked)
        return out.view(b, self.width, h * d)

    def dense(self, t_a: int) -> torch.Tensor:
        """The same weights as a B x width x T_A matrix (tests and small inputs only)."""
        m = torch.zeros((self.batch, self.width, t_a), dtype=torch.float32, device=self.row.device)
        m[self.row, self.dst, self.col] = self.weight
        return m


def token_pool(
    alignments: list[list[list[int]]], sender_mask_BT: torch.Tensor, width: int
) -> TokenPool:
    """Row i's receiver token n (left-padded to `width`) reads the mean of its sender tokens, found at
    the columns where `sender_mask_BT` is 1 (any padding or prefix layout). Built from index lists on
    the host and moved to the device in one copy per tensor."""
    row, dst, col, weight = [], [], [], []
    for i, rows in enumerate(alignments):
        cols = sender_mask_BT[i].nonzero().flatten().tolist()
        pad = width - len(rows)
        for n, hit in enumerate(rows):
            for k in hit:
                row.append(i)
                dst.append(pad + n)
                col.append(cols[k])
                weight.append(1.0 / len(hit))
    device = sender_mask_BT.device
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return TokenPool(
        as_long(row),
        as_long(dst),
        as_long(col),
        torch.tensor(weight, dtype=torch.float32, device=device),
        len(alignments),
        width,
    )
