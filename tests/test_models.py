import pytest
import torch

from cross_model.models import TINY_MODELS, load_model
from cross_model.prompting import tokenize_prompts


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_models_are_deterministic_and_frozen(name):
    a = load_model(name)
    b = load_model(name)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training
    assert a.tokenizer.padding_side == "left"


def test_tiny_models_differ_and_describe_themselves():
    a, b = load_model("tiny-llama-64"), load_model("tiny-llama-48")
    assert (a.info.hidden_size, a.info.num_layers, a.info.num_kv_heads, a.info.head_dim) == (
        64,
        4,
        2,
        16,
    )
    assert (b.info.hidden_size, b.info.num_layers) == (48, 3)
    assert a.info.has_chat_template and not load_model("tiny-gemma3-64").info.has_chat_template
    assert a.info.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4


def test_tiny_tokenizer_round_trips_text():
    lm = load_model("tiny-llama-64")
    text = "Uma is at the Eiffel Tower. Ünïcode ✓"
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert lm.tokenizer.decode(ids) == text


def test_unknown_specs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown tiny test model 'tiny-nope'"):
        load_model("tiny-nope")
    with pytest.raises(FileNotFoundError, match="local directory"):
        load_model("someone/not-a-model-xyz")


def _answer(lm, question: str, max_new_tokens: int = 12) -> str:
    from cross_model.generation import greedy_generate

    batch = tokenize_prompts(lm, [question])
    return greedy_generate(lm, batch.input_ids, batch.attention_mask, max_new_tokens).texts[0]


@pytest.mark.slow
def test_smollm2_loads_offline_and_answers(smollm2):
    info = smollm2.info
    assert (
        info.hidden_size,
        info.num_layers,
        info.num_heads,
        info.num_kv_heads,
        info.vocab_size,
    ) == (576, 30, 9, 3, 49152)
    assert info.has_chat_template
    assert "Paris" in _answer(smollm2, "What is the capital of France?")


@pytest.mark.slow
def test_gemma3_loads_offline_and_answers():
    lm = load_model("gemma3-270m")
    info = lm.info
    assert (
        info.hidden_size,
        info.num_layers,
        info.num_kv_heads,
        info.head_dim,
        info.vocab_size,
    ) == (640, 18, 1, 256, 262144)
    assert not info.has_chat_template  # a base model: plain-text prompts
    assert "Paris" in _answer(lm, "Question: What is the capital of France?\nAnswer:", 6)


@pytest.mark.slow
def test_packaged_model_directory_is_what_save_pretrained_writes(smollm2):
    """The de-quantised SmolLM2 is stored as save_pretrained stores it: the tied embedding once, under
    the input embedding's name, and the safetensors format tag (without them transformers 4.53, which
    the public code pins, leaves the input embeddings random). Plain from_pretrained round-trips it."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from cross_model.models import packaged_dir

    directory = packaged_dir("smollm2-135m-instruct")
    assert smollm2.model.config.tie_word_embeddings
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "model.embed_tokens.weight" in set(f.keys()) and "lm_head.weight" not in set(
            f.keys()
        )
        torch.testing.assert_close(
            f.get_tensor("model.embed_tokens.weight"), smollm2.model.get_input_embeddings().weight
        )
    plain = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.tensor([smollm2.tokenizer("The capital of France is")["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(plain(input_ids=ids).logits, smollm2.model(input_ids=ids).logits)


@pytest.mark.slow
def test_packaged_model_directories_carry_what_transformers_4_53_reads(smollm2):
    """4.53 (the public KVComm code's pin) reads a top-level rope_theta (without it SmolLM2 runs at
    10000 instead of 100000 and its answers change), Gemma-3's local theta as rope_local_base_freq,
    and a tokenizer class it knows; v5 reads the same directory as before (same logits, same ids)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cross_model.models import packaged_dir

    gemma = load_model("gemma3-270m")
    small, big = (
        json.loads((packaged_dir(n) / "config.json").read_text())
        for n in ("smollm2-135m-instruct", "gemma3-270m")
    )
    assert small["rope_theta"] == small["rope_parameters"]["rope_theta"] == 100000.0
    assert small["architectures"] == ["LlamaForCausalLM"]
    assert (big["rope_theta"], big["rope_local_base_freq"]) == (1000000.0, 10000.0)
    tok = json.loads((packaged_dir("smollm2-135m-instruct") / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    for lm, name in ((smollm2, "smollm2-135m-instruct"), (gemma, "gemma3-270m")):
        plain = AutoModelForCausalLM.from_pretrained(packaged_dir(name), dtype=torch.float32)
        again = AutoTokenizer.from_pretrained(packaged_dir(name))
        text = "Uma is at the Eiffel Tower. Which country is Uma in?"
        assert again(text)["input_ids"] == lm.tokenizer(text)["input_ids"]
        assert plain.config.rope_parameters == lm.model.config.rope_parameters
        ids = torch.tensor([again(text)["input_ids"]])
        with torch.inference_mode():
            torch.testing.assert_close(
                plain(input_ids=ids).logits, lm.model(input_ids=ids).logits.float()
            )
