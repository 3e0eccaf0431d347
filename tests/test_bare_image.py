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
