"""C2C's invariants: the character alignment; with A = B an identity projector and every gate open is
KVComm with every layer sent; every gate closed is the baseline; pairs of different shapes run; the
bytes are A's sent layers, raw or quantized; a projector made for another pair is refused."""

import json

import pytest
import torch

from cross_model import kv_wire
from cross_model.c2c.align import AlignmentStats, align_spans, token_spans
from cross_model.c2c.projector import pair_layers
from cross_model.data import load_task_examples
from cross_model.generation import positions_from_mask
from cross_model.kv_layout import assemble_receiver_cache, layout_forward
from cross_model.methods.base import ModelPair
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model
from cross_model.prompting import (
    chat_wrap,
    encode_texts,
    receiver_text,
    sender_text,
    tokenize_prompts,
)
from tests.tolerance import assert_forward_close, assert_reordered_close

ARCHS = ["tiny-llama-64", "tiny-qwen2-64", "tiny-gemma3-64"]


@pytest.fixture(scope="module")
def examples():
    test, _ = load_task_examples("countries", 5, 0, seed=3)
    return test


def make(name, a="tiny-llama-64", b=None, **params):
    sender = load_model(a)
    receiver = sender if b is None else load_model(b)
    cls, p = resolve_method(name, params)
    return cls(p, ModelPair(sender, receiver))


def c2c_logits(m, examples):
    """B's logits at every prompt position reading the projected cache (B x T x V)."""
    from cross_model.c2c.transfer import receiver_cache

    layers = m.active_layers()
    side = m.sender(examples, layers)
    cache, layout, offset = receiver_cache(m.projector, m.pair.receiver, side, layers)
    b = m.pair.receiver
    batch = tokenize_prompts(b, [receiver_text(e) for e in examples])
    pos = positions_from_mask(batch.attention_mask, offset)
    with torch.inference_mode():
        return layout_forward(b, layout, all_logits=True)(
            cache=cache,
            full_mask_BT=batch.attention_mask,
            position_ids_BT=pos,
            input_ids_BT=batch.input_ids,
        )


def test_alignment_of_one_tokenizer_with_itself_is_one_to_one():
    lm = load_model("tiny-llama-64")
    ids, spans = token_spans(lm, "Paris, the capital of France.")
    rows = align_spans(spans, spans)
    assert rows == [[k] for k in range(len(ids))]
    stats = AlignmentStats()
    stats.add(spans, spans, rows)
    assert stats.to_dict()["mismatch_fraction"] == 0.0


def test_alignment_reads_the_sender_tokens_covering_each_receiver_tokens_characters():
    sender = [(0, 0), (0, 4), (4, 5), (5, 11), (11, 12)]  # <bos> "Tour" " " "Eiffel" "."
    receiver = [(0, 2), (2, 7), (7, 11), (11, 12), (12, 12)]
    rows = align_spans(sender, receiver)
    assert rows == [
        [1],
        [1, 2, 3],
        [3],
        [4],
        [4],
    ]  # a zero-width token past the end reads the last one
    assert align_spans(sender, [(0, 0)]) == [[0]]  # a BOS reads the sender's BOS
    stats = AlignmentStats()
    stats.add(sender, receiver, rows)
    assert stats.to_dict()["exact_fraction"] == 0.2 and stats.many == 1


@pytest.mark.slow
def test_alignment_between_the_gemma_and_smollm2_tokenizers_covers_every_character():
    gemma, smol = load_model("gemma3-270m"), load_model("smollm2-135m-instruct")
    text = (
        "Instruction: answer. Context: Ana Reyes visited the Eiffel Tower in 1999, naïvely — twice!"
    )
    _, g_spans = token_spans(gemma, text)
    s_ids, s_spans = token_spans(smol, text)
    assert (
        s_ids
        == smol.tokenizer(text, add_special_tokens=not smol.info.has_chat_template)["input_ids"]
    )
    rows = align_spans(g_spans, s_spans)
    assert len(rows) == len(s_spans)
    for (s, e), hit in zip(s_spans, rows):
        if e > s:  # the sender tokens read are contiguous and cover the receiver token's characters
            assert hit == list(range(hit[0], hit[-1] + 1))
            assert g_spans[hit[0]][0] <= s and g_spans[hit[-1]][1] >= e
    stats = AlignmentStats()
    stats.add(g_spans, s_spans, rows)
    assert (
        0 < stats.to_dict()["mismatch_fraction"] < 1
    )  # two tokenisers: some tokens agree, some do not


