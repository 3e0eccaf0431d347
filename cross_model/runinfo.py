"""What is saved with every run so it can be reproduced: resolved config, versions, git commit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform as py_platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cross_model import __version__
from cross_model.config import ExperimentConfig, to_dict
from cross_model.distributed import (
    barrier,
    broadcast_object,
    gather_object,
    get_rank,
    get_world_size,
    is_main,
)

log = logging.getLogger(__name__)

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "gguf",
    "datasets",
    "numpy",
    "simplemma",
)
# Keys that may change between a run and its resumption without changing its results.
RESUMABLE_KEYS = {
    "stages",
    "logging",
    "eval.batch_size",
    "eval.reuse_prefills",
    "eval.fail_fast_items",
    "eval.fail_fast_ratio",
    "eval.log_prompts",
}


# The code a run executes. Not configs/: the run's own config is compared, resolved, by
# `config_differences`, and another config edited while this run waits in the queue is not its code.
CODE_PATHS = ("cross_model", "run_experiments.py", "launch", "slurm", "requirements.txt")


def git_commit(repo: Path | None = None) -> dict[str, Any]:
    """The commit, whether the tree is dirty, and a hash of the uncommitted changes to the tracked code
    that runs (`CODE_PATHS`), so that a resume can tell the same dirty tree from a changed one.
    Untracked files are not code identity: a config file written into configs/ while a job waits
    in the queue must not make its requeue refuse itself (the run's own config is compared on its
    own, resolved, by `config_differences`)."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, check=True
            ).stdout

        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
        # Only what runs counts as a code change: editing docs or tests while a run waits is not one.
        diff = git("diff", "HEAD", "--binary", "--", *CODE_PATHS)
        # The committed code itself, by content: a commit that changes no code path (docs, tests, an
        # empty commit) leaves it as it was, so a requeue after such a commit still resumes.
        trees = git("rev-parse", *(f"HEAD:{path}" for path in CODE_PATHS if (repo / path).exists()))
        return {
            "commit": commit,
            "dirty": dirty,
            "changes": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff.strip() else None,
            "code": hashlib.sha256(trees.encode()).hexdigest()[:16],
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "changes": None, "code": None}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": py_platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
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
    return [
        k
        for k in keys
        if a.get(k) != b.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)
    ]


IDENTITY_PACKAGES = (
    "torch",
    "transformers",
)  # their kernels and defaults change answers like our code does


def run_identity(meta: dict[str, Any], device: str, dtype: str) -> dict[str, Any]:
    """What a resumed run must share with its first start for its rows to be one experiment: the
    resolved device kind and dtype (`auto` resolves differently on a GPU and a CPU), the number of
    ranks (each calibrates its share, and batches, so bf16 sums, differ with it), the code (the
    content of its paths, committed and not), and the torch and transformers versions."""
    git = meta.get("git") or {}
    found = meta.get("versions") or {}
    return {
        "device": device,
        "dtype": dtype,
        "world_size": meta.get("world_size"),
        "commit": git.get("commit"),
        "code": git.get("code"),
        "changes": git.get("changes"),
        **{name: found.get(name) for name in IDENTITY_PACKAGES},
    }


def check_identity(
    run_dir: Path, first: dict[str, Any], now: dict[str, Any], allow_code_change: bool
) -> None:
    if (first.get("device"), first.get("dtype")) != (now["device"], now["dtype"]):
        raise ValueError(
            f"run directory {run_dir} was started on {first.get('device')} in {first.get('dtype')}, this start resolves to "
            f"{now['device']} in {now['dtype']}: resuming would mix results of two set-ups. Resume it on the same hardware "
            f"(or set platform.device / platform.dtype to {first.get('device')} / {first.get('dtype')}), or pick another --name"
        )
    changed = []
    if first.get("world_size") not in (None, now.get("world_size")):
        resized = f"{first['world_size']} ranks -> {now.get('world_size')}"
        if now["dtype"] in ("bfloat16", "float16"):
            # each rank batches its own share: in half precision other batches give other sums, and
            # near-tied tokens flip
            changed.append(resized)
        else:
            log.warning("resuming %s with %s (float32: batches change no answer)", run_dir, resized)
    # Identities written before `code` existed compare commits.
    same_code = (
        first["code"] == now.get("code")
        if first.get("code")
        else first.get("commit") == now.get("commit")
    )
    if not same_code:
        changed.append(
            f"code {first.get('code') or first.get('commit')} -> {now.get('code') or now.get('commit')} "
            f"(commit {first.get('commit')} -> {now.get('commit')})"
        )
    elif first.get("changes") != now.get("changes"):
        changed.append(
            f"uncommitted changes {first.get('changes') or 'none'} -> {now.get('changes') or 'none'}"
        )
    # Runs started before the versions were part of the identity have none to compare.
    changed += [
        f"{name} {first[name]} -> {now.get(name)}"
        for name in IDENTITY_PACKAGES
        if name in first and first[name] != now.get(name)
    ]
    if changed:
        what = "; ".join(changed)
        if not allow_code_change:
            raise ValueError(
                f"run directory {run_dir} was started with other code or set-up ({what}); its finished rows "
                f"came from that one. Check out the code (and install the versions, use the number of ranks) it "
                f"started with, pick another --name, or pass --allow-code-change to resume anyway (each row "
                f"records the start it came from)"
            )
        log.warning(
            "resuming %s with changed code (%s), as --allow-code-change asks", run_dir, what
        )


