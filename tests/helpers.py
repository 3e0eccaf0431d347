"""Shared by the tests that kill real processes."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def kill_9_after_first_checkpoint(proc: subprocess.Popen, checkpoints: Path, timeout: float = 180) -> None:
    """SIGKILL `proc` as soon as a complete step checkpoint appears under `checkpoints`, and check that
    it had not finished."""
    deadline = time.time() + timeout
    while not list(checkpoints.glob("*/step_*/meta.json")):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list(checkpoints.glob("*/final")), "killed before the end"
