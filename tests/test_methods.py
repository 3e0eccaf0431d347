"""Every method: batched equals unbatched, payloads follow the spec's formulas, impossible pairs refused.
AC and CIPHER invariants are checked against reference computations."""

import pytest
import torch

from cross_model.data import load_task_examples
from cross_model.generation import positions_from_mask
from cross_model.methods.ac import combine
from cross_model.methods.base import ModelPair
from cross_model.methods.cipher import vector_generate
from cross_model.methods.registry import available_methods, resolve_method
from cross_model.models import load_model
from cross_model.prompting import receiver_text, sender_text, tokenize_prompts
from cross_model.surgery import last_token, partial_forward, residual_edit
from tests.tolerance import assert_forward_close, assert_reordered_close, forward_budget

METHOD_PARAMS = {
    "baseline": {},
    "skyline": {},
    "nld": {"nld_max_tokens": 6, "rounds": 2},
    "cipher": {"nld_max_tokens": 6, "rounds": 2},
    "ac": {"k": 2, "j": 2, "mode": "sum"},
    "kvcomm": {"selection": "range", "layer_from": 1, "layer_to": 2},
    "qkvcomm": {"selection": "range", "layer_from": 1, "layer_to": 2, "bits": 3},
}


def make(method, a="tiny-llama-64", b=None, dtype=torch.float32, **params):
    lm_a = load_model(a, dtype=dtype)
    lm_b = lm_a if b is None else load_model(b, dtype=dtype)
    cls, p = resolve_method(method, {**METHOD_PARAMS.get(method, {}), **params})
    return cls(p, ModelPair(lm_a, lm_b))


@pytest.fixture(scope="module")
def examples():
    countries, _ = load_task_examples("countries", 3, 0, seed=11, max_new_tokens=5)
    tips, _ = load_task_examples("tipsheets", 3, 0, seed=11, max_new_tokens=5)
    return countries + tips  # mixed lengths


def test_registry_has_every_method():
    assert set(METHOD_PARAMS) <= set(available_methods())


@pytest.mark.parametrize("method", list(METHOD_PARAMS))
def test_batched_equals_unbatched(method, examples):
    # CIPHER feeds probability-weighted embeddings back in, which amplifies fp32 rounding differences
    # between batch shapes on random weights; in float64 only a real difference could show.
    m = make(method, dtype=torch.float64 if method == "cipher" else torch.float32)
    batched = m.run_batch(examples)
    single = [m.run_batch([e])[0] for e in examples]
    assert all(p.error is None for p in batched), batched[0].error
    assert [p.answer for p in batched] == [p.answer for p in single]
    assert [p.payload_bytes for p in batched] == [p.payload_bytes for p in single]
    assert [p.receiver_generated_tokens for p in batched] == [
        p.receiver_generated_tokens for p in single
    ]


def test_payload_formulas(examples):
    e = examples[:2]
    assert [p.payload_bytes for p in make("baseline").run_batch(e)] == [0, 0]
    assert [p.payload_bytes for p in make("skyline").run_batch(e)] == [
        len(x.prompt_A.encode()) for x in e
    ]
    nld = make("nld", rounds=1).run_batch(e)
    assert [p.payload_bytes for p in nld] == [len(p.extra["sender_message"].encode()) for p in nld]
    cipher = make("cipher", rounds=1).run_batch(e)
    assert [p.payload_bytes for p in cipher] == [p.extra["sender_vectors"] * 64 * 4 for p in cipher]
    assert all(p.extra["sender_vectors"] > 0 for p in cipher)
    assert [p.payload_bytes for p in make("ac").run_batch(e)] == [64 * 4] * 2  # d_A x fp32
    ac48 = make("ac", "tiny-llama-48", "tiny-llama-64", k=3, j=1).run_batch(e)
    assert [p.payload_bytes for p in ac48] == [48 * 4] * 2  # sent before any projection


