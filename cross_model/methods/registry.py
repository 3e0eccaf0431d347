"""The method registry: configs name methods, nothing else branches on them.

Each method's module is named here and imported when a config first names the method (as
lm-evaluation-harness registers tasks lazily), so listing the methods imports none of them, nor torch.
A module registers its class with `@register(name)` when imported; tests register their own that way.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Any

from cross_model.config import from_dict

_METHODS: dict[str, type] = {}  # the classes registered so far (their modules imported)

# name -> "module:Class" of every shipped method (tests/test_methods.py checks it against the modules)
LAZY: dict[str, str] = {
    "ac": "cross_model.methods.ac:ActivationCommunication",
    "baseline": "cross_model.methods.baseline:Baseline",
    "c2c": "cross_model.methods.c2c:C2C",
    "cipher": "cross_model.methods.cipher:Cipher",
    "facts_only": "cross_model.methods.facts_only:FactsOnly",
    "kv_translate": "cross_model.methods.kv_translate:KVTranslate",
    "kvcomm": "cross_model.methods.kvcomm:KVComm",
    "latentwire": "cross_model.methods.latentwire:LatentWireMethod",
    "linear_probe": "cross_model.methods.linear_probe:LinearProbe",
    "nld": "cross_model.methods.nld:NaturalLanguageDebate",
    "qkvcomm": "cross_model.methods.qkvcomm:QKVComm",
    "skyline": "cross_model.methods.skyline:Skyline",
}


def register(name: str):
    def wrap(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.registry_name = name
        _METHODS[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    return sorted(set(_METHODS) | set(LAZY))


def _registered(name: str) -> type | None:
    """The class of method `name`, its module imported on first use; None for an unknown name."""
    if name not in _METHODS and name in LAZY:
        module, cls = LAZY[name].split(":")
        importlib.import_module(module)
        if _METHODS.get(name) is None or _METHODS[name].__name__ != cls:
            raise RuntimeError(f"{module} did not register {cls} as method {name!r}")
    return _METHODS.get(name)


def get_method_class(name: str) -> type:
    cls = _registered(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return cls


def method_summary(name: str) -> str:
    """The first line of the method module's docstring, read from its source without importing it."""
    module = LAZY[name].split(":")[0] if name in LAZY else _METHODS[name].__module__
    doc = ast.get_docstring(ast.parse(Path(importlib.util.find_spec(module).origin).read_text()))
    return doc.strip().splitlines()[0] if doc else ""


def resolve_method(instance: str, params: dict[str, Any]) -> tuple[type, Any]:
    """`methods.<instance>: {method: ac, k: 3}` -> (the AC class, its typed params)."""
    params = dict(params or {})
    method = params.pop("method", instance)
    if not isinstance(method, str):
        raise ValueError(f"methods.{instance}.method: expected a method name, got {method!r}")
    cls = _registered(method)
    if cls is None:
        raise ValueError(
            f"methods.{instance}: unknown method {method!r}; available: {', '.join(available_methods())}"
            + (
                ""
                if "method" in (params or {})
                else " (set `method:` when the instance name is not a method name)"
            )
        )
    typed = from_dict(cls.Params, params, f"methods.{instance}")
    typed.validate(f"methods.{instance}")
    return cls, typed


def validate_methods(methods: dict[str, dict[str, Any]]) -> None:
    """Every configured method instance against its method's typed parameters (errors name the key)."""
    for instance, params in methods.items():
        resolve_method(instance, params)
