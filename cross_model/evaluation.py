"""Evaluation: build the pair and the methods, calibrate, run every method on every task in batches,
shard examples over ranks (i % world_size == rank), gather on rank 0 and score.

Not yet here (issue: sharded, resumable evaluation): per-rank JSONL results with restart, and the
report files; this module keeps results in memory and prints one line per task and method.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from cross_model.data import load_task_examples
from cross_model.distributed import gather_object, get_rank, get_world_size, is_main, progress
from cross_model.methods.base import ModelPair
from cross_model.metrics import score_prediction, wilson_interval
from cross_model.models import load_model

log = logging.getLogger(__name__)


def load_pair(ctx) -> ModelPair:
    if "pair" not in ctx.state:
        m, p = ctx.cfg.models, ctx.platform
        sender = load_model(m.sender, p.dtype, p.device, m.sender_revision)
        same = m.sender == m.receiver and m.sender_revision == m.receiver_revision
        receiver = sender if same else load_model(m.receiver, p.dtype, p.device, m.receiver_revision)
        ctx.state["pair"] = ModelPair(sender, receiver)
    return ctx.state["pair"]


def task_splits(ctx) -> dict[str, tuple[list, list]]:
    if "tasks" not in ctx.state:
        ctx.state["tasks"] = {
            t.name: load_task_examples(t.name, t.n_test, t.n_calib, t.seed if t.seed is not None else ctx.cfg.seed,
                                       t.path, t.max_new_tokens)
            for t in ctx.cfg.tasks
        }
    return ctx.state["tasks"]


def build_methods(ctx) -> dict[str, Any]:
    if "methods" not in ctx.state:
        from cross_model.pipeline import method_instances

        pair = load_pair(ctx)
        ctx.state["methods"] = {name: cls(params, pair, name, ctx.run_dir) for name, cls, params in method_instances(ctx.cfg)}
    return ctx.state["methods"]


def calibrate_methods(ctx, instances: list) -> None:
    """Calibrate on the calibration splits of all tasks (never test items); saved with the run."""
    methods = build_methods(ctx)
    calib = [e for _, (_, c) in task_splits(ctx).items() for e in c]
    for name, _, _ in instances:
        path = ctx.run_dir / f"calibration-{name}.json"
        if path.exists():
            methods[name].load_calibration(json.loads(path.read_text()))
            log.info("calibrate: %s loaded its saved calibration from %s", name, path)
            continue
        result = methods[name].calibrate(calib)
        if is_main():
            path.write_text(json.dumps(result, indent=2))
        log.info("calibrate: %s keeps receiver layers %s", name, result.get("selected"))


def evaluate(ctx) -> None:
    methods = build_methods(ctx)
    rank, world = get_rank(), get_world_size()
    summary = ctx.state.setdefault("summary", [])
    for task, (test, _) in task_splits(ctx).items():
        if ctx.cfg.eval.limit:
            test = test[: ctx.cfg.eval.limit]
        shard = [e for i, e in enumerate(test) if i % world == rank]
        for name, method in methods.items():
            bs = method.params.batch_size or ctx.cfg.eval.batch_size
            start = time.perf_counter()
            preds = []
            for i in progress(range(0, len(shard), bs), desc=f"{task}/{name}"):
                preds.extend(method.run_batch(shard[i : i + bs]))
            elapsed = time.perf_counter() - start
            gathered = [p for part in gather_object([p.to_dict() for p in preds]) for p in part]
            if not is_main():
                continue
            by_id = {e.example_id: e for e in test}
            rows = []
            for p in gathered:
                e = by_id[p["example_id"]]
                s = score_prediction(e.metric, p["answer"], e.answers, e.meta.get("candidates", ()))
                rows.append({**p, **s, "gold": list(e.answers)})
            assert len(rows) == len(test), "every example is scored exactly once"
            n = len(rows)
            acc = sum(r["score"] for r in rows) / n
            lo, hi = wilson_interval(sum(r["score"] for r in rows), n)
            line = {
                "task": task, "method": name, "n": n, "accuracy": acc, "ci95": [lo, hi],
                "token_f1": sum(r["token_f1"] for r in rows) / n,
                "first_named": sum(r["first_named"] for r in rows) / n,
                "payload_bytes": sum(r["payload_bytes"] for r in rows) / n,
                "errors": sum(1 for r in rows if r["error"]), "seconds": elapsed,
            }
            summary.append(line)
            print(
                f"{task:>12} {name:>14}  acc {acc:6.1%} [{lo:5.1%}, {hi:5.1%}]  first-named {line['first_named']:6.1%}  "
                f"payload {line['payload_bytes']:>10.0f} B  errors {line['errors']}  ({elapsed:.1f}s)",
                flush=True,
            )
    if is_main():
        (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