@pytest.mark.float_sensitive
def test_ac_replace_same_prompt_same_layer_is_identity(examples):
    """A = B, B reads A's prompt, replace at k = j: B's own vector comes back, so B's output is B alone."""
    m = make("ac", mode="replace", k=2, j=2)
    lm = m.pair.receiver
    batch = tokenize_prompts(lm, [receiver_text(x) for x in examples])
    a_vec = last_token(
        partial_forward(lm, batch.input_ids, batch.attention_mask, 2), batch.attention_mask
    )
    pos = positions_from_mask(batch.attention_mask)
    with torch.inference_mode():
        plain = lm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
        ).logits[:, -1]
        with residual_edit(lm, 2, lambda b: combine("replace", a_vec, b)) as rec:
            edited = lm.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
            ).logits[:, -1]
    seq = batch.input_ids.shape[1]
    assert_reordered_close(rec["before"], a_vec, **forward_budget(lm, seq, layers=2))
    assert_forward_close(edited, plain, lm, seq)
    # an identity projection W = I changes nothing either
    from cross_model.projection import LearnedProjection

    proj = LearnedProjection(64, 64).requires_grad_(False)
    proj.linear.weight.copy_(torch.eye(64))
    with torch.inference_mode(), residual_edit(lm, 2, lambda b: combine("replace", proj(a_vec), b)):
        projected = lm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
        ).logits[:, -1]
    assert_forward_close(projected, plain, lm, seq)


@pytest.mark.float_sensitive
def test_ac_sum_doubles_the_vector_and_mean_keeps_it(examples):
    m = make("ac", k=2, j=2)
    lm = m.pair.receiver
    batch = tokenize_prompts(lm, [receiver_text(x) for x in examples])
    a_vec = last_token(
        partial_forward(lm, batch.input_ids, batch.attention_mask, 2), batch.attention_mask
    )
    pos = positions_from_mask(batch.attention_mask)
    for mode, factor in (("sum", 2.0), ("mean", 1.0)):
        with torch.inference_mode(), residual_edit(lm, 2, lambda b: combine(mode, a_vec, b)) as rec:
            lm.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
            )
        assert_reordered_close(
            rec["after"], factor * a_vec, **forward_budget(lm, batch.input_ids.shape[1], layers=2)
        )


def test_ac_slicing_rule_for_different_widths():
    a = torch.arange(48, dtype=torch.float32)[None] + 1000  # A narrower than B
    b = torch.arange(64, dtype=torch.float32)[None]
    out = combine("replace", a, b)
    assert torch.equal(out[0, :16], b[0, :16]) and torch.equal(out[0, 16:], a[0])
    out = combine("sum", a, b)
    assert torch.equal(out[0, 16:], b[0, 16:] + a[0])
    wide = torch.arange(80, dtype=torch.float32)[None] + 1000  # A wider than B: A's last 64 dims
    assert torch.equal(combine("replace", wide, b)[0], wide[0, 16:])
    assert torch.equal(combine("mean", wide, b)[0], (wide[0, 16:] + b[0]) / 2)


@pytest.mark.float_sensitive
def test_ac_edits_the_receiver_vector_through_the_method(examples):
    """End to end with a 48 -> 64 pair: the residual B sees at block j is the sliced combination."""
    m = make("ac", "tiny-llama-48", "tiny-llama-64", k=3, j=1, mode="replace")
    a_vec = m.sender_vectors(examples[:2])
    records = []
    real = residual_edit

    import cross_model.methods.ac as ac_mod

    def spy(lm, j, edit):
        ctx = real(lm, j, edit)
        rec = ctx.__enter__()
        records.append(rec)

        class Wrapper:
            def __enter__(self):
                return rec

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)

        return Wrapper()

    ac_mod.residual_edit = spy
    try:
        m.run_batch(examples[:2])
    finally:
        ac_mod.residual_edit = real
    rec = records[0]
    # run_batch prefills A again, in its own batch: A's first k = 3 blocks in another order of sums
    assert_reordered_close(
        rec["after"][:, 16:], a_vec, **forward_budget(m.pair.sender, 256, layers=3)
    )
    torch.testing.assert_close(rec["after"][:, :16], rec["before"][:, :16])


