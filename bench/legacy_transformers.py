"""Do the packaged models' cache directories read the same in transformers 4.53 (the public KVComm
code's pin) as in ours? Loads each directory in a child process per transformers version (4.53 from
a `--target` install given by --legacy-path), compares the tokenizer's ids, the last-position logits
and 8 greedy tokens, and writes what it saw.

    python -m bench.legacy_transformers --legacy-path /tmp/tf453 --json docs/legacy_transformers.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TEXTS = (
    "Uma is at the Eiffel Tower. Which country is Uma located in? Answer:",
    "The capital of France is",
)
MODELS = ("smollm2-135m-instruct", "gemma3-270m")


def read_directories(directories: list[str]) -> dict:
    """In this process's transformers (nothing of ours imported, so nothing of v5's): each model's
    tokenizer class, ids, logits and greedy answers."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 4.53 names the dtype argument torch_dtype (it would keep `dtype` in the config); v5 dtype
    dtype_arg = "torch_dtype" if int(transformers.__version__.split(".")[0]) < 5 else "dtype"
    out = {"transformers": transformers.__version__, "models": {}}
    for name, directory in zip(MODELS, directories):
        tok = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, **{dtype_arg: torch.float32}).eval()
        rows = []
        for text in TEXTS:
            ids = torch.tensor([tok(text)["input_ids"]])
            with torch.inference_mode():
                logits = model(input_ids=ids).logits[0, -1]
                gen = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
                )
            rows.append(
                {
                    "ids": ids[0].tolist(),
                    "logits": logits.tolist(),
                    "answer": tok.decode(gen[0, ids.shape[1] :]),
                }
            )
        out["models"][name] = {"tokenizer_class": type(tok).__name__, "rows": rows}
    return out


def _child(python_path: str | None, directories: list[str]) -> dict:
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join([python_path, env.get("PYTHONPATH", ""), os.getcwd()])
    done = subprocess.run(
        [sys.executable, "-m", "bench.legacy_transformers", "--read", *directories],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(
            f"reading the directories failed ({python_path or 'ours'}):\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(ours: dict, legacy: dict) -> dict:
    models = {}
    for name in MODELS:
        a, b = ours["models"][name]["rows"], legacy["models"][name]["rows"]
        models[name] = {
            "tokenizer_class": [
                ours["models"][name]["tokenizer_class"],
                legacy["models"][name]["tokenizer_class"],
            ],
            "same_ids": all(x["ids"] == y["ids"] for x, y in zip(a, b)),
            "max_abs_logit_difference": max(
                abs(p - q) for x, y in zip(a, b) for p, q in zip(x["logits"], y["logits"])
            ),
            "same_answers": all(x["answer"] == y["answer"] for x, y in zip(a, b)),
            "answers": [x["answer"] for x in a],
        }
    from cross_model.runinfo import git_commit

    return {
        "transformers": [ours["transformers"], legacy["transformers"]],
        "texts": list(TEXTS),
        "models": models,
        "git": git_commit(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.legacy_transformers", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--legacy-path", help="a directory holding transformers 4.53 (pip install --target)"
    )
    ap.add_argument("--json", help="write the comparison here")
    ap.add_argument("--read", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read:
        print(json.dumps(read_directories(args.read)))
        return
    from cross_model.models import load_model, packaged_dir

    for name in MODELS:
        if not (packaged_dir(name) / "COMPLETE").exists():
            load_model(name)  # writes the directory, in our transformers
    directories = [str(packaged_dir(name)) for name in MODELS]
    result = compare(_child(None, directories), _child(args.legacy_path, directories))
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
