"""What is saved with every run so it can be reproduced: resolved config, versions, git commit."""

from __future__ import annotations

import json
import os
import platform as py_platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cross_model.config import ExperimentConfig, to_dict

TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "datasets", "numpy", "simplemma")
# Keys that may change between a run and its resumption without changing its results.
RESUMABLE_KEYS = {"stages", "logging", "eval.batch_size"}


def git_commit(repo: Path | None = None) -> dict[str, Any]:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": py_platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    from cross_model import __version__

    out["cross_model"] = __version__
    return out


def run_metadata(world_size: int, device: str) -> dict[str, Any]:
    return {
        "versions": versions(),
        "git": git_commit(),
        "host": socket.gethostname(),
        "world_size": world_size,
        "device": device,
        "argv": sys.argv,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def config_differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]


def prepare_run_dir(cfg: ExperimentConfig, meta: dict[str, Any]) -> Path:
    """Create the run directory, or check that a restart uses the same config (resume, never overwrite)."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    resolved = to_dict(cfg)
    if config_path.exists():
        old = yaml.safe_load(config_path.read_text()) or {}
        diff = config_differences(old, resolved)
        if diff:
            raise ValueError(
                f"run directory {run_dir} holds a run with a different config (differs in: {', '.join(diff[:8])}); "
                f"resume it with the same arguments, or pick another --name"
            )
    else:
        _atomic_write(config_path, yaml.safe_dump(resolved, sort_keys=False))
    # Metadata is per start: a resumed run appends, so each start's versions are kept.
    with open(run_dir / "runs.jsonl", "a") as fh:
        fh.write(json.dumps(meta) + "\n")
    _atomic_write(run_dir / "versions.json", json.dumps(meta, indent=2))
    return run_dir


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_run_context(run_dir: Path) -> dict[str, Any]:
    """What a report carries so its numbers can be reproduced: the resolved config, and the versions,
    commit, host and world size of every start of the run."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else None
    starts = []
    if (run_dir / "runs.jsonl").exists():
        starts = [json.loads(line) for line in (run_dir / "runs.jsonl").read_text().splitlines() if line.strip()]
    latest = starts[-1] if starts else {}
    return {"name": run_dir.name, "config": config, "versions": latest.get("versions"), "git": latest.get("git"),
            "starts": starts}
