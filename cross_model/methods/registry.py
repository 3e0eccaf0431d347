"""The method registry: configs name methods, nothing else branches on them."""

from __future__ import annotations

from typing import Any

from cross_model.config import from_dict

_METHODS: dict[str, type] = {}  # filled by the method modules, which `cross_model.methods` imports


def register(name: str):
    def wrap(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.registry_name = name
        _METHODS[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method_class(name: str) -> type:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def resolve_method(instance: str, params: dict[str, Any]) -> tuple[type, Any]:
    """`methods.<instance>: {method: ac, k: 3}` -> (the AC class, its typed params)."""
    params = dict(params or {})
    method = params.pop("method", instance)
    if not isinstance(method, str):
        raise ValueError(f"methods.{instance}.method: expected a method name, got {method!r}")
    if method not in _METHODS:
        raise ValueError(
            f"methods.{instance}: unknown method {method!r}; available: {', '.join(sorted(_METHODS))}"
            + (
                ""
                if "method" in (params or {})
                else " (set `method:` when the instance name is not a method name)"
            )
        )
    cls = _METHODS[method]
    typed = from_dict(cls.Params, params, f"methods.{instance}")
    typed.validate(f"methods.{instance}")
    return cls, typed


def validate_methods(methods: dict[str, dict[str, Any]]) -> None:
    """Every configured method instance against its method's typed parameters (errors name the key)."""
    for instance, params in methods.items():
        resolve_method(instance, params)
