"""What each frozen receiver reads: adapters, RMS calibration, the one prompt composer, and everything
computed from one forward over it (training losses, gold NLL, first-token accuracy, rescoring) or
decoded from it (answers).

One row is `[BOS?][prefix][question + anchor][answer + EOS]`, left-padded, positions counted over real
tokens. The prefix is the soft tokens (latent variants), or the embedded context ids (the text path and
the token budget; the oracle encoder of the tests). The anchor is "Answer:" with no trailing space: on
both packaged receivers "Answer: " tokenises to a lone space, and "Answer:" + " Paris" is the
concatenation of the two tokenisations. Embeddings are the output of `get_input_embeddings()` (Gemma
scales inside that module), so ids and their embeddings give identical logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cross_model.data.base import Example
from cross_model.generation import ChooseFn, GenerationResult, greedy_generate, positions_from_mask
from cross_model.models import LoadedModel

ANCHOR = "Answer:"
RMS_EPS = 1e-8
IGNORE = -100


# --- per receiver, computed once ------------------------------------------------------------------


def adds_bos(lm: LoadedModel) -> bool:
    """The BOS policy: a receiver whose tokenizer starts every text with BOS gets it first."""

    def compute() -> bool:
        bos = lm.tokenizer.bos_token_id
        ids = lm.tokenizer("a")["input_ids"]
        return bos is not None and len(ids) > 0 and ids[0] == bos

    return lm.cached("interlingua_adds_bos", compute)


BOS_POLICIES = ("auto", "always", "never", "after_prefix")
AFTER_PREFIX = "after"  # `compose`'s bos: the BOS between the prefix and the question


def use_bos(lm: LoadedModel, policy: str = "auto") -> bool | str:
    """auto: BOS first when the tokenizer starts texts with it (Gemma); always: also where it does
    not (SmolLM2's `<|im_start|>`, which begins every chat), so that no soft token sits at position 0,
    where models park attention; never: no BOS; after_prefix: the LatentWire design's
    `append_bos_after_prefix`, a BOS after the prefix, before the question (and none first)."""
    if policy == "auto":
        return adds_bos(lm)
    if policy in ("always", "after_prefix"):
        if lm.tokenizer.bos_token_id is None:
            raise ValueError(
                f"interlingua.bos: {policy}, but {lm.info.name} has no BOS token; use auto or never"
            )
        return True if policy == "always" else AFTER_PREFIX
    if policy == "never":
        return False
    raise ValueError(f"interlingua.bos: {policy!r} is not one of {', '.join(BOS_POLICIES)}")


def embedding_rms(lm: LoadedModel) -> float:
    """RMS of `get_input_embeddings()` over the whole vocabulary (what soft tokens are scaled to)."""

    def compute() -> float:
        emb = lm.model.get_input_embeddings()
        n = (
            emb.num_embeddings
            if hasattr(emb, "num_embeddings")
            else lm.model.config.get_text_config().vocab_size
        )
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, n, 8192):
                ids = torch.arange(start, min(n, start + 8192), device=lm.device)
                x = emb(ids).double()
                total += float((x * x).sum())
                count += x.numel()
        return (total / count) ** 0.5

    return lm.cached("interlingua_embedding_rms", compute)


def embed_ids(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """n x D embeddings of these ids, exactly as the model embeds them."""
    t = torch.tensor(ids, dtype=torch.long, device=lm.device)
    return lm.model.get_input_embeddings()(t)


def eos_id(lm: LoadedModel) -> int:
    eos = lm.tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"interlingua: receiver {lm.info.name} has no EOS token to end answers with"
        )
    return int(eos)


# --- adapters ------------------------------------------------------------------------------------


def calibrate_rms(x_BMD: torch.Tensor, target: float) -> torch.Tensor:
    """Per example, scale the soft tokens so that their RMS (over all M x D numbers) is `target`."""
    rms = x_BMD.float().pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    return x_BMD * (target / (rms + RMS_EPS)).to(x_BMD.dtype)


class Adapter(nn.Module):
    """d_z -> the receiver's embedding width, then per-example RMS calibration to its embeddings."""

    def __init__(self, d_z: int, d_model: int, target_rms: float, calibrate: bool = True):
        super().__init__()
        self.linear = nn.Linear(d_z, d_model)
        self.target_rms = float(target_rms)
        self.calibrate = calibrate

    def forward(self, z_BMZ: torch.Tensor) -> torch.Tensor:
        x = self.linear(z_BMZ.float())
        return calibrate_rms(x, self.target_rms) if self.calibrate else x


# --- the one composer ----------------------------------------------------------------------------


def question_text(example: Example) -> str:
    return f"\n{example.prompt_B}\n{ANCHOR}"


def answer_text(example: Example) -> str:
    return " " + example.answers[0]


@dataclass
class Composed:
    embeds_BTD: torch.Tensor
    mask_BT: torch.Tensor
    positions_BT: torch.Tensor
    answer_ids: list[list[int]] | None  # per row, EOS included (None: a prompt to decode from)
    prompt_lengths: list[int]  # real positions before the answer

    @property
    def keep(self) -> int:
        """Last positions whose logits predict every row's answer (rows end together: left padding)."""
        return max(len(a) for a in self.answer_ids) + 1 if self.answer_ids else 1


def compose(
    lm: LoadedModel,
    prefixes: list[torch.Tensor],
    questions: list[str],
    answers: list[str] | None = None,
    bos: bool | str | None = None,
) -> Composed:
    """`[BOS?][prefix][question][answer + EOS]` per row, left-padded. `prefixes`: n_i x D each (soft
    tokens or embedded ids; gradients flow through them). `bos`: None follows the tokenizer; True first;
    `AFTER_PREFIX` between the prefix and the question."""
    tok = lm.tokenizer
    after = bos == AFTER_PREFIX
    first = [tok.bos_token_id] if not after and (adds_bos(lm) if bos is None else bos) else []
    rows, answer_ids = [], [] if answers is not None else None
    for i, (prefix, q) in enumerate(zip(prefixes, questions)):
        q_ids = tok(q, add_special_tokens=False)["input_ids"]
        parts = [embed_ids(lm, first)] if first else []
        parts += [prefix.to(lm.dtype)]
        parts += [embed_ids(lm, [tok.bos_token_id])] if after else []
        parts += [embed_ids(lm, q_ids)]
        if answers is not None:
            a_ids = tok(answers[i], add_special_tokens=False)["input_ids"] + [eos_id(lm)]
            answer_ids.append(a_ids)
            parts.append(embed_ids(lm, a_ids))
        rows.append(torch.cat(parts, dim=0))
    width = max(r.shape[0] for r in rows)
    d = rows[0].shape[1]
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=lm.device)
    padded = []
    for i, r in enumerate(rows):
        padded.append(
            torch.cat([r.new_zeros(width - r.shape[0], d), r]) if r.shape[0] < width else r
        )
        mask[i, width - r.shape[0] :] = 1
    embeds = torch.stack(padded)
    lengths = [r.shape[0] - (len(answer_ids[i]) if answer_ids else 0) for i, r in enumerate(rows)]
    return Composed(embeds, mask, positions_from_mask(mask), answer_ids, lengths)


