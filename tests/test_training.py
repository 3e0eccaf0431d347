"""Projection training and the checkpoint manager: real gloo groups, real processes killed with
SIGKILL / SIGTERM, real checkpoints on disk, tiny random models."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cross_model import distributed as d
from cross_model.checkpointing import CheckpointManager
from cross_model.config import TrainConfig
from cross_model.distributed import Preempted
from cross_model.training.ac_projection import fit_projection, train_projection
from tests.conftest import ROOT, free_port
from tests.helpers import kill_9_after_first_checkpoint
from tests.tolerance import assert_reordered_close

IDENTITY = {
    "sender": "synthetic-a",
    "receiver": "synthetic-b",
    "sender_revision": None,
    "receiver_revision": None,
    "k": 1,
    "j": 1,
    "d_in": 24,
    "d_out": 16,
}


def synthetic_pairs(n: int, seed: int = 0, noise: float = 0.0):
    """B's activation is an exact linear map of A's (plus optional noise)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(IDENTITY["d_out"], IDENTITY["d_in"], generator=g) / 4
    a = torch.randn(n, IDENTITY["d_in"], generator=g)
    return a, a @ m.T + noise * torch.randn(n, IDENTITY["d_out"], generator=g), m


def recipe(cfg: TrainConfig, seed: int = 0) -> dict:
    from cross_model.training.ac_projection import training_recipe

    return training_recipe(cfg, seed)


# --- the checkpoint manager --------------------------------------------------------------------


