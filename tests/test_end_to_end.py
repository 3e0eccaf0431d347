import json
import subprocess
import sys

from tests.conftest import ROOT


def test_tiny_config_runs_its_six_methods_end_to_end(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "run_experiments.py",
            "--config",
            "configs/tiny.yaml",
            "--output_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    methods = {
        "baseline",
        "skyline",
        "nld",
        "cipher",
        "ac_replace",
        "ac_sum",
        "kvcomm",
        "kvcomm_all",
        "ac_48_to_64",
    }
    assert {(s["task"], s["method"]) for s in summary} == {
        (t, m) for t in ("countries", "tipsheets") for m in methods
    }
    for s in summary:
        assert s["n"] == {"countries": 6, "tipsheets": 4}[s["task"]] and s["errors"] == 0
        assert f"| {s['task']} | {s['method']} | {s['n']} |" in res.stdout
    by = {(s["task"], s["method"]): s["payload_bytes"] for s in summary}
    assert (
        by[("countries", "baseline")] == 0
        and 0 < by[("countries", "kvcomm")] < by[("countries", "kvcomm_all")]
    )
    calib = json.loads((tmp_path / "tiny" / "calibration-kvcomm.json").read_text())
    assert len(calib["ranking"]) == 4 and all("calib" in i for i in calib["calibration_ids"])
    # The train stage fitted the 48 -> 64 projection that ac_48_to_64 then used (checkpoints under output_dir).
    (final,) = list((tmp_path / "checkpoints").glob("tiny-llama-48__tiny-llama-64__k2_j2__*/final"))
    assert json.loads((final / "projection.json").read_text())["d_in"] == 48
    fits = json.loads((tmp_path / "tiny" / "projections.json").read_text())
    assert (
        fits["ac_48_to_64"]["directory"] == str(final) and fits["ac_48_to_64"]["solver"] == "lstsq"
    )
    assert fits["ac_48_to_64"]["fit"] == json.loads((final / "projection.json").read_text())["fit"]
    assert by[("countries", "ac_48_to_64")] == 48 * 4
    for name in (
        "results.json",
        "results.md",
        "results.csv",
        "accuracy.png",
        "accuracy_vs_bytes.png",
    ):
        assert (tmp_path / "tiny" / name).stat().st_size > 0
    assert len((tmp_path / "tiny" / "results.csv").read_text().splitlines()) == 1 + len(summary)
    assert (tmp_path / "tiny" / "config.yaml").exists() and (
        tmp_path / "tiny" / "versions.json"
    ).exists()


def test_a_layer_sweep_runs_every_instance_and_draws_its_plot(tmp_path):
    from cross_model.doc_tables import publish

    cfg = {
        "name": "sweep",
        "output_dir": str(tmp_path),
        "stages": ["evaluate", "report"],
        "models": {"sender": "tiny-llama-64", "receiver": "tiny-llama-64"},
        "tasks": [{"name": "countries", "n_test": 3, "n_calib": 0, "max_new_tokens": 2}],
        "methods": {
            "baseline": {},
            "ac_layers": {"method": "ac", "sweep": {"k": "1..3", "j": "k"}},
            "ac_grid": {
                "method": "ac",
                "sender": "tiny-llama-48",
                "sweep": {"k": [1, 2], "j": [1, 3]},
            },
        },
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(cfg))
    res = subprocess.run(
        [sys.executable, "run_experiments.py", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [s["method"] for s in summary] == [
        "baseline",
        "ac_layers_k1_j1",
        "ac_layers_k2_j2",
        "ac_layers_k3_j3",
        "ac_grid_k1_j1",
        "ac_grid_k1_j3",
        "ac_grid_k2_j1",
        "ac_grid_k2_j3",
    ]
    assert all(s["n"] == 3 and s["errors"] == 0 for s in summary)
    assert (
        tmp_path / "sweep" / "layer_sweep.png"
    ).stat().st_size > 0 and "layer_sweep.png" in res.stdout
    publish(tmp_path / "sweep", tmp_path / "docs")
    assert (tmp_path / "docs" / "layer_sweep.png").exists()
