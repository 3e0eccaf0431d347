"""Sharded, resumable evaluation of every method on every task, batch-major.

Rank r takes the test items whose index i satisfies i % world_size == r, sorts them by prompt length
and cuts them into batches of `eval.batch_size`. Each batch goes through every method before the next
batch starts: the methods that read the same prompts share one prefill of them (a `PrefillMemo` made
for the batch and dropped after it), so a full-depth KV cache lives for one batch, never longer. Each
method's rows are appended to `results/<task>/<method>/rank<r>.jsonl` (flushed and fsynced after each
batch). Started again, every rank skips what any rank (of this or an earlier world size) wrote, so a
killed or preempted evaluation loses at most one batch; rows that ended in an error run again. Every
rank agrees after each method of a batch whether to stop (a signal) or whether any rank failed.
After a barrier, rank 0 reads every rank's file and checks that each test id appears exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from cross_model.data import load_task_examples
from cross_model.data.base import Example, asked_sizes
from cross_model.distributed import (
    PeerFailed,
    Preempted,
    agreed,
    all_reduce_max,
    barrier,
    gather_object,
    get_rank,
    get_world_size,
    is_main,
)
from cross_model.failures import FailureGuard, RunRefused
from cross_model.metrics import METRICS, score_prediction
from cross_model.prefill_memo import PrefillMemo
from cross_model.progress import Progress, test_step_delay
from cross_model.prompting import PUBLIC_FAMILY, recording_prompts
from cross_model.report_files import format_table, summarize
from cross_model.result_files import (
    append_rows,
    gather_results,
    read_results,
    repair_tail,
    result_dir,
    write_json_atomically,
)

log = logging.getLogger(__name__)


# --- what the stages share ------------------------------------------------------------------------


def cut_middle(text: str, n: int) -> str:
    """`text` in at most `n` characters: its first and last halves (LongBench's rule, in characters, so
    it is the same for every model's tokenizer)."""
    if len(text) <= n:
        return text
    return text[: n // 2] + text[len(text) - (n - n // 2) :]


def cut_contexts(example: Example, n: int) -> Example:
    """Every sender's context cut to `n` characters (`tasks.N.max_context_chars`); the row records how
    long the longest was."""
    longest = max(len(c) for c in example.contexts)
    if longest <= n:
        return example
    return replace(
        example,
        prompt_A=cut_middle(example.prompt_A, n),
        more_senders=tuple(cut_middle(c, n) for c in example.more_senders),
        meta={**example.meta, "context_chars": longest},
    )


def load_splits(cfg) -> dict[str, tuple[list[Example], list[Example]]]:
    """task label (its name unless labelled) -> (test items, calibration items), the test list cut to
    `eval.limit`. `calibrate_on: test_item_0` calibrates on the first test item (and scores every row
    when n_test is null), as the public countries and tip-sheets runs do; the report marks the task."""
    splits = {}
    for i, t in enumerate(cfg.tasks):
        seed = t.seed if t.seed is not None else cfg.seed
        test, calib = load_task_examples(
            t.name,
            *asked_sizes(t.n_test, t.n_calib, t.calibrate_on),
            seed,
            t.path,
            t.max_new_tokens,
        )
        if t.calibrate_on == "test_item_0":
            calib = test[:1]
        if t.prompts == "public":  # the public code's prompt templates for every kind of task
            test, calib = (
                [replace(e, meta={**e.meta, "prompt_family": PUBLIC_FAMILY}) for e in part]
                for part in (test, calib)
            )
        if (
            t.max_context_chars is not None
        ):  # one cut for every method, before any model reads the text
            test, calib = (
                [cut_contexts(e, t.max_context_chars) for e in part] for part in (test, calib)
            )
        if t.metric is not None:  # the config's (or the preset's) metric instead of the task's own
            if t.metric not in METRICS:
                raise ValueError(
                    f"tasks.{i}.metric: unknown metric {t.metric!r}; available: {', '.join(METRICS)}"
                )
            test, calib = ([replace(e, metric=t.metric) for e in part] for part in (test, calib))
        splits[t.key] = (test[: cfg.eval.limit] if cfg.eval.limit else test, calib)
    return splits


def prepare_data(cfg) -> dict[str, tuple[list[Example], list[Example]]]:
    """The data stage, before any model loads: rank 0 loads every task first (a hub download lands in
    the shared cache once), then the others read it; every rank must then hold the same test and
    calibration ids, or the run is refused (a rank with another cache or code would score other items).
    Returns the splits, which the pipeline hands to the stages that read them."""
    try:
        first = agreed(lambda: load_splits(cfg) if is_main() else None, "load the tasks (rank 0)")
        splits = agreed(lambda: first if first is not None else load_splits(cfg), "load the tasks")
    except (FileNotFoundError, ValueError, PeerFailed) as err:
        raise RunRefused(f"data: {err}") from err
    ids = {
        key: [[e.example_id for e in test], [e.example_id for e in calib]]
        for key, (test, calib) in splits.items()
    }
    digests = gather_object(hashlib.sha256(json.dumps(ids).encode()).hexdigest())
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RunRefused(
            f"ranks {differ} hold other test or calibration items than rank 0 (the same config gave "
            f"different rows: a different dataset cache, local copy or code on their nodes); give every "
            f"node the same data (one shared HF_HOME, or tasks.N.path on a shared filesystem)"
        )
    for key, (test, calib) in splits.items():
        log.info("data: %s: %d test + %d calibration items", key, len(test), len(calib))
    return splits


# --- one task, batch-major ------------------------------------------------------------------------


@dataclass
class TaskOutcome:
    """What one rank did for one task: its batches, and how they shared prefills."""

    batches: int
    prefill_hits: int
    prefill_misses: int


def attributed_prompts(log: list[dict[str, str]], n: int) -> list[dict[str, Any]]:
    """Each row's prompts from a batch's prompt log: a batch builds each kind of prompt for its rows in
    row order, so row i has entries i, i + n, ...; a log that does not divide into rows (a batch re-run
    item by item after a failure) is given whole to every row, marked unattributed."""
    if log and len(log) % n == 0:
        return [{"prompts": log[i::n]} for i in range(n)]
    return [{"prompts": log, "prompts_unattributed": True} for _ in range(n)]


def scored_rows(
    examples: list[Example],
    preds: list,
    seconds: float,
    index_of: dict[str, int],
    run_info: dict[str, Any],
    method: Any,
    prompts: list[dict[str, Any]] | None = None,
) -> list[dict]:
    rows = []
    for i, (e, p) in enumerate(zip(examples, preds)):
        score = score_prediction(e.metric, p.answer, e.answers, e.meta.get("candidates", ()))
        if p.error:  # a failed example counts, as wrong
            score = {key: 0.0 for key in score}
        rows.append(
            {
                "example_id": e.example_id,
                "index": index_of[e.example_id],
                "answer": p.answer,
                "gold": list(e.answers),
                **score,
                "payload_bytes": p.payload_bytes,
                "sender_prefill_tokens": p.sender_prefill_tokens,
                "sender_generated_tokens": p.sender_generated_tokens,
                "receiver_prefill_tokens": p.receiver_prefill_tokens,
                "receiver_generated_tokens": p.receiver_generated_tokens,
                "seconds": seconds / len(examples),
                "rank": get_rank(),
                **run_info,
                "max_new_tokens": method.max_new_tokens(e),
                "max_prompt_tokens": method.params.max_prompt_tokens,
                "error": p.error,
                **p.extra,
                **(prompts[i] if prompts else {}),
            }
        )
    return rows


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def check_senders(task: str, test: list[Example], methods: dict[str, Any]) -> None:
    """A multi-sender task (items with several senders' contexts) only with methods that serve them."""
    senders = max((len(e.contexts) for e in test), default=1)
    for name, method in methods.items():
        if senders > 1 and not method.multi_sender:
            able = (
                ", ".join(n for n, m in methods.items() if m.multi_sender) or "none of this run's"
            )
            raise ValueError(
                f"methods.{name}: task {task} gives each item {senders} senders' contexts, and "
                f"{type(method).__name__} reads one sender; this run's methods that serve several: {able}"
            )
        named = getattr(method.params, "senders", None)
        if named and len(named) != senders:
            raise ValueError(
                f"methods.{name}.senders: {len(named)} models for task {task}, whose items have {senders} "
                f"senders; name one model per sender (or none: `sender` for all)"
            )


def release(memo: PrefillMemo, methods: dict[str, Any]) -> None:
    """Drop what a batch prefilled: the shared memo and every method's prompt-prefix cache."""
    memo.clear()
    for method in methods.values():
        method.release_memory()


def evaluate_task(ctx, task: str, test: list[Example], methods: dict[str, Any]) -> TaskOutcome:
    """This rank's share of `test` through every method, batch by batch; resumes where it stopped."""
    rank, world = get_rank(), get_world_size()
    cfg = ctx.cfg.eval
    files, done = {}, {}
    for name in methods:
        directory = result_dir(ctx.run_dir, task, name)
        directory.mkdir(parents=True, exist_ok=True)
        files[name] = directory / f"rank{rank}.jsonl"
        repair_tail(files[name])
    barrier()  # every rank's files are repaired before anyone reads them
    for name in methods:
        rows = read_results(result_dir(ctx.run_dir, task, name))
        done[name] = {
            rid for rid, row in rows.items() if not row.get("error")
        }  # failed rows run again
        if rows and is_main():
            failed = len(rows) - len(done[name])
            log.info(
                "evaluate %s/%s: %d of %d items already done; resuming%s",
                task,
                name,
                len(done[name]),
                len(test),
                f" and running again the {failed} that ended in an error" if failed else "",
            )
    for method in methods.values():
        method.set_task_items(test)
    index_of = {e.example_id: i for i, e in enumerate(test)}
    pending = [
        e
        for i, e in enumerate(test)
        if i % world == rank and any(e.example_id not in done[name] for name in methods)
    ]
    # Batches of similar lengths pad less (left padding is computed like real tokens). The same batch
    # goes through every method, so the methods reading the same prompts share their prefill.
    pending.sort(key=lambda e: (len(e.prompt_A), len(e.prompt_B)))
    batches = chunks(pending, cfg.batch_size)
    # Ranks may have different amounts left; the stop flag is a collective, so all run max(n) rounds.
    rounds = int(all_reduce_max(len(batches)))
    run_info = ctx.row_info
    guards = {
        name: FailureGuard(f"{task}/{name}", cfg.fail_fast_items, cfg.fail_fast_ratio)
        for name in methods
    }
    stop = ctx.stop
    delay = test_step_delay()
    outcome = TaskOutcome(0, 0, 0)
    todo_total = sum(e.example_id not in done[name] for e in pending for name in methods)
    bar = Progress(
        todo_total,
        f"evaluate {task}",
        unit="answers",
        note=f"rank 0's share of {len(test)} items x {len(methods)} methods, {world} ranks",
    )
    with bar:
        for b in range(rounds):
            batch = batches[b] if b < len(batches) else []
            memo = PrefillMemo(cfg.reuse_prefills)
            try:  # nothing a batch prefilled outlives it, however the round ends
                for name, method in methods.items():
                    todo = [e for e in batch if e.example_id not in done[name]]

                    def run_method() -> None:
                        for part in chunks(todo, method.params.batch_size or cfg.batch_size):
                            start = time.perf_counter()
                            with (
                                recording_prompts()
                                if cfg.log_prompts
                                else contextlib.nullcontext() as prompt_log
                            ):
                                preds = method.run_batch(part, memo=memo)
                            prompts = (
                                attributed_prompts(prompt_log, len(part))
                                if cfg.log_prompts
                                else None
                            )
                            append_rows(
                                files[name],
                                scored_rows(
                                    part,
                                    preds,
                                    time.perf_counter() - start,
                                    index_of,
                                    run_info,
                                    method,
                                    prompts,
                                ),
                            )
                            bar.update(len(part))
                            guards[name].record(preds)

                    # Every rank agrees after every method, not only after the batch round: a stop signal
                    # is honoured within one method's share of a batch (a 30-second grace period is enough
                    # at 4 x 8k tokens), and a rank that failed stops the others now, not at the timeout.
                    agreed(run_method, f"evaluate {task}/{name}")
                    if stop is not None and stop.should_stop():
                        raise Preempted(
                            f"evaluation stopped in {task}; finished examples are in {ctx.run_dir / 'results'}"
                        )
            finally:
                release(memo, methods)
            outcome.prefill_hits += memo.hits
            outcome.prefill_misses += memo.misses
            if batch:
                outcome.batches += 1
                time.sleep(delay)
    log.debug(
        "evaluate %s: %d batches, %d prefills reused, %d run",
        task,
        outcome.batches,
        outcome.prefill_hits,
        outcome.prefill_misses,
    )
    return outcome


def evaluate(
    ctx, methods: dict[str, Any], splits: dict[str, tuple[list[Example], list[Example]]]
) -> dict[str, TaskOutcome]:
    """The evaluate stage: every task through `methods`, then (rank 0) the summary of every task x method."""
    for task, (test, _) in splits.items():  # refused before any task runs
        check_senders(task, test, methods)
    outcomes = {task: evaluate_task(ctx, task, test, methods) for task, (test, _) in splits.items()}
    barrier()
    if is_main():
        summary = [
            summarize(task, name, gather_results(ctx.run_dir, task, name, test))
            for task, (test, _) in splits.items()
            for name in methods
        ]
        write_json_atomically(ctx.run_dir / "summary.json", summary)
        if "report" not in ctx.cfg.stages:  # the report stage prints it otherwise
            print(format_table(summary), flush=True)
    barrier()
    return outcomes
