"""Several senders (the public com_ms.py): each reads half of the supporting facts and B reads both.

KVComm's receiver cache is checked against a plain transformers forward built independently: A1's
context at positions 0.., A2's at the positions after it (not seeing A1), B after both. NLD and CIPHER
are checked on what B reads and on the bytes, and every method batched against one item at a time."""

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from cross_model.data import load_task_examples
from cross_model.data.base import sender_count
from cross_model.generation import greedy_generate
from cross_model.kv_layout import layout_forward
from cross_model.kv_wire import payload_size
from cross_model.methods.base import ModelPair
from cross_model.methods.cipher import vector_generate
from cross_model.methods.debate import ANOTHER, OTHERS, PREVIOUS, REVISE, first_sender_text
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model
from cross_model.prompting import (
    chat_wrap,
    encode_texts,
    receiver_text,
    recording_prompts,
    sender_text,
    tokenize_prompts,
)
from tests.public_receiver import public_receiver_logits
from tests.tolerance import assert_forward_close, assert_reordered_close, forward_budget

FIX = Path(__file__).parent / "fixtures"
ARCHS = ["tiny-llama-64", "tiny-qwen2-64", "tiny-gemma3-64"]


@pytest.fixture(scope="module")
def items():
    test, _ = load_task_examples("hotpotqa_ms", 3, 0, path=str(FIX / "hotpotqa.jsonl"))
    assert sender_count(test) == 2
    return test


def make(name, arch="tiny-llama-64", **params):
    lm = load_model(arch)
    cls, p = resolve_method(name, params)
    return cls(p, ModelPair(lm, lm))


def reference_cache(lm, example):
    """[A1 | A2] by plain forwards: A2 at the positions after A1 and without A1 in its cache."""
    ids = [
        encode_texts(lm, [chat_wrap(lm, sender_text(example.as_sender(j)))])[0] for j in range(2)
    ]
    parts, start = [], 0
    with torch.inference_mode():
        for row in ids:
            c = DynamicCache()
            lm.model(
                input_ids=torch.tensor([row]),
                position_ids=torch.arange(start, start + len(row))[None],
                past_key_values=c,
                use_cache=True,
            )
            parts.append(c)
            start += len(row)
    joined = DynamicCache()
    for l in range(lm.info.num_layers):
        joined.update(
            torch.cat([c.layers[l].keys for c in parts], 2),
            torch.cat([c.layers[l].values for c in parts], 2),
            l,
        )
    return joined, start


