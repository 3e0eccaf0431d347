"""What a first 8B run on GPUs would meet, checked on CPU by the property itself: the bytes each cache
keeps after a batch, the references an out-of-memory retry drops, rows re-run after failing, a stop or
a failing rank honoured between methods."""

import json
import os
import signal
import weakref

import pytest
import torch

from cross_model.data import load_task_examples
from cross_model.failures import is_out_of_memory, measure_in_batches, poisons_process
from cross_model.memory import held_bytes
from cross_model.methods.base import Method, ModelPair, Prediction
from cross_model.methods.registry import _METHODS, register, resolve_method
from cross_model.models import load_model
from cross_model.prefill_memo import PrefillMemo, run_prefill
from cross_model.prompt_prefix_cache import PrefixCache
from cross_model.prompting import chat_wrap, encode_texts, pad_left
from cross_model.result_files import finished_ids, read_results
from tests.tolerance import forward_budget, reorder_atol


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama-64")


@pytest.fixture(scope="module")
def items():
    return load_task_examples("countries", 4, 0, seed=5, max_new_tokens=3)[0]


def _ids(lm, texts):
    return encode_texts(lm, [chat_wrap(lm, t) for t in texts], None)


# --- memory: hold only what is used ----------------------------------------------------------------


def test_a_prefill_keeps_its_kv_and_one_row_per_layer_not_the_layer_outputs(lm, items):
    ids = _ids(lm, [e.prompt_A + " " * 40 + e.prompt_B for e in items])  # long rows: T >> 1
    batch = pad_left(ids, lm.tokenizer.pad_token_id, lm.device)
    B, T = batch.input_ids.shape
    for layers in (None, 2):
        pre = run_prefill(lm, batch, ids, layers)
        D, n = lm.info.hidden_size, pre.layers
        elem = torch.finfo(lm.model.dtype).bits // 8
        for h in pre.hidden_last:  # each a copy of B x D, not a view of B x T x D
            assert h.untyped_storage().nbytes() == B * D * elem
        kv = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in pre.kv)
        assert kv == 2 * n * B * lm.info.num_kv_heads * T * lm.info.head_dim * elem
        logits = B * lm.model.config.vocab_size * elem if layers is None else 0
        hidden = (n + 1) * B * D * elem
        memo = PrefillMemo()
        memo._entries["k"] = (weakref.ref(lm.model), pre)
        ids_and_mask = held_bytes(pre.input_ids, pre.suffix_mask)
        assert ids_and_mask == 2 * B * T * 8
        # What the memo keeps is the cache plus B x D per layer (and the last logits and the ids), nothing more.
        assert held_bytes(memo) == kv + hidden + logits + ids_and_mask


def test_the_prefix_cache_is_bounded_in_bytes_and_emptied_by_release(lm, items):
    ids = _ids(lm, ["A long shared document. " * 30 + e.prompt_B for e in items])
    big = PrefixCache()
    split = big.split(lm, ids)
    assert split is not None and split.prefix_len > 100
    one_prefix = big.nbytes
    assert one_prefix == held_bytes(big) > 0
    bounded = PrefixCache(max_bytes=one_prefix - 1)  # a prefix over the bound is used, never kept
    again = bounded.split(lm, ids)
    assert (
        torch.equal(again.cache.layers[0].keys, split.cache.layers[0].keys) and bounded.nbytes == 0
    )
    two = PrefixCache(max_bytes=one_prefix + 1)
    two.split(lm, ids)
    two.split(lm, _ids(lm, ["Another shared document. " * 30 + e.prompt_B for e in items]))
    assert two.nbytes <= one_prefix + 1 and len(two._entries) == 1  # the older prefix went
    cls, p = resolve_method("baseline", {})
    m = cls(p, ModelPair(lm, lm))
    m.prefix_cache = big
    m.release_memory()
    assert big.nbytes == 0 and held_bytes(m.prefix_cache) == 0