@pytest.mark.float_sensitive
def test_ac_random_control_sends_a_vector_of_the_same_norm_fixed_per_example(examples):
    """The control edits B with a random vector of A's norm, whatever the batch, and the same bytes."""
    import cross_model.methods.ac as ac_mod

    m = make("ac", "tiny-llama-48", "tiny-llama-64", k=3, j=1, mode="replace", control="random")
    plain = make("ac", "tiny-llama-48", "tiny-llama-64", k=3, j=1, mode="replace")
    a_vec = m.sender_vectors(examples[:3])
    records, real = [], ac_mod.residual_edit

    def spy(lm, j, edit):
        return real(lm, j, lambda b: records.append(edit(b)) or records[-1])

    ac_mod.residual_edit = spy
    try:
        preds = m.run_batch(examples[:3])
        m.run_batch(examples[1:2])  # the same example alone: records[1]
    finally:
        ac_mod.residual_edit = real
    sent = records[0][:, 16:]
    # Replace mode, 48 -> 64 wide: B's last 48 dims are the sent vector.
    budget = forward_budget(m.pair.sender, 256, layers=3)  # A's vector, prefilled in another batch
    assert_reordered_close(sent.norm(dim=-1), a_vec.norm(dim=-1), **budget)
    cos = torch.nn.functional.cosine_similarity(sent, a_vec, dim=-1)
    assert cos.abs().max() < 0.9  # not A's direction
    assert_reordered_close(
        records[1][:, 16:], sent[1:2], **budget
    )  # the same direction for the same example alone
    assert [p.payload_bytes for p in preds] == [
        p.payload_bytes for p in plain.run_batch(examples[:3])
    ]
    with pytest.raises(ValueError, match="control: 'noise' is not one of"):
        make("ac", control="noise")


def embedded(lm, texts):
    """Left-padded prompts as input embeddings (what the public CIPHER feeds its model)."""
    batch = tokenize_prompts(lm, texts)
    with torch.inference_mode():
        return lm.model.get_input_embeddings()(batch.input_ids), batch.attention_mask


@pytest.mark.float_sensitive
def test_cipher_cache_equals_recompute(examples):
    """In float64 the cached loop and the public code's full recomputation agree to rounding. (In fp32
    the soft feedback amplifies rounding noise step by step on these random models: 1e-7 at step 2,
    1e-2 by step 8; the float64 run shows that this is noise, not a different computation.) The
    tolerance follows from that, not from a machine: float64 rounds at 2.2e-16 and the feedback grows it
    about 1e5-fold over 8 steps (fp32's 1e-7 to 1e-2), which stays below 1e-10 whatever the kernel."""
    m = make("cipher", dtype=torch.float64, share_prefix=False)
    lm = m.pair.sender
    texts = [sender_text(e) for e in examples]
    emb, mask = embedded(lm, texts)
    cached, steps_c = vector_generate(lm, emb, mask, 8, 0.7)
    full, steps_f = vector_generate(lm, emb, mask, 8, 0.7, recompute=True)
    assert steps_c == steps_f and max(steps_c) > 1
    for c, f in zip(cached, full):
        torch.testing.assert_close(c, f, atol=1e-10, rtol=1e-10)
    # ... and so does the loop that continues a prefill, left-padded or with a cached shared prefix.
    shared = make("cipher", dtype=torch.float64)
    for method in (m, shared):
        start = method.prefill(lm, texts)
        assert (start.prefix_len >= 8) == (method is shared)
        continued, steps_p = vector_generate(lm, None, None, 8, 0.7, start=start)
        assert steps_p == steps_f
        for c, f in zip(continued, full):
            torch.testing.assert_close(c, f, atol=1e-10, rtol=1e-10)


@pytest.mark.float_sensitive
def test_cipher_vectors_batched_match_single(examples):
    m = make("cipher", dtype=torch.float64)
    lm = m.pair.sender
    batched, steps = vector_generate(
        lm, None, None, 6, 0.7, start=m.prefill(lm, [sender_text(e) for e in examples])
    )
    for i, e in enumerate(examples):
        single, steps1 = vector_generate(
            lm, None, None, 6, 0.7, start=m.prefill(lm, [sender_text(e)])
        )
        assert steps1[0] == steps[i]
        torch.testing.assert_close(
            batched[i], single[0], atol=1e-9, rtol=1e-9
        )  # as above: float64, feedback


def test_cipher_temperature_is_honoured(examples):
    m = make("cipher")
    lm = m.pair.sender
    start = m.prefill(lm, [sender_text(e) for e in examples[:2]])
    hot, _ = vector_generate(lm, None, None, 3, 5.0, start=start)
    cold, _ = vector_generate(
        lm, None, None, 3, 0.1, start=start
    )  # each run decodes from its own copy
    assert not torch.allclose(hot[0][0], cold[0][0])


def test_impossible_combinations_are_refused():
    with pytest.raises(ValueError, match="one vocabulary and one embedding width"):
        make("cipher", "tiny-llama-48", "tiny-llama-64")
    with pytest.raises(ValueError, match=r"methods.ac.k=9 is outside tiny-llama-64's depth"):
        make("ac", k=9, j=1)
    with pytest.raises(ValueError, match=r"methods.ac.j=4 is outside"):
        make("ac", k=1, j=4)
    with pytest.raises(ValueError, match="mode: 'max' is not one of"):
        make("ac", mode="max")