@pytest.mark.float_sensitive
def test_sparse_token_pooling_equals_the_dense_average(examples):
    """The pooled A features (each B token's mean over the A tokens covering its characters) from the
    index lists equal the dense B x N_B x T_A average built from the same alignments in the test, on
    two tokenisers, left-padded; the index lists hold one entry per aligned pair, not N_B x T_A."""
    from cross_model.c2c.transfer import align_prompts

    m = make("kv_translate", "tiny-gemma3-64", "tiny-llama-48", projector="train", gates="open")
    side = m.sender(examples[:3], m.active_layers())
    a, b = m.pair.sender, m.pair.receiver
    wrapped = [chat_wrap(a, sender_text(e)) for e in examples[:3]]
    alignments, counts, _ = align_prompts(a, b, wrapped, encode_texts(a, wrapped))
    mask = side.pre.full_mask
    width = max(counts)
    dense = torch.zeros((3, width, mask.shape[1]))
    for i, rows in enumerate(alignments):
        cols = mask[i].nonzero().flatten().tolist()
        for n, hit in enumerate(rows):
            for k in hit:
                dense[i, width - len(rows) + n, cols[k]] = 1.0 / len(hit)
    k_a = side.pre.kv[0][0].float()
    # each pooled row averages at most the mask's width of A tokens
    assert_reordered_close(
        side.pool(k_a), torch.einsum("bnt,bhtd->bnhd", dense, k_a).flatten(2), terms=mask.shape[1]
    )
    assert (
        side.pool.row.numel()
        == sum(len(h) for rows in alignments for h in rows)
        < dense.numel() / 4
    )


def test_layer_pairing_rules():
    # C2C's: a deeper receiver's first layers all read sender layer 0 (the quickstart pair: 18 -> 30)
    assert pair_layers(4, 6, "last_aligned") == [0, 0, 0, 1, 2, 3]
    assert pair_layers(18, 30, "last_aligned") == [0] * 13 + list(range(1, 18))
    assert pair_layers(6, 4, "last_aligned") == [2, 3, 4, 5]
    assert pair_layers(18, 30, "nearest")[0] == 0 and pair_layers(18, 30, "nearest")[-1] == 17
    with pytest.raises(ValueError, match="pairing"):
        pair_layers(4, 4, "middle")


@pytest.mark.float_sensitive
@pytest.mark.parametrize("rope", ["as_cached", "reapply"])
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "left-padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_projector_with_every_gate_open_is_kvcomm_with_every_layer_sent(
    arch, share_prefix, rope, examples
):
    # rope: reapply takes A's rotary embedding off and puts B's back at the same positions (A = B): the
    # same keys up to rounding, which checks the inverse rotation and each layer's rotary (Gemma-3's two).
    m = make(
        "kv_translate",
        arch,
        projector="identity",
        gates="open",
        share_prefix=share_prefix,
        rope=rope,
    )
    kv = make("kvcomm", arch, selection="all", share_prefix=share_prefix)
    got = c2c_logits(m, examples)
    layers = set(range(kv.pair.receiver.info.num_layers))
    pre, cache, sink = kv.sender_cache(examples, layers)
    b_cache, layout = assemble_receiver_cache(cache, pre.full_mask, kv.layer_map, layers, sink)
    b = kv.pair.receiver
    batch = tokenize_prompts(b, [receiver_text(e) for e in examples])
    with torch.inference_mode():
        ref = layout_forward(b, layout, all_logits=True)(
            cache=b_cache,
            full_mask_BT=batch.attention_mask,
            position_ids_BT=positions_from_mask(batch.attention_mask, pre.full_mask.sum(-1)),
            input_ids_BT=batch.input_ids,
        )
    # reapply adds two rotations per layer to the sums compared: one more step of rounding each
    assert_forward_close(got, ref, b, seq_len=ref.shape[1], msg=f"rope {rope}")
    ours, theirs = m.run_batch(examples), kv.run_batch(examples)
    assert [p.answer for p in ours] == [p.answer for p in theirs]
    assert all(p.extra["alignment_mismatch"] == 0.0 for p in ours)


@pytest.mark.float_sensitive
def test_reapplied_rope_puts_the_receivers_rotation_on_projected_keys(examples):
    """With rope: reapply, A's keys lose A's rotation at A's positions, and B's layer gets B's rotation at
    B's own context positions: undoing B's rotation recovers the projection of un-rotated keys."""
    from cross_model.c2c.transfer import Rotary, receiver_cache

    m = make(
        "kv_translate",
        "tiny-gemma3-64",
        "tiny-llama-48",
        projector="train",
        gates="open",
        rope="reapply",
    )
    layers = m.active_layers()
    side = m.sender(examples[:2], layers)
    cache, _, _ = receiver_cache(
        m.projector, m.pair.receiver, side, layers, a=m.pair.sender, rope="reapply"
    )
    plain, _, _ = receiver_cache(m.projector, m.pair.receiver, side, layers)
    b_rope = Rotary(m.pair.receiver, positions_from_mask(side.context_mask_BN))
    a_rope = Rotary(m.pair.sender, positions_from_mask(side.pre.full_mask))
    l, la = 1, m.projector.partners[1]
    k_a = a_rope.remove(la, side.pre.kv[la][0].float())
    ak = torch.einsum("bnt,bhtd->bnhd", side.pool.dense(k_a.shape[2]), k_a).flatten(2)
    want = m.projector.keys[str(l)](ak)
    with torch.no_grad():
        # A's rotation off, the projection, B's rotation on and off: four steps over A's key width
        assert_reordered_close(
            b_rope.remove(l, cache.layers[l].keys), want, terms=ak.shape[-1], depth=4
        )
    assert not torch.allclose(cache.layers[l].keys, plain.layers[l].keys, atol=1e-3)
    torch.testing.assert_close(
        cache.layers[l].values, plain.layers[l].values
    )  # values carry no rotation


