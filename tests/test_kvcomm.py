"""KVComm's invariants: exactness when every layer is sent, causality for every selection, batching."""

import pytest
import torch

from cross_model import kv_wire
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
from tests.public_receiver import public_calibration_importance, public_receiver_logits
from tests.tolerance import assert_forward_close, forward_budget, reorder_atol

ARCHS = ["tiny-llama-64", "tiny-qwen2-64", "tiny-gemma3-64"]


def make(spec_a, spec_b=None, **params):
    a = load_model(spec_a)
    b = a if spec_b is None else load_model(spec_b)
    cls, p = resolve_method("kvcomm", params)
    return cls(p, ModelPair(a, b))


def receiver_logits(m, examples, selected, b_ids=None):
    """B's logits at every prompt position (B x T x V), reading A's cache for `selected` layers."""
    a_pre, a_cache, sink = m.sender_cache(examples, selected)
    cache, layout = assemble_receiver_cache(
        a_cache, a_pre.full_mask, m.layer_map, selected, sink, m.params.receiver_mask
    )
    b = m.pair.receiver
    batch = tokenize_prompts(b, [receiver_text(e) for e in examples]) if b_ids is None else b_ids
    pos = positions_from_mask(batch.attention_mask, a_pre.full_mask.sum(-1))
    fwd = layout_forward(b, layout, all_logits=True)
    with torch.inference_mode():
        return fwd(
            cache=cache,
            full_mask_BT=batch.attention_mask,
            position_ids_BT=pos,
            input_ids_BT=batch.input_ids,
        ), batch


def concatenated_logits(lm, example):
    ids = encode_texts(
        lm, [chat_wrap(lm, sender_text(example)), chat_wrap(lm, receiver_text(example))]
    )
    n_b = len(ids[1])
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids[0] + ids[1]], device=lm.device)).logits[0]
    return out[-n_b:]


@pytest.fixture(scope="module")
def examples():
    test, _ = load_task_examples("countries", 6, 0, seed=3)
    return test


@pytest.mark.float_sensitive
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "left-padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_layers_sent_equals_one_concatenated_forward(arch, share_prefix, examples):
    m = make(arch, selection="all", share_prefix=share_prefix)
    # a left-padded batch of mixed A and B lengths (the generator gives different names and landmarks)
    logits, batch = receiver_logits(m, examples, set(range(m.pair.receiver.info.num_layers)))
    for i, e in enumerate(examples):
        ref = concatenated_logits(m.pair.receiver, e)
        n = ref.shape[0]
        got = logits[i, -n:]
        assert_forward_close(got, ref, m.pair.receiver, seq_len=logits.shape[1])
        assert batch.attention_mask[i, :-n].sum() == 0  # padding sits on the left


def test_gemma_sliding_window_is_exercised(examples):
    lm = load_model("tiny-gemma3-64")
    n = len(
        encode_texts(
            lm,
            [chat_wrap(lm, sender_text(examples[0])) + chat_wrap(lm, receiver_text(examples[0]))],
        )[0]
    )
    assert n > lm.model.config.sliding_window  # so the window rule matters in the test above


def test_sink_only_differs(examples):
    m = make("tiny-llama-64", selection="all")
    full, _ = receiver_logits(m, examples[:2], {0, 1, 2, 3})
    sink, _ = receiver_logits(m, examples[:2], set())
    assert (full[:, -1] - sink[:, -1]).abs().max() > 1e-2


@pytest.mark.float_sensitive
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("selected", [set(), {0}, {1, 3}, {2}])
def test_causal_for_every_selection(arch, selected, examples):
    """Changing only B's last prompt token leaves the logits at every earlier B position unchanged."""
    m = make(arch, selection="all")
    b = m.pair.receiver
    ex = examples[:3]
    batch = tokenize_prompts(b, [receiver_text(e) for e in ex])
    before, _ = receiver_logits(m, ex, selected, batch)
    changed = batch.input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % b.info.vocab_size
    batch2 = type(batch)(changed, batch.attention_mask)
    after, _ = receiver_logits(m, ex, selected, batch2)
    # the same sums in the same order wherever the kernel does not depend on the sequence length
    assert_forward_close(after[:, :-1], before[:, :-1], b, seq_len=after.shape[1])
    assert (after[:, -1] - before[:, -1]).abs().max() > 1e-4


