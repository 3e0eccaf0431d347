"""Every command-line entry point behaves like every other CLI: `--help` prints its usage and exits 0,
and a wrong argument exits 2 with a usage line (argparse's contract), before any work starts."""

from __future__ import annotations

import runpy
import sys

import pytest

from tests.conftest import ROOT

# runpy warns that the module was imported before it ran as __main__, which `python -m` never does
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")

MODULES = [
    "cross_model.data",
    "cross_model.report",
    "cross_model.doc_tables",
    "cross_model.seed_spread",
    "cross_model.agreement",
    "cross_model.models",
    "bench.run",
    "bench.gpu",
    "bench.gpu_tests",
    "bench.gpu_check",
    "bench.choose_projection_ridge",
    "bench.choose_qkvcomm_scheme",
    "bench.legacy_transformers",
    "launch.local",
    "launch.submit",
]
ENTRY_POINTS = ["run_experiments.py", *MODULES]


def _run(entry: str, args: list[str], monkeypatch) -> int:
    """Runs an entry point as `python -m` (or the script) would, in this process; returns its exit code."""
    monkeypatch.setattr(sys, "argv", [entry, *args])
    try:
        if entry.endswith(".py"):
            runpy.run_path(str(ROOT / entry), run_name="__main__")
        else:
            runpy.run_module(entry, run_name="__main__", alter_sys=False)
    except SystemExit as done:
        return 0 if done.code is None else done.code if isinstance(done.code, int) else 1
    return 0


def test_every_entry_point_is_listed():
    """A new `__main__` under cross_model/, bench/ or launch/ must join the list above."""
    found = set()
    for folder in ("cross_model", "bench", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            if 'if __name__ == "__main__"' in path.read_text() or path.name == "__main__.py":
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                found.add(module.removesuffix(".__main__"))
    assert found == set(MODULES)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_prints_the_usage_and_exits_0(entry, monkeypatch, capsys):
    assert _run(entry, ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and len(out.splitlines()) > 3


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_wrong_argument_exits_2_with_the_usage(entry, monkeypatch, capsys):
    assert _run(entry, ["--no-such-option", "1"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "usage: " in err and "error: " in err, err  # how the command is used, and what was wrong
