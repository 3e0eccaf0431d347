"""What a 4-GPU, 8B, 10-hour run needs and two CPU processes do not show: batch-major prefill sharing,
calibration measured once over ranks, one device rule, failures that stop, shared-directory checks, a
resume that cannot mix hardware or code, and progress off a terminal."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

TINY = ["--config", "configs/tiny.yaml", "--eval.batch_size", "2"]
SHARING = '{"baseline": {}, "nld": {"nld_max_tokens": 4}, "ac": {"k": 2, "j": 2}, "kvcomm_all": {"method": "kvcomm", "selection": "all"}}'


def _main(*args: str) -> int:
    import run_experiments

    return run_experiments.main([*TINY, *args])


def _tiny_budget() -> dict[str, int]:
    from cross_model.models import load_model
    from tests.tolerance import forward_budget

    return forward_budget(
        load_model("tiny-llama-64"), 512
    )  # tiny.yaml's pair; its prompts are < 512 bytes


def _mass_atol() -> float:
    """Attention masses (at most 1) after a forward of tiny.yaml's models, reordered (tests/tolerance.py)."""
    from tests.tolerance import reorder_atol

    return reorder_atol(torch.ones(1), **_tiny_budget())


def _logprob_atol() -> float:
    """Log-probabilities over tiny.yaml's 259-token vocabulary, reordered: on tiny-llama-64 the last
    prompt position's logits reach 6.3 and its log-probabilities 13.4 in magnitude; 20 bounds both."""
    from tests.tolerance import reorder_atol

    return reorder_atol(torch.full((1,), 20.0), **_tiny_budget())


def _answers(run_dir: Path) -> dict:
    data = json.loads((run_dir / "results.json").read_text())
    return {
        t: {
            m: [(r["example_id"], r["answer"], r["payload_bytes"]) for r in rows]
            for m, rows in ms.items()
        }
        for t, ms in data["examples"].items()
    }


# --- 1. batch-major evaluation: one memo per batch, shared by every method, freed after --------------


def test_every_batch_shares_its_prefills_between_methods_and_keeps_nothing_after(
    tmp_path, monkeypatch
):
    from cross_model import evaluation
    from cross_model.prefill_memo import PrefillMemo

    memos = []

    class Recording(PrefillMemo):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            memos.append(self)

    monkeypatch.setattr(evaluation, "PrefillMemo", Recording)
    common = ["--output_dir", str(tmp_path), "--stages", "[evaluate,report]", "--methods", SHARING]
    assert _main(*common, "--name", "shared") == 0
    # countries: 6 items, tipsheets: 4, batches of 2 on one rank: 5 batches, each with its own memo.
    assert len(memos) == 5
    for memo in memos:
        # NLD's B from the baseline; AC's and KVComm's A from NLD's full prefill of A's prompts.
        assert (memo.hits, memo.misses) == (3, 2)
        assert not memo._entries, "a batch's prefills outlived it"
    assert _main(*common, "--name", "alone", "--eval.reuse_prefills", "0") == 0
    assert _answers(tmp_path / "shared") == _answers(tmp_path / "alone")
    rows = json.loads((tmp_path / "shared" / "results.json").read_text())["examples"]["countries"][
        "baseline"
    ]
    assert {(r["start"], r["device"], r["dtype"]) for r in rows} == {(0, "cpu", "float32")}


# --- 2. calibration: each rank its share, one decision ---------------------------------------------


