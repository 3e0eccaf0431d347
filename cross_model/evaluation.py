"""Sharded, resumable evaluation of every method on every task.

Rank r takes the test items whose index i satisfies i % world_size == r, runs each method in batches,
scores each answer, and appends one JSON line per finished example to
`results/<task>/<method>/rank<r>.jsonl` (flushed and fsynced after each batch). Started again, every
rank skips the ids already written by any rank (of this or an earlier world size), so a killed or
preempted evaluation loses at most one batch. A stop signal is agreed on between batches. After a
barrier, rank 0 reads every rank's file and checks that each test id appears exactly once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from cross_model.data import load_task_examples
from cross_model.data.base import Example
from cross_model.distributed import all_reduce_max, barrier, get_rank, get_world_size, is_main, progress
from cross_model.metrics import score_prediction
from cross_model.prompt_prefill import MEMO, set_memo_entries

log = logging.getLogger(__name__)

RESULTS = "results"


# --- what the stages share ------------------------------------------------------------------------


def task_splits(ctx) -> dict[str, tuple[list[Example], list[Example]]]:
    """task -> (test items, calibration items), the test list cut to `eval.limit`."""
    if "tasks" not in ctx.state:
        splits = {}
        for t in ctx.cfg.tasks:
            seed = t.seed if t.seed is not None else ctx.cfg.seed
            test, calib = load_task_examples(t.name, t.n_test, t.n_calib, seed, t.path, t.max_new_tokens)
            splits[t.name] = (test[: ctx.cfg.eval.limit] if ctx.cfg.eval.limit else test, calib)
        ctx.state["tasks"] = splits
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


def write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def calibrate_methods(ctx, instances: list) -> None:
    """Calibrate on the calibration splits of all tasks (never test items); saved with the run and
    reloaded when the run resumes."""
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
            write_json_atomically(path, result)
        if "selected" in result:
            log.info("calibrate: %s keeps receiver layers %s", name, result["selected"])
        if "layer_bits" in result:
            log.info("calibrate: %s gives its layers these bits: %s", name, result["layer_bits"])
    barrier()


# --- per-rank result files ------------------------------------------------------------------------


def result_dir(run_dir: Path, task: str, method: str) -> Path:
    return Path(run_dir) / RESULTS / task / method


def repair_tail(path: Path) -> None:
    """Cut a line left half-written by a kill, so that appending starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        log.warning("%s ends in a partial line (killed while writing); dropped %d bytes", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)


def read_results(directory: Path) -> dict[str, dict[str, Any]]:
    """example id -> its row, from every rank file in `directory` (first occurrence wins; a partial
    last line of a file another rank is writing is ignored)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row["example_id"] in rows:
                log.warning("%s: duplicate result for %s ignored", path, row["example_id"])
                continue
            rows[row["example_id"]] = row
    return rows


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def scored_rows(examples: list[Example], preds: list, seconds: float, index_of: dict[str, int]) -> list[dict]:
    rows = []
    for e, p in zip(examples, preds):
        score = score_prediction(e.metric, p.answer, e.answers, e.meta.get("candidates", ()))
        if p.error:  # a failed example counts, as wrong
            score = {key: 0.0 for key in score}
        rows.append({
            "example_id": e.example_id, "index": index_of[e.example_id], "answer": p.answer, "gold": list(e.answers),
            **score, "payload_bytes": p.payload_bytes,
            "sender_prefill_tokens": p.sender_prefill_tokens, "sender_generated_tokens": p.sender_generated_tokens,
            "receiver_prefill_tokens": p.receiver_prefill_tokens,
            "receiver_generated_tokens": p.receiver_generated_tokens,
            "seconds": seconds / len(examples), "rank": get_rank(), "error": p.error, **p.extra,
        })
    return rows


def run_method_on_task(ctx, task: str, test: list[Example], name: str, method: Any) -> None:
    """This rank's share of `test` for one method, appended to its file; resumes where it stopped."""
    from cross_model.pipeline import Preempted

    rank, world = get_rank(), get_world_size()
    directory = result_dir(ctx.run_dir, task, name)
    directory.mkdir(parents=True, exist_ok=True)
    mine = directory / f"rank{rank}.jsonl"
    repair_tail(mine)
    barrier()  # every rank's file is repaired before anyone reads them
    done = read_results(directory)
    index_of = {e.example_id: i for i, e in enumerate(test)}
    todo = [e for i, e in enumerate(test) if i % world == rank and e.example_id not in done]
    # Batches of similar lengths pad less (left padding is computed like real tokens). Every method sorts
    # the same way, so batches stay identical across methods and their prefills can be shared.
    todo.sort(key=lambda e: (len(e.prompt_A), len(e.prompt_B)))
    bs = method.params.batch_size or ctx.cfg.eval.batch_size
    # Ranks may have different amounts left; the stop flag is a collective, so all run max(n) rounds.
    rounds = int(all_reduce_max(math.ceil(len(todo) / bs)))
    if done and is_main():
        log.info("evaluate %s/%s: %d of %d items already done; resuming", task, name, len(done), len(test))
    stop = ctx.state.get("stop")
    delay = float(os.environ.get("CROSS_MODEL_TEST_STEP_DELAY", "0"))  # lets tests kill a run mid-evaluation
    for b in progress(range(rounds), desc=f"{task}/{name}"):
        batch = todo[b * bs : (b + 1) * bs]
        if batch:
            start = time.perf_counter()
            preds = method.run_batch(batch)
            append_rows(mine, scored_rows(batch, preds, time.perf_counter() - start, index_of))
            time.sleep(delay)
        if stop is not None and stop.should_stop():
            raise Preempted(f"evaluation stopped in {task}/{name}; finished examples are in {directory}")


def gather_results(run_dir: Path, task: str, name: str, test: list[Example]) -> list[dict[str, Any]]:
    """Every test item's row, in test order; an item without a row is an error, never skipped."""
    rows = read_results(result_dir(run_dir, task, name))
    missing = [e.example_id for e in test if e.example_id not in rows]
    if missing:
        raise RuntimeError(
            f"{task}/{name}: {len(missing)} of {len(test)} test items have no result ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); run the evaluate stage again to finish them"
        )
    return [rows[e.example_id] for e in test]


def evaluate(ctx) -> None:
    from cross_model.reporting import format_table, summarize

    methods = build_methods(ctx)
    set_memo_entries(ctx.cfg.eval.reuse_prefills)
    for task, (test, _) in task_splits(ctx).items():
        for name, method in methods.items():
            run_method_on_task(ctx, task, test, name, method)
        log.debug("evaluate: after %s, %d prefills reused and %d run so far", task, MEMO.hits, MEMO.misses)
        MEMO.clear()  # a task's prompts serve no other task
    barrier()
    if is_main():
        summary = [summarize(task, name, gather_results(ctx.run_dir, task, name, test))
                   for task, (test, _) in task_splits(ctx).items() for name in methods]
        ctx.state["summary"] = summary
        write_json_atomically(ctx.run_dir / "summary.json", summary)
        if "report" not in ctx.cfg.stages:  # the report stage prints it otherwise
            print(format_table(summary), flush=True)
    barrier()
