"""LatentWire: the composer, losses, wire format and encoder checked against reference computations
on tiny random receivers (a few marked tests use the two packaged models)."""

from __future__ import annotations

import pytest
import torch

from cross_model.data import load_task_examples
from cross_model.generation import greedy_generate
from cross_model.interlingua import wire
from cross_model.interlingua.encoder import EncoderShape, InterlinguaEncoder, encode_bytes
from cross_model.interlingua.model import LatentWire, load_latentwire, receiver_record
from cross_model.interlingua.receiver_io import (
    Adapter,
    adds_bos,
    answer_logits,
    answer_text,
    compose,
    decode_answers,
    distillation,
    embedding_rms,
    eos_id,
    gold_nll,
    question_text,
    text_prefixes,
    token_nll,
    weighted_ce,
)
from cross_model.kv_wire import PayloadError
from cross_model.models import load_model
from cross_model.prompting import pad_left
from tests.tolerance import assert_reordered_close, forward_budget

SHAPE = EncoderShape(m=4, d_z=32, layers=1, heads=4, max_bytes=128)


@pytest.fixture(scope="module")
def gemma_tiny():
    return load_model("tiny-gemma3-64")


@pytest.fixture(scope="module")
def rows():
    test, _ = load_task_examples("fact_lookup", 6, 0, 0)
    return test


def _net(receivers, seed=0):
    return LatentWire(SHAPE, [receiver_record(lm) for lm in receivers], seed=seed).attach(receivers)


def _replay_check(lm):
    ids = lm.tokenizer("The color of the box is red. What is the color?", add_special_tokens=True)[
        "input_ids"
    ]
    t = torch.tensor([ids])
    with torch.no_grad():
        a = lm.model(input_ids=t).logits
        b = lm.model(inputs_embeds=lm.model.get_input_embeddings()(t)).logits
    assert torch.equal(a, b)


def test_logits_from_ids_equal_logits_from_their_embeddings(tiny_llama, gemma_tiny):
    for lm in (tiny_llama, gemma_tiny):
        _replay_check(lm)


@pytest.mark.slow
def test_embedding_replay_and_bos_policy_on_the_packaged_receivers(smollm2):
    gemma = load_model("gemma3-270m")
    for lm in (smollm2, gemma):
        _replay_check(lm)
    assert not adds_bos(smollm2) and adds_bos(gemma)
    # The target RMS is that of what get_input_embeddings() returns: Gemma scales by sqrt(640) inside it.
    assert embedding_rms(gemma) > 10 * float(
        gemma.model.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    )
    ex = load_task_examples("secret_word", 1, 0, 0)[0][0]
    for lm in (smollm2, gemma):
        c = compose(lm, text_prefixes(lm, [ex.prompt_A])[0], [question_text(ex)], [answer_text(ex)])
        first = lm.tokenizer(answer_text(ex), add_special_tokens=False)["input_ids"][0]
        assert c.answer_ids[0][0] == first and c.answer_ids[0][-1] == eos_id(lm)
        assert first not in (lm.tokenizer.bos_token_id, lm.tokenizer.pad_token_id, eos_id(lm))


def test_oracle_encoder_gives_the_text_paths_answers(tiny_llama, gemma_tiny, rows):
    """Soft tokens = the receiver's own embeddings of the context (identity adapter, no calibration)
    decode exactly what the same prompt given as token ids decodes."""
    for lm in (tiny_llama, gemma_tiny):
        contexts, questions = [e.prompt_A for e in rows], [question_text(e) for e in rows]
        with torch.inference_mode():
            prefixes, _ = text_prefixes(lm, contexts)
        soft, _ = decode_answers(lm, prefixes, questions, [6] * len(rows))
        bos = [lm.tokenizer.bos_token_id] if adds_bos(lm) else []
        ids = [
            bos
            + lm.tokenizer(c, add_special_tokens=False)["input_ids"]
            + lm.tokenizer(q, add_special_tokens=False)["input_ids"]
            for c, q in zip(contexts, questions)
        ]
        batch = pad_left(ids, lm.tokenizer.pad_token_id, lm.device)
        ref = greedy_generate(lm, batch.input_ids, batch.attention_mask, 6)
        assert soft.token_ids == ref.token_ids