def test_checkpoints_are_atomic_pruned_and_damaged_ones_skipped(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(
            step, {"w": torch.full((3,), float(step))}, {"what": "test"}, {"step": step}, [{"r": 0}]
        )
    assert manager.steps() == [3, 4]  # keep-last-2
    assert manager.load_latest().tensors["w"].tolist() == [4.0] * 3

    weights = manager.step_dir(4) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated, as by a kill during a copy
    with caplog.at_level(logging.WARNING):
        latest = manager.load_latest()
    assert latest.step == 3 and latest.tensors["w"].tolist() == [3.0] * 3
    assert "step_00000004" in caplog.text and "checksum" in caplog.text

    # A writer killed before its rename leaves only a hidden temporary: never taken for a checkpoint.
    (tmp_path / ".tmp-step_00000005-1-1").mkdir()
    (tmp_path / "step_00000006").mkdir()  # and a directory without meta.json is incomplete
    assert manager.latest_step() == 3

    # Saving over the damaged step 4 moves it aside instead of overwriting it in place.
    manager.save(4, {"w": torch.zeros(3)}, {"what": "test"}, {"step": 4}, [{"r": 0}])
    assert manager.latest_step() == 4 and manager.load_latest().tensors["w"].tolist() == [0.0] * 3
    assert any(p.name.startswith("step_00000004.damaged-") for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError):
        from cross_model.checkpointing import write_atomically

        write_atomically(manager.step_dir(4), {"x.txt": "x"}, {})


def test_linear_map_is_recovered(tmp_path):
    a, b, m = synthetic_pairs(640)
    cfg = TrainConfig(
        solver="adam",
        epochs=30,
        batch_size=32,
        lr=1e-2,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=1000,
    )
    held = (a[576:], b[576:])
    result = fit_projection(
        lambda idx: (a[idx], b[idx]), 576, held, IDENTITY, recipe(cfg), tmp_path / "p", cfg
    )
    fit = result.meta["fit"]
    assert fit["r2"] > 0.99 and fit["cosine"] > 0.99, fit
    assert (
        len(result.meta["history"]) == 30
    )  # held-out statistics every epoch, stored with the checkpoint
    torch.testing.assert_close(result.projection.linear.weight, m, atol=0.05, rtol=0)
    final_meta = json.loads((tmp_path / "p" / "final" / "projection.json").read_text())
    assert (
        final_meta["fit"]["r2"] == fit["r2"]
        and final_meta["d_in"] == 24
        and final_meta["lr"] == 1e-2
    )


@pytest.mark.float_sensitive
def test_least_squares_is_the_exact_minimiser_with_and_without_ridge(tmp_path, caplog):
    import numpy as np

    from cross_model.training.ac_projection import least_squares

    a, b, m = synthetic_pairs(300, noise=0.3)
    pairs = lambda idx: (a[idx], b[idx])  # noqa: E731
    # Plain least squares over the first 270 pairs (read in chunks of 7), against numpy in float64.
    x, y = a[:270].double().numpy(), b[:270].double().numpy()
    plain = np.linalg.lstsq(x, y, rcond=None)[0].T
    # solved in float64 and returned in float32: the float32 rounding of W is the whole difference
    assert_reordered_close(
        least_squares(pairs, 270, 24, 16, 0.0, chunk=7).double(),
        torch.from_numpy(plain),
        terms=1,
        dtype=torch.float32,
    )
    # Ridge: (A^T A + lam I)^-1 A^T B with lam relative to the mean diagonal of A^T A.
    gram = x.T @ x
    lam = 0.1 * np.trace(gram) / 24
    ridge_ref = np.linalg.solve(gram + lam * np.eye(24), x.T @ y).T
    assert_reordered_close(
        least_squares(pairs, 270, 24, 16, 0.1).double(),
        torch.from_numpy(ridge_ref),
        terms=1,
        dtype=torch.float32,
    )
    assert not np.allclose(ridge_ref, plain, atol=1e-3)  # the ridge changed W

    cfg = TrainConfig(ridge=0.0)
    result = fit_projection(
        pairs, 270, (a[270:], b[270:]), IDENTITY, recipe(cfg), tmp_path / "p", cfg
    )
    assert (
        result.meta["solver"] == "lstsq"
        and result.meta["fit"]["r2"] > 0.9
        and len(result.meta["history"]) == 1
    )
    assert (tmp_path / "p" / "final" / "projection.safetensors").exists()
    # A held-out set the map does not describe: the fit is worse than the mean, and the log says so.
    with caplog.at_level(logging.WARNING):
        fit_projection(pairs, 270, (a[270:], -b[270:]), IDENTITY, recipe(cfg), tmp_path / "q", cfg)
    assert "held-out R^2" in caplog.text and "< 0" in caplog.text


# --- two ranks -------------------------------------------------------------------------------


@pytest.mark.float_sensitive
def test_least_squares_over_two_ranks_equals_one_process(tmp_path):
    (_, s0, _, w0), (_, s1, _, w1) = _run_ranks(tmp_path / "two", solver="lstsq")
    (_, s, _, w) = _run_ranks(tmp_path / "one", world=1, solver="lstsq")[0]
    assert s0 == s1 == s == "done" and torch.equal(w0, w1)
    assert_reordered_close(w0, w, terms=1)  # float64 sums in another order, W rounded to float32


def _fit_worker(rank, world, port, directory, out, delay, solver="adam"):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        CROSS_MODEL_TEST_STEP_DELAY=str(delay),
    )
    torch.set_num_threads(1)
    a, b, _ = synthetic_pairs(200, noise=0.1)
    cfg = TrainConfig(
        solver=solver, epochs=4, batch_size=30, lr=1e-2, checkpoint_every=2, keep_last=10
    )
    record = []

    def on_step(step, proj):
        # numpy arrays travel through the queue by value (tensors would go through shared memory)
        record.append(
            (
                step,
                proj.linear.weight.grad.numpy().copy(),
                proj.linear.weight.detach().numpy().copy(),
            )
        )

    with d.distributed_session("gloo"):
        stop = d.StopFlag().install()
        try:
            res = fit_projection(
                lambda idx: (a[idx], b[idx]),
                180,
                (a[180:], b[180:]),
                IDENTITY,
                recipe(cfg),
                Path(directory),
                cfg,
                stop=stop,
                on_step=on_step,
            )
            out.put((rank, "done", record, res.projection.linear.weight.numpy().copy()))
        except Preempted:
            out.put((rank, "preempted", record, None))