@pytest.mark.float_sensitive
def test_every_gate_closed_is_the_baseline(examples):
    m = make(
        "kv_translate",
        "tiny-gemma3-64",
        "tiny-llama-48",
        projector="train",
        gates="closed",
        max_new_tokens=5,
    )
    base = make("baseline", "tiny-llama-48", max_new_tokens=5)
    ours, ref = m.run_batch(examples), base.run_batch(examples)
    assert [p.answer for p in ours] == [p.answer for p in ref]
    assert all(p.payload_bytes == 0 and p.extra["layers"] == [] for p in ours)
    got = c2c_logits(m, examples)
    b = base.pair.receiver
    batch = tokenize_prompts(b, [receiver_text(e) for e in examples])
    with torch.inference_mode():
        plain = b.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=positions_from_mask(batch.attention_mask),
        ).logits
    real = batch.attention_mask.bool()
    assert_forward_close(got[real], plain[real], b, seq_len=batch.input_ids.shape[1])


@pytest.mark.parametrize("pairing", ["last_aligned", "nearest"])
def test_pairs_of_different_layers_heads_and_widths_run_and_count_a_sent_layers(pairing, examples):
    # tiny-gemma3-64: 4 layers, 1 KV head; tiny-llama-48: 3 layers, 2 KV heads of another width.
    m = make(
        "kv_translate",
        "tiny-gemma3-64",
        "tiny-llama-48",
        projector="train",
        gates="open",
        pairing=pairing,
        max_new_tokens=4,
    )
    preds = m.run_batch(examples)
    a = m.pair.sender
    for p in preds:
        assert p.error is None and p.extra["layers"] == [0, 1, 2]
        assert p.extra["sender_layers"] == sorted(set(pair_layers(4, 3, pairing)))
        n = p.sender_prefill_tokens
        per = 2 * a.info.num_kv_heads * a.info.head_dim * 4 * n  # fp32 keys and values per layer
        header = m.wire(p.extra["sender_layers"], n).header()
        framing = kv_wire._PREAMBLE.size + len(kv_wire._header_bytes(header)) + kv_wire._CRC.size
        assert p.payload_bytes == per * len(p.extra["sender_layers"]) + framing


def test_quantized_c2c_sends_kv_wire_frames_and_reads_them_back(examples):
    raw = make("kv_translate", projector="identity", gates="open", max_new_tokens=4)
    q8 = make("kv_translate", projector="identity", gates="open", bits=8, max_new_tokens=4)
    q2 = make("kv_translate", projector="identity", gates="open", bits=2, max_new_tokens=4)
    r, a8, a2 = raw.run_batch(examples), q8.run_batch(examples), q2.run_batch(examples)
    assert all(x.payload_bytes < y.payload_bytes / 3 for x, y in zip(a8, r))
    assert all(x.payload_bytes < y.payload_bytes for x, y in zip(a2, a8))
    side = q2.sender(examples[:1], q2.active_layers())
    sent, sizes = q2.transmit(side, q2.sender_layers(q2.active_layers()))
    k_raw = side.pre.kv[1][0]
    assert sizes == [a2[0].payload_bytes] and not torch.equal(
        sent[1][0], k_raw
    )  # B reads the decoded tensors
    # The batched frame is kv_wire's own: one row encoded alone has the same bytes, and decodes the same.
    cols = side.pre.full_mask[0].bool()
    one = q2.wire(q2.sender_layers(q2.active_layers()), int(cols.sum()))
    one.keys = [side.pre.kv[la][0][0][:, cols] for la in one.sender_layers]
    one.values = [side.pre.kv[la][1][0][:, cols] for la in one.sender_layers]
    blob = kv_wire.encode(one)
    assert len(blob) == sizes[0]
    back = kv_wire.decode(blob, one.receiver, one.kv_heads, one.head_dim)
    torch.testing.assert_close(sent[1][0][0][:, cols], back.keys[one.sender_layers.index(1)])
    assert (sent[1][0] - k_raw).abs().max() < k_raw.abs().max()