def text_prefixes(
    lm: LoadedModel, contexts: list[str], max_tokens: int | None = None
) -> tuple[list[torch.Tensor], list[int]]:
    """The contexts' embedded ids (the first `max_tokens` of each: the token budget) and their counts."""
    out, counts = [], []
    for c in contexts:
        ids = lm.tokenizer(c, add_special_tokens=False)["input_ids"]
        ids = ids[:max_tokens] if max_tokens is not None else ids
        out.append(embed_ids(lm, ids))
        counts.append(len(ids))
    return out, counts


# --- one forward: logits at the answer positions -------------------------------------------------------


@dataclass
class AnswerLogits:
    logits_BAV: torch.Tensor  # row i's first a_i positions predict its answer tokens (EOS last)
    labels_BA: torch.Tensor  # IGNORE beyond a row's answer
    valid_BA: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid_BA.sum(-1)


def answer_logits(lm: LoadedModel, c: Composed) -> AnswerLogits:
    """One teacher-forced forward; only the positions that predict answer tokens reach the LM head."""
    if c.answer_ids is None:
        raise ValueError("answer_logits: the composed rows have no answers")
    keep = c.keep
    out = lm.model(
        inputs_embeds=c.embeds_BTD,
        attention_mask=c.mask_BT,
        position_ids=c.positions_BT,
        use_cache=False,
        logits_to_keep=keep,
    )
    logits = (
        out.logits
    )  # B x keep x V; column keep - 1 is each row's last position (EOS, predicts nothing)
    a_max = keep - 1
    lens = torch.tensor([len(a) for a in c.answer_ids], device=logits.device)
    t = torch.arange(a_max, device=logits.device)
    cols = (keep - 1 - lens[:, None] + t[None, :]).clamp(max=keep - 2)
    picked = logits.gather(1, cols[:, :, None].expand(-1, -1, logits.shape[-1]))
    valid = t[None, :] < lens[:, None]
    labels = torch.full((len(c.answer_ids), a_max), IGNORE, dtype=torch.long, device=logits.device)
    for i, a in enumerate(c.answer_ids):
        labels[i, : len(a)] = torch.tensor(a, device=logits.device)
    return AnswerLogits(picked, labels, valid)


