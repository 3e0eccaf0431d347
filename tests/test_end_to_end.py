import json
import subprocess
import sys

from tests.conftest import ROOT


def test_tiny_config_runs_every_method_end_to_end(tmp_path):
    res = subprocess.run(
        [sys.executable, "run_experiments.py", "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    methods = {"baseline", "skyline", "nld", "cipher", "ac_replace", "ac_sum", "kvcomm", "kvcomm_all", "ac_48_to_64"}
    assert {(s["task"], s["method"]) for s in summary} == {(t, m) for t in ("countries", "tipsheets") for m in methods}
    for s in summary:
        assert s["n"] == {"countries": 6, "tipsheets": 4}[s["task"]] and s["errors"] == 0
        assert f"| {s['task']} | {s['method']} | {s['n']} |" in res.stdout
    by = {(s["task"], s["method"]): s["payload_bytes"] for s in summary}
    assert by[("countries", "baseline")] == 0 and 0 < by[("countries", "kvcomm")] < by[("countries", "kvcomm_all")]
    calib = json.loads((tmp_path / "tiny" / "calibration-kvcomm.json").read_text())
    assert len(calib["ranking"]) == 4 and all("calib" in i for i in calib["calibration_ids"])
    # The train stage fitted the 48 -> 64 projection that ac_48_to_64 then used (checkpoints under output_dir).
    (final,) = list((tmp_path / "checkpoints").glob("tiny-llama-48__tiny-llama-64__k2_j2__*/final"))
    assert json.loads((final / "projection.json").read_text())["d_in"] == 48
    fits = json.loads((tmp_path / "tiny" / "projections.json").read_text())
    assert fits["ac_48_to_64"]["directory"] == str(final) and fits["ac_48_to_64"]["solver"] == "lstsq"
    assert fits["ac_48_to_64"]["fit"] == json.loads((final / "projection.json").read_text())["fit"]
    assert by[("countries", "ac_48_to_64")] == 48 * 4
    for name in ("results.json", "results.md", "results.csv", "accuracy.png", "accuracy_vs_bytes.png"):
        assert (tmp_path / "tiny" / name).stat().st_size > 0
    assert len((tmp_path / "tiny" / "results.csv").read_text().splitlines()) == 1 + len(summary)
    assert (tmp_path / "tiny" / "config.yaml").exists() and (tmp_path / "tiny" / "versions.json").exists()