def test_a_failing_example_is_recorded_not_dropped(examples, monkeypatch, caplog):
    m = make("baseline")
    real = m._run_batch

    def flaky(batch):
        if any(e.example_id == examples[1].example_id for e in batch):
            raise RuntimeError("boom")
        return real(batch)

    monkeypatch.setattr(m, "_run_batch", flaky)
    preds = m.run_batch(examples)
    assert [p.example_id for p in preds] == [e.example_id for e in examples]
    assert preds[1].error and "boom" in preds[1].error and preds[1].answer == ""
    assert all(p.error is None for i, p in enumerate(preds) if i != 1)
    # the fallback is said (a batch too big for memory would otherwise just run slowly)
    assert (
        f"a batch of {len(examples)} failed (RuntimeError: boom); running its examples one at a time"
        in caplog.text
    )


def test_other_architectures_run(examples):
    for arch in ("tiny-qwen2-64", "tiny-gemma3-64"):
        for method in ("ac", "kvcomm", "cipher"):
            preds = make(method, arch).run_batch(examples[:2])
            assert all(p.error is None for p in preds), preds[0].error


def test_ac_with_a_projection_checkpoint_and_its_refusals(tmp_path, examples):
    from cross_model.projection import LearnedProjection, save_projection

    proj = LearnedProjection(48, 64, seed=0)
    meta = {
        "sender": "tiny-llama-48",
        "receiver": "tiny-llama-64",
        "k": 3,
        "j": 1,
        "d_in": 48,
        "d_out": 64,
    }
    save_projection(proj, tmp_path / "w", meta)
    m = make("ac", "tiny-llama-48", "tiny-llama-64", k=3, j=1, projection=str(tmp_path / "w"))
    torch.testing.assert_close(m.projection.linear.weight, proj.linear.weight)
    preds = m.run_batch(examples[:2])
    assert all(p.error is None for p in preds) and preds[0].payload_bytes == 48 * 4  # sent before W
    with pytest.raises(ValueError, match="k: checkpoint has 3, this run needs 2"):
        make("ac", "tiny-llama-48", "tiny-llama-64", k=2, j=1, projection=str(tmp_path / "w"))
    with pytest.raises(ValueError, match="sender: checkpoint has 'tiny-llama-48'"):
        make("ac", "tiny-llama-64", "tiny-llama-64", k=3, j=1, projection=str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="no projection"):
        make("ac", "tiny-llama-48", "tiny-llama-64", k=3, j=1, projection=str(tmp_path / "missing"))


@pytest.mark.parametrize("method", ["baseline", "skyline", "nld", "cipher", "ac"])
def test_shared_prefix_reuse_changes_no_answer(method, examples):
    """Prefilling the common prompt prefix once (cached, expanded over the batch) gives the answers of
    a full prefill, in float64 so that only a real difference in what each row sees could show."""
    from cross_model.prompt_prefix_cache import shared_prefix_length

    shared = make(method, dtype=torch.float64, share_prefix=True)
    full = make(method, dtype=torch.float64, share_prefix=False)
    a = [p.to_dict() for p in shared.run_batch(examples)]
    b = [p.to_dict() for p in full.run_batch(examples)]
    assert a == b
    assert shared.prefix_cache._entries, "the prefix cache was used"
    ids = [[1, 2, 3, 4], [1, 2, 3], [1, 2, 5, 6]]
    assert shared_prefix_length(ids) == 2 and shared_prefix_length([[1, 2], [1, 2]]) == 1


def test_methods_sharing_prefills_answer_as_they_do_alone(examples):
    """Baseline, NLD, CIPHER, AC and KVComm read the same prompts: with the prefill memo, the later
    ones reuse the earlier ones' prefills (AC's layer-k residual and KVComm's caches then come from a
    full forward), and every answer, payload and token count equals the method's own with the memo off."""
    from cross_model.prefill_memo import PrefillMemo

    lm = load_model("tiny-llama-64", dtype=torch.float64)  # one model, as the pipeline shares them
    methods = {}
    for n in ["baseline", "nld", "cipher", "ac", "kvcomm"]:
        cls, p = resolve_method(n, METHOD_PARAMS[n])
        methods[n] = cls(p, ModelPair(lm, lm))
    memo = PrefillMemo()
    shared = {
        n: [p.to_dict() for p in m.run_batch(examples, memo=memo)] for n, m in methods.items()
    }
    assert (
        memo.hits == 5
    )  # NLD's B (from the baseline); CIPHER's A and B, AC's A, KVComm's A (from NLD)
    off = PrefillMemo(0)
    alone = {n: [p.to_dict() for p in m.run_batch(examples, memo=off)] for n, m in methods.items()}
    assert off.hits == 0 and not off._entries
    assert shared == alone


