"""Progress a cluster user can see: a tqdm bar on a terminal, periodic log lines everywhere else.

Under SLURM stderr is a file, so a bar either prints nothing or floods it. Off a terminal, rank 0
logs `desc: done/total unit, rate, ETA` every `logging.progress_every_s` seconds (and once at the
end), so a 10-hour run says how far it is between stage headers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from cross_model.distributed import is_main

log = logging.getLogger("cross_model.progress")

DEFAULT_EVERY_S = 60.0
_every_s = DEFAULT_EVERY_S


def set_progress_interval(seconds: float) -> None:
    """How often rank 0 logs progress off a terminal (`logging.progress_every_s`; 0: every update)."""
    global _every_s
    if seconds < 0:
        raise ValueError(f"logging.progress_every_s: seconds >= 0, got {seconds}")
    _every_s = float(seconds)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts `unit`s done out of `total` on this rank; only rank 0 shows anything."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "items",
        initial: int = 0,
        note: str = "",
        every_s: float | None = None,
        clock: Any = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.note = total, desc, unit, note
        self.done = initial
        self._initial = initial
        self._clock = clock
        self._start = self._last = clock()
        self._every = _every_s if every_s is None else every_s
        self._show = is_main()
        tty = sys.stderr.isatty() or os.environ.get("CROSS_MODEL_PROGRESS") == "1"
        self._bar = None
        if self._show and tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)

    def line(self) -> str:
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = (self.done - self._initial) / elapsed
        left = self.total - self.done
        eta = format_duration(left / rate) if rate > 0 else "unknown"
        note = f" ({self.note})" if self.note else ""
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit}{note}, {rate:.3g} {self.unit}/s, "
            f"elapsed {format_duration(elapsed)}, ETA {eta}"
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self._show:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last >= self._every and self.done < self.total:
            self._last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if not self._show:
            return
        if self._bar is not None:
            self._bar.close()
        elif self.done > self._initial:
            log.info("%s", self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def test_step_delay() -> float:
    """Seconds to sleep after each training step or evaluation batch: tests set
    CROSS_MODEL_TEST_STEP_DELAY to kill or signal a run mid-way; 0 otherwise."""
    return float(os.environ.get("CROSS_MODEL_TEST_STEP_DELAY", "0"))
