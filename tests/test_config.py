import json
from pathlib import Path

import pytest
import yaml

from cross_model.config import ExperimentConfig, load_config, parse_overrides


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_yaml_and_overrides_precedence(tmp_path):
    p = write(tmp_path, {"seed": 3, "eval": {"batch_size": 2}, "train": {"lr": 0.01}})
    cfg = load_config(p, ["--eval.batch_size", "8", "--seed=5"])
    assert cfg.eval.batch_size == 8  # CLI beats YAML
    assert cfg.seed == 5
    assert cfg.train.lr == 0.01  # YAML beats default
    assert cfg.train.epochs == ExperimentConfig().train.epochs  # default kept
    assert isinstance(cfg.train.lr, float)


def test_list_index_and_method_overrides(tmp_path):
    p = write(
        tmp_path,
        {
            "tasks": [{"name": "countries", "n_test": 4}],
            "methods": {"baseline": {}, "sky": {"method": "skyline"}},
        },
    )
    cfg = load_config(
        p,
        [
            "--tasks.0.n_test",
            "2",
            "--methods.sky.max_new_tokens",
            "7",
            "--stages",
            "[evaluate,report]",
        ],
    )
    assert cfg.tasks[0].n_test == 2
    assert cfg.methods["sky"] == {"method": "skyline", "max_new_tokens": 7}
    assert cfg.stages == ["evaluate", "report"]
    # YAML methods replace the default set rather than merging into it
    assert set(cfg.methods) == {"baseline", "sky"}


@pytest.mark.parametrize(
    "data, overrides, match",
    [
        ({"evall": {}}, [], "unknown config key 'evall'"),
        ({"eval": {"batchsize": 3}}, [], r"unknown config key eval.'batchsize'"),
        ({}, ["--eval.batch_size", "many"], "eval.batch_size: expected an integer"),
        ({}, ["--eval.batch_size", "0"], "eval.batch_size: must be >= 1"),
        ({}, ["--platform.device", "tpu"], "platform.device: 'tpu' is not allowed"),
        ({}, ["--stages", "[train,fly]"], "stages: 'fly' is not allowed"),
        (
            {},
            ["--tasks.0.path", "/no/such/file.jsonl"],
            "tasks.0.path: '/no/such/file.jsonl' does not exist",
        ),
        ({}, ["--tasks.3.n_test", "1"], "must be a list index below 1"),
        ({"methods": {"telepathy": {}}}, [], "methods.telepathy: unknown method 'telepathy'"),
        ({"methods": {"baseline": {"k": 3}}}, [], r"unknown config key methods.baseline.'k'"),
        (
            {"methods": {"baseline": {"max_new_tokens": -1}}},
            [],
            "methods.baseline.max_new_tokens: must be >= 1",
        ),
        ({"train": {"heldout_fraction": 1.5}}, [], r"train.heldout_fraction: must be in \(0, 1\)"),
        ({"logging": {"wandb": "yes"}}, [], "logging.wandb: expected true or false"),
        (
            {"tasks": [{"name": "countries"}, {"name": "countries"}]},
            [],
            "give a repeated task a distinct label",
        ),
        (
            {"tasks": [{"name": "countries", "label": "a/b"}]},
            [],
            r"tasks.0.label: 'a/b' names a file or directory",
        ),
    ],
)
def test_bad_input_names_the_key(tmp_path, data, overrides, match):
    from cross_model.context import load_experiment

    p = write(tmp_path, data)
    with pytest.raises(ValueError, match=match):
        load_experiment(p, overrides)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="has no value"):
        parse_overrides(["--eval.batch_size"])
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_overrides(["eval.batch_size", "3"])


@pytest.mark.parametrize("path", ["configs/tiny.yaml", "configs/quickstart.yaml"])
def test_shipped_configs_validate(path):
    from cross_model.context import load_experiment

    load_experiment(path)


def test_run_dir_refuses_a_different_config(tmp_path):
    from cross_model.runinfo import prepare_run_dir
    from tests.helpers import write_a_result_row

    cfg = load_config("configs/tiny.yaml", ["--output_dir", str(tmp_path)])
    prepare_run_dir(cfg, {"x": 1})
    write_a_result_row(tmp_path / "tiny")
    prepare_run_dir(
        load_config("configs/tiny.yaml", ["--output_dir", str(tmp_path), "--eval.batch_size", "2"]),
        {},
    )
    other = load_config("configs/tiny.yaml", ["--output_dir", str(tmp_path), "--seed", "9"])
    with pytest.raises(ValueError, match="differs in: seed"):
        prepare_run_dir(other, {})
    saved = yaml.safe_load((tmp_path / "tiny" / "config.yaml").read_text())
    assert saved["seed"] == 0  # never overwritten in place