def test_a_projector_for_another_pair_is_refused(tmp_path, examples):
    from cross_model.c2c.train_projector import WEIGHTS_FILE
    from cross_model.checkpointing import publish_once

    other = make("kv_translate", "tiny-gemma3-64", "tiny-llama-48", projector="train")
    meta = {
        "sender": {"name": "someone-else"},
        "receiver": {},
        "pairing": "last_aligned",
        "hidden": 256,
    }
    publish_once(tmp_path / "p", {WEIGHTS_FILE: other.projector.state_dict()}, meta)
    with pytest.raises(ValueError, match="trained for another setting.*sender"):
        make("kv_translate", "tiny-gemma3-64", "tiny-llama-48", projector=str(tmp_path / "p"))
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["pairing"] == "last_aligned"


def test_training_rows_from_a_chat_dataset_a_jsonl_file_and_the_tasks(tmp_path):
    from cross_model.c2c.train_projector import conversation_pair, training_rows
    from cross_model.config import load_config

    hermes = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name a fjord."},
            {"from": "gpt", "value": "Geiranger."},
        ]
    }
    # the user turn is the context, the assistant's reply after it the gold response (target: gold)
    assert conversation_pair(hermes, "Answer it.") == ("Name a fjord.", "Answer it.", "Geiranger.")
    assert conversation_pair({"context": "c", "question": "q"}, "x") == ("c", "q", "")
    assert conversation_pair({"context": "c", "question": "q", "answer": "a"}, "x") == (
        "c",
        "q",
        "a",
    )
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(json.dumps({"context": f"c{i}", "question": f"q{i}"}) + "\n" for i in range(5))
    )
    _, p = resolve_method("kv_translate", {"data": str(path), "n_train": 3, "n_heldout": 2})
    train, held = training_rows(p)
    assert [e.prompt_A for e in train] == ["c0", "c1", "c2"] and [e.prompt_B for e in held] == [
        "q3",
        "q4",
    ]
    from cross_model.c2c.train_projector import gold_targets

    with pytest.raises(ValueError, match="has no gold answer .*JSONL rows need an `answer` field"):
        gold_targets(load_model("tiny-llama-48"), train, 4)
    with pytest.raises(ValueError, match="needs 9"):
        training_rows(
            resolve_method("kv_translate", {"data": str(path), "n_train": 7, "n_heldout": 2})[1]
        )
    cfg = load_config("configs/tiny.yaml", ["--output_dir", str(tmp_path)])
    _, p = resolve_method("kv_translate", {"data": "tasks", "n_train": 6, "n_heldout": 2})
    train, held = training_rows(p, cfg)
    test = {
        e.prompt_A
        for t in cfg.tasks
        for e in load_task_examples(t.name, t.n_test, t.n_calib, cfg.seed, t.path)[0]
    }
    assert len(train) == 6 and len(held) == 2 and not test & {e.prompt_A for e in train + held}
    with pytest.raises(ValueError, match="data"):
        resolve_method("kv_translate", {"data": "wikipedia"})


def test_each_prompt_is_recorded_once(examples):
    from cross_model.prompting import recording_prompts, sender_text

    m = make(
        "kv_translate",
        "tiny-gemma3-64",
        "tiny-llama-48",
        projector="train",
        gates="open",
        max_new_tokens=2,
    )
    with recording_prompts() as log:
        m.run_batch(examples[:1])
    assert [r["model"] for r in log] == ["tiny-gemma3-64", "tiny-llama-48"]
    assert (
        sender_text(examples[0]) in log[0]["text"] and receiver_text(examples[0]) in log[1]["text"]
    )


def test_the_other_item_control_reads_each_items_donor_context_and_b_its_own_question(examples):
    """Under `control: other_item` C2C answers exactly as the plain method answers items whose context
    is the donor's (the next test item by context length) and whose question is their own."""
    from dataclasses import replace

    from cross_model.methods.other_item import donor_map

    items = examples[:5]
    control = make("kv_translate", projector="identity", gates="open", control="other_item")
    control.set_task_items(items)
    plain = make("kv_translate", projector="identity", gates="open")
    donors = donor_map(items)
    swapped = [replace(e, prompt_A=donors[e.example_id].prompt_A) for e in items]
    assert any(s.prompt_A != e.prompt_A for s, e in zip(swapped, items))
    got, want = control.run_batch(items), plain.run_batch(swapped)
    assert [(p.answer, p.payload_bytes) for p in got] == [(p.answer, p.payload_bytes) for p in want]
    assert [p.example_id for p in got] == [e.example_id for e in items]
    one = make("kv_translate", projector="identity", gates="open", control="other_item")
    one.set_task_items(items[:1])
    assert "needs another item" in (one.run_batch(items[:1])[0].error or "")
