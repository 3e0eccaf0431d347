"""Controls are not opt-in: every method that declares them (`Method.controls`) gets them in every
config, by what they run rather than by name, and the resolved config lists them."""

import pytest
import yaml

from cross_model.context import load_experiment
from cross_model.methods.registry import resolve_method


def _load(tmp_path, methods: dict, **more) -> dict:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"tasks": [{"name": "secret_word", "n_test": 2}], "methods": methods, **more}
        )
    )
    return load_experiment(path).methods


def test_latentwire_gets_its_shuffled_and_zero_latent_per_receiver(tmp_path):
    got = _load(
        tmp_path,
        {
            "lw": {"method": "latentwire"},
            "lw_gemma": {"method": "latentwire", "receiver": "gemma3-270m"},
            "lw_8bit": {"method": "latentwire", "bits": 8},
        },
    )
    assert got["lw_shuffled"] == {"method": "latentwire", "variant": "shuffled"}
    assert got["lw_zero"] == {"method": "latentwire", "variant": "zero"}
    assert got["lw_gemma_zero"] == {
        "method": "latentwire",
        "receiver": "gemma3-270m",
        "variant": "zero",
    }
    # the 8-bit instance shares the raw-wire controls of its receiver: none of its own
    assert sorted(got) == [
        "lw",
        "lw_8bit",
        "lw_gemma",
        "lw_gemma_shuffled",
        "lw_gemma_zero",
        "lw_shuffled",
        "lw_zero",
    ]


def test_a_control_the_config_already_runs_under_another_name_is_not_added_twice(tmp_path):
    got = _load(
        tmp_path,
        {"lw": {"method": "latentwire"}, "mine": {"method": "latentwire", "variant": "shuffled"}},
    )
    assert sorted(got) == ["lw", "lw_zero", "mine"]
    with pytest.raises(
        ValueError, match="methods.lw_zero: the name of lw's control .* is taken by another method"
    ):
        _load(tmp_path, {"lw": {"method": "latentwire"}, "lw_zero": {"method": "baseline"}})


@pytest.mark.parametrize("method", ["c2c", "kv_translate"])
def test_learned_cache_methods_get_both_controls_with_the_same_recipe(tmp_path, method):
    got = _load(tmp_path, {"m": {"method": method, "data": "tasks", "steps": 7, "lr": 0.01}})
    assert got["m_other_item"] == {
        "method": method,
        "steps": 7,
        "lr": 0.01,
        "data": "tasks",
        "control": "other_item",
    }
    _, main = resolve_method("m", got["m"])
    _, control = resolve_method("m_other_item", got["m_other_item"])
    from dataclasses import replace

    assert (
        replace(control, control=None) == main
    )  # same recipe: the train stage trains one module for both
    assert got["m_shuffled_a"] == {
        "method": method,
        "steps": 7,
        "lr": 0.01,
        "data": "tasks",
        "train_control": "shuffled_a",
    }
    assert sorted(got) == ["m", "m_other_item", "m_shuffled_a"]
    # nothing trained (a finished directory): no control
    assert sorted(_load(tmp_path, {"m": {"method": method, "projector": str(tmp_path)}})) == ["m"]
    assert sorted(_load(tmp_path, {"m": {"method": method}}, controls=False)) == ["m"]
