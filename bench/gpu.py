"""`make bench-gpu`: the GPU benchmark of issue #8. Randomly initialised models in the real shape of
Llama-3.1-8B for A and B (one set of weights serves both: same shapes, half the memory), bf16, SDPA;
a Llama-3.2-3B-shaped sender for AC with a learned projection (3072 -> 4096). Vocabulary 49,152 and
SmolLM2's tokenizer, as in the public code's measurements we compare against.

    python -m bench.gpu                                   # H100/H200: every table, about 8 minutes
    python -m bench.gpu --workloads short --batches 1,8   # a part
    python -m bench.gpu --shapes small --device cpu       # the same code on toy shapes (what the tests run)

Per workload (short: countries prompts, 5 new tokens; long: 2,000-token contexts, 32 new tokens),
method and batch size (1, 8, 32 and the largest that fits): ms per example, the speed-up over the
public code's numbers (issue #8, H100) and over a reference sharing none of the method's code
(bench/reference.py; batch 1, same run; none for KVComm at 30% of layers), and whether its answers
equal ours. Then the prefill's achieved TFLOP/s (2 x
non-embedding parameters x tokens plus causal attention, no LM head) against the card's bf16 peak, the
decode step's memory bandwidth (weights plus the KV cache read per step) against the card's, and
projection training's throughput split into the frozen forwards and the projection's own steps.

Random weights never emit EOS, so every example generates its full budget: the work is fixed.
Greedy answers of random models are near-ties; batched bf16 arithmetic may break a tie differently
from batch 1, so "same answers" is reported, not required, here (the CPU bench checks it exactly).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from bench.reference import REFERENCES, applies
from cross_model.data import load_task_examples
from cross_model.data.base import Example
from cross_model.data.corpus import offline_sentences
from cross_model.methods.base import ModelPair
from cross_model.methods.registry import resolve_method
from cross_model.models import LoadedModel, describe_model, freeze, load_model, tiny_tokenizer
from cross_model.projection import LearnedProjection
from cross_model.prompting import pad_left, receiver_text, skyline_text
from cross_model.surgery import partial_forward
from cross_model.training.ac_projection import frozen_activations

VOCAB = 49_152
SHAPES = {
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "llama-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "small": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "small-3b": dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}
SHAPE_SETS = {
    "llama": ("llama-8b", "llama-3b"),
    "small": ("small", "small-3b"),
}  # (A and B, AC's sender)
WORKLOADS = {
    "short": {"context_tokens": 0, "new_tokens": 5},
    "long": {"context_tokens": 2000, "new_tokens": 32},
}
METHODS = {
    "short": ("baseline", "skyline", "kvcomm", "ac", "ac_projected", "nld", "cipher"),
    "long": ("baseline", "skyline", "kvcomm", "ac", "ac_projected"),
}
# The public code's per-example milliseconds on an H100 in bf16 (issue #8), same shapes and workloads,
# one example at a time: compared with our batch 1 only, and only with SmolLM2's tokenizer (the
# byte-level one makes prompts about four times longer). On another card the ratio is marked.
PUBLIC_GPU = "H100"
PUBLIC_TOKENIZER = "SmolLM2"
PUBLIC_MS = {
    "short": {
        "baseline": 179,
        "skyline": 266,
        "kvcomm": 397,
        "ac": 256,
        "nld": 22_134,
        "cipher": 24_740,
    },
    "long": {
        "baseline": 1_499,
        "skyline": 1_626,
        "kvcomm": 1_846,
        "ac": 1_487,
    },
}
# No public figure for ac_projected: the public AC timing is an 8B sender, ours here a 3B-shaped one.
# SmolLM2's tokenizer by content (its vocabulary, sorted, hashed), wherever its files come from.
PUBLIC_TOKENIZER_VOCAB = "450fd25da1a689ff"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


# Dense bf16 tensor-core peak (FLOP/s) and HBM bandwidth (bytes/s), from NVIDIA's data sheets (SXM).
CARDS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}
PARAMS = {
    "nld": {"nld_max_tokens": 256},
    "cipher": {"nld_max_tokens": 256},
    "kvcomm": {"selection": "random", "top_layers": 0.3, "seed": 0},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for key, (flops, bw) in CARDS.items():
        if key in name:
            return name, flops, bw
    return name, None, None


def bench_tokenizer(directory: Path | None = None) -> tuple[Any, str]:
    """A tokenizer saved in `directory` (a machine without the packaged models can be given SmolLM2's
    tokenizer files this way), else SmolLM2's (vocabulary 49,152) where the packaged model is installed,
    else the byte-level test tokenizer (prompts come out about four times longer in tokens; the table
    says which)."""
    if directory is not None:
        from transformers import AutoTokenizer

        if not (Path(directory) / "tokenizer_config.json").exists():
            raise FileNotFoundError(
                f"--tokenizer {directory}: no tokenizer_config.json there (save one with save_pretrained)"
            )
        tok = AutoTokenizer.from_pretrained(directory)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        # carried files of SmolLM2's tokenizer are SmolLM2's tokenizer: the public ratio applies
        same = tokenizer_fingerprint(tok) == PUBLIC_TOKENIZER_VOCAB
        return tok, PUBLIC_TOKENIZER if same else str(directory)
    try:
        return load_model("smollm2-135m-instruct", device="cpu").tokenizer, "SmolLM2"
    except (FileNotFoundError, OSError, ImportError):
        return tiny_tokenizer(True), "byte-level (SmolLM2 not installed)"


def random_model(
    shape: str, tokenizer: Any, dtype: torch.dtype, device: torch.device, seed: int
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=max(VOCAB, len(tokenizer)),
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: no 16 GB host copy
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LoadedModel(
        freeze(model), tokenizer, describe_model(f"random-{shape}", model, tokenizer)
    )


def workload(name: str, n: int, tokenizer: Any) -> list[Example]:
    spec = WORKLOADS[name]
    examples, _ = load_task_examples("countries", n, 0, seed=0, max_new_tokens=spec["new_tokens"])
    examples = [replace(e, max_new_tokens=spec["new_tokens"]) for e in examples]
    if not spec["context_tokens"]:
        return examples
    out = []
    for i, e in enumerate(examples):  # A's context: filler sentences, cut to context_tokens tokens
        text = " ".join(offline_sentences(spec["context_tokens"] // 4, seed=i))
        filler = tokenizer.decode(
            tokenizer(text, add_special_tokens=False)["input_ids"][: spec["context_tokens"]]
        )
        out.append(replace(e, prompt_A=filler + "\n" + e.prompt_A))
    return out


def make_method(
    name: str, a: LoadedModel, b: LoadedModel, small_sender: LoadedModel | None, max_prompt: int
):
    if name == "ac_projected":
        sender = small_sender
        cls, p = resolve_method(
            "ac",
            {
                "k": sender.info.num_layers // 2,
                "j": b.info.num_layers // 2,
                "max_prompt_tokens": max_prompt,
            },
        )
        method = cls(p, ModelPair(sender, b))
        method.projection = (
            LearnedProjection(sender.info.hidden_size, b.info.hidden_size, seed=0)
            .to(b.device)
            .requires_grad_(False)
        )
        return method
    params = {**PARAMS.get(name, {}), "max_prompt_tokens": max_prompt}
    if name == "ac":
        params.update(k=a.info.num_layers // 2, j=b.info.num_layers // 2)
    cls, p = resolve_method(name, params)
    return cls(p, ModelPair(a, b))


def time_method(
    method: Any, examples: list[Example], batch: int, device: torch.device
) -> tuple[float, list[str]]:
    """Seconds per example over `examples` in batches of `batch` (after one warm-up batch)."""
    # The batched path itself (`_run_batch`): `run_batch` would retry a batch that ran out of memory one
    # example at a time, which the search for the largest batch must see as not fitting.
    method._run_batch(examples[:batch])
    sync(device)
    start = time.perf_counter()
    preds = [
        p
        for i in range(0, len(examples), batch)
        for p in method._run_batch(examples[i : i + batch])
    ]
    sync(device)
    return (time.perf_counter() - start) / len(examples), [p.answer for p in preds]


def fits(run: Callable[[], Any], device: torch.device) -> bool:
    try:
        run()
        return True
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False


HF_GENERATE = (
    "baseline",
    "skyline",
)  # plain generation: transformers' own batched generate is a peer


def hf_generate_ms(method: Any, examples: list[Example], batch: int, device: torch.device) -> float:
    """Milliseconds per example of transformers' batched `generate` on the same prompts, at `batch`
    (the batch our best row used): greedy, every row its full answer length, like ours on random weights."""
    lm = method.pair.receiver
    texts = [
        receiver_text(e) if method.registry_name == "baseline" else skyline_text(e, e.prompt_A)
        for e in examples
    ]
    ids = method.prompt_ids(lm, texts)
    new = max(method.max_new_tokens(e) for e in examples)

    def run(rows: list[list[int]]) -> None:
        b = pad_left(rows, lm.tokenizer.pad_token_id, lm.device)
        with torch.inference_mode():
            lm.model.generate(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=lm.tokenizer.pad_token_id,
            )

    run(ids[:batch])  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(ids), batch):
        run(ids[i : i + batch])
    sync(device)
    return (time.perf_counter() - start) / len(ids) * 1e3


def bench_workload(
    wl: str,
    models: dict,
    examples: list[Example],
    batches: list[int],
    find_max: bool,
    ref_n: int,
    device: torch.device,
    methods: list[str],
    tokenizer_name: str = "",
) -> list[dict]:
    a, small = models["a"], models["small"]
    max_prompt = WORKLOADS[wl]["context_tokens"] + 512
    rows = []
    for name in methods:
        method = make_method(name, a, a, small, max_prompt)
        sizes = list(batches)
        if find_max and device.type == "cuda":
            b = max(sizes) * 2
            # bound now: `method` is deleted at the end of each loop turn
            while b <= len(examples) and fits(
                lambda m=method, n=b: time_method(m, examples[:n], n, device), device
            ):
                b *= 2
            if b // 2 > max(sizes):
                sizes.append(b // 2)
        ours = {}
        for b in sizes:
            n = min(len(examples), max(b * 2, 8))
            ours[b] = time_method(method, examples[:n], b, device)
        ref_ms, same = None, None
        ref_name = "ac" if name == "ac_projected" else name
        if ref_n and applies(
            ref_name, method
        ):  # KVComm at 30% of layers has no independent reference
            sync(device)
            start = time.perf_counter()
            ref = [REFERENCES[ref_name](method, e) for e in examples[:ref_n]]
            sync(device)
            ref_ms = (time.perf_counter() - start) / ref_n * 1e3
            answers = ours[sizes[0]][1]
            same = f"{sum(x == y for x, y in zip(ref, answers))}/{ref_n}"
        best_b = min(ours, key=lambda b: ours[b][0])
        best_ms = ours[best_b][0] * 1e3
        batch_1 = ours[1][0] * 1e3 if 1 in ours else None
        public = PUBLIC_MS[wl].get(name)
        comparable = (
            public is not None and batch_1 is not None and tokenizer_name == PUBLIC_TOKENIZER
        )
        rows.append(
            {
                "workload": wl,
                "method": name,
                "ms_per_example": {b: s * 1e3 for b, (s, _) in ours.items()},
                "best_batch": best_b,
                "best_ms": best_ms,
                "public_ms": public,
                # like with like: our batch 1 against the public code's one-at-a-time figure
                "vs_public": public / batch_1 if comparable else None,
                # our batch 1 against the reference (batch 1, same run)
                "reference_ms": ref_ms,
                "vs_reference": ref_ms / batch_1 if ref_ms and batch_1 else None,
                "same_answers": same,
                "hf_generate_ms": hf_generate_ms(method, examples, best_b, device)
                if name in HF_GENERATE
                else None,
            }
        )
        print(
            f"  {wl} {name}: " + ", ".join(f"b{b} {s * 1e3:.1f} ms" for b, (s, _) in ours.items()),
            flush=True,
        )
        del method
    return rows


def attention_flops(lm: LoadedModel, lengths: list[int]) -> float:
    """QK^T and AV over the causal triangle, every layer."""
    i = lm.info
    return sum(2 * 2 * i.num_layers * i.num_heads * i.head_dim * t * (t + 1) / 2 for t in lengths)


def dense_params(lm: LoadedModel) -> int:
    """Parameters a token's forward multiplies by, below the LM head (embedding lookups are free)."""
    return sum(
        p.numel()
        for n, p in lm.model.named_parameters()
        if "embed_tokens" not in n and "lm_head" not in n
    )