def test_the_evaluator_frees_every_cache_after_each_batch(tmp_path):
    """Each batch starts with no prefix a method cached in an earlier batch, and no memo entry."""
    import run_experiments
    from cross_model.methods.baseline import Baseline

    seen = []

    @register("records_held")
    class RecordsHeld(Baseline):
        def _run_batch(self, examples):
            seen.append(
                (self.prefix_cache.nbytes, self._memo.hits + self._memo.misses if self._memo else 0)
            )
            out = super()._run_batch(examples)
            assert self.prefix_cache.nbytes > 0  # it did cache the chat template's prefix
            return out

    try:
        rc = run_experiments.main(
            [
                "--config",
                "configs/tiny.yaml",
                "--output_dir",
                str(tmp_path),
                "--stages",
                "[evaluate]",
                "--methods",
                '{"held": {"method": "records_held"}}',
                "--eval.batch_size",
                "2",
            ]
        )
    finally:
        _METHODS.pop("records_held")
    assert rc == 0
    assert len(seen) == 5  # 3 batches of countries, 2 of tipsheets
    assert all(prefix == 0 and memo == 0 for prefix, memo in seen), seen


# --- out of memory: retried outside the handler, at the size that fitted ----------------------------


def test_out_of_memory_is_told_from_poison():
    for text in (
        "CUDA error: out of memory",
        "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)",
        "MPS backend out of memory",
    ):
        assert is_out_of_memory(RuntimeError(text)) and not poisons_process(RuntimeError(text))
    assert is_out_of_memory(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    )
    for text in (
        "CUDA error: device-side assert triggered",
        "CUBLAS_STATUS_EXECUTION_FAILED",
        "NCCL error",
    ):
        assert poisons_process(RuntimeError(text)) and not is_out_of_memory(RuntimeError(text))


class _Hungry(Method):
    """Allocates a large tensor per attempt and runs out of memory on batches larger than `fits`."""

    def __init__(self, fits: int):
        self.fits, self.sizes, self.allocations, self.alive_at_retry = fits, [], [], []
        cls, p = resolve_method("baseline", {})
        self.params, self.name, self._memo, self.fitted_batch_size = p, "hungry", None, None
        self.prefix_cache = PrefixCache()

    def _run_batch(self, examples):
        self.alive_at_retry.append(sum(r() is not None for r in self.allocations))
        self.sizes.append(len(examples))
        activations = torch.ones(len(examples), 1 << 20)  # 4 MiB per row, held by this frame
        self.allocations.append(weakref.ref(activations))
        if len(examples) > self.fits:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {activations.numel() * 8} bytes"
            )
        return [Prediction(e.example_id, "x", 0) for e in examples]


def test_out_of_memory_frees_the_failed_attempt_before_retrying_and_remembers_the_size(items):
    m = _Hungry(fits=1)
    preds = m.run_batch(items)
    assert [p.example_id for p in preds] == [e.example_id for e in items] and not any(
        p.error for p in preds
    )
    assert m.sizes == [4, 2, 1, 1, 2, 1, 1]
    # Every attempt started with every earlier attempt's activations freed: the retry did not run
    # inside the handler, where the traceback would have kept the failed frames (and tensors) alive.
    assert m.alive_at_retry == [0] * len(m.sizes)
    assert m.fitted_batch_size == 1
    m.sizes.clear()
    m.run_batch(items)
    assert m.sizes == [1, 1, 1, 1]  # later batches start at the size that fitted


def test_calibration_batches_halve_on_out_of_memory_with_the_failed_batch_freed():
    allocations, alive = [], []

    def measure(part):
        alive.append(sum(r() is not None for r in allocations))
        held = torch.ones(len(part), 1 << 18)
        allocations.append(weakref.ref(held))
        if len(part) > 2:
            raise RuntimeError("CUDA error: out of memory")
        return sum(part)

    out = measure_in_batches(list(range(10)), 8, measure, "test")
    assert [len(p) for p, _ in out] == [2, 2, 2, 2, 2]  # 8 -> 4 -> 2, then 2 for the rest
    assert sum(r for _, r in out) == sum(range(10)) and alive == [0] * len(alive)
    with pytest.raises(ValueError):
        measure_in_batches([1, 2], 2, lambda p: (_ for _ in ()).throw(ValueError("a bug")), "test")


@pytest.mark.float_sensitive
def test_kvcomm_calibration_at_any_batch_size_measures_the_same(lm):
    from tests.test_methods import make

    _, calib = load_task_examples("countries", 1, 6, seed=2)
    m = make("kvcomm", selection="calibrate", top_layers=0.5)
    one = m.calibrate(calib, batch_size=1)["importance"]
    six = m.calibrate(calib, batch_size=6)["importance"]
    atol = reorder_atol(
        torch.ones(1), **forward_budget(m.pair.receiver, 512)
    )  # masses <= 1, prompts < 512
    assert one == pytest.approx(six, abs=atol)