@pytest.mark.float_sensitive
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "left-padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_kvcomm_all_layers_from_two_senders_equals_one_forward_over_both_contexts(
    arch, share_prefix, items
):
    m = make("kvcomm", arch, selection="all", share_prefix=share_prefix)
    lm = m.pair.receiver
    cache, layout, offset, _, _, _ = m.receiver_cache(items, set(range(lm.info.num_layers)))
    batch = tokenize_prompts(lm, [receiver_text(e) for e in items])
    pos = offset[:, None] + (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        got = layout_forward(lm, layout, all_logits=True)(
            cache=cache,
            full_mask_BT=batch.attention_mask,
            position_ids_BT=pos,
            input_ids_BT=batch.input_ids,
        )
    for i, e in enumerate(items):
        ref_cache, n_a = reference_cache(lm, e)
        assert int(offset[i]) == n_a  # B's positions continue after both contexts
        b_ids = encode_texts(lm, [chat_wrap(lm, receiver_text(e))])[0]
        with torch.inference_mode():
            ref = lm.model(
                input_ids=torch.tensor([b_ids]),
                position_ids=torch.arange(n_a, n_a + len(b_ids))[None],
                past_key_values=ref_cache,
                attention_mask=torch.ones((1, n_a + len(b_ids)), dtype=torch.long),
                use_cache=True,
            ).logits[0]
        assert_forward_close(got[i, -len(b_ids) :], ref, lm, n_a + len(b_ids))


def test_kvcomm_two_senders_answers_as_greedy_decoding_from_the_reference_cache(items):
    m = make("kvcomm", selection="all", max_new_tokens=6)
    preds = m.run_batch(items)
    lm = m.pair.receiver
    for p, e in zip(preds, items):
        cache, n_a = reference_cache(lm, e)
        b_ids = torch.tensor([encode_texts(lm, [chat_wrap(lm, receiver_text(e))])[0]])
        ref = greedy_generate(
            lm,
            b_ids,
            torch.ones_like(b_ids),
            6,
            cache=cache,
            past_mask_BP=torch.ones((1, n_a), dtype=torch.long),
            position_offset_B=torch.tensor([n_a]),
        )
        assert p.error is None and p.answer == ref.texts[0]


@pytest.mark.float_sensitive
@pytest.mark.parametrize("selected", [set(), {1, 3}])
def test_kvcomm_two_senders_stay_causal_and_count_both_payloads(selected, items):
    m = make(
        "kvcomm", selection="layers", layers_list=[3], always_send_layer0=False, max_new_tokens=4
    )
    lm = m.pair.receiver
    batch = tokenize_prompts(lm, [receiver_text(e) for e in items])
    changed = batch.input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % lm.info.vocab_size
    out = []
    for ids in (batch.input_ids, changed):
        cache, layout, offset, _, _, _ = m.receiver_cache(items, selected)
        pos = offset[:, None] + (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out.append(
                layout_forward(lm, layout, all_logits=True)(
                    cache=cache,
                    full_mask_BT=batch.attention_mask,
                    position_ids_BT=pos,
                    input_ids_BT=ids,
                )
            )
    assert_forward_close(
        out[1][:, :-1], out[0][:, :-1], lm, out[0].shape[1] + layout.key_pos[0].shape[1]
    )
    # Both senders' sinks sit in every unsent layer: two keys per row, at positions 0 and n1.
    if not selected:
        assert layout.key_pos[0].shape[1] == 2 + batch.input_ids.shape[1]
    preds = m.run_batch(items)
    for p, e in zip(preds, items):
        n = [
            len(encode_texts(lm, [chat_wrap(lm, sender_text(e.as_sender(j)))])[0]) for j in range(2)
        ]
        assert p.extra["bytes_per_sender"] == [m.payload_bytes(k, {3}) for k in n]
        assert p.payload_bytes == sum(
            p.extra["bytes_per_sender"]
        ) and p.sender_prefill_tokens == sum(n)
        assert p.extra["text_bytes"] == sum(len(c.encode()) for c in e.contexts)


def receiver_prompt_logits(m, items, selected):
    lm = m.pair.receiver
    cache, layout, offset, _, _, _ = m.receiver_cache(items, selected)
    batch = tokenize_prompts(lm, [receiver_text(e) for e in items])
    pos = offset[:, None] + (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return layout_forward(lm, layout, all_logits=True)(
            cache=cache,
            full_mask_BT=batch.attention_mask,
            position_ids_BT=pos,
            input_ids_BT=batch.input_ids,
        ), layout


@pytest.mark.float_sensitive
@pytest.mark.parametrize("selected", [{0, 2}, {0}, {0, 1, 2, 3}])
def test_public_multi_sender_cache_reproduces_the_public_two_sender_receiver(selected, items):
    """multi_sender_cache public with the public receiver mask equals com_ms.py's receiver rebuilt from
    transformers: A2 prefilled from position 0, only A1's sink in unsent layers, B after N1 + N2. Our
    ordered rule differs from it (A2's keys sit at other positions); batched equals one at a time."""
    lm = load_model("tiny-llama-64")
    kw = dict(selection="layers", layers_list=sorted(selected), receiver_mask="public")
    public = make("kvcomm", **kw, multi_sender_cache="public")
    ordered = make("kvcomm", **kw)
    got, layout = receiver_prompt_logits(public, items, selected)
    got_ordered, _ = receiver_prompt_logits(ordered, items, selected)
    for i, e in enumerate(items):
        senders = [
            encode_texts(lm, [chat_wrap(lm, sender_text(e.as_sender(j)))])[0] for j in range(2)
        ]
        b_ids = encode_texts(lm, [chat_wrap(lm, receiver_text(e))])[0]
        ref = public_receiver_logits(senders, b_ids, selected)
        n = sum(map(len, senders)) + len(b_ids)
        assert_forward_close(got[i, -len(b_ids) :], ref, lm, n)
        assert (got_ordered[i, -len(b_ids) :] - ref).abs().max() > 1e-3
        alone, _ = receiver_prompt_logits(public, [e], selected)
        assert_forward_close(alone[0, -len(b_ids) :], ref, lm, n)
    if len(selected) < 4:  # an unsent layer holds one key per row (A1's sink) before B's tokens
        unsent = min(set(range(4)) - selected)
        assert layout.key_src[unsent].shape[1] == 1 + got.shape[1]


def test_public_multi_sender_cache_sends_only_the_first_senders_sinks(items):
    """The bytes follow what B reads: A2's payload carries its sent layers and no sink; the preset turns
    the rule on."""
    public = make(
        "kvcomm", selection="layers", layers_list=[2], multi_sender_cache="public", max_new_tokens=2
    )
    ordered = make("kvcomm", selection="layers", layers_list=[2], max_new_tokens=2)
    lm = public.pair.receiver
    for p, q, e in zip(public.run_batch(items), ordered.run_batch(items), items):
        n = [
            len(encode_texts(lm, [chat_wrap(lm, sender_text(e.as_sender(j)))])[0]) for j in range(2)
        ]
        assert p.extra["bytes_per_sender"][0] == q.extra["bytes_per_sender"][0]
        no_sinks = public.wire_payload({0, 2}, n[1], side=public.sender_side(1))
        assert no_sinks.sink_layers == [] and p.extra["bytes_per_sender"][1] == payload_size(
            no_sinks.header()
        )
        assert p.extra["bytes_per_sender"][1] < q.extra["bytes_per_sender"][1]
    from cross_model.methods.kvcomm import KVComm

    assert KVComm.public_settings["multi_sender_cache"] == "public"


@pytest.mark.parametrize(
    "name,params",
    [
        ("kvcomm", {"selection": "layers", "layers_list": [2]}),
        ("qkvcomm", {"selection": "all", "bits": 4}),
        ("nld", {"rounds": 2, "nld_max_tokens": 4}),
        ("cipher", {"rounds": 2, "nld_max_tokens": 4}),
    ],
)
def test_two_senders_batched_equals_one_item_at_a_time(name, params, items):
    m = make(name, max_new_tokens=4, **params)
    batched = m.run_batch(items)
    single = [m.run_batch([e])[0] for e in items]
    for b, s in zip(batched, single):
        assert b.error is None and (b.answer, b.payload_bytes) == (s.answer, s.payload_bytes)
        assert b.sender_prefill_tokens == s.sender_prefill_tokens


def test_qkvcomm_two_senders_bytes_add_and_ratios_are_of_the_sums(items):
    m = make("qkvcomm", selection="all", bits=4, max_new_tokens=2)
    two = m.run_batch(items)
    for p, e in zip(two, items):
        alone = [
            m.run_batch([e.as_sender(j)])[0] for j in range(2)
        ]  # each sender's payload on its own
        assert p.extra["bytes_per_sender"] == [a.payload_bytes for a in alone]
        assert p.payload_bytes == sum(a.payload_bytes for a in alone)
        bf16 = sum(a.extra["bf16_bytes"] for a in alone)
        assert p.extra["compression_vs_bf16"] == round(bf16 / p.payload_bytes, 3)


def test_nld_receiver_hears_both_senders_and_each_sender_reads_only_its_half(items):
    m = make("nld", rounds=2, nld_max_tokens=4, max_new_tokens=3)
    e = items[0]
    with recording_prompts() as log:
        (p,) = m.run_batch([e])
    texts = [r["text"] for r in log]
    # In order: the two senders' first prompts, B's first, B's refinement, the senders' refinements, B's last.
    assert len(texts) == 7
    for j, other in ((0, 1), (1, 0)):
        assert e.contexts[j] in texts[j] and e.contexts[other] not in texts[j]
        assert e.contexts[j] in texts[4 + j] and e.contexts[other] not in texts[4 + j]
    assert not any(c in t for c in e.contexts for t in (texts[2], texts[3], texts[6]))

    def heard(text):
        """The messages quoted in a refinement prompt: one "Another agent's answer" block each."""
        return text.split(PREVIOUS, 1)[1].split(REVISE, 1)[0].split(ANOTHER)[1:]

    # B hears both senders, each in its own block (the public com_ms.py's template), sender 1 first;
    # the bytes are all four messages'.
    first, last = heard(texts[3]), heard(texts[6])
    assert len(first) == len(last) == 2 and OTHERS not in texts[3]
    assert "\n".join(last) == p.extra["sender_message"]
    assert p.payload_bytes == sum(len(m.encode()) for m in first + last)
    # A sender's refinement quotes B's answer, then the other sender's first message, a block each.
    assert heard(texts[4])[1] == first[1] and heard(texts[5])[1] == first[0]


def test_cipher_two_senders_send_each_senders_own_vectors(items):
    m = make("cipher", nld_max_tokens=5, max_new_tokens=2)
    preds = m.run_batch(items)
    a = m.pair.sender
    for p, e in zip(preds, items):
        counts = []
        for j in range(2):
            pre = m.prefill(a, [first_sender_text(e.as_sender(j), m.params)])
            vecs, _ = vector_generate(a, None, None, 5, 1.0, start=pre)
            counts.append(vecs[0].shape[0])
        assert p.extra["vectors_per_sender"] == counts
        assert p.payload_bytes == sum(counts) * a.info.hidden_size * 4  # fp32 vectors


def test_cipher_refinement_puts_each_senders_vectors_in_its_own_block():
    """B's refinement prompt with two senders: its own vectors, then each sender's under its own
    "Another agent's answer" header, in order; with one sender, the one "Other agents' answers" block."""
    m = make("cipher")
    b = m.pair.receiver
    d = b.info.hidden_size
    own, v1, v2 = (torch.full((k, d), float(x)) for k, x in ((2, 7.0), (3, 8.0), (1, 9.0)))
    head, rest = m._refinement_parts(b, "Q?", own, [v1, v2])
    assert PREVIOUS.strip() in b.tokenizer.decode(head)
    table = b.model.get_input_embeddings().weight
    rows = [int(i) for i in range(rest.shape[0])]
    marked = {x: [r for r in rows if torch.all(rest[r] == x)] for x in (7.0, 8.0, 9.0)}
    assert [len(marked[x]) for x in (7.0, 8.0, 9.0)] == [2, 3, 1]
    assert (
        marked[7.0] == [0, 1]
        and marked[7.0][-1] < marked[8.0][0]
        and marked[8.0][-1] < marked[9.0][0]
    )

    def words(
        part: torch.Tensor, lo: int, hi: int
    ) -> str:  # embedded text read back as its token ids
        ids = [int((table == part[r].to(table.dtype)).all(-1).nonzero()[0]) for r in range(lo, hi)]
        return b.tokenizer.decode(ids)

    assert words(rest, 2, marked[8.0][0]).strip() == ANOTHER.strip()
    assert words(rest, marked[8.0][-1] + 1, marked[9.0][0]).strip() == ANOTHER.strip()
    assert REVISE.strip() in words(rest, marked[9.0][0] + 1, rest.shape[0])
    _, single = m._refinement_parts(b, "Q?", own, [v1])
    first_v1 = next(r for r in range(single.shape[0]) if torch.all(single[r] == 8.0))
    assert words(single, 2, first_v1).strip() == OTHERS.strip()


def test_the_fact_side_channel_and_the_other_item_control_refuse_two_senders():
    assert make("kvcomm", selection="all").multi_sender
    assert not make("kvcomm", selection="all", facts=True).multi_sender
    assert not make("kvcomm", selection="all", control="other_item").multi_sender
    assert not make("qkvcomm", selection="all", target_bits=4.0).multi_sender
    assert not make("ac", k=1, j=1).multi_sender


@pytest.mark.float_sensitive
def test_senders_of_different_models_each_run_their_own(items):
    """`senders: [A1, A2]` with two models: each sender's part is what that model alone sends, and B's
    cache holds A1's part then A2's (KVComm equals the reference built from the two models)."""
    a2 = load_model("tiny-qwen2-64")  # tiny-llama-64's KV shape (2 x 16), other weights
    m = make("kvcomm", selection="all")
    a1 = m.pair.sender
    m.pair.more_senders = [a2]
    m.check_pair()
    cache, layout, offset, _, sizes, extras = m.receiver_cache(items, set(range(4)))
    assert m.pair.sender is a1  # restored after the senders' turns
    for i, e in enumerate(items):
        n1 = len(encode_texts(a1, [chat_wrap(a1, sender_text(e.as_sender(0)))])[0])
        ids2 = encode_texts(a2, [chat_wrap(a2, sender_text(e.as_sender(1)))])[0]
        with torch.inference_mode():
            c2 = DynamicCache()
            a2.model(
                input_ids=torch.tensor([ids2]),
                position_ids=torch.arange(n1, n1 + len(ids2))[None],
                past_key_values=c2,
                use_cache=True,
            )
        got = cache.layers[2].keys[i][:, -len(ids2) :]  # A2's part of layer 2, right after A1's
        # layer 2's keys come out of the two layers below it
        assert_reordered_close(
            got, c2.layers[2].keys[0], **dict(forward_budget(a2, n1 + len(ids2)), depth=3)
        )
        assert extras[i]["bytes_per_sender"] == [
            m.payload_bytes(n1, set(range(4))),
            m.payload_bytes(len(ids2), set(range(4))),
        ]
    nld = make("nld", nld_max_tokens=4, max_new_tokens=3)
    nld.pair.more_senders = [a2]
    with recording_prompts() as log:
        nld.run_batch(items[:1])
    # each sender prompts its own model
    assert [r["model"] for r in log[:2]] == [
        nld.pair.sender.info.name,
        a2.info.name,
    ] and a1.info.name != a2.info.name
    cipher = make("cipher", nld_max_tokens=4, max_new_tokens=2)
    cipher.pair.more_senders = [a2]
    (p,) = cipher.run_batch(items[:1])
    pre = cipher.prefill(a2, [first_sender_text(items[0].as_sender(1), cipher.params)])
    assert (
        p.extra["vectors_per_sender"][1]
        == vector_generate(a2, None, None, 4, 1.0, start=pre)[0][0].shape[0]
    )


def test_the_two_hop_task_needs_both_senders_and_its_items_do_not_move_with_the_sizes():
    """countries_two_hop: A1 names the person and their landmark but no country; A2 names the landmark's
    country (among three of different countries) but no person; only together do they answer. An item
    is the same whatever n_test and n_calib a run asks for, and the two splits never share one."""
    from cross_model.data.synthetic import COUNTRY_NAMES, LANDMARKS, PEOPLE

    test, calib = load_task_examples("countries_two_hop", 40, 8)
    assert sender_count(test + calib) == 2
    for e in test + calib:
        a1, a2 = e.contexts
        person, landmark = e.meta["person"], e.meta["landmark"]
        assert f"{person} is at the {landmark}." in a1 and not any(c in a1 for c in COUNTRY_NAMES)
        assert f"The {landmark} is in {e.answers[0]}." in a2 and not any(
            p in a2.split() for p in PEOPLE
        )
        assert e.answers == (LANDMARKS[landmark],) and person in e.prompt_B
        named = [LANDMARKS[x] for x in LANDMARKS if f"The {x} is in" in a2]
        assert (
            len(named) == len(set(named)) == 3
        )  # three landmarks, three countries: no lucky guess
        other = [p for p in PEOPLE if p != person and f"{p} is at the" in a1]
        assert len(other) == 1
    small, small_calib = load_task_examples("countries_two_hop", 3, 2)
    assert [(x.example_id, x.contexts, x.prompt_B) for x in small] == [
        (x.example_id, x.contexts, x.prompt_B) for x in test[:3]
    ]
    assert {x.contexts for x in small_calib} <= {x.contexts for x in calib}
    assert not {x.contexts for x in test} & {x.contexts for x in calib}
    with pytest.raises(ValueError, match="reads no file"):
        load_task_examples("countries_two_hop", 3, 0, path="x.jsonl")
