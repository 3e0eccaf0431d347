"""`make bench`: examples per second and peak memory of every method on a fixed workload, each next to
the straightforward reference (bench/reference.py) measured in the same run, and whether the two
give the same answers.

    python -m bench.run                       # CPU: tiny models, then the packaged SmolLM2, 64 countries items
    python -m bench.run --models tiny --n 16  # a quick look
    python -m bench.run --json out.json       # the table as JSON too

The reference is slow (it re-reads every sequence at every step), so it runs on the first `--ref-n`
items; both speeds are per example. Each method runs alone (no prefill shared with another method).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench.reference import REFERENCES, applies
from cross_model.data import load_task_examples
from cross_model.doc_tables import bench_table
from cross_model.methods.base import ModelPair
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model
from cross_model.runinfo import git_commit

# KVComm sends every layer, which its reference computes independently as one concatenated forward;
# the KV translator with A = B, the identity projector and every gate open is that same forward
# (alignment, projector and gates on the path); C2C's fuser with every gate closed is B alone (its
# prompt split at the last token, the fusion path run); Q-KVComm sends a subset (no reference: its wire
# format is ours).
MODEL_SETS = {
    "tiny": (
        "tiny-llama-64",
        {
            "ac": {"k": 2, "j": 2},
            "kvcomm": {"selection": "all"},
            "qkvcomm": {"selection": "layers", "layers_list": [1, 2]},
        },
    ),
    "smollm2": (
        "smollm2-135m-instruct",
        {
            "ac": {"k": 20, "j": 20},
            "kvcomm": {"selection": "all"},
            "qkvcomm": {"selection": "random", "top_layers": 0.3, "seed": 0},
        },
    ),
}
METHODS = ("baseline", "skyline", "nld", "cipher", "ac", "kvcomm", "qkvcomm", "kv_translate", "c2c")
COMMON = {
    "nld": {"nld_max_tokens": 8},
    "cipher": {"nld_max_tokens": 8},
    "kv_translate": {"projector": "identity", "gates": "open"},
    "c2c": {"gates": "closed", "hidden_dim": 16, "intermediate_dim": 16},
}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def make_method(name: str, lm, overrides: dict):
    params = {**COMMON.get(name, {}), **overrides.get(name, {})}
    if name == "qkvcomm":
        params["bits"] = 4
    cls, p = resolve_method(name, params)
    return cls(p, ModelPair(lm, lm))


def bench_method(name: str, lm, overrides: dict, examples: list, batch: int, ref_n: int) -> dict:
    method = make_method(name, lm, overrides)
    method.run_batch(
        examples[: min(2, len(examples))]
    )  # warm-up: first-call costs are not the method's
    reset_peak_memory(lm.device)
    start = time.perf_counter()
    preds = [
        p for i in range(0, len(examples), batch) for p in method.run_batch(examples[i : i + batch])
    ]
    ours_s = time.perf_counter() - start
    row = {
        "method": name,
        "n": len(examples),
        "ours_ex_per_s": len(examples) / ours_s,
        "peak_mb": peak_memory_mb(lm.device),
        "errors": sum(p.error is not None for p in preds),
    }
    reference = REFERENCES.get(name) if applies(name, method) else None
    if reference is None or ref_n == 0:
        return {**row, "ref_ex_per_s": None, "speedup": None, "same_answers": None}
    start = time.perf_counter()
    ref = [reference(method, e) for e in examples[:ref_n]]
    ref_s = time.perf_counter() - start
    same = sum(a == p.answer for a, p in zip(ref, preds))
    ref_rate = ref_n / ref_s
    return {
        **row,
        "ref_ex_per_s": ref_rate,
        "speedup": row["ours_ex_per_s"] / ref_rate,
        "same_answers": f"{same}/{ref_n}",
    }


def format_table(title: str, rows: list[dict]) -> str:
    return f"### {title}\n\n{bench_table(rows)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--models", default="tiny,smollm2", help="comma-separated: " + ", ".join(MODEL_SETS)
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=64, help="countries items per method")
    ap.add_argument("--ref-n", type=int, default=8, help="items the reference runs (0: none)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODEL_SETS]
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown or bad:
        ap.error(
            f"unknown models {unknown} or methods {bad}; models: {list(MODEL_SETS)}, methods: {list(METHODS)}"
        )
    torch.set_num_threads(args.threads)
    examples, _ = load_task_examples(
        "countries", args.n, 0, seed=0, max_new_tokens=args.max_new_tokens
    )
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    print(
        f"# bench: {args.n} countries items, {args.max_new_tokens} new tokens, batch {args.batch}; "
        f"reference on the first {args.ref_n}; {machine}\n",
        flush=True,
    )
    results = {}
    for key in args.models.split(","):
        spec, overrides = MODEL_SETS[key]
        lm = load_model(spec)
        rows = []
        for name in args.methods.split(","):
            rows.append(bench_method(name, lm, overrides, examples, args.batch, args.ref_n))
            print(f"  {spec} {name}: {rows[-1]['ours_ex_per_s']:.3g} ex/s", flush=True)
        results[spec] = rows
        print(
            "\n"
            + format_table(f"{spec} (CPU, float32)" if lm.device.type == "cpu" else spec, rows)
            + "\n",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "git": git_commit(),
                    "args": vars(args) | {"json": str(args.json)},
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