def token_nll(a: AnswerLogits) -> torch.Tensor:
    """-log p(gold token) per answer position (0 beyond a row's answer), float32."""
    logp = torch.log_softmax(a.logits_BAV.float(), dim=-1)
    gold = a.labels_BA.clamp(min=0)
    return -logp.gather(-1, gold[:, :, None])[:, :, 0] * a.valid_BA


def answer_weights(
    valid_BA: torch.Tensor, first_weight: float, k_weight: float, k: int
) -> torch.Tensor:
    """1 per answer token, + first_weight on the first, + k_weight on each of the first k."""
    t = torch.arange(valid_BA.shape[1], device=valid_BA.device)[None, :]
    w = 1.0 + first_weight * (t == 0).float() + k_weight * (t < k).float()
    return w * valid_BA


def weighted_ce(
    a: AnswerLogits, first_weight: float = 0.0, k_weight: float = 0.0, k: int = 4
) -> torch.Tensor:
    """Per-row weighted cross-entropy on the answer (EOS included); a row's value never depends on others."""
    w = answer_weights(a.valid_BA, first_weight, k_weight, k)
    return (token_nll(a) * w).sum(-1) / w.sum(-1)


def distillation(
    student: AnswerLogits, teacher_logits_BAV: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per row: tau^2 x mean over answer positions of KL(teacher/tau || student/tau)."""
    t = torch.log_softmax(teacher_logits_BAV.float() / tau, dim=-1)
    s = torch.log_softmax(student.logits_BAV.float() / tau, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) * student.valid_BA
    return tau * tau * kl.sum(-1) / student.lengths


def gold_nll(a: AnswerLogits) -> torch.Tensor:
    """Mean -log p per gold answer token (EOS included), per row."""
    return token_nll(a).sum(-1) / a.lengths


def first_token_correct(a: AnswerLogits) -> torch.Tensor:
    return (a.logits_BAV[:, 0].argmax(-1) == a.labels_BA[:, 0]).float()


# --- decoding -----------------------------------------------------------------------------------------


def decode_answers(
    lm: LoadedModel,
    prefixes: list[torch.Tensor],
    questions: list[str],
    limits: list[int],
    bos: bool | str | None = None,
    choose: ChooseFn | None = None,
) -> tuple[GenerationResult, list[int]]:
    """Greedy answers (or `choose`'s) after `[BOS?][prefix][question]`; also each row's prompt length."""
    c = compose(lm, [p.detach() for p in prefixes], questions, bos=bos)
    gen = greedy_generate(
        lm,
        None,
        c.mask_BT,
        max(limits),
        inputs_embeds_BTD=c.embeds_BTD,
        max_new_tokens_B=limits,
        choose=choose,
    )
    return gen, c.prompt_lengths


@torch.inference_mode()
def answer_scores(
    lm: LoadedModel,
    prefixes: list[torch.Tensor],
    questions: list[str],
    answers: list[str],
    bos: bool | str | None = None,
) -> torch.Tensor:
    """Length-normalised log-probability of each row's answer (EOS included): joint rescoring's score."""
    a = answer_logits(lm, compose(lm, prefixes, questions, answers, bos))
    return -gold_nll(a)
