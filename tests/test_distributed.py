"""Distributed helpers in a real two-process gloo group, and without any process group."""

import os
import signal
import subprocess
import sys

import torch.multiprocessing as mp

from cross_model import distributed as d
from tests.conftest import ROOT, free_port


def _worker(rank: int, world: int, port: int, out) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    with d.distributed_session("gloo") as env:
        gathered = d.gather_object({"rank": d.get_rank(), "sq": rank * rank})
        value = d.broadcast_object(f"from-{rank}", src=1)
        flag = d.StopFlag()
        first = flag.should_stop()  # nobody set it
        if rank == 1:
            flag.set()  # only rank 1 saw the signal ...
        second = flag.should_stop()  # ... yet every rank agrees to stop
        d.barrier()
        out.put((rank, env.world_size, gathered, value, first, second))


def test_collectives_agree_across_two_gloo_ranks():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, world, gathered, value, first, second in results:
        assert world == 2
        assert gathered == [{"rank": 0, "sq": 0}, {"rank": 1, "sq": 1}]
        assert value == "from-1"
        assert first is False and second is True


def test_helpers_without_a_process_group():
    assert not d.is_initialized()
    assert d.get_rank() == 0 and d.get_world_size() == 1 and d.is_main()
    assert d.gather_object(5) == [5]
    assert d.broadcast_object("x") == "x"
    d.barrier()
    flag = d.StopFlag()
    assert not flag.should_stop()
    flag.set()
    assert flag.should_stop()


def test_signal_sets_the_stop_flag():
    flag = d.StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.local and flag.should_stop()
    finally:
        flag.uninstall()


def test_torchrun_dry_run_two_processes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "run_experiments.py",
        "--config",
        "configs/tiny.yaml",
        "--dry-run",
        "--output_dir",
        str(tmp_path),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "planned stages" in res.stdout
    assert res.stdout.count("planned stages") == 1  # printed by rank 0 only
    assert "world size 2" in res.stderr
    assert not (tmp_path / "tiny").exists()  # a dry run writes nothing


def test_config_error_exit_code_and_message():
    res = subprocess.run(
        [
            sys.executable,
            "run_experiments.py",
            "--config",
            "configs/tiny.yaml",
            "--eval.batch_size",
            "zero",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "eval.batch_size: expected an integer" in res.stderr


def _slow_first_load(rank, port, fail, queue):
    """Rank 0 takes longer to load a model than the process group's timeout (as a download would),
    or fails to load it."""
    import time

    from cross_model import context
    from cross_model.config import load_config
    from cross_model.distributed import destroy_distributed, init_distributed, read_env
    from cross_model.platform import detect_platform

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    init_distributed("gloo", read_env(), timeout_s=2)
    real = context.load_model

    def slow(*args, **kw):
        if rank == 0:
            time.sleep(5)
            if fail:
                raise OSError("gated repo: accept the licence")
        return real(*args, **kw)

    context.load_model = slow
    try:
        cfg = load_config("configs/tiny.yaml")
        store = context.ModelStore(cfg, detect_platform("cpu", "float32"))
        queue.put((rank, store.get(cfg.models.receiver).info.num_layers))
    except Exception as err:  # noqa: BLE001 - the other rank must hear of it
        queue.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        destroy_distributed()


def test_ranks_wait_for_rank_0s_model_download_past_the_process_group_timeout():
    """Ranks 1.. wait for rank 0 to download and cache a model; that wait outlasts the group's timeout
    (2 s here, 30 minutes in a run) instead of failing with an error about a collective."""
    from tests.helpers import two_gloo_ranks

    assert two_gloo_ranks(_slow_first_load, False) == {0: 4, 1: 4}
    failed = two_gloo_ranks(_slow_first_load, True)
    assert failed[0] == "OSError: gated repo: accept the licence"
    assert failed[1].startswith("RuntimeError: rank 0 failed: OSError: gated repo")