def prepare_run_dir(
    cfg: ExperimentConfig,
    meta: dict[str, Any],
    identity: dict[str, Any] | None = None,
    allow_code_change: bool = False,
) -> int:
    """Create the run directory, or check that a restart uses the same config, hardware and code (resume,
    never overwrite). Returns this start's index (0 for the first start, the line in runs.jsonl)."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    identity_path = run_dir / "identity.json"
    resolved = to_dict(cfg)
    produced = produced_files(run_dir)
    if config_path.exists() and not produced:
        # An earlier start stopped before any stage wrote anything (a data error, a typo in an
        # override): nothing would mix, so this start takes the directory over.
        log.info(
            "run directory %s holds no results yet: this start's config replaces its own", run_dir
        )
        identity_path.unlink(missing_ok=True)
        config_path.unlink()
    if config_path.exists():
        old = yaml.safe_load(config_path.read_text()) or {}
        diff = config_differences(old, resolved)
        if diff:
            raise ValueError(
                f"run directory {run_dir} holds a run with a different config (differs in: {', '.join(diff[:8])}); "
                f"resume it with the same arguments, or pick another --name"
            )
        if identity is not None and identity_path.exists():
            check_identity(
                run_dir, json.loads(identity_path.read_text()), identity, allow_code_change
            )
        elif identity is not None:
            raise ValueError(
                f"run directory {run_dir} holds {', '.join(produced[:3])} but no identity.json, so "
                f"nothing says which code and hardware wrote them (not a directory this program "
                f"started, or its identity was deleted); pick another --name"
            )
    else:
        _atomic_write(config_path, yaml.safe_dump(resolved, sort_keys=False))
    if identity is not None and not identity_path.exists():
        _atomic_write(identity_path, json.dumps(identity, indent=2))
    runs = run_dir / "runs.jsonl"
    start = sum(1 for line in runs.read_text().splitlines() if line.strip()) if runs.exists() else 0
    # Metadata is per start: a resumed run appends, so each start's versions are kept.
    with open(runs, "a") as fh:
        fh.write(json.dumps({**meta, "start": start, "identity": identity}) + "\n")
    _atomic_write(run_dir / "versions.json", json.dumps(meta, indent=2))
    return start


START_FILES = {"config.yaml", "identity.json", "runs.jsonl", "versions.json"}


def produced_files(run_dir: Path) -> list[str]:
    """What a stage wrote into the run directory (relative paths of non-empty files): everything but
    what a start writes before its first stage and the ranks' directory check."""
    out = []
    for path in sorted(Path(run_dir).rglob("*")):
        rel = path.relative_to(run_dir)
        if rel.parts[0].startswith(".rank-check-") or str(rel) in START_FILES:
            continue
        if path.is_file() and path.stat().st_size > 0:
            out.append(str(rel))
    return out


def check_shared_run_dir(run_dir: Path, wait_s: float = 20.0) -> None:
    """Every rank writes a token into the run directory and must see every other rank's: rank 0 alone
    decides about the run's files (checkpoints, calibration, results), which only works when all ranks
    see one directory. With node-local output directories the run would hang or mix; refuse it."""
    world = get_world_size()
    if world == 1:
        return
    nonce = broadcast_object(uuid.uuid4().hex[:12] if is_main() else None)
    tokens = Path(run_dir) / f".rank-check-{nonce}"
    tokens.mkdir(parents=True, exist_ok=True)
    (tokens / f"rank{get_rank()}").write_text(socket.gethostname())
    barrier()
    deadline = (
        time.monotonic() + wait_s
    )  # network filesystems may list a new file a few seconds late
    while True:
        seen = sorted(int(p.name[4:]) for p in tokens.glob("rank*"))
        if seen == list(range(world)) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    views = gather_object((socket.gethostname(), seen))
    barrier()
    if is_main():
        shutil.rmtree(tokens, ignore_errors=True)
    blind = [(r, host, s) for r, (host, s) in enumerate(views) if s != list(range(world))]
    if blind:
        detail = "; ".join(f"rank {r} on {host} sees ranks {s}" for r, host, s in blind[:4])
        raise ValueError(
            f"the run directory {run_dir} is not shared by all {world} ranks ({detail}). Rank 0 decides about the "
            f"run's checkpoints, calibration and results and the other ranks read them, so output_dir must be on a "
            f"filesystem every node sees (e.g. a cluster home or scratch, not /tmp)"
        )


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
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text())
        if (run_dir / "config.yaml").exists()
        else None
    )
    starts = []
    if (run_dir / "runs.jsonl").exists():
        starts = [
            json.loads(line)
            for line in (run_dir / "runs.jsonl").read_text().splitlines()
            if line.strip()
        ]
    latest = starts[-1] if starts else {}
    return {
        "name": run_dir.name,
        "config": config,
        "versions": latest.get("versions"),
        "git": latest.get("git"),
        "starts": starts,
    }


def check_committed(data: dict[str, Any], run_dir: Path) -> None:
    """Refuse a run any of whose starts ran uncommitted code. Clean means no uncommitted change to the
    code that runs (`runinfo.CODE_PATHS`: its hash is `changes`); a docs file another make target
    rewrote in the same tree is not code."""
    dirty = [
        i
        for i, st in enumerate(data.get("starts") or [])
        if not (st.get("git") or {}).get("commit")
        or (st.get("git") or {}).get("changes") is not None
    ]
    if dirty or not data.get("starts"):
        raise ValueError(
            f"{run_dir}: start(s) {', '.join(map(str, dirty)) or '(none recorded)'} ran with uncommitted "
            f"changes to the code (or no commit recorded); a published result must come from committed "
            f"code. Commit, run its command again from the clean tree, then publish"
        )