def _torchrun(tmp: Path, name: str, nproc: int, *extra: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "run_experiments.py",
        *TINY,
        "--output_dir",
        str(tmp),
        "--name",
        name,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.float_sensitive
def test_two_ranks_calibrate_their_shares_and_choose_what_one_rank_chooses(tmp_path):
    methods = (
        '{"kvcomm": {"selection": "calibrate", "top_layers": 0.5}, '
        '"q": {"method": "qkvcomm", "selection": "calibrate", "top_layers": 0.5, "target_bits": 3}}'
    )
    args = ("--stages", "[calibrate]", "--methods", methods)
    assert _main("--output_dir", str(tmp_path), "--name", "one", *args) == 0
    _torchrun(tmp_path, "two", 2, *args)
    for name in ("kvcomm", "q"):
        one = json.loads((tmp_path / "one" / f"calibration-{name}.json").read_text())
        two = json.loads((tmp_path / "two" / f"calibration-{name}.json").read_text())
        assert one["items_per_rank"] == [4] and two["items_per_rank"] == [2, 2]
        if name == "kvcomm":  # each rank measured its own share, not every item
            r0, r1 = two["measured_per_rank"]
            assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)
            assert (
                sorted(r0 + r1)
                == sorted(two["calibration_ids"])
                == sorted(one["measured_per_rank"][0])
            )
        assert two["selected"] == one["selected"] and two["ranking"] == one["ranking"]
        assert two["importance"] == pytest.approx(one["importance"], abs=_mass_atol())
    q1 = json.loads((tmp_path / "one" / "calibration-q.json").read_text())
    q2 = json.loads((tmp_path / "two" / "calibration-q.json").read_text())
    assert q2["layer_bits"] == q1["layer_bits"]
    for layer, per in q1["sensitivity"].items():
        # KL = sum p (log p - log q): off by at most twice the log-probabilities' tolerance
        assert q2["sensitivity"][layer] == pytest.approx(per, abs=2 * _logprob_atol())


# --- 3. one rule for a rank's device ---------------------------------------------------------------


