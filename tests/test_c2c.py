"""C2C's fuser as thu-nics/C2C computes it: the fusion formula against a reference written from C2C's
description; a closed gate is the receiver alone; the released checkpoint format (its file layout and
C2C's parameter names) loads, and what does not fit is refused; the content control; training opens
the gates where fusion lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cross_model.c2c.align import token_spans
from cross_model.c2c.fuser import LayerFuser, is_released, read_released, write_released
from cross_model.c2c.fusion import fused_cache, relative_alignment, shared_input, split_prompt
from cross_model.c2c.projector import model_record
from cross_model.c2c.train_fuser import FuserLoss
from cross_model.c2c.train_projector import CLOSED, HARD, Mode, fit_projector, identity_of
from cross_model.data import load_task_examples
from cross_model.methods.base import ModelPair
from cross_model.methods.c2c import shared_prompts
from cross_model.methods.learned_cache import FUSER_KEYS
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model
from cross_model.prompting import chat_wrap, encode_texts, pad_left, receiver_text
from tests.tolerance import assert_reordered_close, forward_budget

SMALL = {"hidden_dim": 16, "intermediate_dim": 24, "num_layers": 3}
A, B = "tiny-gemma3-64", "tiny-llama-48"


@pytest.fixture(scope="module")
def examples():
    return load_task_examples("countries", 5, 0, seed=3)[0]


def make(a=A, b=B, **params):
    sender, receiver = load_model(a), load_model(b)
    cls, p = resolve_method("c2c", {**SMALL, **params})
    return cls(p, ModelPair(sender, receiver))


def open_all(fuser, key=True, value=True):
    with torch.no_grad():
        for f in fuser.fusers:
            f.key_gate_logit.fill_(1.0 if key else -1.0)
            f.value_gate_logit.fill_(1.0 if value else -1.0)


def reference_fuse(f: LayerFuser, kind: str, src, tgt, gate):
    """C2C's C2CProjector.forward for one kind, written out from its parameters."""
    p = dict(f.named_parameters())

    def ffn(x, prefix, depth):
        for i in range(depth):
            h = F.rms_norm(x, (x.shape[-1],), p[f"{prefix}.blocks.{i}.norm.weight"], eps=1e-6)
            x = x + F.linear(
                F.gelu(F.linear(h, p[f"{prefix}.blocks.{i}.w1.weight"])),
                p[f"{prefix}.blocks.{i}.w2.weight"],
            )
        return x

    b, h, n, d = tgt.shape
    x = torch.cat([src, tgt.transpose(1, 2).reshape(b, n, h * d)], -1)
    hid = ffn(F.linear(x, p[f"{kind}_in.weight"], p[f"{kind}_in.bias"]), f"{kind}_mlp1", 1)
    proj = (
        F.linear(
            ffn(hid, f"{kind}_proj_mlp2", f.init_args["num_layers"] - 2),
            p[f"{kind}_proj_out.weight"],
            p[f"{kind}_proj_out.bias"],
        )
        .view(b, n, h, d)
        .transpose(1, 2)
    )
    w = torch.sigmoid(
        F.linear(
            ffn(hid, f"{kind}_scalar_mlp2", 1),
            p[f"{kind}_scalar_head.weight"],
            p[f"{kind}_scalar_head.bias"],
        )
    ).permute(0, 2, 1)[..., None]
    return tgt + gate * w * proj


