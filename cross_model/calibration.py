"""The calibrate stage: methods that choose something before the test items (KVComm's layers,
Q-KVComm's bits per layer) choose it on the calibration splits of all tasks, never test items.

The calibration items are sharded over ranks like test items; each method sums its measurements over
its share, the sums are all-reduced, and rank 0 decides and broadcasts (`Method.calibrate`), so every
rank uses one decision however bf16 ties would fall on each GPU. The decision is saved with the run
and reloaded when the run resumes; rank 0 reads the file and tells the others.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cross_model.data.base import Example
from cross_model.distributed import barrier, broadcast_object, is_main
from cross_model.failures import RunRefused
from cross_model.result_files import write_json_atomically

log = logging.getLogger(__name__)


def calibration_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"calibration-{name}.json"


def _read_saved(path: Path) -> dict | str:
    """The saved calibration, or what is wrong with it (a string, broadcast so every rank stops)."""
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return f"saved calibration {path} is not JSON ({err}); delete it to calibrate again"
    if not isinstance(saved, dict):
        return f"saved calibration {path} is not a JSON object; delete it to calibrate again"
    return saved


def calibrate_methods(
    run_dir: Path, methods: dict[str, Any], names: list[str], calib: list[Example], batch_size: int
) -> dict[str, dict]:
    """Calibrate (or reload) each method of `names` on the calibration items `calib` (every task's);
    returns name -> its calibration."""
    out = {}
    for name in names:
        path = calibration_path(run_dir, name)
        saved = broadcast_object(_read_saved(path) if is_main() and path.exists() else None)
        if isinstance(saved, str):
            raise RunRefused(saved)
        if saved is not None:
            try:
                methods[name].load_calibration(saved)
            except (ValueError, KeyError, TypeError) as err:
                raise RunRefused(
                    f"saved calibration {path} does not fit method {name}: {err}. Delete the file "
                    f"to calibrate again"
                ) from None
            log.info("calibrate: %s loaded its saved calibration from %s", name, path)
            out[name] = saved
            continue
        # At the evaluation's batch size unless the method sets its own (halved on out-of-memory).
        result = methods[name].calibrate(
            calib, batch_size=methods[name].params.batch_size or batch_size
        )
        if is_main():
            write_json_atomically(path, result)
        if "selected" in result:
            log.info("calibrate: %s keeps receiver layers %s", name, result["selected"])
        if "layer_bits" in result:
            log.info("calibrate: %s gives its layers these bits: %s", name, result["layer_bits"])
        out[name] = result
    barrier()
    return out