@pytest.mark.float_sensitive
@pytest.mark.parametrize("k", [0, 2, 3])
def test_ac_sender_vector_is_hidden_state_k_of_a_plain_forward(examples, k):
    """A's vector is Hugging Face's hidden_states[k] at the last prompt token, whether A's prefill ran
    only to layer k or a full prefill of the same prompts was taken from the memo."""
    from cross_model.prefill_memo import PrefillMemo

    lm = load_model("tiny-llama-64", dtype=torch.float64)
    cls, p = resolve_method("ac", {"k": k, "j": 2})
    ac = cls(p, ModelPair(lm, lm))
    batch = tokenize_prompts(lm, [sender_text(e) for e in examples])
    with torch.inference_mode():
        ref = lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=positions_from_mask(batch.attention_mask),
            output_hidden_states=True,
        )
    expected = ref.hidden_states[k][:, -1]
    budget = forward_budget(lm, batch.input_ids.shape[1], layers=k)
    assert_reordered_close(ac.sender_vectors(examples), expected, **budget)
    memo = PrefillMemo()
    with ac.using_memo(memo):
        ac.prefill(
            lm, [sender_text(e) for e in examples]
        )  # what NLD leaves in the memo: every layer
        assert_reordered_close(ac.sender_vectors(examples), expected, **budget)
    assert (memo.hits, memo.misses) == (1, 1)


@pytest.mark.float_sensitive
def test_shared_prefix_sender_vectors_match_a_full_forward(examples):
    shared = make("ac", "tiny-llama-64", dtype=torch.float64, k=3, j=2)
    full = make("ac", "tiny-llama-64", dtype=torch.float64, k=3, j=2, share_prefix=False)
    budget = forward_budget(shared.pair.sender, 256, layers=3)
    assert_reordered_close(shared.sender_vectors(examples), full.sender_vectors(examples), **budget)


def test_nld_quotes_messages_raw_by_default_or_stripped(examples):
    """The public code quotes the decoded message as it is; `message_text: stripped` trims it. The same
    generation either way: the stripped message is the raw one trimmed, and its bytes are no more."""
    lm = load_model("tiny-llama-64")
    raw_cls, raw_p = resolve_method("nld", {"nld_max_tokens": 8})
    st_cls, st_p = resolve_method("nld", {"nld_max_tokens": 8, "message_text": "stripped"})
    assert raw_p.message_text == "raw"
    raw = raw_cls(raw_p, ModelPair(lm, lm)).run_batch(examples)
    stripped = st_cls(st_p, ModelPair(lm, lm)).run_batch(examples)
    for r, s in zip(raw, stripped):
        assert r.extra["sender_message"].strip() == s.extra["sender_message"]
        assert r.payload_bytes >= s.payload_bytes
    with pytest.raises(ValueError, match="message_text: raw or stripped"):
        resolve_method("nld", {"message_text": "trimmed"})


def test_the_lazy_registry_names_every_method_module_and_listing_imports_none():
    """registry.LAZY names each shipped method's module and class (importing every method module
    registers exactly those), and --list-methods / --list-tasks answer without importing torch or any
    method module."""
    import importlib
    import pkgutil
    import subprocess
    import sys

    import cross_model.methods as package
    from cross_model.methods.registry import _METHODS, LAZY
    from tests.conftest import ROOT

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"cross_model.methods.{info.name}")
    shipped = {
        n: f"{c.__module__}:{c.__name__}"
        for n, c in _METHODS.items()
        if c.__module__.startswith("cross_model.")
    }
    assert shipped == LAZY
    code = (
        "import sys, run_experiments\n"
        "assert run_experiments.main(['--list-methods']) == 0\n"
        "assert run_experiments.main(['--list-tasks']) == 0\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('cross_model.methods.')]\n"
        "assert loaded == ['cross_model.methods.registry'], loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kvcomm     KVComm (Shi et al., ICLR 2026)" in proc.stdout