@torch.inference_mode()
def prefill_tflops(
    lm: LoadedModel, batch: int, tokens: int, device: torch.device, repeats: int = 3
) -> dict:
    """Achieved TFLOP/s of a full prefill (every block, no LM head) of `batch` x `tokens`."""
    ids = torch.randint(100, lm.info.vocab_size - 1, (batch, tokens), device=device)
    mask = torch.ones_like(ids)
    partial_forward(lm, ids, mask, lm.info.num_layers)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        partial_forward(lm, ids, mask, lm.info.num_layers)
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    flops = 2 * dense_params(lm) * batch * tokens + attention_flops(lm, [tokens] * batch)
    return {"batch": batch, "tokens": tokens, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12}


@torch.inference_mode()
def decode_bandwidth(
    lm: LoadedModel, batch: int, context: int, steps: int, device: torch.device
) -> dict:
    """GB/s of one decode step: the weights (LM head included) and every layer's KV cache are read once."""
    from transformers import DynamicCache

    ids = torch.randint(100, lm.info.vocab_size - 1, (batch, context), device=device)
    cache = DynamicCache()
    out = lm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        out = lm.model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    weights = sum(
        p.numel() * p.element_size()
        for n, p in lm.model.named_parameters()
        if "embed_tokens" not in n
    )
    kv = (
        lm.info.num_layers
        * 2
        * lm.info.num_kv_heads
        * lm.info.head_dim
        * lm.dtype.itemsize
        * batch
        * (context + steps // 2)
    )
    return {
        "batch": batch,
        "context": context,
        "ms_per_step": step * 1e3,
        "gb_per_s": (weights + kv) / step / 1e9,
    }


def projection_training(
    sender: LoadedModel,
    receiver: LoadedModel,
    n: int,
    max_length: int,
    batch: int,
    device: torch.device,
) -> dict:
    """Throughput of projection training, split into its two parts: the frozen forwards that produce
    (a, b) pairs, and the projection's own Adam steps on them."""
    texts = offline_sentences(n, seed=0)
    k, j = sender.info.num_layers // 2, receiver.info.num_layers // 2
    frozen_activations(sender, receiver, k, j, texts[:batch], max_length, batch)  # warm-up
    sync(device)
    start = time.perf_counter()
    a, b = frozen_activations(sender, receiver, k, j, texts, max_length, batch)
    sync(device)
    forward_s = time.perf_counter() - start
    tokens = sum(min(len(sender.tokenizer(t)["input_ids"]), max_length) for t in texts)
    proj = LearnedProjection(a.shape[-1], b.shape[-1], seed=0).to(device)
    opt = torch.optim.Adam(proj.parameters(), lr=1e-3)
    a, b = a.to(device), b.to(device)
    sync(device)
    start = time.perf_counter()
    for i in range(0, n, batch):
        loss = torch.nn.functional.mse_loss(proj(a[i : i + batch]), b[i : i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    step_s = time.perf_counter() - start
    return {
        "sentences": n,
        "tokens": tokens,
        "d_in": a.shape[-1],
        "d_out": b.shape[-1],
        "forward_sentences_per_s": n / forward_s,
        "forward_tokens_per_s": tokens / forward_s,
        "projection_sentences_per_s": n / step_s,
        "forward_share": forward_s / (forward_s + step_s),
    }


def _peak_table(
    title: str,
    columns: list[str],
    rows: list[dict],
    cells: Callable[[dict], list[str]],
    achieved: Callable[[dict], float],
    peak: float | None,
    peak_name: str,
) -> list[str]:
    if not rows:
        return []
    lines = [
        f"## {title}",
        "",
        "| " + " | ".join(columns) + f" | % of {peak_name} |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for r in rows:
        pct = f"{100 * achieved(r) / peak:.0f}%" if peak else "-"
        lines.append("| " + " | ".join(cells(r)) + f" | {pct} |")
    return lines + [""]


def format_tables(result: dict) -> str:
    out = [
        f"# GPU bench: {result['device']}, {result['dtype']}, tokenizer {result['tokenizer']}",
        "",
    ]
    notes = [
        f"`vs public`: the public code's figure (one example at a time, measured on an {PUBLIC_GPU}) over our "
        f"batch 1; `vs reference`: the reference (batch 1, this run) over our batch 1; `HF generate`: "
        f"transformers' batched generate at our best row's batch."
    ]
    if PUBLIC_GPU not in str(result["device"]):
        notes.append(
            f"The public figures were measured on an {PUBLIC_GPU}, this run on {result['device']}: an H200 "
            f"has 1.4x an H100's memory bandwidth, so `vs public` flatters us here by up to that much."
        )
    if result["tokenizer"] != PUBLIC_TOKENIZER:
        notes.append(
            f"No ratio against the public code: its figures used {PUBLIC_TOKENIZER}'s tokenizer and this run "
            f"used {result['tokenizer']}, whose prompts are several times longer in tokens."
        )
    out += notes + [""]
    for wl in result["workloads"]:
        rows = [r for r in result["rows"] if r["workload"] == wl]
        if not rows:
            continue
        batches = sorted({int(b) for r in rows for b in r["ms_per_example"]})
        out += [
            f"## {wl}: {WORKLOADS[wl]}",
            "",
            "| method | "
            + " | ".join(f"b{b} ms/ex" for b in batches)
            + " | best batch | HF generate ms/ex | public ms/ex | vs public | reference ms/ex | vs reference | same answers |",
            "|---" * (len(batches) + 8) + "|",
        ]
        for r in rows:
            cells = [
                f"{r['ms_per_example'][b]:.2f}" if b in r["ms_per_example"] else "-"
                for b in batches
            ]
            fmt = lambda x, f: f.format(x) if x is not None else "-"  # noqa: E731
            out.append(
                f"| {r['method']} | " + " | ".join(cells) + f" | {r['best_batch']} | "
                f"{fmt(r.get('hf_generate_ms'), '{:.2f}')} | {fmt(r['public_ms'], '{:,}')} | "
                f"{fmt(r['vs_public'], '{:.0f}x')} | {fmt(r['reference_ms'], '{:.1f}')} | "
                f"{fmt(r['vs_reference'], '{:.1f}x')} | {r['same_answers'] or '-'} |"
            )
        out.append("")
    out += _peak_table(
        "prefill (A's full forward, no LM head)",
        ["batch x tokens", "ms", "TFLOP/s"],
        result["prefill"],
        lambda p: [f"{p['batch']} x {p['tokens']}", f"{p['ms']:.1f}", f"{p['tflops']:.1f}"],
        lambda p: p["tflops"] * 1e12,
        result["peak_flops"],
        "bf16 peak",
    )
    out += _peak_table(
        "decode step",
        ["batch", "context", "ms/step", "GB/s"],
        result["decode"],
        lambda d: [
            str(d["batch"]),
            str(d["context"]),
            f"{d['ms_per_step']:.2f}",
            f"{d['gb_per_s']:.0f}",
        ],
        lambda d: d["gb_per_s"] * 1e9,
        result["peak_bandwidth"],
        "HBM peak",
    )
    t = result.get("training")
    if t:
        out += [
            f"## projection training {t['d_in']} -> {t['d_out']}",
            "",
            f"frozen forwards: {t['forward_sentences_per_s']:.1f} sentences/s, {t['forward_tokens_per_s']:.0f} tokens/s; "
            f"projection steps: {t['projection_sentences_per_s']:.0f} sentences/s; "
            f"the forwards take {100 * t['forward_share']:.1f}% of the time",
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--shapes", default="llama", choices=list(SHAPE_SETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--workloads", default="short,long", help="comma-separated; '' for none")
    ap.add_argument(
        "--methods", default=None, help="comma-separated subset of each workload's methods"
    )
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument(
        "--no-max-batch", action="store_true", help="skip searching for the largest batch that fits"
    )
    ap.add_argument(
        "--n",
        type=int,
        default=64,
        help="items per workload (at least twice the largest batch timed)",
    )
    ap.add_argument(
        "--ref-n", default="short:4,long:1", help="items the reference runs, per workload"
    )
    ap.add_argument("--skip", default="", help="comma-separated: prefill, decode, training")
    ap.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a saved tokenizer's folder (default: SmolLM2's)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(
            "--device cuda, but torch sees no CUDA device; use --device cpu --shapes small for a dry run"
        )
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    wls = [w for w in args.workloads.split(",") if w]  # "" runs only the measurements below
    bad = [w for w in wls if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {list(WORKLOADS)}")
    ref_n = {w: int(c) for w, c in (x.split(":") for x in args.ref_n.split(","))}
    skip = set(filter(None, args.skip.split(",")))
    batches = [int(b) for b in args.batches.split(",")]

    try:
        tokenizer, tok_name = bench_tokenizer(args.tokenizer)
    except FileNotFoundError as e:
        ap.error(str(e))
    big, small_shape = SHAPE_SETS[args.shapes]
    models = {
        "a": random_model(big, tokenizer, dtype, device, seed=0),
        "small": random_model(small_shape, tokenizer, dtype, device, seed=1),
    }
    name, peak_f, peak_b = card_peaks(device)
    result: dict[str, Any] = {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "tokenizer": tok_name,
        "shapes": [big, small_shape],
        "workloads": wls,
        "rows": [],
        "prefill": [],
        "decode": [],
        "peak_flops": peak_f,
        "peak_bandwidth": peak_b,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(
        f"# bench.gpu on {name}, {result['dtype']}, A = B = {big}, AC sender {small_shape}, tokenizer {tok_name}",
        flush=True,
    )
    for wl in wls:
        examples = workload(wl, args.n, tokenizer)
        methods = [m for m in METHODS[wl] if not args.methods or m in args.methods.split(",")]
        result["rows"] += bench_workload(
            wl,
            models,
            examples,
            batches,
            not args.no_max_batch,
            ref_n.get(wl, 0),
            device,
            methods,
            tok_name,
        )
    if "prefill" not in skip:
        for b, t in ((1, 2048), (8, 2048), (32, 512)):
            result["prefill"].append(
                prefill_tflops(
                    models["a"],
                    b if device.type == "cuda" else 1,
                    t if device.type == "cuda" else 64,
                    device,
                )
            )
    if "decode" not in skip:
        for b in batches:
            result["decode"].append(
                decode_bandwidth(models["a"], b, 2048 if device.type == "cuda" else 64, 16, device)
            )
    if "training" not in skip:
        n = 2048 if device.type == "cuda" else 16
        result["training"] = projection_training(
            models["small"], models["a"], n, 64, 64 if device.type == "cuda" else 8, device
        )
    print("\n" + format_tables(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
