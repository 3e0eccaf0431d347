"""`make qkvcomm-scheme`: choose Q-KVComm's quantization scheme on calibration items, never test items.

For each candidate scheme (the default, the plain first scheme, and the default with one part changed)
and each width, the mean KL divergence of B's next-token distribution at its first answer token from
KVComm's unquantized one, over the calibration splits of the quickstart's tasks (`--n-calib` items
each, the experiments' seed: disjoint from their test items by construction), with the layers KVComm
keeps at 30% (calibrated on the same items), and the mean payload bytes. Lower KL is closer to KVComm.
Schemes are compared at about the same bytes: among those within 10% of the leanest payload at every
width, the least mean KL over the widths wins, and `QKVCommParams`' defaults are that scheme. Writes
docs/qkvcomm/scheme_choice.json and prints the table.

    python -m bench.choose_qkvcomm_scheme [--n-calib 40] [--bits 2,3] [--json docs/qkvcomm/scheme_choice.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cross_model.data import load_task_examples
from cross_model.methods.base import ModelPair
from cross_model.methods.qkvcomm import QKVCommParams
from cross_model.methods.registry import resolve_method
from cross_model.models import load_model
from cross_model.runinfo import git_commit

TASKS = ("countries", "tipsheets")
SAME_BYTES = 0.10  # schemes within 10% of the leanest payload at every width compete on KL
BASE = QKVCommParams().scheme()
CANDIDATES = {
    "default": BASE,
    "plain (the first scheme)": replace(
        BASE, key_group=0, value_group="token", rotate=False, raw_first=0, clip=False, sink_bits=16
    ),
    "no rotation": replace(BASE, rotate=False),
    "first token quantized": replace(BASE, raw_first=0),
    "no clipping": replace(BASE, clip=False),
    "values over all heads": replace(BASE, value_group="token"),
    "keys in groups of 16 tokens": replace(BASE, key_group=16),
    "sinks raw": replace(BASE, sink_bits=16),
}


def scheme_params(scheme) -> dict:
    return {k: v for k, v in asdict(scheme).items()}


def measure(method, examples, selected, bits: int, batch: int) -> tuple[float, float]:
    """(mean KL from unquantized KVComm, mean payload bytes) over `examples`."""
    kl = size = 0.0
    widths = [bits] * len(selected)
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        ref = method.first_logits(chunk, selected, None).float().log_softmax(-1)
        got = method.first_logits(chunk, selected, widths).float().log_softmax(-1)
        kl += float((ref.exp() * (ref - got)).sum(-1).clamp(min=0).double().sum())
        pre, cache, sink = method.sender_cache(chunk, selected)
        size += sum(method.send_quantized(pre, cache, sink, selected, widths)[2])
    return kl / len(examples), size / len(examples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.choose_qkvcomm_scheme",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-calib", type=int, default=40, help="calibration items per task")
    ap.add_argument(
        "--seed", type=int, default=0, help="the experiments' seed (its calibration split)"
    )
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    bits = [int(b) for b in args.bits.split(",")]
    torch.manual_seed(0)
    lm = load_model(args.model)
    calib = [e for t in TASKS for e in load_task_examples(t, 1, args.n_calib, args.seed)[1]]
    cls, p = resolve_method("qkvcomm", {"selection": "calibrate", "top_layers": 0.3})
    layers = cls(p, ModelPair(lm, lm), "layers")
    layers.calibrate(calib)
    selected = layers.selected_layers()
    rows = []
    for name, scheme in CANDIDATES.items():
        cls, p = resolve_method(
            "qkvcomm",
            {
                "selection": "layers",
                "layers_list": sorted(selected),
                "always_send_layer0": False,
                **scheme_params(scheme),
            },
        )
        method = cls(p, ModelPair(lm, lm), name)
        start = time.perf_counter()
        got = {b: measure(method, calib, selected, b, args.batch) for b in bits}
        kl, size = {b: v[0] for b, v in got.items()}, {b: v[1] for b, v in got.items()}
        rows.append(
            {
                "scheme": name,
                "params": scheme_params(scheme),
                "kl": kl,
                "bytes": size,
                "mean_kl": sum(kl.values()) / len(kl),
            }
        )
        print(
            f"{name:28s} "
            + "  ".join(f"{b} bits: KL {kl[b]:.4f}, {size[b]:,.0f} B" for b in bits)
            + f"   ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    # Compared at about the same bytes: a scheme may not spend more than SAME_BYTES over the leanest
    # scheme at any width (finer groups buy accuracy with scales, which is a different budget).
    lean = {b: min(r["bytes"][b] for r in rows) for b in bits}
    for r in rows:
        r["within_budget"] = all(r["bytes"][b] <= (1 + SAME_BYTES) * lean[b] for b in bits)
    best = min((r for r in rows if r["within_budget"]), key=lambda r: r["mean_kl"])
    print(f"\nleast mean KL: {best['scheme']} ({best['params']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "tasks": list(TASKS),
                    "n_calib_per_task": args.n_calib,
                    "seed": args.seed,
                    "calibration_ids": [e.example_id for e in calib],
                    "selected_layers": sorted(selected),
                    "bits": bits,
                    "same_bytes_tolerance": SAME_BYTES,
                    "rows": rows,
                    "best": best["scheme"],
                    "default_is_best": best["params"] == scheme_params(BASE),
                    "git": git_commit(),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