def test_a_sweep_entry_expands_into_named_instances_in_place(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "methods": {
                    "baseline": {},
                    "ac_layers": {
                        "method": "ac",
                        "mode": "sum",
                        "sweep": {"k": "1..5..2", "j": "k"},
                    },
                    "grid": {"method": "ac", "sweep": {"k": [1, 2], "j": "3..4"}},
                    "skyline": {},
                }
            },
            sort_keys=False,
        )
    )
    cfg = load_config(p)
    assert list(cfg.methods) == [
        "baseline",
        "ac_layers_k1_j1",
        "ac_layers_k3_j3",
        "ac_layers_k5_j5",
        "grid_k1_j3",
        "grid_k1_j4",
        "grid_k2_j3",
        "grid_k2_j4",
        "skyline",
    ]
    assert cfg.methods["ac_layers_k3_j3"] == {
        "method": "ac",
        "mode": "sum",
        "k": 3,
        "j": 3,
        "group": "ac_layers",
    }
    from cross_model.sweeps import sweep_groups

    groups = sweep_groups(cfg.methods)
    assert groups["ac_layers"]["keys"] == ["k"] and groups["ac_layers"]["label"] == "k = j"
    assert groups["grid"]["keys"] == ["k", "j"] and groups["grid"]["instances"]["grid_k2_j3"] == {
        "k": 2,
        "j": 3,
    }


@pytest.mark.parametrize(
    "sweep, match",
    [
        ({"k": "5..1"}, r"sweep.k: '5..1' is not a list of integers"),
        ({"k": [1, "x"]}, "is not a list of integers"),
        ({"j": "m"}, "is not a list of integers"),
        ({}, "a mapping of parameter -> values"),
    ],
)
def test_bad_sweeps_name_the_key(tmp_path, sweep, match):
    with pytest.raises(ValueError, match=match):
        load_config(write(tmp_path, {"methods": {"ac_s": {"method": "ac", "sweep": sweep}}}))


def test_chat_template_kwargs_reach_every_models_template(tmp_path):
    """`models.chat_template_kwargs` (e.g. Qwen3's enable_thinking: false, as C2C evaluates) are passed to
    each model's chat template by every prompt the run builds; without them the template's default."""
    from cross_model.config import load_config
    from cross_model.context import ModelStore
    from cross_model.platform import detect_platform
    from cross_model.prompting import chat_text

    cfg = load_config(
        "configs/tiny.yaml",
        [
            "--output_dir",
            str(tmp_path),
            "--models.chat_template_kwargs",
            '{"enable_thinking": false}',
        ],
    )
    store = ModelStore(cfg, detect_platform("cpu", "float32"))
    lm = store._load(cfg.models.receiver, "receiver")
    lm.tokenizer.chat_template = (
        "{{ messages[0]['content'] }}{% if enable_thinking is defined and not enable_thinking %}"
        " [no thinking]{% endif %}"
    )
    assert chat_text(lm, "Hi") == "Hi [no thinking]"
    lm.derived.clear()
    assert chat_text(lm, "Hi") == "Hi"


def test_chat_template_kwargs_are_part_of_a_trained_artefacts_identity(tmp_path):
    """A module trained under other template variables is another module (its prompts differed); with
    none set the identity is what it was before the option existed."""
    from cross_model.c2c.train_projector import identity_of
    from cross_model.config import load_config
    from cross_model.methods.registry import resolve_method
    from cross_model.models import load_model

    a = load_model("tiny-llama-64")
    _, params = resolve_method("kv_translate", {})
    plain = load_config("configs/tiny.yaml", ["--output_dir", str(tmp_path)])
    other = load_config(
        "configs/tiny.yaml",
        [
            "--output_dir",
            str(tmp_path),
            "--models.chat_template_kwargs",
            '{"enable_thinking": false}',
        ],
    )
    assert "chat_template_kwargs" not in identity_of(params, a, a, plain)
    assert identity_of(params, a, a, other)["chat_template_kwargs"] == {"enable_thinking": False}


# Llama 3.2's template's date logic, as its tokenizer_config.json has it (trimmed to the date line).
LLAMA32_DATE = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}'
    '{%- set date_string = "26 Jul 2024" %}{%- endif %}{%- endif %}'
    "Today Date: {{ date_string }}\n{{ messages[0]['content'] }}"
)


def test_configs_with_llama3_models_pin_the_templates_date(tmp_path):
    """Llama 3.2's chat template prints today's date in every prompt: a run would answer differently on
    different days, and a resumed run would mix two prompts. Every config with a Llama 3 model pins it."""
    import datetime

    from cross_model.context import ModelStore
    from cross_model.platform import detect_platform
    from cross_model.prompting import chat_text

    llama = [
        p for p in sorted(Path("configs").glob("*.yaml")) if "meta-llama/Llama-3" in p.read_text()
    ]
    assert len(llama) >= 5
    for path in llama:
        cfg = load_config(path)
        assert cfg.models.chat_template_kwargs.get("date_string") == "26 Jul 2024", path
        # the pinned kwargs reach the template in place of the clock
        tiny = load_config(
            "configs/tiny.yaml",
            [
                "--output_dir",
                str(tmp_path),
                "--models.chat_template_kwargs",
                json.dumps(cfg.models.chat_template_kwargs),
            ],
        )
        lm = ModelStore(tiny, detect_platform("cpu", "float32"))._load(
            tiny.models.receiver, "receiver"
        )
        lm.tokenizer.chat_template = LLAMA32_DATE
        assert chat_text(lm, "Hi").startswith("Today Date: 26 Jul 2024\n")
        lm.derived.clear()
        assert chat_text(lm, "Hi").startswith(f"Today Date: {datetime.date.today():%d %b %Y}")
