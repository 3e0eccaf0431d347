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
from cross_model.metrics import score_prediction, wilson_interval

log = logging.getLogger(__name__)


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
        from cross_model.pipeline import method_instances, model_pair

        methods = {}
        for name, cls, params in method_instances(ctx.cfg):
            methods[name] = method = cls(params, model_pair(ctx, params), name, ctx.run_dir)
            if cls.needs_training(params):
                method.set_projection_from(trained_projection(ctx, name, method))
        ctx.state["methods"] = methods
    return ctx.state["methods"]


def trained_projection(ctx, name: str, method) -> str:
    """Where the train stage put this method's projection (this run or an earlier one)."""
    from cross_model.checkpointing import verify
    from cross_model.training import final_projection_dir, projection_identity, resolved_train_config, training_recipe

    path = ctx.state.get("projections", {}).get(name)
    if path is None:
        identity = projection_identity(method.pair.sender, method.pair.receiver, method.params.k, method.params.j)
        train = resolved_train_config(ctx.cfg)
        path = final_projection_dir(train.checkpoint_dir, identity, training_recipe(train, ctx.cfg.seed))
    if verify(path)[0] is None:
        raise FileNotFoundError(
            f"methods.{name}: projection: train, but no finished projection at {path}; "
            f"run the train stage first (stages: [train, ...]) with the same train settings"
        )
    return str(path)


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