def test_each_rank_gets_its_own_gpu_or_a_clear_error(monkeypatch):
    from cross_model.platform import check_distinct_devices, cuda_index_for_rank

    assert cuda_index_for_rank(3, 4) == 3
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(
        ValueError, match="4 ranks on this node .*all see the one GPU.*--gpus-per-task=1"
    ):
        cuda_index_for_rank(3, 1, local_world_size=4)  # nothing gave each rank its own GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert (
        cuda_index_for_rank(3, 1, local_world_size=4) == 0
    )  # srun --gpus-per-task=1: one GPU visible per rank
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(
        ValueError, match=r"LOCAL_RANK=3.*2 visible CUDA device\(s\), CUDA_VISIBLE_DEVICES=0,1"
    ):
        cuda_index_for_rank(3, 2)
    with pytest.raises(ValueError, match="4 ranks on this node .*nproc_per_node=2"):
        cuda_index_for_rank(
            0, 2, local_world_size=4
        )  # rank 0 refuses too, so no rank waits for the others
    with pytest.raises(ValueError, match="no CUDA device"):
        cuda_index_for_rank(0, 0)
    check_distinct_devices([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a")])
    with pytest.raises(ValueError, match="ranks 0 and 2 both run on GPU GPU-a of n1"):
        check_distinct_devices([("n1", "GPU-a"), ("n1", "GPU-b"), ("n1", "GPU-a")])


def test_detect_platform_uses_the_rule_with_the_device_count_patched(monkeypatch):
    """No GPU here: CUDA's availability, count and properties are patched (the rule is what is tested)."""
    from cross_model import platform

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "H100")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    p = platform.detect_platform("cuda", "auto", local_rank=3)
    assert (
        p.device == torch.device("cuda", 0)
        and p.dtype == torch.bfloat16
        and p.dist_backend == "nccl"
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert platform.detect_platform("auto", "auto", local_rank=3).device == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        platform.detect_platform("cuda", "auto", local_rank=1)


def test_models_load_straight_onto_their_device(monkeypatch):
    """The weights are placed by `from_pretrained(device_map=...)`, never loaded on the host and moved."""
    import transformers

    from cross_model.models import load_model

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    lm = load_model("smollm2-135m-instruct", torch.float32, "cpu")
    assert calls == [torch.device("cpu")] and lm.device == torch.device("cpu")


# --- 4. failures ------------------------------------------------------------------------------------


def _examples(n: int):
    from cross_model.data import load_task_examples

    return load_task_examples("countries", n, 0, 0, None, 4)[0]


def _method(cls_body, name="probe"):
    from cross_model.methods.base import ModelPair
    from cross_model.methods.baseline import Baseline
    from cross_model.models import load_model

    lm = load_model("tiny-llama-64")
    cls = type(name, (Baseline,), cls_body)
    return cls(Baseline.Params(), ModelPair(lm, lm), name)


def test_an_error_keeps_the_frame_that_raised_and_the_full_traceback_on_the_side():
    def deep(n):
        if n == 0:
            raise ValueError("the innermost reason")
        return deep(n - 1)

    def _run_batch(self, examples):
        return deep(
            12
        )  # far below the evaluator's frames: a limit=4 traceback would show only those

    preds = _method({"_run_batch": _run_batch}).run_batch(_examples(1))
    assert "the innermost reason" in preds[0].error and "deep" in preds[0].error
    assert "_run_batch" in preds[0].error_traceback and "run_batch" in preds[0].error_traceback
    assert "error_traceback" not in preds[0].to_dict()


@pytest.mark.parametrize(
    "message", ["CUDA error: device-side assert triggered", "NCCL communicator was aborted"]
)
def test_errors_that_poison_the_device_or_the_group_are_raised_not_scored(message):
    calls = []

    def _run_batch(self, examples):
        calls.append(len(examples))
        raise RuntimeError(message)

    with pytest.raises(RuntimeError, match=message.split(":")[0]):
        _method({"_run_batch": _run_batch}).run_batch(_examples(4))
    assert calls == [4], "no retry item by item after the device is gone"


def test_out_of_memory_frees_the_cache_and_halves_the_batch(caplog):
    from cross_model.methods.baseline import Baseline

    sizes = []

    def _run_batch(self, examples):
        sizes.append(len(examples))
        if len(examples) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Baseline._run_batch(self, examples)

    examples = _examples(6)
    with caplog.at_level(logging.WARNING):
        preds = _method({"_run_batch": _run_batch}).run_batch(examples)
    assert sizes == [6, 3, 2, 1, 3, 2, 1]
    assert "out of memory on a batch of 6" in caplog.text and "running it as 3 + 3" in caplog.text
    plain = _method({}, "plain").run_batch(examples)
    assert [p.answer for p in preds] == [p.answer for p in plain] and not any(
        p.error for p in preds
    )


def test_a_method_failing_on_nearly_all_its_first_items_stops_the_run_with_its_traceback(tmp_path):
    from cross_model.failures import MethodFailing
    from cross_model.methods.baseline import Baseline
    from cross_model.methods.registry import _METHODS, register

    def broken_helper():
        raise KeyError("a key the method needs")

    @register("always_fails_for_test")
    class AlwaysFails(Baseline):
        def _run_batch(self, examples):
            return broken_helper()

    try:
        with pytest.raises(
            MethodFailing, match=r"4 of its first 4 items failed(.|\n)*broken_helper"
        ):
            _main(
                "--output_dir",
                str(tmp_path),
                "--stages",
                "[evaluate]",
                "--eval.fail_fast_items",
                "4",
                "--methods",
                '{"baseline": {}, "bad": {"method": "always_fails_for_test"}}',
            )
    finally:
        _METHODS.pop("always_fails_for_test")
    done = (
        (tmp_path / "tiny" / "results" / "countries" / "bad" / "rank0.jsonl")
        .read_text()
        .splitlines()
    )
    assert len(done) == 4, "the failed items are on disk, so the run resumes after the fix"


# --- 5. rank 0 decides; every rank must see the run directory ---------------------------------------


def _shared_dir_worker(rank: int, port: int, dirs: list, out) -> None:
    from cross_model import distributed as d
    from cross_model.runinfo import check_shared_run_dir

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    with d.distributed_session("gloo"):
        try:
            check_shared_run_dir(Path(dirs[rank]), wait_s=1.0)
            out.put((rank, "ok"))
        except ValueError as err:
            out.put((rank, str(err)))


def _two_ranks(dirs: list) -> dict:
    from tests.helpers import two_gloo_ranks

    return two_gloo_ranks(_shared_dir_worker, dirs)


def test_ranks_that_do_not_share_the_run_directory_are_refused(tmp_path):
    shared = _two_ranks([str(tmp_path / "run"), str(tmp_path / "run")])
    assert shared == {0: "ok", 1: "ok"}
    assert not list((tmp_path / "run").glob(".rank-check-*")), "the tokens are cleaned up"
    # Node-local directories: the same path name, different filesystems (two directories here).
    local = _two_ranks([str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")])
    for rank in (0, 1):
        assert (
            "not shared by all 2 ranks" in local[rank]
            and "shared" in local[rank]
            and "filesystem" in local[rank]
        )


# --- 6. a resume that cannot mix hardware or code ---------------------------------------------------


def test_a_resume_refuses_other_hardware_or_other_code(tmp_path):
    from cross_model.config import load_config
    from cross_model.runinfo import prepare_run_dir
    from tests.helpers import write_a_result_row

    cfg = load_config("configs/tiny.yaml", ["--output_dir", str(tmp_path)])
    first = {"device": "cuda", "dtype": "bfloat16", "commit": "abc", "changes": None}
    assert prepare_run_dir(cfg, {}, first) == 0
    write_a_result_row(tmp_path / "tiny")
    assert prepare_run_dir(cfg, {}, dict(first)) == 1
    with pytest.raises(
        ValueError, match="started on cuda in bfloat16, this start resolves to cpu in float32"
    ):
        prepare_run_dir(cfg, {}, {**first, "device": "cpu", "dtype": "float32"})
    with pytest.raises(ValueError, match="commit abc -> def.*--allow-code-change"):
        prepare_run_dir(cfg, {}, {**first, "commit": "def"})
    with pytest.raises(ValueError, match="uncommitted changes none -> 1234"):
        prepare_run_dir(cfg, {}, {**first, "changes": "1234"})
    assert prepare_run_dir(cfg, {}, {**first, "commit": "def"}, allow_code_change=True) == 2
    starts = [
        json.loads(line) for line in (tmp_path / "tiny" / "runs.jsonl").read_text().splitlines()
    ]
    assert [s["start"] for s in starts] == [0, 1, 2] and starts[2]["identity"]["commit"] == "def"
    assert (
        json.loads((tmp_path / "tiny" / "identity.json").read_text()) == first
    )  # the first start's, kept


def test_run_experiments_refuses_a_resume_where_auto_resolves_otherwise(
    tmp_path, capsys, monkeypatch
):
    """dtype `auto` is float32 on this CPU and bfloat16 on a GPU: the second start's platform is patched to
    resolve as a GPU machine's would (same config), and the resume is refused."""
    from cross_model.platform import Platform

    common = (
        "--output_dir",
        str(tmp_path),
        "--stages",
        "[evaluate]",
        "--methods",
        '{"baseline": {}}',
        "--eval.limit",
        "2",
    )
    assert _main(*common) == 0
    monkeypatch.setattr(  # run_experiments.run imports it from there when a run starts
        "cross_model.platform.detect_platform",
        lambda *a, **k: Platform(
            torch.device("cpu"), torch.bfloat16, "as a GPU would resolve auto"
        ),
    )
    assert _main(*common) == 2
    assert (
        "started on cpu in float32, this start resolves to cpu in bfloat16"
        in capsys.readouterr().err
    )


# --- 9. progress off a terminal ---------------------------------------------------------------------


def test_progress_off_a_terminal_logs_counts_rate_and_eta(caplog, monkeypatch):
    from cross_model.progress import Progress

    monkeypatch.delenv("CROSS_MODEL_PROGRESS", raising=False)
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="cross_model.progress"):
        with Progress(10, "evaluate countries", every_s=30, clock=lambda: now[0]) as bar:
            for _ in range(10):
                now[0] += 10
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    # every 30 s of 100: at 30, 60 and 90 s, then the final line
    assert len(lines) == 4
    assert lines[0] == "evaluate countries: 3/10 items, 0.1 items/s, elapsed 30s, ETA 1m10s"
    assert lines[-1].startswith("evaluate countries: 10/10 items")


# --- 7. hot paths: computed once per model or per step, same answers ---------------------------------


def test_per_model_tables_are_built_once(monkeypatch):
    from cross_model.generation import eos_token_ids
    from cross_model.methods.cipher import vector_tables
    from cross_model.models import load_model
    from cross_model.surgery import input_embeddings

    lm = load_model("tiny-gemma3-64")
    calls = []
    real = type(lm.tokenizer).get_vocab
    monkeypatch.setattr(type(lm.tokenizer), "get_vocab", lambda self: calls.append(1) or real(self))
    assert eos_token_ids(lm) == eos_token_ids(lm) and len(calls) == 1
    assert vector_tables(lm) is vector_tables(lm)
    assert input_embeddings(lm) is input_embeddings(lm)  # Gemma's scaled table: one copy per model
    emb = lm.model.get_input_embeddings()
    torch.testing.assert_close(
        input_embeddings(lm), emb.weight * emb.embed_scale.to(emb.weight.dtype)
    )


def test_kvcomm_builds_one_mask_per_kind_of_layer_per_step():
    """Sent layers share A's keys, sink-only layers the sink: two masks a step (and their GQA-folded
    forms), not one per layer; the answers still equal one concatenated forward (test_kvcomm)."""
    from cross_model.data import load_task_examples
    from cross_model.kv_layout import assemble_receiver_cache, layout_forward
    from cross_model.methods.base import ModelPair
    from cross_model.methods.registry import resolve_method
    from cross_model.models import load_model

    lm = load_model("tiny-llama-64")
    cls, p = resolve_method(
        "kvcomm", {"selection": "layers", "layers_list": [1, 2], "always_send_layer0": False}
    )
    m = cls(p, ModelPair(lm, lm))
    ex = load_task_examples("countries", 2, 0, 0, None, 4)[0]
    pre, cache, sink = m.sender_cache(ex, {1, 2})
    b_cache, layout = assemble_receiver_cache(cache, pre.full_mask, m.layer_map, {1, 2}, sink)
    assert len({id(t) for t in layout.key_pos}) == 2
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    pos = torch.tensor([[40, 41, 42], [40, 41, 42]])
    with torch.inference_mode():
        layout_forward(lm, layout)(
            cache=b_cache, full_mask_BT=torch.ones_like(ids), position_ids_BT=pos, input_ids_BT=ids
        )
    plain = [k for k in layout._masks if k[0] != "folded"]
    assert len(plain) == 2 and lm.info.num_layers == 4


def test_rows_carry_their_limits_and_with_log_prompts_the_exact_prompts(tmp_path):
    from cross_model.data import load_task_examples
    from cross_model.models import load_model
    from cross_model.prompting import chat_wrap, receiver_text, sender_text, skyline_text

    assert (
        _main(
            "--output_dir",
            str(tmp_path),
            "--stages",
            "[evaluate,report]",
            "--eval.log_prompts",
            "true",
            "--methods",
            '{"baseline": {}, "skyline": {"max_new_tokens": 3}, "nld": {"nld_max_tokens": 4}, '
            '"cipher": {"nld_max_tokens": 4}}',
        )
        == 0
    )
    data = json.loads((tmp_path / "tiny" / "results.json").read_text())["examples"]["countries"]
    lm = load_model("tiny-llama-64")
    test = {e.example_id: e for e in load_task_examples("countries", 6, 2, 0, None, 4)[0]}
    for row in data["baseline"]:
        assert row["max_new_tokens"] == 4 and row["max_prompt_tokens"] is None
        assert row["prompts"] == [
            {
                "model": "tiny-llama-64",
                "text": chat_wrap(lm, receiver_text(test[row["example_id"]])),
            }
        ]
    for row in data["skyline"]:
        assert row["max_new_tokens"] == 3
        assert [p["text"] for p in row["prompts"]] == [
            chat_wrap(lm, skyline_text(test[row["example_id"]]))
        ]
    for row in data["nld"]:  # A's message, B's first answer, B's revision (which quotes both)
        e = test[row["example_id"]]
        texts = [p["text"] for p in row["prompts"]]
        assert (
            texts[:2] == [chat_wrap(lm, sender_text(e)), chat_wrap(lm, receiver_text(e))]
            and len(texts) == 3
        )
    assert all("[vectors]" in row["prompts"][-1]["text"] for row in data["cipher"])