def test_greedy_continuation_matches_concatenated_generation(examples):
    from cross_model.generation import greedy_generate

    m = make("tiny-llama-64", selection="all", max_new_tokens=6)
    preds = m.run_batch(examples[:3])
    lm = m.pair.receiver
    for p, e in zip(preds, examples[:3]):
        ids = encode_texts(lm, [chat_wrap(lm, sender_text(e)) + chat_wrap(lm, receiver_text(e))])[0]
        t = torch.tensor([ids])
        ref = greedy_generate(lm, t, torch.ones_like(t), 6).texts[0]
        assert p.answer == ref


def test_batched_equals_unbatched_and_payload_formula(examples):
    m = make("tiny-llama-64", selection="layers", layers_list=[2], max_new_tokens=5)
    batched = m.run_batch(examples)
    single = [m.run_batch([e])[0] for e in examples]
    assert [p.answer for p in batched] == [p.answer for p in single]
    assert [p.payload_bytes for p in batched] == [p.payload_bytes for p in single]
    info = m.pair.sender.info
    per = 2 * info.num_kv_heads * info.head_dim * 4  # fp32
    for p in batched:
        n = p.sender_prefill_tokens
        assert p.extra["layers"] == [0, 2]  # layer 0 is always sent by default
        header = m.wire_payload({0, 2}, n).header()
        framing = kv_wire._PREAMBLE.size + len(kv_wire._header_bytes(header)) + kv_wire._CRC.size
        assert (
            p.payload_bytes == per * (2 * n + 2) + framing
        )  # two full layers + two sink tokens, framed


def test_refuses_different_kv_shapes_and_bad_layers():
    with pytest.raises(ValueError, match="same KV shape"):
        make("tiny-llama-64", "tiny-gemma3-64", selection="all")
    with pytest.raises(ValueError, match="outside tiny-llama-64's 0..3"):
        make("tiny-llama-64", selection="layers", layers_list=[9])


def test_layer_map_across_depths():
    from cross_model.methods.kvcomm import layer_map

    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(4, 3) == [0, 2, 3]  # 3 receiver layers read sender layers spread over 4
    assert layer_map(28, 32)[-1] == 27 and layer_map(28, 32)[0] == 0


def test_calibration_ranks_layers_where_b_can_see_a(examples, monkeypatch):
    """Synthetic: B's tokens can see A's tokens only in layers 1 and 3; those must rank first."""
    import cross_model.methods.kvcomm as kv
    from cross_model.kv_layout import SRC_A

    real = kv.assemble_from_sources

    def only_1_and_3(*args, **kw):
        cache, layout = real(*args, **kw)
        for l in (0, 2):
            layout.key_valid[l] = layout.key_valid[l] & (layout.key_src[l] != SRC_A)
        return cache, layout

    monkeypatch.setattr(kv, "assemble_from_sources", only_1_and_3)
    m = make(
        "tiny-llama-64", selection="calibrate", top_layers=0.5, alpha=1.0, always_send_layer0=False
    )
    _, calib = load_task_examples("countries", 1, 4, seed=5)
    out = m.calibrate(calib)
    assert out["importance"][0] == 0.0 and out["importance"][2] == 0.0
    assert set(out["ranking"][:2]) == {1, 3} and m.selected_layers() == {1, 3}
    assert set(out["calibration_ids"]).isdisjoint({e.example_id for e in examples})