@pytest.mark.float_sensitive
def test_the_fusion_formula_is_c2cs():
    torch.manual_seed(0)
    f = LayerFuser(8, 6, 2, 3, intermediate_dim=12, hidden_dim=10, num_layers=4, dropout=0.0).eval()
    for prm in f.parameters():  # C2C's init leaves nothing at zero; neither do we here
        torch.nn.init.normal_(prm, std=0.3)
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 3, 5, 6)
    for kind in ("key", "value"):
        with torch.no_grad():
            getattr(f, f"{kind}_gate_logit").fill_(0.7)
            # in-projection, num_layers FFN blocks and the two heads, each at most 16 wide
            fuser = {"terms": 16, "depth": 4 + 2}
            assert_reordered_close(
                f.fuse(kind, src, tgt), reference_fuse(f, kind, src, tgt, 1.0), **fuser
            )
            getattr(f, f"{kind}_gate_logit").fill_(-0.2)
            assert torch.equal(
                f.fuse(kind, src, tgt), tgt
            )  # a closed hard gate: B's own tensor, exactly
            u = torch.rand(2, 3, 5, 1)
            gate = torch.sigmoid((-0.2 - torch.log(-torch.log(u + 1e-20) + 1e-20)) / 0.5)
            assert_reordered_close(
                f.fuse(kind, src, tgt, u, 0.5), reference_fuse(f, kind, src, tgt, gate), **fuser
            )
    # the temperature anneals geometrically from the first to the last value over anneal_steps
    g = LayerFuser(
        2,
        2,
        1,
        1,
        hidden_dim=4,
        intermediate_dim=4,
        initial_temperature=1.0,
        final_temperature=0.001,
        anneal_steps=10,
    )
    assert [g.temperature_at(s) for s in (0, 5, 10, 20)] == pytest.approx(
        [1.0, 0.001**0.5, 0.001, 0.001]
    )


@pytest.mark.parametrize("receiver", [B, "tiny-qwen2-64", "tiny-gemma3-64"])
def test_a_closed_gate_is_the_receiver_alone(examples, receiver):
    """Untrained gates (logit 0) are closed: B's cache is its own, bit for bit, A never runs, nothing
    crosses, and B answers as the baseline does (its prompt read in one pass there; Gemma-3 with its
    sliding-window layers)."""
    m = make(b=receiver, projector="train", max_new_tokens=6)
    base_cls, base_p = resolve_method("baseline", {"max_new_tokens": 6})
    base = base_cls(base_p, m.pair)
    got, want = m.run_batch(examples), base.run_batch(examples)
    assert [p.answer for p in got] == [p.answer for p in want]
    assert all(
        p.payload_bytes == 0 and p.sender_prefill_tokens == 0 and p.extra["layers"] == []
        for p in got
    )
    a, b = m.pair.sender, m.pair.receiver
    inp = shared_input(a, b, shared_prompts(a, b, examples, "receiver", None, "c2c")[0])
    with torch.inference_mode():
        closed = fused_cache(m.fuser, a, b, inp, list(range(b.info.num_layers)))
        plain = fused_cache(m.fuser, a, b, inp, [])
    for l in range(b.info.num_layers):
        assert torch.equal(closed.layers[l].keys, plain.layers[l].keys)
        assert torch.equal(closed.layers[l].values, plain.layers[l].values)


def test_open_gates_fuse_every_layer_and_count_as_cache_as_bytes(examples):
    m = make(projector="train", gates="open", max_new_tokens=3)
    a, b = m.pair.sender, m.pair.receiver
    got = m.run_batch(examples[:2])
    partners = m.fuser.partners
    assert (
        len(partners) == b.info.num_layers and partners[-1] == a.info.num_layers - 1
    )  # last layers meet
    for p, e in zip(got, examples[:2]):
        assert p.error is None and p.extra["layers"] == list(range(b.info.num_layers))
        assert p.extra["sender_layers"] == sorted(set(partners))
        per_token = (
            2 * len(set(partners)) * a.info.num_kv_heads * a.info.head_dim * 4
        )  # fp32 keys and values
        assert p.payload_bytes >= p.sender_prefill_tokens * per_token
    inp = shared_input(a, b, shared_prompts(a, b, examples[:2], "receiver", None, "c2c")[0])
    open_all(m.fuser, key=False, value=True)  # only values: keys stay B's own, values change
    with torch.inference_mode():
        half = fused_cache(m.fuser, a, b, inp, [0])
        plain = fused_cache(m.fuser, a, b, inp, [])
    assert torch.equal(half.layers[0].keys, plain.layers[0].keys)
    assert not torch.equal(half.layers[0].values, plain.layers[0].values)
    assert m.fuser.open_layers() == list(range(b.info.num_layers))