def _run_ranks(directory, delay=0.0, sigterm_rank=None, world=2, solver="adam"):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_fit_worker, args=(r, world, port, str(directory), out, delay, solver))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    if sigterm_rank is not None:
        manager = CheckpointManager(directory)
        deadline = time.time() + 120
        while manager.latest_step() is None:  # wait for the first complete checkpoint
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(procs[sigterm_rank].pid, signal.SIGTERM)  # one rank only: the others must agree
    results = sorted((out.get(timeout=180) for _ in procs), key=lambda r: r[0])
    results = [
        (
            r,
            status,
            [(s, torch.from_numpy(g), torch.from_numpy(w)) for s, g, w in rec],
            None if final is None else torch.from_numpy(final),
        )
        for r, status, rec, final in results
    ]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.float_sensitive
def test_two_ranks_keep_identical_gradients_and_parameters_and_match_one_process(tmp_path):
    results = _run_ranks(tmp_path / "two")
    (_, s0, rec0, w0), (_, s1, rec1, w1) = results
    assert s0 == s1 == "done" and len(rec0) == len(rec1) == 24
    for (step0, g0, p0), (step1, g1, p1) in zip(rec0, rec1):
        assert step0 == step1
        assert torch.equal(g0, g1), f"gradients differ between ranks at step {step0}"
        assert torch.equal(p0, p1), f"parameters differ between ranks at step {step0}"
    assert torch.equal(w0, w1)
    # The split batch gives the global-batch gradient: the same fit as one process, up to rounding.
    (_, s, rec, w) = _run_ranks(tmp_path / "one", world=1)[0]
    assert_reordered_close(
        rec[0][1], rec0[0][1], terms=32, depth=2
    )  # a batch of 32, forward and backward
    # After 24 Adam steps rounding has passed through every update (m / sqrt(v) rescales it), so this is a
    # bound on a trajectory, not the reordering rule: 1e-4 of W, three orders above the ~1e-7 per step the
    # rule allows the gradients, and far below what a wrong split of the batch changes.
    torch.testing.assert_close(w, w0, rtol=1e-4, atol=1e-5)


def test_sigterm_to_one_rank_saves_exits_zero_and_resume_is_bitwise_equal(tmp_path):
    reference = _run_ranks(tmp_path / "ref")
    interrupted = tmp_path / "int"
    first = _run_ranks(interrupted, delay=0.1, sigterm_rank=1)
    assert [r[1] for r in first] == ["preempted", "preempted"]  # both ranks left the loop together
    stopped_at = CheckpointManager(interrupted).latest_step()
    assert stopped_at is not None and stopped_at < 24 and not (interrupted / "final").exists()
    assert stopped_at == first[0][2][-1][0]  # the checkpoint is the step the ranks stopped at
    second = _run_ranks(interrupted)
    assert [r[1] for r in second] == ["done", "done"]
    assert second[0][2][0][0] == stopped_at + 1  # resumed, not restarted
    assert torch.equal(second[0][3], reference[0][3]) and torch.equal(second[1][3], reference[0][3])


# --- the real entry point, killed with SIGKILL ----------------------------------------------------


def _train_config(tmp_path: Path, name: str, cache: bool) -> Path:
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "stages": ["train"],
        "models": {"sender": "tiny-llama-48", "receiver": "tiny-llama-64"},
        "tasks": [{"name": "countries", "n_test": 2}],
        "methods": {"ac_w": {"method": "ac", "k": 2, "j": 2, "projection": "train"}},
        "train": {
            "solver": "adam",
            "corpus": "offline",
            "n_sentences": 72,
            "epochs": 3,
            "batch_size": 8,
            "checkpoint_every": 3,
            "cache_activations": cache,
            "checkpoint_dir": str(tmp_path / name / "ckpt"),
        },
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _final_weights(tmp_path: Path, name: str) -> torch.Tensor:
    (final,) = list((tmp_path / name / "ckpt").glob("*/final"))
    return load_file(str(final / "projection.safetensors"))["linear.weight"]