@pytest.mark.float_sensitive
def test_public_calibration_mask_reproduces_the_public_recompute(examples):
    """calibration_mask public equals the public calibration (its boolean mask added as +1, B's later
    tokens in the softmax) rebuilt from transformers pieces; one item at a time equals a padded batch,
    and the causal measure differs from it."""
    public = make("tiny-llama-64", selection="calibrate", calibration_mask="public")
    causal = make("tiny-llama-64", selection="calibrate")
    lm = public.pair.receiver
    for e in examples[:2]:
        a_ids, b_ids = encode_texts(
            lm, [chat_wrap(lm, sender_text(e)), chat_wrap(lm, receiver_text(e))]
        )
        ref = public_calibration_importance(a_ids, b_ids)
        # a layer's attention mass sums the softmax over A's keys after that layer's forward
        atol = reorder_atol(torch.tensor(ref), **forward_budget(lm, len(a_ids) + len(b_ids)))
        assert public.layer_importance([e]) == pytest.approx(ref, abs=atol)
        assert max(abs(x - y) for x, y in zip(causal.layer_importance([e]), ref)) > 1e-3
    batched = public.layer_importance(examples[:4], batch_size=4)
    alone = [public.layer_importance([e]) for e in examples[:4]]
    mean = [sum(x) / 4 for x in zip(*alone)]
    longest = max(
        sum(
            map(
                len,
                encode_texts(lm, [chat_wrap(lm, sender_text(e)), chat_wrap(lm, receiver_text(e))]),
            )
        )
        for e in examples[:4]
    )
    assert batched == pytest.approx(
        mean, abs=reorder_atol(torch.tensor(mean), **forward_budget(lm, longest))
    )
    from cross_model.methods.kvcomm import KVComm

    assert KVComm.public_settings["calibration_mask"] == "public"


@pytest.mark.float_sensitive
def test_calibration_attention_applies_the_causal_mask(examples):
    """Our recorded mass equals HF's eager attention (causal) over one concatenated [A ; B] forward."""
    m = make("tiny-llama-64", selection="calibrate")
    e = examples[0]
    importance = m.layer_importance([e])
    ref_lm = load_model("tiny-llama-64")
    ref_lm.model.set_attn_implementation("eager")
    ids = encode_texts(
        ref_lm, [chat_wrap(ref_lm, sender_text(e)), chat_wrap(ref_lm, receiver_text(e))]
    )
    n_a = len(ids[0])
    with torch.inference_mode():
        out = ref_lm.model(input_ids=torch.tensor([ids[0] + ids[1]]), output_attentions=True)
    atol = reorder_atol(
        torch.ones(1), **forward_budget(ref_lm, len(ids[0]) + len(ids[1]))
    )  # masses are <= 1
    for l, att in enumerate(out.attentions):  # 1 x H x T x T, rows sum to 1 under the causal mask
        mass = att[0, :, n_a:, 1:n_a].sum(-1).mean()  # B's queries on A's tokens except the sink
        assert importance[l] == pytest.approx(float(mass), abs=atol)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("selected", [{0, 2}, {0}, {0, 1, 2, 3}])
def test_public_receiver_mask_reproduces_the_public_first_pass(selected, examples):
    """receiver_mask: public equals the public receiver rebuilt from transformers (later B tokens change
    earlier B positions in sink-only layers); causal differs there; with every layer both are one
    concatenated forward."""
    e = examples[0]
    lm = load_model("tiny-llama-64")
    a_ids, b_ids = encode_texts(
        lm, [chat_wrap(lm, sender_text(e)), chat_wrap(lm, receiver_text(e))]
    )
    public = make(
        "tiny-llama-64", selection="layers", layers_list=sorted(selected), receiver_mask="public"
    )
    causal = make("tiny-llama-64", selection="layers", layers_list=sorted(selected))
    got_public, _ = receiver_logits(public, [e], selected)
    got_causal, _ = receiver_logits(causal, [e], selected)
    ref = public_receiver_logits([a_ids], b_ids, selected)
    n = len(a_ids) + len(b_ids)
    assert_forward_close(got_public[0, -len(b_ids) :], ref, lm, n)
    if len(selected) == 4:
        assert_forward_close(got_public, got_causal, lm, n)
        assert_forward_close(got_causal[0, -len(b_ids) :], concatenated_logits(lm, e), lm, n)
    else:
        assert (
            got_public[0, 0] - got_causal[0, 0]
        ).abs().max() > 1e-3  # B's first token saw later ones


