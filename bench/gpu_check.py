"""`make gpu-check`: one call on a bare GPU machine that proves the GPU path, in under 8 minutes.

Each step runs as its own process with its own deadline; a step that fails or overruns is recorded and
the next one runs. Every step writes one JSON under OUT (`$OUT` on the device machines, else
docs/gpu_check), beside `environment.json` (device, versions, commit) and `summary.json`:

  tests       the GPU tests (tests/test_gpu.py through bench.gpu_tests)
  short       the bench's short workload at batches 1 and 8 (Llama-3.1-8B shapes, random weights)
  long        the long workload (2,000-token contexts) at batches 1 and 8
  debate      NLD and CIPHER at batch 8
  kvcomm_8b   one evaluator batch of configs/kvcomm_llama8b.yaml at its real shapes (batch 4, contexts
              at its 8,192-token cap, 128 new tokens) on a random Llama-3.1-8B-shaped model: the peak
              torch.cuda.max_memory_allocated against the dry run's estimate for that shape

`--toy` runs every step at toy shapes on any device (the CPU emulation of a bare image in the tests).
A tokenizer folder carried as `.gpukit/tok` (`make gpu-kit`) is used when present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".gpukit"
# The steps' deadlines add up to 8 minutes. They are first estimates from the public code's H100
# timings (NLD and CIPHER: about 22 s an item at batch 1); the first GPU run's summary.json shows
# each step's seconds against its deadline.
BUDGET_S = 480


def steps(out: Path, toy: bool, tokenizer: Path | None) -> list[tuple[str, list[str], int]]:
    """(name, command, deadline in seconds) of every step."""
    py = [sys.executable, "-m"]
    tok = ["--tokenizer", str(tokenizer)] if tokenizer else []
    # toy: the same commands, small enough for a CPU (two items, batches 1 and 2, no reference run)
    shape = ["--shapes", "small", "--n", "2"] if toy else []
    batches, debate_batches = ("1,2", "2") if toy else ("1,8", "8")

    def bench(
        name: str,
        workload: str,
        methods: str,
        skip: str,
        batch_sizes: str = batches,
        references: int = 0 if toy else 1,
    ) -> list[str]:
        return [
            *py,
            "bench.gpu",
            *tok,
            *shape,
            "--no-max-batch",
            "--batches",
            batch_sizes,
            "--workloads",
            workload,
            "--methods",
            methods,
            "--ref-n",
            f"{workload}:{references}",
            "--skip",
            skip,
            "--json",
            str(out / f"{name}.json"),
        ]

    evaluator = [*py, "bench.gpu_check", "--evaluator-batch", str(out / "kvcomm_8b.json"), *tok]
    return [
        ("tests", [*py, "bench.gpu_tests", "--json", str(out / "tests.json")], 100),
        (
            "short",
            bench("short", "short", "baseline,skyline,kvcomm,ac,ac_projected", "training"),
            90,
        ),
        (
            "long",
            bench("long", "long", "baseline,skyline,kvcomm,ac", "prefill,decode,training"),
            110,
        ),
        (
            "debate",
            # no reference: the public code's NLD and CIPHER take ~22 s an item one at a time
            bench("debate", "short", "nld,cipher", "prefill,decode,training", debate_batches, 0)
            + ([] if toy else ["--n", "8"]),
            110,
        ),
        ("kvcomm_8b", evaluator + (["--toy"] if toy else []), 70),
    ]


def evaluator_batch(path: Path, toy: bool, tokenizer_dir: Path | None) -> dict:
    """One batch of kvcomm_llama8b's KVComm at its shapes; peak device memory against the estimate."""
    import torch

    from bench.gpu import bench_tokenizer, random_model, workload
    from cross_model.config import load_config
    from cross_model.memory import estimate, shape_of_model
    from cross_model.methods.base import ModelPair
    from cross_model.methods.registry import resolve_method

    cfg = load_config(ROOT / "configs" / "kvcomm_llama8b.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = dict(cfg.methods["kvcomm"])
    cap = 64 if toy else params["max_prompt_tokens"]
    # its 30% of layers, chosen at random: the calibration's choice holds as many
    params.update(selection="random", seed=0, max_prompt_tokens=cap)
    batch, new = cfg.eval.batch_size, 128 if not toy else 8
    tokenizer, _ = bench_tokenizer(tokenizer_dir)
    lm = random_model("small" if toy else "llama-8b", tokenizer, dtype, device, seed=0)
    cls, method_params = resolve_method("kvcomm", {**params, "max_new_tokens": new})
    method = cls(method_params, ModelPair(lm, lm))
    examples = workload("long", batch, tokenizer)  # 2,000-token contexts ...
    filler = " ".join(e.prompt_A for e in examples)  # ... made as long as the cap and beyond
    examples = [replace(e, prompt_A=filler * 4) for e in examples]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.time()
    preds = method.run_batch(examples)
    seconds = time.time() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    element = torch.tensor([], dtype=dtype).element_size()
    est = estimate([shape_of_model(lm)], element, batch, cap, new, cfg.eval.reuse_prefills)
    record = {
        "config": "configs/kvcomm_llama8b.yaml",
        "shape": lm.info.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "prompt_tokens_cap": cap,
        "new_tokens": new,
        "seconds": round(seconds, 2),
        "errors": [p.error for p in preds if p.error],
        "peak_allocated_gib": None if peak is None else round(peak / 2**30, 2),
        "estimate_gib": round(est.total / 2**30, 2),
        "estimate_parts_gib": {
            k: round(getattr(est, k) / 2**30, 3)
            for k in ("weights", "kv", "prefill", "hidden_rows", "decode")
        },
        "peak_within_estimate": None if peak is None else peak <= est.total,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def environment() -> dict:
    import torch

    from cross_model.runinfo import git_commit, versions

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "versions": versions(),
        "git": git_commit(ROOT),
        "kit": sorted(p.name for p in KIT.rglob("*") if p.is_file()) if KIT.exists() else [],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="where the JSON files go ($OUT, else docs/gpu_check)"
    )
    ap.add_argument("--toy", action="store_true", help="toy shapes on any device (CPU emulation)")
    ap.add_argument("--only", default="", help="comma-separated step names (default: every step)")
    ap.add_argument(
        "--tokenizer", type=Path, default=None, help="a tokenizer folder (default .gpukit/tok)"
    )
    ap.add_argument("--evaluator-batch", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tokenizer = args.tokenizer or (KIT / "tok" if (KIT / "tok").is_dir() else None)
    if args.evaluator_batch:
        evaluator_batch(args.evaluator_batch, args.toy, tokenizer)
        return 0
    out = args.out or Path(os.environ.get("OUT") or ROOT / "docs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
    only = set(filter(None, args.only.split(",")))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    summary = {}
    for name, cmd, deadline in steps(out, args.toy, tokenizer):
        if only and name not in only:
            continue
        start = time.time()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=deadline
            )
            code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as err:
            partial = (
                err.output.decode(errors="replace") if isinstance(err.output, bytes) else err.output
            )
            code, tail = "deadline", f"over its {deadline} s deadline\n{(partial or '')[-2000:]}"
        summary[name] = {
            "exit": code,
            "seconds": round(time.time() - start, 1),
            "deadline_s": deadline,
        }
        if code != 0:
            (out / f"{name}.failed.txt").write_text(f"{' '.join(cmd)}\n{tail}\n")
        print(
            f"gpu-check {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {summary[name]['seconds']} s",
            flush=True,
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(s["exit"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
