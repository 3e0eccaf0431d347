"""The GPU benchmark's code path, run on CPU with toy shapes (this machine has no GPU; on one,
`make bench-gpu` runs the same code on Llama-3.1-8B-shaped models): every table is filled, and the
FLOP and byte counts behind its TFLOP/s and GB/s columns match the shapes they count."""

import json

import pytest
import torch

from bench import gpu


@pytest.fixture(scope="module")
def tokenizer():
    return gpu.bench_tokenizer()[0]


def test_dense_parameter_count_matches_the_llama_formula(tokenizer):
    lm = gpu.random_model("small", tokenizer, torch.float32, torch.device("cpu"), seed=0)
    s = gpu.SHAPES["small"]
    h, i, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    assert gpu.dense_params(lm) == L * per_layer + h
    assert lm.info.vocab_size == gpu.VOCAB
    # the real shape's count, from the same formula: Llama-3.1-8B has 6.98e9 parameters below its head
    s = gpu.SHAPES["llama-8b"]
    h, i, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    assert abs(L * (h * q + 2 * h * kv + q * h + 3 * h * i) / 6.98e9 - 1) < 0.01


def test_a_saved_tokenizer_folder_is_used_and_a_wrong_one_refused(tokenizer, tmp_path):
    """SmolLM2's tokenizer files carried to a GPU machine are recognised by their vocabulary, so the
    ratio to the public code's figures is printed; another tokenizer is named by its folder."""
    from cross_model.models import tiny_tokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    tok, name = gpu.bench_tokenizer(tmp_path / "tok")
    assert tok("Paris")["input_ids"] == tokenizer("Paris")["input_ids"]
    assert name == (gpu.PUBLIC_TOKENIZER if len(tokenizer) == 49152 else str(tmp_path / "tok"))
    tiny_tokenizer(True).save_pretrained(tmp_path / "bytes")
    assert gpu.bench_tokenizer(tmp_path / "bytes")[1] == str(tmp_path / "bytes")
    with pytest.raises(SystemExit):
        gpu.main(["--tokenizer", str(tmp_path / "missing"), "--device", "cpu"])


def test_long_workload_contexts_have_the_stated_length(tokenizer):
    examples = gpu.workload("long", 2, tokenizer)
    short = gpu.workload("short", 2, tokenizer)
    for e, s in zip(examples, short):
        assert e.max_new_tokens == 32 and s.max_new_tokens == 5
        extra = len(tokenizer(e.prompt_A)["input_ids"]) - len(tokenizer(s.prompt_A)["input_ids"])
        assert abs(extra - 2000) <= 20  # the filler re-tokenises to within 1% of 2,000 tokens


def test_gpu_bench_fills_every_table_on_toy_shapes(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert (
        gpu.main(
            [
                "--shapes",
                "small",
                "--device",
                "cpu",
                "--workloads",
                "short",
                "--methods",
                "baseline,kvcomm,ac_projected",
                "--batches",
                "1,2",
                "--n",
                "4",
                "--ref-n",
                "short:1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["baseline", "kvcomm", "ac_projected"]
    for r in result["rows"]:
        assert set(r["ms_per_example"]) == {"1", "2"} and all(
            v > 0 for v in r["ms_per_example"].values()
        )
        # like with like: the public code's one-at-a-time figure over our batch 1, never our best
        # batch; none for ac_projected (the public AC figure is an 8B sender, ours a 3B-shaped one)
        if r["method"] == "ac_projected":
            assert r["public_ms"] is None and r["vs_public"] is None
        else:
            assert r["vs_public"] == pytest.approx(
                gpu.PUBLIC_MS["short"][r["method"]] / r["ms_per_example"]["1"]
            )
        assert (
            (r["hf_generate_ms"] > 0) if r["method"] == "baseline" else r["hf_generate_ms"] is None
        )
        if (
            r["method"] == "kvcomm"
        ):  # 30% of layers, as the public numbers: no independent reference exists
            assert r["reference_ms"] is None and r["same_answers"] is None
            continue
        assert r["reference_ms"] > 0
        assert r["same_answers"] == "1/1", r  # float32 on CPU: batch 1 equals the reference exactly
    assert all(p["tflops"] > 0 for p in result["prefill"]) and len(result["decode"]) == 2
    t = result["training"]
    assert (t["d_in"], t["d_out"]) == (48, 64) and 0 < t["forward_share"] < 1
    text = capsys.readouterr().out
    assert "| ac_projected |" in text and "projection training 48 -> 64" in text
    assert (
        "measured on an H100, this run on" in text
    )  # a CPU here: the public figures are marked as another card's


def test_without_the_public_codes_tokenizer_no_ratio_against_it_is_printed(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        gpu, "bench_tokenizer", lambda directory=None: (gpu.tiny_tokenizer(True), "byte-level")
    )
    out = tmp_path / "gpu.json"
    assert (
        gpu.main(
            [
                "--shapes",
                "small",
                "--device",
                "cpu",
                "--workloads",
                "short",
                "--methods",
                "baseline",
                "--batches",
                "1",
                "--n",
                "2",
                "--ref-n",
                "short:0",
                "--skip",
                "prefill,decode,training",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert all(r["vs_public"] is None for r in json.loads(out.read_text())["rows"])
    assert "No ratio against the public code" in capsys.readouterr().out


def test_a_batch_that_runs_out_of_memory_does_not_fit():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test)")

    assert gpu.fits(lambda: None, torch.device("cpu"))
    assert not gpu.fits(oom, torch.device("cpu"))
    with pytest.raises(ValueError):  # anything else is a bug and surfaces
        gpu.fits(lambda: int("x"), torch.device("cpu"))


def test_make_test_gpu_records_device_versions_and_every_outcome(tmp_path):
    """Here (no GPU) every GPU test skips with its reason; the record says so, per test."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    record = tmp_path / "test_gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_tests", "--json", str(record)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(record.read_text())
    assert data["versions"]["torch"] == torch.__version__ and data["git"]["commit"]
    names = {k.split("::")[-1] for k in data["tests"]}
    assert "test_two_rank_nccl_calibrate_and_evaluate" in names and len(data["tests"]) >= 8
    if not torch.cuda.is_available():
        assert data["device"]["cuda"] is False and data["skipped"] == len(data["tests"])
        assert all("GPU" in t["reason"] for t in data["tests"].values())
