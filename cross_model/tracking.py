"""Optional Weights & Biases tracking: rank 0 only, offline mode works, a no-op when wandb is not
installed or not asked for (said once in the log, never an error)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cross_model.distributed import is_main

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, run: Any = None):
        self.run = run

    @classmethod
    def start(cls, logging_cfg: Any, run_dir: Path, config: dict[str, Any], name: str) -> "Tracker":
        if not logging_cfg.wandb or not is_main() or logging_cfg.wandb_mode == "disabled":
            return cls()
        try:
            import wandb
        except ImportError:
            log.warning(
                "logging.wandb is on but wandb is not installed (`pip install wandb`); not tracking"
            )
            return cls()
        run = wandb.init(
            project=logging_cfg.wandb_project,
            name=name,
            mode=logging_cfg.wandb_mode,
            config=config,
            dir=str(run_dir),
            resume="allow",
            id=_run_id(run_dir, name),
        )
        return cls(run)

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def log_summary(self, summary: list[dict[str, Any]]) -> None:
        if self.run is None:
            return
        import wandb

        columns = list(summary[0]) if summary else []
        self.run.log(
            {
                "results": wandb.Table(
                    columns=columns, data=[[s[c] for c in columns] for s in summary]
                )
            }
        )
        for s in summary:
            self.run.summary[f"{s['task']}/{s['method']}/accuracy"] = s["accuracy"]
            self.run.summary[f"{s['task']}/{s['method']}/payload_bytes"] = s["payload_bytes"]

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _run_id(run_dir: Path, name: str) -> str:
    """A stable id per run directory, so that a resumed run continues the same wandb run."""
    import hashlib

    return f"{name}-{hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]}"
