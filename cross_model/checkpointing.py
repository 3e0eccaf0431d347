"""Checkpoints that survive kills and preemption.

A checkpoint is a directory `step_<NNNNNNNN>/` holding
  - `weights.safetensors`  the trained tensors,
  - `trainer.pt`           optimizer state, step, data position (torch.save, loaded with weights_only),
  - `rng_rank<r>.pt`       each rank's RNG states as tensors and plain data (restored only when the
                           world size is unchanged; like trainer.pt, loaded with weights_only),
  - `meta.json`            written last: the identity sidecar, the step, fit statistics, and a
                           SHA-256 per file. Its presence (with matching checksums) marks a complete one.
It is written into a hidden temporary directory, every file fsynced, then renamed into place, so a
kill at any moment leaves either a complete checkpoint or none. `latest()` is the highest step whose
files verify; a truncated or corrupted one is skipped with a warning that names it. Nothing is ever
overwritten in place: a damaged directory at the step being saved is moved aside first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FINAL = "final"  # a training job's finished artefact, beside its step checkpoints
META = "meta.json"
WEIGHTS = "weights.safetensors"
TRAINER = "trainer.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, files: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `files` (name -> tensors dict for .safetensors, any torch-saveable object for .pt, bytes
    or str otherwise) and finally `meta.json` (with checksums) into a temporary sibling of `target`,
    then rename it to `target`. `target` must not exist."""
    from safetensors.torch import save_file

    if target.exists():
        raise FileExistsError(f"{target} exists; checkpoints are never overwritten in place")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        checksums = {}
        for name, content in files.items():
            path = tmp / name
            if name.endswith(".safetensors"):
                save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, str(path))
            elif name.endswith(".pt"):
                torch.save(content, path)
            else:
                path.write_bytes(content.encode() if isinstance(content, str) else content)
            _fsync_file(path)
            checksums[name] = sha256(path)
        meta_path = tmp / META
        meta_path.write_text(json.dumps({**meta, "checksums": checksums}, indent=2, sort_keys=True))
        _fsync_file(meta_path)
        _fsync_dir(tmp)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def publish_once(target: Path, files: dict[str, Any], meta: dict[str, Any]) -> None:
    """A finished artefact written atomically, once: a complete one is kept, a damaged one moved aside."""
    if target.exists() and verify(target)[0] is not None:
        return
    if target.exists():
        os.rename(target, target.with_name(f"{target.name}.damaged-{time.time_ns()}"))
    write_atomically(target, files, meta)


def verify(directory: Path) -> tuple[dict[str, Any] | None, str]:
    """(meta, "") if every file named in meta.json is present with its checksum, else (None, why)."""
    meta_path = directory / META
    if not meta_path.exists():
        return None, "no meta.json (incomplete write)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return None, f"meta.json unreadable ({err})"
    checksums = meta.get("checksums")
    if not isinstance(checksums, dict) or not checksums:
        return None, "meta.json has no checksums"
    for name, expected in checksums.items():
        path = directory / name
        if not path.exists():
            return None, f"{name} is missing"
        if sha256(path) != expected:
            return None, f"{name} does not match its checksum (truncated or corrupted)"
    return meta, ""


@dataclass
class Checkpoint:
    step: int
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    rng: Any = None  # this rank's RNG states, or None when the world size changed