def test_a_released_c2c_checkpoint_loads_and_one_for_another_pair_is_refused(tmp_path, examples):
    """A fixture written in C2C's format (projector_{i}.json with the class and its init arguments,
    projector_{i}.pt with C2C's parameter names, projector_config.json mapping receiver layers to
    sender layers) loads into the same fuser and answers as it."""
    m = make(projector="train", max_new_tokens=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for prm in m.fuser.parameters():
            prm.normal_(std=0.2)
    open_all(m.fuser)
    with torch.no_grad():
        m.fuser.fusers[2].key_gate_logit.fill_(-1.0)
    out = write_released(m.fuser, tmp_path / "released")
    assert is_released(out)
    names = set(torch.load(out / "projector_0.pt", weights_only=True))
    c2c_names = {
        f"{k}_{part}"
        for k in ("key", "value")
        for part in (
            "in.weight",
            "in.bias",
            "mlp1.blocks.0.norm.weight",
            "mlp1.blocks.0.w1.weight",
            "mlp1.blocks.0.w2.weight",
            "scalar_mlp2.blocks.0.norm.weight",
            "scalar_mlp2.blocks.0.w1.weight",
            "scalar_mlp2.blocks.0.w2.weight",
            "scalar_head.weight",
            "scalar_head.bias",
            "proj_mlp2.blocks.0.norm.weight",
            "proj_mlp2.blocks.0.w1.weight",
            "proj_mlp2.blocks.0.w2.weight",
            "proj_out.weight",
            "proj_out.bias",
            "gate_logit",
        )
    } | {"gate_temperature"}
    assert names == c2c_names
    spec = json.loads((out / "projector_0.json").read_text())
    assert spec["init_args"]["source_num_heads"] == m.pair.sender.info.num_kv_heads
    mapping = json.loads((out / "projector_config.json").read_text())
    assert mapping["0"]["1"]["0"] == [[m.fuser.partners[0], 0]]
    loaded = make(projector=str(out), max_new_tokens=4)
    assert (
        loaded.fuser.partners == m.fuser.partners
        and loaded.fuser.open_layers() == m.fuser.open_layers()
    )
    for (k, v), (k2, v2) in zip(m.fuser.state_dict().items(), loaded.fuser.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert [p.answer for p in loaded.run_batch(examples)] == [
        p.answer for p in m.run_batch(examples)
    ]
    with pytest.raises(ValueError, match="made for another pair.*target_num_heads"):
        read_released(
            out, model_record(m.pair.sender), {**model_record(m.pair.receiver), "num_kv_heads": 5}
        )
    (out / "projector_0.json").write_text(json.dumps({**spec, "model_name": "AllInOneProjector"}))
    with pytest.raises(ValueError, match="only C2C's C2CProjector"):
        make(projector=str(out))
    (out / "projector_0.json").write_text(json.dumps(spec))
    torch.save({"key_in.weight": torch.zeros(1)}, out / "projector_1.pt")
    with pytest.raises(ValueError, match="does not fit C2C's C2CProjector"):
        make(projector=str(out))


def test_the_content_control_reads_the_donors_prompt_at_the_same_relative_places(examples):
    assert relative_alignment([[0], [1], [2]], 3) == [[0], [1], [2]]
    assert relative_alignment([[0], [1], [2], [3], [4]], 3) == [[0], [2], [4]]
    assert relative_alignment([[0], [1]], 4) == [[0], [0], [1], [1]]
    m = make(projector="train", gates="open", control="other_item", max_new_tokens=2)
    m.set_task_items(examples)
    plain = make(projector="train", gates="open", max_new_tokens=2)
    got, own = m.run_batch(examples), plain.run_batch(examples)
    a = m.pair.sender
    for p, e in zip(got, examples):
        donor = m.donors[e.example_id]
        held = split_prompt(m.pair.receiver, chat_wrap(m.pair.receiver, receiver_text(donor)))
        assert p.sender_prefill_tokens == len(
            token_spans(a, held.text)[0]
        )  # A read the donor's prompt
    assert [p.sender_prefill_tokens for p in got] != [p.sender_prefill_tokens for p in own]
    assert [p.receiver_prefill_tokens for p in got] == [
        p.receiver_prefill_tokens for p in own
    ]  # B its own


def _params(**extra):
    return resolve_method(
        "c2c",
        {
            **SMALL,
            "dropout": 0.0,
            "steps": 16,
            "n_train": 16,
            "n_heldout": 4,
            "batch_size_train": 4,
            "target_tokens": 4,
            "lr": 3e-3,
            "checkpoint_every": 8,
            "tau_end": 0.05,
            **extra,
        },
    )[1]


@pytest.mark.float_sensitive
def test_every_gate_closed_is_b_reading_its_prompt_and_target_in_one_pass(examples):
    a, b = load_model(A), load_model(B)
    p = _params()
    from cross_model.c2c.fuser import new_fuser

    net = FuserLoss(new_fuser(p, a, b), a, b, p)
    targets = [[5, 6, 7], [8, 9]]
    with torch.no_grad():
        got = net(examples[:2], targets, CLOSED)
        prompts = encode_texts(b, [chat_wrap(b, receiver_text(e)) for e in examples[:2]])
        batch = pad_left(
            [q + t for q, t in zip(prompts, targets)], b.tokenizer.pad_token_id, b.device
        )
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = b.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
        ).logits
    width = batch.input_ids.shape[1]
    want = [
        F.cross_entropy(logits[i, width - len(t) - 1 : width - 1], torch.tensor(t))
        for i, t in enumerate(targets)
    ]
    budget = forward_budget(b, width)
    budget["terms"] = max(
        budget["terms"], b.info.vocab_size
    )  # the cross-entropy sums the vocabulary
    assert_reordered_close(got, torch.stack(want), **budget)


def test_training_opens_the_gates_where_fusion_lowers_the_loss(tmp_path):
    """A synthetic task where fusion helps: every row's gold answer is the same word, which B alone does
    not say. The gates start closed (logit 0); the trained fuser opens layers, and its held-out loss ends
    below B alone's on the same targets. Noise and dropout come from the seed, the step and the row, so
    the same run twice gives the same fuser."""
    from cross_model.c2c.fuser import new_fuser

    a, b = load_model(A), load_model(B)
    data = tmp_path / "rows.jsonl"
    contexts = [e.prompt_A for e in load_task_examples("countries", 20, 0, seed=11)[0]]
    data.write_text(
        "".join(
            json.dumps({"context": c, "question": "Say the word.", "answer": "Oslo"}) + "\n"
            for c in contexts
        )
    )
    outs = []
    for name in ("one", "again"):
        p = _params(data=str(data), target="gold", dropout=0.1)
        fuser = new_fuser(p, a, b)
        done = fit_projector(
            FuserLoss(fuser, a, b, p), b, p, identity_of(p, a, b, None, FUSER_KEYS), tmp_path / name
        )
        outs.append((fuser, done.meta))
    (fuser, meta), (again, _) = outs
    rows = load_task_examples("countries", 2, 0, seed=12)[0]
    first, last = meta["history"][0], meta["history"][-1]
    assert first["open_layers"] == 0 and last["open_layers"] > 0
    assert last["heldout_loss"] < last["heldout_loss_closed"] - 0.05
    assert all(
        torch.equal(x, y) for x, y in zip(fuser.state_dict().values(), again.state_dict().values())
    )
    net = FuserLoss(fuser, a, b, _params())
    with torch.no_grad():
        soft = net(rows, [[5, 6], [7, 8]], Mode("soft", 3, (0, 1)))
        soft_again = net(rows, [[5, 6], [7, 8]], Mode("soft", 3, (0, 1)))
        other_step = net(rows, [[5, 6], [7, 8]], Mode("soft", 4, (0, 1)))
        hard = net(rows, [[5, 6], [7, 8]], HARD)
    assert torch.equal(soft, soft_again)  # the gate noise is the seed's, the step's and the row's
    assert not torch.equal(soft, other_step) and hard.shape == (2,)