def _entry(config: Path, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "CROSS_MODEL_TEST_STEP_DELAY": str(delay), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_experiments.py"), "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("cache", [True, False], ids=["activation-cache", "no-cache"])
def test_kill_9_then_restart_gives_the_uninterrupted_projection(tmp_path, cache):
    ref = _entry(_train_config(tmp_path, "ref", cache))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    config = _train_config(tmp_path, "killed", cache)
    proc = _entry(config, delay=0.15)
    kill_9_after_first_checkpoint(proc, tmp_path / "killed" / "ckpt")

    again = _entry(config)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "resumed" in out
    assert torch.equal(_final_weights(tmp_path, "killed"), _final_weights(tmp_path, "ref"))

    # Started once more, the finished projection is loaded, not retrained.
    done = _entry(config)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0 and "loaded, not retrained" in out, out


def test_sigterm_on_the_entry_point_leaves_a_checkpoint_and_exits_zero(tmp_path):
    config = _train_config(tmp_path, "term", True)
    proc = _entry(config, delay=0.15)
    deadline = time.time() + 120
    while not list((tmp_path / "term" / "ckpt").glob("*/step_*/meta.json")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "preempted" in out
    (pair_dir,) = [p for p in (tmp_path / "term" / "ckpt").glob("*") if p.name != "activations"]
    assert (
        CheckpointManager(pair_dir).latest_step() is not None and not (pair_dir / "final").exists()
    )


# --- refusing what does not fit -----------------------------------------------------------------


def test_checkpoints_and_projections_of_another_pair_are_refused(
    tmp_path, tiny_llama, tiny_llama_48
):
    from cross_model.projection import load_projection
    from cross_model.training.ac_projection import projection_identity

    cfg = TrainConfig(
        solver="adam",
        corpus="offline",
        n_sentences=24,
        epochs=1,
        batch_size=8,
        checkpoint_dir=str(tmp_path),
    )
    first = train_projection(tiny_llama_48, tiny_llama, 2, 2, cfg, seed=0)
    assert not first.loaded_final and first.meta["d_in"] == 48 and first.meta["d_out"] == 64
    assert train_projection(tiny_llama_48, tiny_llama, 2, 2, cfg, seed=0).loaded_final

    # A step checkpoint of the 48 -> 64 pair copied where the 64 -> 48 pair's training looks:
    other = train_projection.__globals__["projection_dir"](
        tmp_path, projection_identity(tiny_llama, tiny_llama_48, 2, 2), recipe(cfg)
    )
    other.mkdir(parents=True)
    step = max(first.directory.glob("step_*"))
    shutil.copytree(step, other / step.name)
    with pytest.raises(
        ValueError,
        match=r"sender: checkpoint has 'tiny-llama-48', this run needs 'tiny-llama-64'.*d_in",
    ):
        train_projection(tiny_llama, tiny_llama_48, 2, 2, cfg, seed=0)

    with pytest.raises(ValueError, match="k: checkpoint has 2, this run needs 3"):
        load_projection(
            first.directory / "final", {**projection_identity(tiny_llama_48, tiny_llama, 3, 2)}
        )
    # A damaged final projection is refused too, not half-loaded.
    w = first.directory / "final" / "projection.safetensors"
    w.write_bytes(w.read_bytes()[:-3])
    with pytest.raises(ValueError, match="damaged"):
        load_projection(
            first.directory / "final", projection_identity(tiny_llama_48, tiny_llama, 2, 2)
        )


def test_a_refit_with_another_solver_reads_the_cached_activations(
    tmp_path, tiny_llama, tiny_llama_48, caplog
):
    from dataclasses import replace

    cfg = TrainConfig(corpus="offline", n_sentences=40, checkpoint_dir=str(tmp_path))
    calls = []
    hooks = [
        lm.model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
        for lm in (tiny_llama_48, tiny_llama)
    ]
    try:
        first = train_projection(tiny_llama_48, tiny_llama, 2, 2, cfg, seed=0)
        assert calls  # the models ran for the first fit
        calls.clear()
        with caplog.at_level(logging.INFO):
            second = train_projection(
                tiny_llama_48, tiny_llama, 2, 2, replace(cfg, ridge=0.5), seed=0
            )
    finally:
        for h in hooks:
            h.remove()
    assert not second.loaded_final and second.directory != first.directory  # another W, fitted anew
    assert (
        calls == [] and caplog.text.count("read from the cache") == 2
    )  # held-out and training pairs
    assert second.meta["fit"]["r2"] != first.meta["fit"]["r2"]