class CheckpointManager:
    """Step checkpoints under one directory: atomic save, verified `latest()`, keep-last-k."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def steps(self) -> list[int]:
        """Steps that have a directory (complete or not), ascending."""
        if not self.directory.exists():
            return []
        return sorted(
            int(m.group(1)) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))
        )

    def complete(self, warn: bool = True) -> list[tuple[int, dict[str, Any]]]:
        """(step, meta) of every checkpoint that verifies, ascending; the others are named in a warning."""
        out = []
        for step in self.steps():
            meta, why = verify(self.step_dir(step))
            if meta is None:
                if warn:
                    log.warning("checkpoint %s is skipped: %s", self.step_dir(step), why)
                continue
            out.append((step, meta))
        return out

    def latest_step(self) -> int | None:
        done = self.complete()
        return done[-1][0] if done else None

    def save(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        trainer: dict[str, Any] | None = None,
        rng_per_rank: list[Any] | None = None,
    ) -> Path:
        """Write checkpoint `step` (call on one rank; gather the other ranks' RNG states first)."""
        target = self.step_dir(step)
        if target.exists():
            existing, why = verify(target)
            if existing is not None:
                log.info("checkpoint %s already complete; not rewritten", target)
                return target
            aside = target.with_name(f"{target.name}.damaged-{time.time_ns()}")
            log.warning("checkpoint %s is damaged (%s); moved aside to %s", target, why, aside.name)
            os.rename(target, aside)
        files: dict[str, Any] = {WEIGHTS: tensors, TRAINER: trainer or {}}
        for rank, state in enumerate(rng_per_rank or []):
            files[f"rng_rank{rank}.pt"] = state
        meta = {
            **meta,
            "step": step,
            "world_size": len(rng_per_rank or []) or None,
            "saved_at": time.time(),
        }
        write_atomically(target, files, meta)
        self.prune()
        return target

    def load(self, step: int, rank: int = 0, world_size: int = 1) -> Checkpoint:
        from safetensors.torch import load_file

        path = self.step_dir(step)
        meta, why = verify(path)
        if meta is None:
            raise ValueError(f"checkpoint {path} cannot be loaded: {why}")
        trainer = load_plain(path / TRAINER)
        rng = None
        rng_file = path / f"rng_rank{rank}.pt"
        if meta.get("world_size") == world_size and rng_file.exists():
            rng = load_plain(rng_file)
        elif meta.get("world_size"):
            log.info(
                "checkpoint %s was saved by %s ranks, this run has %s: RNG states not restored",
                path,
                meta.get("world_size"),
                world_size,
            )
        return Checkpoint(step, path, meta, load_file(str(path / WEIGHTS)), trainer, rng)

    def load_latest(self, rank: int = 0, world_size: int = 1) -> Checkpoint | None:
        step = self.latest_step()
        return None if step is None else self.load(step, rank, world_size)

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; older complete ones go, and so do damaged
        ones older than the newest complete (they can never be resumed from)."""
        done = [s for s, _ in self.complete(warn=False)]
        keep = set(done[-self.keep_last :])
        newest = done[-1] if done else None
        for step in self.steps():
            if step in keep:
                continue
            if step in done or (newest is not None and step < newest):
                shutil.rmtree(self.step_dir(step), ignore_errors=True)
        for stale in self.directory.glob(".tmp-step_*"):
            # Temporaries of a killed writer (our own pid's are renamed before we get here).
            if f"-{os.getpid()}-" not in stale.name:
                shutil.rmtree(stale, ignore_errors=True)


def load_plain(path: Path) -> Any:
    """torch.load of tensors and plain data only (weights_only=True): a checkpoint file is read, never
    run, so a crafted pickle planted in a checkpoint directory is refused with the file named."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint file {path} holds objects other than tensors and plain data, which are never "
            f"loaded (they could run code): {str(err).splitlines()[0]}. If this code wrote it, it was "
            f"tampered with; delete that checkpoint directory to resume from an earlier one"
        ) from None


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain data (saved and loaded with weights_only=True)."""
    import random

    import numpy as np

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "words": torch.tensor(words, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Trained:
    """A training job's outcome: its directory (with `final/`), the final metadata, the step it resumed
    from (None: a fresh run) and whether a finished artefact was found instead of training."""

    directory: Path
    meta: dict[str, Any]
    resumed_from: int | None = None
    loaded_final: bool = False


def check_identity(
    meta: dict[str, Any], expected: dict[str, Any], where: str, keys: tuple[str, ...]
) -> None:
    """Refuse a checkpoint (or a finished artefact) whose recorded `keys` differ from what this run
    needs: another pair, other layers or widths, another recipe; every mismatch is named."""
    mismatches = [
        f"{key}: checkpoint has {meta.get(key)!r}, this run needs {expected[key]!r}"
        for key in keys
        if key in expected and meta.get(key) != expected[key]
    ]
    if mismatches:
        raise ValueError(f"{where} does not fit this run: " + "; ".join(mismatches))


def directory_slug(name: str) -> str:
    """A model or task name as part of a directory name (its last 48 safe characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-48:]
