"""GPU checks (marked `gpu`; each skips without CUDA, CI has none): the bf16 / CUDA / nccl paths the CPU
tests cannot reach. One command on a bare H100/H200 (nothing installed: its own torch and transformers):

    make test-gpu      # every test here, then docs/test_gpu.json: device, versions, each test's outcome

One GPU runs all but the 2-rank nccl test, which needs two (nccl refuses two ranks on one GPU).

Tolerances follow tests/tolerance.py's rule for bf16 (8 bits of mantissa, float32 accumulation), and
a claim about tokens is checked where the reference's top two logits are further apart than twice that
tolerance (nearer ties may flip under any reordering). CROSS_MODEL_GPU_TESTS_DEVICE=cpu runs the
single-device tests in bf16 on the CPU, which checks these tolerances on a machine without a GPU.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from cross_model.data import load_task_examples
from cross_model.methods.base import ModelPair
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model
from tests.conftest import ROOT
from tests.tolerance import (
    assert_forward_close,
    assert_reordered_close,
    forward_budget,
    reorder_atol,
)

DEVICE = os.environ.get("CROSS_MODEL_GPU_TESTS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (CROSS_MODEL_GPU_TESTS_DEVICE=cpu: bf16 on CPU)",
    ),
]
BF16 = torch.bfloat16


def _method(name: str, spec: str = "tiny-llama-64", **params):
    lm = load_model(spec, BF16, DEVICE)
    cls, p = resolve_method(name, params)
    return cls(p, ModelPair(lm, lm))


@pytest.fixture(scope="module")
def examples():
    return load_task_examples("countries", 16, 0, seed=3)[0]


@pytest.mark.float_sensitive
@pytest.mark.parametrize("spec", ["tiny-llama-64", "tiny-gemma3-64"])
def test_kvcomm_all_layers_in_bf16_matches_the_concatenated_forward(spec, examples):
    """Every logit within tests/tolerance.py's bf16 bound, and the same top-1 token wherever the
    reference's top two are further apart than twice that bound."""
    from tests.test_kvcomm import concatenated_logits, receiver_logits

    m = _method("kvcomm", spec, selection="all")
    logits, _ = receiver_logits(m, examples[:8], set(range(m.pair.receiver.info.num_layers)))
    lm = m.pair.receiver
    decided = 0
    for i, e in enumerate(examples[:8]):
        ref = concatenated_logits(lm, e).float()
        got = logits[i, -ref.shape[0] :].float()
        budget = forward_budget(lm, logits.shape[1])
        assert_forward_close(got, ref, lm, logits.shape[1], dtype=BF16, msg=f"item {i}")
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * reorder_atol(ref, **budget, dtype=BF16)
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear]), (
            f"item {i}: a clear top-1 token differs"
        )
        decided += int(clear.sum())
    assert decided > 0, "no position had a clear top-1 token: the check above tested nothing"


@pytest.mark.parametrize("name", ["baseline", "kvcomm", "ac"])
def test_batched_and_one_at_a_time_agree_on_the_first_answer_token(name, examples):
    """bf16 batches reorder sums: near-tied tokens may flip, so >= 80% top-1 agreement is required, not all."""
    params = {"kvcomm": {"selection": "all"}, "ac": {"k": 2, "j": 2}}.get(name, {})
    m = _method(name, **params)
    batched = [p.answer for p in m.run_batch(examples)]
    alone = [m.run_batch([e])[0].answer for e in examples]
    tok = m.pair.receiver.tokenizer
    first_token = lambda text: tok.encode(text, add_special_tokens=False)[:1]  # noqa: E731 - a token, not a character
    assert all(first_token(a) for a in batched + alone), (
        "an empty answer has no first token to compare"
    )
    first = [first_token(a) == first_token(b) for a, b in zip(batched, alone)]
    assert sum(first) / len(first) >= 0.8, list(zip(batched, alone))


@pytest.mark.float_sensitive
def test_cipher_in_bf16_sends_bf16_vectors_that_are_expected_embeddings(examples):
    from cross_model.methods.cipher import vector_generate
    from cross_model.prompting import sender_text, tokenize_prompts
    from cross_model.surgery import input_embeddings

    m = _method("cipher", nld_max_tokens=4)
    preds = m.run_batch(examples[:4])
    assert not any(p.error for p in preds)
    d = m.pair.sender.info.hidden_size
    assert all(p.payload_bytes == p.extra["sender_vectors"] * d * 2 for p in preds)  # bf16 elements
    lm = m.pair.sender
    batch = tokenize_prompts(lm, [sender_text(e) for e in examples[:4]])
    emb = lm.model.get_input_embeddings()(batch.input_ids)
    vecs, _ = vector_generate(lm, emb, batch.attention_mask, 1, 1.0)
    with torch.inference_mode():
        logits = (
            lm.model(inputs_embeds=emb, attention_mask=batch.attention_mask).logits[:, -1].float()
        )
    expected = logits.softmax(-1) @ input_embeddings(lm).float()
    for v, e in zip(vecs, expected):
        if v.shape[0]:
            assert v.dtype == BF16 and torch.isfinite(v).all()
            # a bf16 forward, then the expected embedding: a sum over the vocabulary (float32 accumulation)
            assert_reordered_close(
                v[0].float(),
                e,
                terms=lm.info.vocab_size,
                depth=forward_budget(lm)["depth"] + 1,
                dtype=BF16,
            )


def test_qkvcomm_wire_round_trip_in_bf16_on_the_gpu(examples):
    """Q-KVComm's encode/decode on CUDA tensors, 8 bits, no clipping: B's view of every sent layer within
    one step of the layer's whole range (a group's half step is smaller) plus bf16 rounding."""
    m = _method("qkvcomm", selection="all", bits=8, clip=False)
    selected = set(range(m.pair.receiver.info.num_layers))
    pre, cache, sink = m.sender_cache(examples[:4], selected)
    view, _, sizes, _ = m.transmit(pre, cache, sink, selected)
    assert all(s > 0 for s in sizes)
    mask = pre.full_mask.bool()
    for row in range(mask.shape[0]):
        idx = mask[row].nonzero().squeeze(-1)
        for la in sorted({m.layer_map[l] for l in selected}):
            for got, ref in (
                (view.layers[la].keys, cache.layers[la].keys),
                (view.layers[la].values, cache.layers[la].values),
            ):
                g, r = got[row][:, idx].float(), ref[row][:, idx].float()
                bound = (r.amax() - r.amin()).item() / 255 + 1e-2 * r.abs().max().item()
                assert (g - r).abs().max().item() <= bound


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="a 2-rank nccl run needs two GPUs (nccl refuses two ranks on one)",
)
def test_two_rank_nccl_calibrate_and_evaluate(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "run_experiments.py",
        "--config",
        "configs/tiny.yaml",
        "--output_dir",
        str(tmp_path),
        "--platform.device",
        "cuda",
        "--stages",
        "[calibrate,evaluate,report]",
        "--methods",
        '{"baseline": {}, "kvcomm": {"selection": "calibrate", "top_layers": 0.5}, "cipher": {"nld_max_tokens": 4}}',
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    calib = json.loads((tmp_path / "tiny" / "calibration-kvcomm.json").read_text())
    assert calib["items_per_rank"] == [2, 2]
    data = json.loads((tmp_path / "tiny" / "results.json").read_text())
    rows = data["examples"]["countries"]["kvcomm"]
    assert (
        len(rows) == 6
        and {r["rank"] for r in rows} == {0, 1}
        and {r["dtype"] for r in rows} == {"bfloat16"}
    )
