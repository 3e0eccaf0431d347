"""What a failure in a method means for the run: an item scored wrong, a batch to halve, or a stop.

A method's exception on one item is data (the item is recorded as an error and scored 0). Three kinds
are not: an error that poisons the device or the process group (a CUDA device-side assert, an
illegal memory access, an NCCL failure) makes every later item fail the same way, so it stops the run
(finished items are on disk; the run resumes); running out of memory frees the cache and halves the
batch; and a method whose first items nearly all fail stops with its first traceback in full, instead
of scoring zeros for hours.
"""

from __future__ import annotations

import gc
import logging
import re
import traceback
from typing import Any, Callable

import torch

# Messages of errors after which the CUDA context or the process group cannot be trusted.
_POISONING = re.compile(
    r"CUDA error|device-side assert|illegal memory access|unspecified launch failure|CUBLAS_STATUS|"
    r"CUDNN_STATUS|NCCL|ProcessGroup|misaligned address|uncorrectable ECC",
    re.IGNORECASE,
)
TRACEBACK_FRAMES = 8
log = logging.getLogger(__name__)


# An allocation that failed: the device is fine, a smaller batch may fit. CUDA reports it as
# `torch.OutOfMemoryError`, as "CUDA error: out of memory" (a kernel's own allocation), or as
# CUBLAS_STATUS_ALLOC_FAILED (cuBLAS's workspace); MPS and some allocators as a plain RuntimeError.
_OUT_OF_MEMORY = re.compile(
    r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDA_ERROR_OUT_OF_MEMORY|"
    r"cudaErrorMemoryAllocation",
    re.IGNORECASE,
)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(exc)))


def poisons_process(exc: BaseException) -> bool:
    """Errors after which no later item can succeed in this process."""
    if is_out_of_memory(exc):
        return False
    fatal_types = tuple(
        t
        for t in (
            getattr(torch, "AcceleratorError", None),
            getattr(torch.distributed, "DistError", None),
        )
        if t is not None
    )
    return isinstance(exc, fatal_types) or bool(_POISONING.search(f"{type(exc).__name__}: {exc}"))


def innermost_traceback(exc: BaseException, frames: int = TRACEBACK_FRAMES) -> str:
    """The traceback's last `frames` frames: the ones that raised, not the evaluator's."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-frames))


def full_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if (
        mps is not None
        and getattr(torch.backends, "mps", None)
        and torch.backends.mps.is_available()
    ):
        mps.empty_cache()


class RunRefused(ValueError):
    """The run cannot do what its config and stages ask; refused before any work, with what to do instead."""


class MethodFailing(RuntimeError):
    """A method failed on nearly every item it was given first: a bug or a broken setup, not data."""


class FailureGuard:
    """Watches a method's first `items` items on this rank; if at least `ratio` of them failed, the run
    stops with the first failure's full traceback (`items` 0: never)."""

    def __init__(self, label: str, items: int, ratio: float):
        self.label, self.items, self.ratio = label, items, ratio
        self.seen = self.failed = 0
        self.first: str | None = None

    def record(self, predictions: list[Any]) -> None:
        if not self.items or self.seen >= self.items:
            return
        for p in predictions[: self.items - self.seen]:
            self.seen += 1
            if p.error:
                self.failed += 1
                self.first = self.first or p.error_traceback or p.error
        if self.seen >= self.items and self.failed >= self.ratio * self.seen:
            raise MethodFailing(
                f"{self.label}: {self.failed} of its first {self.seen} items failed, so the run stops instead of "
                f"scoring zeros (eval.fail_fast_items / eval.fail_fast_ratio set this). Finished items are saved; "
                f"fix the cause and start the same command again. The first failure:\n{self.first}"
            )


def measure_in_batches(
    items: list, size: int, measure: Callable[[list], Any], label: str, progress: Any = None
) -> list[tuple[list, Any]]:
    """[(batch, measure(batch))] over `items` in batches of `size` (calibration's forwards). A batch
    that runs out of memory is freed (outside the handler, so the failed attempt's tensors are gone)
    and run again at half its size, and the batches after it start at the size that fitted. `measure`
    returns its batch's contribution instead of adding it somewhere, so a failed attempt adds nothing."""
    out: list[tuple[list, Any]] = []
    i = 0
    while i < len(items):
        part = items[i : i + size]
        try:
            result = measure(part)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest is re-raised
            if len(part) < 2 or not is_out_of_memory(exc):
                raise
            result = _OOM
        if result is _OOM:
            free_device_memory()
            size = (len(part) + 1) // 2
            log.warning(
                "%s: out of memory on a batch of %d; memory freed, continuing at %d",
                label,
                len(part),
                size,
            )
            continue
        out.append((part, result))
        i += len(part)
        if progress is not None:
            progress.update(len(part))
    return out


_OOM = object()
