"""The GPU commands start on a bare GPU image: one with torch, transformers and pytest, and without
rapidfuzz, rouge, simplemma, datasets, gguf, wandb, submitit or deepspeed (../shared/ENVIRONMENT.md).
Emulated here with this environment's site-packages minus those packages (their code and metadata),
so a module-level import of any of them fails these tests, as it would there."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

ABSENT = ("rapidfuzz", "rouge", "simplemma", "datasets", "gguf", "wandb", "submitit", "deepspeed")


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory) -> Path:
    """A copy (by links) of site-packages without the packages the bare images lack."""
    out = tmp_path_factory.mktemp("bare_site")
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if not entry.name.lower().startswith(ABSENT):
            (out / entry.name).symlink_to(entry)
    return out


def _bare_python(bare_site: Path, code: str, cwd: Path = ROOT, **env: str):
    # -S: no site-packages but the bare copy (PYTHONPATH), so an absent package is really absent
    environ = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{bare_site}", **env}
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=cwd, env=environ, capture_output=True, text=True
    )


def test_the_emulated_image_lacks_what_the_bare_images_lack(bare_site):
    for name in ABSENT:
        proc = _bare_python(bare_site, f"import {name}")
        assert proc.returncode != 0 and "No module named" in proc.stderr, name


def test_the_gpu_commands_and_the_entry_point_import_on_the_bare_image(bare_site):
    modules = "bench.gpu, bench.gpu_tests, tests.test_gpu, run_experiments, cross_model.pipeline"
    proc = _bare_python(bare_site, f"import {modules}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_metric_that_needs_an_absent_package_says_which(bare_site):
    code = (
        "from cross_model.metrics import edit_similarity\n"
        "try:\n    edit_similarity('a = 1', ['a = 2'])\n"
        "except ImportError as err:\n    print(err)\n"
    )
    proc = _bare_python(bare_site, code)
    assert "edit_similarity needs the 'rapidfuzz' package" in proc.stdout, proc.stderr[-2000:]


def test_gpu_tests_record_a_collection_error_as_a_failure(tmp_path, bare_site):
    """A test module that cannot import runs no test; the record says failed, not 'passed 0'."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_gpu.py").write_text("import rapidfuzz\n\ndef test_x():\n    pass\n")
    out = tmp_path / "record.json"
    code = (
        "import sys; from pathlib import Path; import bench.gpu_tests as g\n"
        f"g.ROOT = Path({str(tmp_path)!r})\n"
        f"sys.exit(g.main(['--json', {str(out)!r}]))\n"
    )
    proc = _bare_python(bare_site, code, cwd=tmp_path)
    import json

    record = json.loads(out.read_text())
    assert proc.returncode != 0 and record["failed"] == 1 and record["passed"] == 0
    (name,) = record["tests"]
    assert name.startswith("collecting") and "rapidfuzz" in record["tests"][name]["error"]


@pytest.mark.slow  # the bench steps tokenise with SmolLM2's tokenizer (a packaged model)
def test_gpu_check_runs_every_step_on_the_bare_image(tmp_path, bare_site):
    """make gpu-check's steps, at toy shapes on this CPU (--toy), in the emulated bare image: every step
    starts, finishes within its deadline and writes its record; the GPU tests run in bf16 on the CPU."""
    import json

    code = "import sys, bench.gpu_check as g; sys.exit(g.main(['--toy', '--out', sys.argv[1]]))"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path)],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{bare_site}",
            "CROSS_MODEL_GPU_TESTS_DEVICE": "cpu",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    failed = {p.name: p.read_text()[-1500:] for p in tmp_path.glob("*.failed.txt")}
    assert proc.returncode == 0 and not failed, (summary, failed)
    assert list(summary) == ["tests", "short", "long", "debate", "kvcomm_8b"]
    tests = json.loads((tmp_path / "tests.json").read_text())
    assert tests["failed"] == 0 and tests["passed"] >= 7
    evaluator = json.loads((tmp_path / "kvcomm_8b.json").read_text())
    assert evaluator["errors"] == [] and evaluator["batch"] == 4 and evaluator["estimate_gib"] > 0
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["versions"]["gguf"] is None  # really the bare image


def test_gpu_check_fits_one_call():
    """A device call runs at most 10 minutes: gpu-check's deadlines add up to 8."""
    from bench import gpu_check

    for toy in (False, True):
        deadlines = [deadline for _, _, deadline in gpu_check.steps(Path("/tmp"), toy, None)]
        assert sum(deadlines) <= gpu_check.BUDGET_S <= 480