# --- a run that failed can be finished ---------------------------------------------------------------


def test_an_error_row_gives_way_to_a_later_answer(tmp_path):
    rows = [
        {"example_id": "a", "error": "boom"},
        {"example_id": "b", "error": None, "answer": "1"},
        {"example_id": "a", "error": None, "answer": "2"},
        {"example_id": "c", "error": "x"},
        {"example_id": "c", "error": "y"},
        {"example_id": "b", "error": None, "answer": "dup"},
    ]
    (tmp_path / "rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (tmp_path / "rank1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    got = read_results(tmp_path)
    assert got["a"]["answer"] == "2" and got["a"]["failed_attempts"] == 1
    assert got["b"]["answer"] == "1" and "failed_attempts" not in got["b"]
    assert got["c"]["error"] == "y"
    assert finished_ids(tmp_path) == {"a", "b"}


def test_resume_runs_failed_rows_again_and_the_report_counts_them(tmp_path):
    import run_experiments
    from cross_model.methods.baseline import Baseline

    broken = {"on": True}

    @register("flaky_once")
    class FlakyOnce(Baseline):
        def _run_batch(self, examples):
            if broken["on"] and any(int(e.example_id.rsplit("-", 1)[-1]) % 2 for e in examples):
                raise RuntimeError("transient failure")
            return super()._run_batch(examples)

    args = [
        "--config",
        "configs/tiny.yaml",
        "--output_dir",
        str(tmp_path),
        "--stages",
        "[evaluate,report]",
        "--methods",
        '{"baseline": {}, "flaky": {"method": "flaky_once"}}',
        "--eval.batch_size",
        "3",
        "--eval.fail_fast_items",
        "0",
    ]
    try:
        assert run_experiments.main(args) == 0
        first = json.loads((tmp_path / "tiny" / "results.json").read_text())
        failed = {
            t: sum(1 for r in first["examples"][t]["flaky"] if r["error"])
            for t in ("countries", "tipsheets")
        }
        assert all(failed.values())
        broken["on"] = False
        assert run_experiments.main(args) == 0
    finally:
        _METHODS.pop("flaky_once")
    data = json.loads((tmp_path / "tiny" / "results.json").read_text())
    for task in ("countries", "tipsheets"):
        rows, base = data["examples"][task]["flaky"], data["examples"][task]["baseline"]
        assert not any(r["error"] for r in rows)
        assert [r["answer"] for r in rows] == [r["answer"] for r in base]
        line = next(s for s in data["summary"] if s["task"] == task and s["method"] == "flaky")
        assert line["errors"] == 0 and line["rerun"] == failed[task]
    assert (
        "Re-run after failing in an earlier start" in (tmp_path / "tiny" / "results.md").read_text()
    )


def test_a_stop_signal_is_honoured_between_methods_within_a_batch(tmp_path):
    """SIGTERM during the first method of the first batch: the second method does not start."""
    import run_experiments
    from cross_model.methods.baseline import Baseline

    @register("signals_stop")
    class SignalsStop(Baseline):
        def _run_batch(self, examples):
            os.kill(os.getpid(), signal.SIGTERM)
            return super()._run_batch(examples)

    try:
        rc = run_experiments.main(
            [
                "--config",
                "configs/tiny.yaml",
                "--output_dir",
                str(tmp_path),
                "--stages",
                "[evaluate]",
                "--methods",
                '{"first": {"method": "signals_stop"}, "second": {"method": "baseline"}}',
                "--eval.batch_size",
                "6",
            ]
        )
    finally:
        _METHODS.pop("signals_stop")
    assert rc == 0
    results = tmp_path / "tiny" / "results" / "countries"
    assert len(read_results(results / "first")) == 6
    assert not read_results(results / "second")


def _failing_rank(rank: int, port: int, out) -> None:
    from cross_model import distributed as d

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    with d.distributed_session("gloo"):

        def work():
            if rank == 1:
                raise ValueError("rank 1's own error")
            return 1.0

        try:
            d.agreed(work, "measure")
            d.all_reduce_sum(
                [1.0]
            )  # where the healthy rank would wait for the failed one, for 30 minutes
            out.put((rank, "went on"))
        except Exception as exc:  # noqa: BLE001
            out.put((rank, f"{type(exc).__name__}: {exc}"))


def _two_ranks(target) -> dict[int, str]:
    from tests.helpers import two_gloo_ranks

    return two_gloo_ranks(target)


def test_one_ranks_failure_stops_every_rank_at_once():
    got = _two_ranks(_failing_rank)
    assert got[1] == "ValueError: rank 1's own error"
    assert got[0].startswith("PeerFailed: measure: another rank failed")


# --- identity: the tracked code, this run's config, torch and transformers ----------------------------


def test_code_identity_ignores_new_untracked_and_config_files_but_not_tracked_code(tmp_path):
    import shutil
    import subprocess

    from cross_model.runinfo import git_commit

    repo = tmp_path / "repo"
    (repo / "cross_model").mkdir(parents=True)
    (repo / "configs").mkdir()
    (repo / "cross_model" / "a.py").write_text("x = 1\n")
    (repo / "configs" / "run.yaml").write_text("name: a\n")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    first = git_commit(repo)
    (repo / "configs" / "queued_later.yaml").write_text("name: b\n")  # written while the job waits
    (repo / "configs" / "run.yaml").write_text("name: edited\n")  # another run's config, edited
    (repo / "cross_model" / "scratch.py").write_text(
        "y = 2\n"
    )  # untracked: never imported by the run
    assert git_commit(repo)["changes"] == first["changes"] is None
    (repo / "cross_model" / "a.py").write_text("x = 2\n")
    assert git_commit(repo)["changes"] is not None
    shutil.rmtree(repo)


def test_a_resume_with_other_torch_or_transformers_is_refused_unless_allowed(tmp_path):
    from cross_model.config import load_config
    from cross_model.runinfo import prepare_run_dir, run_identity
    from tests.helpers import write_a_result_row

    cfg = load_config("configs/tiny.yaml", ["--output_dir", str(tmp_path)])
    meta = {"git": {"commit": "abc"}, "versions": {"torch": "2.13.0", "transformers": "5.23.0"}}
    first = run_identity(meta, "cpu", "float32")
    assert first["torch"] == "2.13.0" and first["transformers"] == "5.23.0"
    prepare_run_dir(cfg, {}, first)
    write_a_result_row(tmp_path / "tiny")
    later = run_identity(
        {**meta, "versions": {"torch": "2.13.0", "transformers": "5.17.0"}}, "cpu", "float32"
    )
    with pytest.raises(ValueError, match="transformers 5.23.0 -> 5.17.0.*--allow-code-change"):
        prepare_run_dir(cfg, {}, later)
    assert prepare_run_dir(cfg, {}, later, allow_code_change=True) == 1
    old_run = {
        k: v for k, v in first.items() if k not in ("torch", "transformers")
    }  # identity.json of an older run
    (tmp_path / "tiny" / "identity.json").write_text(json.dumps(old_run))
    assert prepare_run_dir(cfg, {}, later) == 2


def test_evaluate_without_the_calibrate_stage_loads_the_saved_calibration_or_refuses_before_any_work(
    tmp_path, capsys
):
    import run_experiments

    common = [
        "--config",
        "configs/tiny.yaml",
        "--output_dir",
        str(tmp_path),
        "--methods",
        '{"baseline": {}, "kvcomm": {"selection": "calibrate", "top_layers": 0.5}}',
    ]
    assert run_experiments.main([*common, "--stages", "[evaluate, report]"]) == 2
    assert "no saved calibration" in capsys.readouterr().err
    assert not (tmp_path / "tiny" / "results").exists()  # refused before any row
    assert run_experiments.main([*common, "--stages", "[calibrate]"]) == 0
    saved = json.loads((tmp_path / "tiny" / "calibration-kvcomm.json").read_text())
    assert run_experiments.main([*common, "--stages", "[evaluate, report]"]) == 0
    data = json.loads((tmp_path / "tiny" / "results.json").read_text())
    rows = data["examples"]["countries"]["kvcomm"]
    assert not any(r["error"] for r in rows)
    assert all(r["layers"] == saved["selected"] for r in rows)


# --- data: loads under datasets >= 4, before any model, the same on every rank ------------------------


def _longbench_parquet(path, n: int, schema: str = "harness"):
    """A parquet file in a LongBench copy's format (written by us): the script's fields, or the
    harness copy's renamed ones (`question` for `input`), without `_id`."""
    import datasets

    rows = []
    for i in range(n):
        row = {
            "context": f"Paper {i} evaluates on dataset D{i}.",
            "answers": [f"D{i}"],
            "length": 7,
            "dataset": "qasper",
            "language": "en",
            "all_classes": None,
        }
        row.update(
            {"input": f"Which dataset does paper {i} use?", "_id": f"lb{i}"}
            if schema == "script"
            else {"question": f"Which dataset does paper {i} use?"}
        )
        rows.append(row)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return rows


@pytest.mark.parametrize("schema", ["script", "harness"])
def test_longbench_loads_from_a_parquet_copy_in_either_format(tmp_path, schema):
    rows = _longbench_parquet(tmp_path / "qasper.parquet", 12, schema)
    test, calib = load_task_examples("qasper", 5, 3, path=str(tmp_path / "qasper.parquet"))
    by_context = {r["context"]: r for r in rows}
    for e in test + calib:
        r = by_context[e.prompt_A]
        assert e.prompt_B == r.get("input", r.get("question")) and list(e.answers) == r["answers"]
    assert len({e.example_id for e in test + calib}) == 8
    again, _ = load_task_examples(
        "qasper", 5, 3, path=str(tmp_path)
    )  # the directory holding the copy
    assert [e.example_id for e in again] == [e.example_id for e in test]


def test_every_hub_source_of_a_longbench_task_is_the_pinned_parquet_copy():
    from cross_model.data.base import get_task
    from cross_model.data.hub import REVISIONS

    for name, rows in (("qasper", 200), ("multifieldqa_en", 150), ("twowikimqa", 200)):
        task = get_task(name)
        assert task.source.path == "Xnhyacinth/LongBench" and task.rows_available == rows
        assert (
            task.source.revision == REVISIONS["Xnhyacinth/LongBench"]
            and len(task.source.revision) == 40
        )


def test_dry_run_fails_in_seconds_when_a_config_asks_more_rows_than_the_source_has(
    tmp_path, capsys
):
    import run_experiments

    assert run_experiments.main(["--config", "configs/kvcomm_llama8b.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tasks.qasper:" in out and "192 test + 8 calibration" in out
    assert (
        run_experiments.main(
            [
                "--config",
                "configs/kvcomm_llama8b.yaml",
                "--dry-run",
                "--tasks",
                "[{name: qasper, n_test: 200, n_calib: 8}]",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "do not fit the 200 rows" in err and "at most 192 test rows" in err
    # A local copy is loaded and counted for real.
    _longbench_parquet(tmp_path / "q.parquet", 60)
    args = ["--config", "configs/tiny.yaml", "--dry-run", "--tasks"]
    assert (
        run_experiments.main(
            [*args, f"[{{name: qasper, n_test: 52, n_calib: 4, path: {tmp_path / 'q.parquet'}}}]"]
        )
        == 0
    )
    assert "52 test + 4 calibration items" in capsys.readouterr().out
    assert (
        run_experiments.main(
            [*args, f"[{{name: qasper, n_test: 53, n_calib: 4, path: {tmp_path / 'q.parquet'}}}]"]
        )
        == 2
    )
    assert (
        "data error: tasks.qasper: n_test (53) exceeds the 52 test rows of its 60 (the last 8 are kept"
        in capsys.readouterr().err
    )


def test_data_check_loads_one_row_of_every_task_and_fails_on_a_broken_one(tmp_path, capsys):
    from cross_model.data.check import main

    _longbench_parquet(tmp_path / "q.parquet", 3)
    assert (
        main(
            [
                "check",
                "configs/tiny.yaml",
                "--tasks",
                f"[{{name: countries}}, {{name: qasper, path: {tmp_path / 'q.parquet'}}}]",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "tasks.countries: ok" in out and "tasks.qasper: ok" in out and "2 of 2 tasks loaded" in out
    )
    (tmp_path / "bad.jsonl").write_text('{"prompt_A": "x"}\n')
    assert (
        main(
            [
                "check",
                "configs/tiny.yaml",
                "--tasks",
                f"[{{name: jsonl, path: {tmp_path / 'bad.jsonl'}}}]",
            ]
        )
        == 1
    )
    assert "tasks.jsonl: FAILED" in capsys.readouterr().out


def test_a_task_that_cannot_load_stops_the_run_before_any_model_loads(
    tmp_path, capsys, monkeypatch
):
    import run_experiments
    from cross_model import context

    loaded = []
    monkeypatch.setattr(
        context, "load_model", lambda *a, **k: loaded.append(a) or pytest.fail("a model loaded")
    )
    _longbench_parquet(tmp_path / "q.parquet", 3)
    rc = run_experiments.main(
        [
            "--config",
            "configs/tiny.yaml",
            "--output_dir",
            str(tmp_path),
            "--tasks",
            f"[{{name: countries}}, {{name: qasper, n_test: 10, path: {tmp_path / 'q.parquet'}}}]",
        ]
    )
    assert rc == 2 and not loaded
    assert (
        "run error: data: tasks.qasper: n_test (10) + n_calib (8) exceeds the 3 rows available"
        in capsys.readouterr().err
    )


def _other_items_on_rank_1(rank: int, port: int, out) -> None:
    from cross_model import distributed as d
    from cross_model import evaluation
    from cross_model.config import load_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    cfg = load_config("configs/tiny.yaml", ["--tasks", "[{name: countries, n_test: 4}]"])
    if rank == 1:  # as if this node's cache held another copy of the data
        real = evaluation.load_task_examples
        evaluation.load_task_examples = lambda *a, **k: (lambda t, c: (t[1:] + t[:1], c))(
            *real(*a, **k)
        )
    with d.distributed_session("gloo"):
        try:
            evaluation.prepare_data(cfg)
            out.put((rank, "ok"))
        except Exception as exc:  # noqa: BLE001
            out.put((rank, f"{type(exc).__name__}: {exc}"))


def test_ranks_holding_other_test_items_are_refused():
    got = _two_ranks(_other_items_on_rank_1)
    for rank in (0, 1):
        assert got[rank].startswith("RunRefused: ranks [1] hold other test or calibration items"), (
            got
        )


# --- the dry run's memory estimate against what the tiny models really allocate ----------------------


def test_the_memory_estimate_counts_what_a_tiny_model_really_holds(lm, items):
    from cross_model.memory import estimate, shape_of

    shape = shape_of("tiny-llama-64")
    weights = sum(p.untyped_storage().nbytes() for p in lm.model.parameters())
    assert shape.parameters * 4 == weights  # fp32, counted on the meta device without weights
    ids = _ids(lm, [e.prompt_A + e.prompt_B for e in items])
    batch = pad_left(ids, lm.tokenizer.pad_token_id, lm.device)
    B, T = batch.input_ids.shape
    seen = []  # every module output inside the first decoder layer during the prefill
    hooks = [
        m.register_forward_hook(
            lambda mod, a, out: seen.append(
                (out[0] if isinstance(out, tuple) else out).untyped_storage().nbytes()
            )
        )
        for m in lm.model.model.layers[0].modules()
    ]
    try:
        pre = run_prefill(lm, batch, ids, None)
    finally:
        for h in hooks:
            h.remove()
    est = estimate([shape], 4, B, T, 0, memo_entries=1)
    assert est.weights == weights
    assert est.kv == 3 * held_bytes(
        pre.kv
    )  # the memo's prefill, the decoding cache, B's assembled cache
    assert est.hidden_rows == held_bytes(pre.hidden_last)
    assert est.decode == B * lm.info.vocab_size * 4
    assert (
        sum(seen) == est.prefill
    )  # every module output of one layer, as if all were alive at once: a bound


def test_dry_run_prints_the_memory_per_rank_without_loading_weights(capsys, monkeypatch):
    import run_experiments
    from cross_model import context, models

    monkeypatch.setattr(context, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    assert run_experiments.main(["--config", "configs/kvcomm_llama8b.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per rank at batch 4 x 8320 tokens" in out  # 8,192 prompt tokens + qasper's 128 new ones
    assert "meta-llama/Llama-3.1-8B-Instruct: 8,030.3 M parameters, 32 layers, KV" in out


def test_calibration_keeps_no_tensor_after_it_decides(lm):
    """What a calibrated method holds afterwards: its decision (numbers), no cache, no activation."""
    from tests.test_methods import make

    _, calib = load_task_examples("countries", 1, 6, seed=2)
    for name, params in (
        ("kvcomm", {"selection": "calibrate", "top_layers": 0.5}),
        ("qkvcomm", {"selection": "calibrate", "top_layers": 0.5, "target_bits": 4.0}),
    ):
        m = make(name, **params)
        m.calibrate(calib, batch_size=4)
        held = held_bytes({k: v for k, v in vars(m).items() if k != "pair"})
        assert held == m.prefix_cache.nbytes, (
            name,
            held,
        )  # only the chat template's prefix, freed below
        m.release_memory()
        assert held_bytes({k: v for k, v in vars(m).items() if k != "pair"}) == 0


def test_a_bug_while_streaming_c4_is_not_reported_as_a_network_failure(monkeypatch):
    """corpus.py names the hub's errors: a network failure becomes the offline advice, a bug stays a bug."""
    import datasets

    from cross_model.data import corpus

    def broken(*a, **k):
        raise KeyError("text")  # as if the row format changed: our bug, not the network

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(KeyError):
        corpus.c4_sentences(2, 0)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="train.corpus to 'offline'"):
        corpus.c4_sentences(2, 0)


def test_failed_rows_stay_in_every_denominator_and_payload_means_skip_them():
    from cross_model.interlingua.controls import joint_rows
    from cross_model.report_files import summarize

    ok = {"score": 1.0, "first_named": 1.0, "token_f1": 1.0, "payload_bytes": 100, "error": None}
    rows = [
        {**ok, "example_id": "a"},
        {**ok, "example_id": "b"},
        {
            "example_id": "c",
            "score": 0.0,
            "first_named": 0.0,
            "token_f1": 0.0,
            "payload_bytes": 0,
            "error": "boom",
        },
    ]
    s = summarize("t", "m", rows)
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(2 / 3) and s["errors"] == 1
    assert s["payload_bytes"] == 100 and s["payload_rows"] == 2  # over the rows that sent something
    joint = [
        {
            "example_id": "a",
            "variant": "joint",
            "score": 1.0,
            "oracle_score": 1.0,
            "score_x": 1.0,
            "score_y": 0.0,
            "joint_choice": "x",
            "error": None,
        },
        {"example_id": "b", "variant": "joint", "score": 0.0, "error": "boom"},
    ]
    (line,) = joint_rows({"t": {"lw_joint": joint}})
    assert (
        line["n"] == 2 and line["errors"] == 1 and line["accuracy"] == 0.5 and line["oracle"] == 0.5
    )
    assert line["receivers"]["x"]["accuracy"] == 0.5


def _gib(line: str, key: str) -> float:
    import re

    return float(re.search(rf"{key} ([0-9.]+) GiB", line).group(1))


@pytest.mark.parametrize(
    "longest_chars", [0, 3 * 33_139]
)  # no item loaded; LongBench's longest item
def test_the_dry_run_estimates_kvcomm_llama8b_as_a_hand_calculation_does(longest_chars):
    """configs/kvcomm_llama8b.yaml on a machine without a GPU: the figure is for the bf16 run it will be
    on a GPU, at the methods' 8,192-token cap (the baseline reads no context, so its missing cap does
    not lift it to the longest item's 33,139 tokens)."""
    from cross_model.config import load_config
    from cross_model.pipeline import memory_plan

    cfg = load_config("configs/kvcomm_llama8b.yaml")
    lines = memory_plan(cfg, torch.device("cpu"), torch.float32, longest_chars)
    # By hand, Llama-3.1-8B: 8,030,261,248 parameters; 32 layers, 8 KV heads of 128, hidden 4096,
    # MLP 14336, 32 heads, vocabulary 128256; bf16 = 2 bytes. Batch 4, 8192 prompt + 128 new tokens.
    batch, prompt, tokens, bf16 = 4, 8192, 8192 + 128, 2
    memo = cfg.eval.reuse_prefills
    weights = 8_030_261_248 * bf16
    kv = 2 * 32 * 8 * 128 * bf16 * batch * tokens * (memo + 2)
    prefill = batch * prompt * (7 * 4096 + (32 + 2 * 8) * 128 + 3 * 14336) * bf16
    hidden = 33 * batch * 4096 * bf16 * memo
    decode = batch * 128256 * 4
    total = weights + kv + prefill + hidden + decode
    first = lines[0]
    assert f"at batch {batch} x {tokens} tokens" in first
    for key, want in (("weights", weights), ("kv", kv), ("prefill", prefill)):
        assert _gib(first, key) == pytest.approx(want / 2**30, abs=0.005), key
    assert _gib(first, "memory:") == pytest.approx(total / 2**30, abs=0.005)
    assert round(total / 2**30, 2) == 44.09
    assert lines[1].startswith("memory: in bfloat16 (what dtype auto gives on a GPU")


def test_config_headers_quote_the_dry_runs_memory_estimate():
    """A header that says how much GPU memory a config needs quotes the dry run's estimate (bf16, as
    it will run) and asks for at least that much; configs whose models' shapes are not known offline
    are not estimated here."""
    import re
    from pathlib import Path

    from cross_model.config import load_config
    from cross_model.data.check import check_counts
    from cross_model.pipeline import memory_plan

    checked = 0
    for path in sorted(Path("configs").glob("*.yaml")):
        header = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        needs = re.search(r"GPUs? with >= (\d+) GB", header)
        if not needs:
            continue
        cfg = load_config(path)
        longest = max((c.longest_chars for c in check_counts(cfg)), default=0)  # as --dry-run does
        lines = memory_plan(cfg, torch.device("cpu"), torch.float32, longest)
        if "not estimated" in lines[0]:
            continue
        figure = float(re.search(r"memory: ([0-9.]+) GiB per rank", lines[0]).group(1))
        assert f"--dry-run`: {figure:.2f} GiB per rank in bf16" in header, path
        assert int(needs.group(1)) * 1e9 >= figure * 2**30, path
        checked += 1
    assert checked >= 3


def _hub_says(monkeypatch, answers: dict):
    """The hub's answer to auth_check, per repository. A stand-in: these machines cannot reach the hub;
    the errors are huggingface_hub's own classes, built as the hub client builds them."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def auth_check(repo_id, **_):
        response = httpx2.Response(
            403, request=httpx2.Request("GET", f"https://huggingface.co/{repo_id}")
        )
        kind = answers.get(repo_id, "ok")
        if kind == "gated":
            raise GatedRepoError("Access to model is restricted", response=response)
        if kind == "missing":
            raise RepositoryNotFoundError("Repository Not Found", response=response)
        if kind == "down":
            raise httpx2.ConnectError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)


def test_the_dry_run_names_a_missing_or_gated_model_and_fails(tmp_path, monkeypatch, capsys):
    import run_experiments

    _hub_says(
        monkeypatch, {"meta-llama/Gated": "gated", "nobody/typo": "missing", "org/far": "down"}
    )
    args = ["--config", "configs/tiny.yaml", "--output_dir", str(tmp_path), "--dry-run"]
    assert run_experiments.main([*args, "--models.receiver", "meta-llama/Gated"]) == 2
    err = capsys.readouterr().err
    assert "model error: meta-llama/Gated: gated: accept its licence" in err and "HF_TOKEN" in err
    assert run_experiments.main([*args, "--models.sender", "nobody/typo"]) == 2
    assert "model error: nobody/typo: missing: not on the hub" in capsys.readouterr().err
    # unreachable is not a failure: a run may read the model from the cache
    out_code = run_experiments.main([*args, "--methods", '{"baseline": {"receiver": "org/far"}}'])
    out = capsys.readouterr().out
    assert out_code == 0 and "org/far: offline: not checked: the hub cannot be reached" in out
    assert "tiny-llama-64: local: built in" in out


def test_the_data_check_names_a_gated_model(tmp_path, monkeypatch, capsys):
    from cross_model.data.check import main

    _hub_says(monkeypatch, {"meta-llama/Gated": "gated"})
    assert main(["check", "configs/tiny.yaml", "--models.receiver", "meta-llama/Gated"]) == 1
    assert "model meta-llama/Gated: gated: accept its licence" in capsys.readouterr().out


def test_the_data_check_applies_the_preset_and_a_refused_script_dataset_is_a_data_error(
    monkeypatch, capsys
):
    """Under preset kvcomm_public qasper reads SCROLLS (tau/scrolls), a script dataset that datasets 5
    refuses with a RuntimeError: the check looks at that source, and the refusal is a data error that
    names it, not a traceback. The hub cannot be reached here: load_dataset raises what datasets 5
    raises for a script dataset."""
    import datasets

    from cross_model.data.check import main

    def refuse(path, *args, **kwargs):
        raise RuntimeError(
            f"Dataset scripts are no longer supported, but found {path.split('/')[-1]}.py"
        )

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    code = main(
        [
            "check",
            "configs/tiny.yaml",
            "--preset",
            "kvcomm_public",
            "--tasks",
            '[{"name": "qasper"}]',
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "tasks.qasper: FAILED from tau/scrolls" in out
    assert "RuntimeError: Dataset scripts are no longer supported, but found scrolls.py" in out