@pytest.mark.float_sensitive
@pytest.mark.parametrize(
    "sender,receiver,selected",
    [
        (
            "tiny-llama-64-deep",
            "tiny-llama-64",
            {0, 2, 5},
        ),  # two sender layers in every receiver layer
        ("tiny-llama-64-deep", "tiny-llama-64", set(range(8))),
        ("tiny-llama-64", "tiny-llama-64-deep", {0, 2}),  # receiver layers 1, 3, 5, 7 get nothing
    ],
)
def test_public_depth_map_reproduces_the_public_receiver_across_depths(
    sender, receiver, selected, examples
):
    """depth_map public (the public models.py): sender layer i goes to receiver layer
    round((i + 0.5) L_B / L_A - 0.5), several concatenated, with the selection applied to the sender's
    indices; with the public receiver mask it equals that receiver rebuilt from transformers pieces, one
    item at a time and in a padded batch, and the bytes count every sender layer that crossed."""
    from cross_model.kv_wire import payload_size
    from cross_model.methods.kvcomm import public_depth_map

    m = make(
        sender,
        receiver,
        selection="layers",
        layers_list=sorted(selected),
        receiver_mask="public",
        depth_map="public",
    )
    a, b = m.pair.sender, m.pair.receiver
    nearest = make(
        sender,
        receiver,
        selection="layers",
        receiver_mask="public",
        layers_list=sorted(l for l in selected if l < b.info.num_layers),
    )
    chosen = m.selected_layers()
    groups = public_depth_map(a.info.num_layers, b.info.num_layers)
    assert sorted(x for g in groups for x in g) == list(range(a.info.num_layers))
    batch = tokenize_prompts(b, [receiver_text(e) for e in examples[:3]])
    outs = []
    for method in (m, nearest):
        cache, layout, offset, _, _, _ = method.receiver_cache(
            examples[:3], method.selected_layers()
        )
        pos = offset[:, None] + (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            outs.append(
                layout_forward(b, layout, all_logits=True)(
                    cache=cache,
                    full_mask_BT=batch.attention_mask,
                    position_ids_BT=pos,
                    input_ids_BT=batch.input_ids,
                )
            )
    for i, e in enumerate(examples[:3]):
        a_ids, b_ids = encode_texts(
            a, [chat_wrap(a, sender_text(e)), chat_wrap(b, receiver_text(e))]
        )
        ref = public_receiver_logits([a_ids], b_ids, chosen, sender=sender, receiver=receiver)
        assert_forward_close(outs[0][i, -len(b_ids) :], ref, b, len(a_ids) + len(b_ids))
        assert (
            outs[1][i, -len(b_ids) :] - ref
        ).abs().max() > 1e-3  # ours reads one sender layer per layer
        p = m.wire_payload(chosen, len(a_ids))
        assert sorted(p.sender_layers + p.sink_sender_layers) == list(range(a.info.num_layers))
        assert m.run_batch([e])[0].payload_bytes == payload_size(p.header())


def test_q_kvcomm_refuses_the_public_depth_map_across_depths():
    with pytest.raises(ValueError, match="depth_map public puts several sender layers"):
        cls, p = resolve_method("qkvcomm", {"selection": "all", "depth_map": "public"})
        cls(p, ModelPair(load_model("tiny-llama-64-deep"), load_model("tiny-llama-64")))
    from cross_model.methods.kvcomm import KVComm
    from cross_model.methods.qkvcomm import QKVComm

    assert (
        KVComm.public_settings["depth_map"] == "public"
        and "depth_map" not in QKVComm.public_settings
    )


@pytest.mark.float_sensitive
def test_public_receiver_mask_batched_equals_one_at_a_time(examples):
    """The public rule is per row (a key's place among that row's real keys), so left padding and a
    shared prefix do not change it."""
    m = make("tiny-llama-64", selection="layers", layers_list=[0, 2], receiver_mask="public")
    batched, batch = receiver_logits(m, examples[:4], {0, 2})
    for i, e in enumerate(examples[:4]):
        alone, _ = receiver_logits(m, [e], {0, 2})
        n = int(batch.attention_mask[i].sum())
        assert_forward_close(batched[i, -n:], alone[0, -n:], m.pair.receiver, batched.shape[1])


def test_public_online_rule_ranks_on_every_intervalth_item_of_the_task_whatever_the_batches(
    examples,
):
    """online_rule public (com_online.py): item k is answered with the ranking that item
    k - k mod calib_interval gave alone; two batchings in other orders (as two ranks' shares would
    be) give every item the same layers and answers."""
    kw = dict(selection="online", online_rule="public", calib_interval=4, top_layers=0.5)
    whole = make("tiny-llama-64", **kw)
    whole.set_task_items(examples)
    one = whole.run_batch(examples)
    parts = make("tiny-llama-64", **kw)
    parts.set_task_items(examples)
    shuffled = [examples[i] for i in (5, 1, 4, 0, 3, 2)]
    two = {
        p.example_id: p
        for part in (shuffled[:2], shuffled[2:3], shuffled[3:])
        for p in parts.run_batch(part)
    }
    assert [(p.answer, p.extra["layers"]) for p in one] == [
        (two[p.example_id].answer, two[p.example_id].extra["layers"]) for p in one
    ]
    assert [p.extra["online_anchor"] for p in one] == [examples[0].example_id] * 4 + [
        examples[4].example_id
    ] * 2
    offline = make("tiny-llama-64", selection="calibrate", top_layers=0.5)
    for anchor, rows in ((0, one[:4]), (4, one[4:])):
        offline.calibrate([examples[anchor]])  # the anchor alone, as the public code ranks
        assert all(p.extra["layers"] == sorted(offline.selected_layers()) for p in rows)
    (failed,) = make("tiny-llama-64", **kw).run_batch(
        examples[:1]
    )  # no task list handed over: the row fails
    assert "online_rule public ranks on the task's own items" in failed.error


def test_online_selection_reranks_on_the_batchs_own_prompts_every_calib_interval_items(examples):
    """selection: online re-selects when a batch reaches the next multiple of calib_interval items,
    from B's attention on A's tokens over that batch's prompts (what offline calibration measures on
    calibration items), and never reads a label."""
    from dataclasses import replace

    first, second = examples[:3], examples[3:]
    online = make("tiny-llama-64", selection="online", calib_interval=4, top_layers=0.5)
    offline = make("tiny-llama-64", selection="calibrate", top_layers=0.5)
    a = online.run_batch(first)
    assert all(p.extra["online_reselected"] for p in a)
    assert online.ranking == offline.calibrate(first)["ranking"]
    assert [p.extra["layers"] for p in a] == [sorted(offline.selected_layers())] * 3
    b = online.run_batch(second)  # items 3..5 hold item 4: re-selected from this batch
    assert (
        all(p.extra["online_reselected"] for p in b)
        and online.ranking == offline.calibrate(second)["ranking"]
    )
    assert not online.run_batch(examples[:2])[0].extra[
        "online_reselected"
    ]  # seen before: not new items
    assert online.online_seen == 6
    # The answers are never read: blanked golds choose the same layers.
    blank = make("tiny-llama-64", selection="online", calib_interval=4, top_layers=0.5)
    blank.run_batch([replace(e, answers=("",)) for e in first])
    assert blank.ranking == offline.calibrate(first)["ranking"]
    with pytest.raises(ValueError, match="calib_interval: must be >= 1"):
        make("tiny-llama-64", selection="online", calib_interval=0)


def test_other_item_control_reads_the_next_items_cache_by_context_length(examples):
    """control: other_item: B gets the cache A built from another test item's context (the next in
    order of context length), with its own question; the same as KVComm on those swapped items."""
    from dataclasses import replace

    m = make("tiny-llama-64", selection="range", layer_from=1, layer_to=2, control="other_item")
    assert all(p.error and "control other_item needs" in p.error for p in m.run_batch(examples[:2]))
    m.set_task_items(examples)
    order = sorted(examples, key=lambda e: (len(e.prompt_A), e.example_id))
    donor = {e.example_id: order[(i + 1) % len(order)] for i, e in enumerate(order)}
    assert all(donor[e.example_id].example_id != e.example_id for e in examples)
    got = m.run_batch(examples)
    ref = make("tiny-llama-64", selection="range", layer_from=1, layer_to=2).run_batch(
        [replace(e, prompt_A=donor[e.example_id].prompt_A) for e in examples]
    )
    assert [p.answer for p in got] == [p.answer for p in ref]
    assert [p.payload_bytes for p in got] == [p.payload_bytes for p in ref]
    assert [p.answer for p in m.run_batch(examples[3:])] == [
        p.answer for p in got[3:]
    ]  # batch-independent
    with pytest.raises(ValueError, match="control: 'noise' is not one of"):
        make("tiny-llama-64", control="noise")
