"""Building the configuration: defaults, then a YAML file, then dotted CLI overrides, then sweeps
expanded, type-checked against the schema and validated.

Precedence: CLI overrides (`--eval.batch_size 8`) > YAML file > dataclass defaults. Unknown keys,
wrong types and impossible values raise `ValueError` naming the dotted key and what is allowed.
`describe()` prints every key with its default and help.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cross_model.config.schema import ExperimentConfig

# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checking that names the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dataclasses from dicts)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {
            str(k): coerce(v if v is not None else {}, val_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise TypeError(
        f"{key}: unsupported annotation {tp!r}"
    )  # a bug in a config class, not user input


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(
            f"unknown config key {where}{unknown[0]!r}; allowed keys{' under ' + prefix if prefix else ''}: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# YAML + overrides


def parse_override_value(text: str) -> Any:
    """CLI values are YAML scalars/lists: `8` -> 8, `true` -> True, `[a,b]` -> list, `null` -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c = value` in nested dicts/lists; list items are addressed by index (`tasks.0.n_test`)."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        key_so_far = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(
                    f"--{dotted}: {key_so_far!r} must be a list index below {len(node)}"
                )
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"--{dotted}: {last!r} must be a list index below {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`--a.b 3 --c=x` -> [("a.b", 3), ("c", "x")]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(
                f"unexpected argument {arg!r}; overrides look like --section.key value"
            )
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg} has no value; write {arg} VALUE")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out.append((key, parse_override_value(raw)))
    return out


# --- sweeps: one method entry standing for many instances (cross_model.sweeps reads them back) ------

_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?:\.\.\s*(\d+)\s*)?$")


def _values(entry: str, key: str, spec: Any) -> list[int]:
    if (
        isinstance(spec, list)
        and spec
        and all(isinstance(v, int) and not isinstance(v, bool) for v in spec)
    ):
        return list(spec)
    m = _RANGE.match(spec) if isinstance(spec, str) else None
    if m:
        lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        if step >= 1 and lo <= hi:
            return list(range(lo, hi + 1, step))
    raise ValueError(
        f"methods.{entry}.sweep.{key}: {spec!r} is not a list of integers, 'a..b' or 'a..b..step' "
        f"(a <= b, step >= 1), nor the name of another swept key"
    )


def expand_sweeps(methods: dict[str, Any]) -> dict[str, Any]:
    """Methods with every `sweep:` entry replaced by its instances, in place of the entry and in order."""
    out: dict[str, Any] = {}
    for name, params in methods.items():
        if not isinstance(params, dict) or "sweep" not in params:
            out[name] = params
            continue
        sweep = params["sweep"]
        if not isinstance(sweep, dict) or not sweep:
            raise ValueError(
                f"methods.{name}.sweep: a mapping of parameter -> values, e.g. {{k: '1..29', j: k}}"
            )
        free = {
            k: _values(name, k, v)
            for k, v in sweep.items()
            if not (isinstance(v, str) and v in sweep)
        }
        tied = {k: v for k, v in sweep.items() if k not in free}
        for key, target in tied.items():
            if target not in free:
                raise ValueError(
                    f"methods.{name}.sweep.{key}: tied to {target!r}, which is not itself swept over values"
                )
        base = {k: v for k, v in params.items() if k != "sweep"}
        base.setdefault("method", name)
        for combo in itertools.product(*free.values()):
            values = dict(zip(free, combo))
            values.update({key: values[target] for key, target in tied.items()})
            instance = name + "".join(f"_{k}{values[k]}" for k in sweep)
            if instance in methods or instance in out:
                raise ValueError(
                    f"methods.{name}: its instance {instance!r} clashes with another method's name"
                )
            out[instance] = {**base, **values, "group": name}
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Defaults, then the YAML file, then CLI overrides; validated."""
    data = to_dict(ExperimentConfig())
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"config file {str(path)!r} does not exist (configs live in configs/)"
            )
        try:
            with open(path) as fh:
                loaded = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of config sections")
        _merge(data, loaded, "")
    for key, value in parse_overrides(overrides or []):
        apply_override(data, key, value)
    if isinstance(data.get("methods"), dict):
        data["methods"] = expand_sweeps(data["methods"])
    cfg = from_dict(ExperimentConfig, data)
    cfg.validate()
    return cfg


def _merge(base: dict, new: dict, prefix: str) -> None:
    """YAML mappings merge into the defaults, except `methods` and lists, which replace them."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if (
            key in base
            and isinstance(base[key], dict)
            and isinstance(value, dict)
            and dotted != "methods"
        ):
            _merge(base[key], value, dotted + ".")
        else:
            base[key] = value


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per config key with its default and help (for `--help-config`)."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines.extend(describe(hint, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"{key} = {default!r}  # {f.metadata.get('help', '')}")
    return lines


def resolved_train_config(cfg: Any) -> Any:
    """The experiment's train settings with `checkpoint_dir` made absolute: a relative one lives
    under `output_dir`, so runs in one output directory share finished projections."""
    path = Path(cfg.train.checkpoint_dir).expanduser()
    return dataclasses.replace(
        cfg.train, checkpoint_dir=str(path if path.is_absolute() else Path(cfg.output_dir) / path)
    )