@pytest.mark.float_sensitive
def test_one_forward_equals_the_step_by_step_losses(tiny_llama, rows):
    lm = tiny_llama
    net = _net([lm])
    with torch.no_grad():
        z = net.latent([e.prompt_A for e in rows])
        soft = net.soft_tokens(z, 0)
        qs, ans = [question_text(e) for e in rows], [answer_text(e) for e in rows]
        one = token_nll(answer_logits(lm, compose(lm, list(soft), qs, ans)))
        for i in range(len(rows)):
            # Reference: the prompt alone, then the answer fed one token at a time through a cache.
            c = compose(lm, [soft[i]], [qs[i]])
            out = lm.model(inputs_embeds=c.embeds_BTD, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
            a_ids = lm.tokenizer(ans[i], add_special_tokens=False)["input_ids"] + [eos_id(lm)]
            step_nll = []
            for t, tok in enumerate(a_ids):
                step_nll.append(-torch.log_softmax(logits.float(), -1)[0, tok])
                out = lm.model(
                    input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True
                )
                cache, logits = out.past_key_values, out.logits[:, -1]
            budget = forward_budget(lm, c.embeds_BTD.shape[1] + len(a_ids))
            budget["terms"] = max(
                budget["terms"], lm.info.vocab_size
            )  # the NLL's softmax sums the vocabulary
            assert_reordered_close(one[i, : len(a_ids)], torch.stack(step_nll), **budget)
            assert torch.all(one[i, len(a_ids) :] == 0)


def test_labels_start_at_the_first_content_token_and_end_with_eos(tiny_llama, gemma_tiny, rows):
    for lm in (tiny_llama, gemma_tiny):
        c = compose(
            lm,
            text_prefixes(lm, [e.prompt_A for e in rows])[0],
            [question_text(e) for e in rows],
            [answer_text(e) for e in rows],
        )
        a = answer_logits(lm, c)
        for i, e in enumerate(rows):
            want = lm.tokenizer(" " + e.answers[0], add_special_tokens=False)["input_ids"] + [
                eos_id(lm)
            ]
            n = int(a.lengths[i])
            assert a.labels_BA[i, :n].tolist() == want
            assert a.labels_BA[i, 0] not in (lm.tokenizer.bos_token_id, lm.tokenizer.pad_token_id)
        # Labels come from lengths, never from `== pad_id`: with pad = EOS (SmolLM2) nothing changes.
        assert int(a.valid_BA.sum()) == sum(len(x) for x in c.answer_ids)


@pytest.mark.float_sensitive
def test_a_rows_latent_and_loss_do_not_depend_on_padding_or_the_rest_of_the_batch(tiny_llama, rows):
    net = _net([tiny_llama])
    long = rows[0].prompt_A + " And also " * 8
    with torch.no_grad():
        alone = net.latent([rows[1].prompt_A])
        batched = net.latent([long, rows[1].prompt_A, ""])
        # the encoder's SHAPE.layers blocks over at most max_bytes positions, then the pooler
        encoder = {"terms": max(SHAPE.max_bytes, 4 * SHAPE.d_z), "depth": SHAPE.layers + 2}
        assert_reordered_close(batched[1:2], alone, **encoder)
        ids, mask = encode_bytes([rows[1].prompt_A, long], 128)
        assert int(mask[0].sum()) == len(rows[1].prompt_A.encode())
        qs = [question_text(e) for e in rows[:2]]
        ans = [answer_text(e) for e in rows[:2]]
        together = net.row_losses(net.latent([rows[0].prompt_A, rows[1].prompt_A]), 0, qs, ans)[
            "loss"
        ]
        single = net.row_losses(alone, 0, qs[1:], ans[1:])["loss"]
        # and through the receiver's forward and its softmax over the vocabulary
        receiver = forward_budget(tiny_llama, 128)  # the tiny tokenizer's bytes: at most 128 here
        loss = {
            "terms": max(encoder["terms"], receiver["terms"], tiny_llama.info.vocab_size),
            "depth": encoder["depth"] + receiver["depth"],
        }
        assert_reordered_close(together[1:], single, **loss)


@pytest.mark.float_sensitive
def test_calibrated_soft_tokens_have_the_receivers_embedding_rms(tiny_llama, gemma_tiny):
    for lm in (tiny_llama, gemma_tiny):
        target = embedding_rms(lm)
        emb = lm.model.get_input_embeddings()(torch.arange(lm.model.config.vocab_size))
        assert abs(target - float(emb.double().pow(2).mean().sqrt())) < 1e-6
        x = Adapter(32, lm.info.hidden_size, target)(
            torch.randn(3, 4, 32) * torch.tensor([0.1, 1.0, 50.0])[:, None, None]
        )
        rms = x.pow(2).mean(dim=(1, 2)).sqrt()
        assert_reordered_close(
            rms, torch.full((3,), target), terms=4 * lm.info.hidden_size, depth=2
        )


def test_distillation_is_zero_when_the_student_is_the_teacher_replayed(tiny_llama, rows):
    """The student is recomputed from the same prefixes, one row at a time: not the teacher's tensor
    itself, so a distillation that compared an input with itself could not pass for this."""
    lm = tiny_llama
    qs, ans = [question_text(e) for e in rows], [answer_text(e) for e in rows]
    with torch.no_grad():
        prefixes = text_prefixes(lm, [e.prompt_A for e in rows])[0]
        teacher = answer_logits(lm, compose(lm, prefixes, qs, ans)).logits_BAV
        student = answer_logits(lm, compose(lm, prefixes, qs, ans))
        assert student.logits_BAV.data_ptr() != teacher.data_ptr()
        assert float(distillation(student, teacher, tau=2.0).abs().max()) < 1e-6
        # a real difference: the teacher rolled by one row is another row's distribution
        assert float(distillation(student, teacher.roll(1, dims=0), tau=2.0).min()) > 0
        other = answer_logits(
            lm,
            compose(lm, [p[:2] for p in text_prefixes(lm, [e.prompt_A for e in rows])[0]], qs, ans),
        )
        assert float(distillation(other, teacher, tau=2.0).min()) > 0


@pytest.mark.float_sensitive
def test_teacher_logits_are_computed_once_per_row_and_equal_the_batched_teacher(tiny_llama, rows):
    from cross_model.interlingua.model import TeacherCache

    lm, net = tiny_llama, _net([tiny_llama])
    net.loss_weights = {**net.loss_weights, "kd_weight": 1.0}
    ctx, qs, ans = (
        [e.prompt_A for e in rows],
        [question_text(e) for e in rows],
        [answer_text(e) for e in rows],
    )
    calls = []
    hook = lm.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            teacher_rows = compose(lm, text_prefixes(lm, ctx)[0], qs, ans, net.bos(0))
            batched = answer_logits(lm, teacher_rows)
            calls.clear()
            net.teacher = TeacherCache(2**30)
            z = net.latent(ctx)
            first = net.row_losses(z, 0, qs, ans, ctx)["kd"]
            assert len(calls) == 1 + len(
                rows
            )  # the student's one forward, the teacher once per row
            calls.clear()
            again = net.row_losses(z, 0, qs, ans, ctx)["kd"]
            assert len(calls) == 1 and net.teacher.hits == len(rows)  # the student only
            torch.testing.assert_close(first, again, rtol=0, atol=0)
            cached = net.teacher.logits(
                lm, 0, ctx, qs, ans, batched.logits_BAV.shape[1], net.bos(0)
            )
            valid = batched.valid_BA[:, :, None]
            # row by row against the batch: one forward of B in another order of sums
            assert_reordered_close(
                cached * valid,
                batched.logits_BAV * valid,
                **forward_budget(lm, teacher_rows.embeds_BTD.shape[1]),
            )
            # Past its budget nothing is kept and every lookup recomputes the same values.
            net.teacher = TeacherCache(0)
            torch.testing.assert_close(
                net.row_losses(z, 0, qs, ans, ctx)["kd"], first, rtol=0, atol=0
            )
            assert net.teacher.rows == {} and net.teacher.misses == len(rows)
    finally:
        hook.remove()


def test_first_token_weights_change_the_loss_as_specified(tiny_llama, rows):
    lm = tiny_llama
    with torch.no_grad():
        a = answer_logits(
            lm,
            compose(
                lm,
                text_prefixes(lm, [e.prompt_A for e in rows])[0],
                [question_text(e) for e in rows],
                [answer_text(e) for e in rows],
            ),
        )
    nll = token_nll(a)
    torch.testing.assert_close(weighted_ce(a), gold_nll(a))
    w = torch.ones_like(nll) * a.valid_BA
    w[:, 0] += 2.0
    w[:, :3] += 0.5 * a.valid_BA[:, :3]
    torch.testing.assert_close(weighted_ce(a, 2.0, 0.5, 3), (nll * w).sum(-1) / w.sum(-1))


@pytest.mark.parametrize("bits", [16, 8, 4, 3, 2])
def test_wire_bytes_equal_the_formula_and_decode_equals_quantize_dequantize(bits):
    z = torch.randn(5, 24) * torch.linspace(0.1, 3, 24)
    blob = wire.encode(z, bits)
    assert len(blob) == wire.payload_size(5, 24, bits)
    body = 5 * 24 * 2 if bits == 16 else -(-5 * 24 * bits // 8) + 5 * 4
    assert len(blob) == 10 + len(b'{"bits":%d,"d_z":24,"dtype":"float16","m":5}' % bits) + body + 4
    assert torch.equal(wire.decode(blob), wire.quantize_dequantize(z, bits))
    # Within one quantization step of each latent vector's own range (float16 rounding aside).
    err = (wire.decode(blob) - z).abs().amax(1)
    step = (z.amax(1) - z.amin(1)) / (2**bits - 1) if bits != 16 else torch.zeros(5)
    assert torch.all(err <= step + 2e-3 * z.abs().amax(1))
    with pytest.raises(PayloadError):
        wire.decode(blob[:-5] + bytes(5))
    with pytest.raises(ValueError):
        wire.encode(z, 9)


def test_the_same_seed_gives_the_same_latent_and_another_seed_another():
    texts = ["The secret word is apple.", "x"]
    a = InterlinguaEncoder(SHAPE, seed=3).encode(texts)
    torch.manual_seed(999)  # the global RNG does not matter
    b = InterlinguaEncoder(SHAPE, seed=3).encode(texts)
    c = InterlinguaEncoder(SHAPE, seed=4).encode(texts)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_a_finished_interlingua_refuses_another_receiver(
    tmp_path, tiny_llama, tiny_llama_48, gemma_tiny
):
    from cross_model.interlingua.train_interlingua import publish_final

    net = _net([tiny_llama, gemma_tiny])
    meta = {"receivers": net.records, "shape": SHAPE.to_dict(), "calibrate": True}
    publish_final(net, tmp_path / "final", meta)
    loaded, _ = load_latentwire(tmp_path / "final", [gemma_tiny])
    z = torch.randn(2, SHAPE.m, SHAPE.d_z)
    torch.testing.assert_close(loaded.soft_tokens(z, 1), net.soft_tokens(z, 1))
    with pytest.raises(ValueError, match="no adapter for receiver 'tiny-llama-48'"):
        load_latentwire(tmp_path / "final", [tiny_llama_48])
    with pytest.raises(ValueError, match="not loaded"):
        loaded.soft_tokens(z, 0)


def test_controls_say_information_crossed_only_when_the_paired_nll_interval_excludes_zero():
    from cross_model.interlingua.controls import control_rows, format_controls

    def rows(variant, nlls, scores, receiver="a"):
        return [
            {
                "example_id": f"e{i}",
                "variant": variant,
                "gold_nll": n,
                "score": s,
                "payload_bytes": 100,
                "text_bytes": 40,
                "first_token_correct": s,
                "receiver": receiver,
            }
            for i, (n, s) in enumerate(zip(nlls, scores))
        ]

    base = [1.0 + 0.1 * (i % 5) for i in range(40)]
    methods = {
        "lw": rows("latent", base, [1.0] * 20 + [0.0] * 20),
        "lw_shuffled": rows("shuffled", [n + 0.5 for n in base], [0.0] * 40),  # worse on every item
        "lw_zero": rows(
            "zero",
            [n + (0.3 if i % 2 else -0.3) for i, n in enumerate(base)],
            [1.0] * 20 + [0.0] * 20,
        ),
        "text": rows("text", base, [1.0] * 40),  # not a latent, not a control: not compared
        # Another receiver's NLLs are in other tokens: never paired with receiver a's latent.
        "other_shuffled": rows("shuffled", [n + 9.0 for n in base], [0.0] * 40, receiver="b"),
    }
    lines = {x["control"]: x for x in control_rows({"t": methods})}
    assert set(lines) == {"lw_shuffled", "lw_zero"}
    assert (
        lines["lw_shuffled"]["information_crossed"]
        and abs(lines["lw_shuffled"]["nll_gap"]["diff"] - 0.5) < 1e-9
    )
    assert lines["lw_shuffled"]["accuracy_gain"]["verdict"] == "better"
    assert not lines["lw_zero"]["information_crossed"]  # +-0.3 around the same items: mean 0
    assert "| t | lw | lw_shuffled | 40 | 100 / 40 |" in format_controls(list(lines.values()))


def test_joint_lines_count_the_kept_answer_each_receiver_alone_and_the_oracle():
    from cross_model.interlingua.controls import format_joint, joint_rows

    # (score a, score b, kept): the kept answer's score is the kept receiver's.
    items = [(1.0, 0.0, "a"), (0.0, 1.0, "a"), (0.0, 1.0, "b"), (0.0, 0.0, "b")]
    rows = [
        {
            "example_id": f"e{i}",
            "variant": "joint",
            "score_a": sa,
            "score_b": sb,
            "joint_choice": k,
            "score": sa if k == "a" else sb,
            "oracle_score": max(sa, sb),
            "error": None,
        }
        for i, (sa, sb, k) in enumerate(items)
    ]
    (line,) = joint_rows({"t": {"lw_joint": rows, "lw": [{"variant": "latent", "score": 1.0}]}})
    assert line["accuracy"] == 0.5 and line["oracle"] == 0.75
    assert line["receivers"] == {
        "a": {"accuracy": 0.25, "kept": 0.5},
        "b": {"accuracy": 0.5, "kept": 0.5},
    }
    assert "| t | lw_joint | 4 | 50.0 | a 25.0 (50); b 50.0 (50) | 75.0 |" in format_joint([line])


def test_interlingua_settings_are_checked_with_the_key_named():
    from cross_model.config import InterlinguaConfig

    for bad, match in (
        ({"zero_stage": 3}, "zero_stage: 3 partitions"),
        ({"d_z": 30, "heads": 4}, "divisible"),
        ({"bos": "sometimes"}, "interlingua.bos"),
        ({"encoder_lr": 0.0}, "encoder_lr"),
    ):
        with pytest.raises(ValueError, match=match):
            InterlinguaConfig(**bad).validate("interlingua")
    InterlinguaConfig().validate("interlingua")


def test_the_designs_decoding_bans_eos_at_first_and_samples_the_first_token_from_the_nucleus():
    """design_chooser on logits where EOS (id 0) leads: banned for the first steps, chosen after; the
    first token is drawn from the nucleus only (a token outside the top-p mass never comes), at random
    across rows, and the same row id draws the same token."""
    from cross_model.interlingua.decoding import design_chooser, nucleus_sample, row_generator

    logits = torch.tensor([[5.0, 4.0, 1.0, -2.0]] * 3)
    ban = design_chooser({0}, 2, False, 0.7, 0.95, 0, ["a", "b", "c"])
    assert ban(0, logits, [0, 1, 2]).tolist() == [1, 1, 1] and ban(
        1, logits[:2], [0, 1]
    ).tolist() == [1, 1]
    assert ban(2, logits[:1], [0]).tolist() == [0]
    # probabilities 0.7, 0.29, 0.01 at T = 1: the nucleus at 0.95 is the first two tokens
    p = torch.tensor([0.7, 0.29, 0.01]).log()
    g = row_generator(0, "x")
    draws = [nucleus_sample(p, 1.0, 0.95, g) for _ in range(2000)]
    assert set(draws) == {0, 1} and 0.6 < draws.count(0) / 2000 < 0.8
    flat = torch.zeros(
        2, 50
    )  # fifty equally likely tokens: rows draw differently, ids reproducibly
    ids = [f"item-{i}" for i in range(8)]
    first = [int(design_chooser(set(), 0, True, 0.7, 0.95, 0, [i])(0, flat[:1], [0])) for i in ids]
    again = design_chooser(set(), 0, True, 0.7, 0.95, 0, ids[::-1])(
        0, torch.zeros(8, 50), list(range(8))
    ).tolist()
    assert len(set(first)) > 1 and again == first[::-1]
    other_seed = [
        int(design_chooser(set(), 0, True, 0.7, 0.95, 1, [i])(0, flat[:1], [0])) for i in ids
    ]
    assert other_seed != first


def test_latentwire_with_the_designs_decoding_answers_each_item_alike_in_any_batch(
    tmp_path, tiny_llama, rows
):
    """first_token sample and eos_ban_steps through the method: an item's answer is the same alone and in
    a batch, and differs from greedy decoding somewhere (the ban itself: the test above)."""
    from cross_model.interlingua.train_interlingua import publish_final
    from cross_model.methods.base import ModelPair
    from cross_model.methods.registry import resolve_method

    net = _net([tiny_llama])
    publish_final(
        net,
        tmp_path / "final",
        {"receivers": net.records, "shape": SHAPE.to_dict(), "calibrate": True},
    )

    def method(**params):
        cls, p = resolve_method(
            "latentwire", {"checkpoint": str(tmp_path / "final"), "max_new_tokens": 6, **params}
        )
        return cls(p, ModelPair(tiny_llama, tiny_llama))

    design = method(first_token="sample", eos_ban_steps=3, first_temperature=2.0, first_top_p=1.0)
    batched = design.run_batch(rows)
    alone = [design.run_batch([e])[0] for e in rows]
    assert [p.answer for p in batched] == [p.answer for p in alone]
    greedy = method().run_batch(rows)
    assert [p.answer for p in batched] != [p.answer for p in greedy]


def test_bos_after_prefix_puts_the_bos_between_the_soft_tokens_and_the_question(tiny_llama):
    """bos: after_prefix (the design's append_bos_after_prefix): [prefix][BOS][question][answer], and no
    BOS first; the answer's logits are those of the same sequence fed as one embedding row."""
    from cross_model.interlingua.receiver_io import AFTER_PREFIX, embed_ids, use_bos

    assert use_bos(tiny_llama, "after_prefix") == AFTER_PREFIX
    prefix = torch.randn(3, tiny_llama.info.hidden_size)
    q = question_text(load_task_examples("fact_lookup", 1, 0, 0)[0][0])
    c = compose(tiny_llama, [prefix], [q], [" red"], AFTER_PREFIX)
    q_ids = tiny_llama.tokenizer(q, add_special_tokens=False)["input_ids"]
    a_ids = tiny_llama.tokenizer(" red", add_special_tokens=False)["input_ids"] + [
        eos_id(tiny_llama)
    ]
    want = torch.cat(
        [prefix, embed_ids(tiny_llama, [tiny_llama.tokenizer.bos_token_id] + q_ids + a_ids)]
    )
    torch.testing.assert_close(c.embeds_BTD[0], want)
    assert c.prompt_lengths == [3 + 1 + len(q_ids)]
    before = compose(tiny_llama, [prefix], [q], [" red"], True)
    torch.testing.assert_close(
        before.embeds_BTD[0, 1:4], prefix
    )  # `always`: BOS first, then the prefix


def test_the_compressed_config_sends_fewer_bytes_than_the_text_on_every_test_item():
    """configs/latentwire_compressed.yaml: at every wire width its latent methods use, the encoded latent
    (header, scales and checksum included) is smaller than each test item's context as text."""
    from pathlib import Path

    from cross_model.config import load_config
    from cross_model.methods.registry import resolve_method

    cfg = load_config(
        str(Path(__file__).resolve().parent.parent / "configs" / "latentwire_compressed.yaml")
    )
    ic, task = cfg.interlingua, cfg.tasks[0]
    widths = {
        resolve_method(n, p)[1].bits
        for n, p in cfg.methods.items()
        if resolve_method(n, p)[0].__name__ == "LatentWireMethod"
        and resolve_method(n, p)[1].variant == "latent"
    }
    assert widths == {16, 8, 4}
    test, _ = load_task_examples(task.name, task.n_test, task.n_calib, cfg.seed)
    smallest_text = min(len(e.prompt_A.encode("utf-8")) for e in test)
    for bits in widths:
        assert len(wire.encode(torch.randn(ic.m, ic.d_z), bits, "float16")) < smallest_text
