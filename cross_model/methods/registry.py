"""The method registry: configs name methods, nothing else branches on them."""

from __future__ import annotations

import importlib
from typing import Any

from cross_model.config import from_dict

_METHODS: dict[str, type] = {}
_MODULES = ("baseline", "skyline", "nld", "cipher", "ac", "kvcomm", "qkvcomm")


def register(name: str):
    def wrap(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.registry_name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(f"cross_model.methods.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"cross_model.methods.{module}":
                raise


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get_method_class(name: str) -> type:
    _load_all()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS)) or 'none yet'}")
    return _METHODS[name]


def resolve_method(instance: str, params: dict[str, Any]) -> tuple[type, Any]:
    """`methods.<instance>: {method: ac, k: 3}` -> (the AC class, its typed params)."""
    params = dict(params or {})
    method = params.pop("method", instance)
    if not isinstance(method, str):
        raise ValueError(f"methods.{instance}.method: expected a method name, got {method!r}")
    _load_all()
    if method not in _METHODS:
        raise ValueError(
            f"methods.{instance}: unknown method {method!r}; available: {', '.join(sorted(_METHODS)) or 'none yet'}"
            + ("" if "method" in (params or {}) else " (set `method:` when the instance name is not a method name)")
        )
    cls = _METHODS[method]
    typed = from_dict(cls.Params, params, f"methods.{instance}")
    typed.validate(f"methods.{instance}")
    return cls, typed


def validate_method_params(instance: str, params: dict[str, Any]) -> None:
    resolve_method(instance, params)
