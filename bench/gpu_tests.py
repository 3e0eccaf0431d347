"""`make test-gpu`: the GPU tests on a bare GPU machine, recorded. Runs tests/test_gpu.py under pytest
(present on the GPU machines; nothing is installed) and writes a JSON record: the device, the
versions, the commit, and each test's outcome and seconds, so that a GPU session commits what it saw.

    python -m bench.gpu_tests --json docs/test_gpu.json [-- extra pytest arguments]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from cross_model.runinfo import git_commit, versions

ROOT = Path(__file__).resolve().parent.parent


class Outcomes:
    """A pytest plugin that keeps each test's outcome (the call phase, or the setup's when it failed or skipped)."""

    def __init__(self) -> None:
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:  # noqa: ANN001 - pytest's hook signature
        if report.when == "call" or report.outcome != "passed":
            entry = {"outcome": report.outcome, "seconds": round(report.duration, 2)}
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                entry["reason"] = report.longrepr[2]
            elif report.outcome == "failed":
                entry["error"] = str(report.longrepr)[-2000:]
            self.tests.setdefault(report.nodeid, entry)

    def pytest_collectreport(self, report) -> None:  # noqa: ANN001 - pytest's hook signature
        # A module that fails to import (a missing package on a bare image) runs no test: without
        # this it would read as "passed 0, failed 0"
        if report.failed:
            self.tests[f"collecting {report.nodeid or 'tests'}"] = {
                "outcome": "failed",
                "seconds": 0.0,
                "error": str(report.longrepr)[-2000:],
            }


def device_description() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False, "note": "no CUDA device: every test skips"}
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "cuda_version": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_tests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, help="where to write the record")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for pytest (after --)")
    args = parser.parse_args(argv)
    plugin = Outcomes()
    start = time.time()
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py"), *args.pytest_args],
        plugins=[plugin],
    )
    counts = {
        k: sum(1 for t in plugin.tests.values() if t["outcome"] == k)
        for k in ("passed", "failed", "skipped")
    }
    record = {
        "device": device_description(),
        "versions": versions(),
        "git": git_commit(ROOT),
        "seconds": round(time.time() - start, 1),
        "exit_code": int(code),
        **counts,
        "tests": plugin.tests,
    }
    print(
        f"test-gpu: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped on "
        f"{record['device'].get('name', 'no GPU')} in {record['seconds']} s"
    )
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"record: {args.json}")
    return int(code) if code not in (pytest.ExitCode.NO_TESTS_COLLECTED,) else 0


if __name__ == "__main__":
    sys.exit(main())
