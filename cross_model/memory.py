"""What tensors an object keeps alive, counted by storage: the measure behind the memory tests and
the dry run's estimate. A view counts its whole storage (that is what it pins); storages shared by
several tensors count once."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def tensor_storages(*objects: Any) -> dict[int, int]:
    """data pointer -> bytes of every distinct tensor storage reachable from `objects` through
    dataclass fields, lists, tuples, dicts and objects' attributes (cycles are visited once)."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            stack.extend(vars(obj).values())
    return found


def held_bytes(*objects: Any) -> int:
    """Bytes of every distinct tensor storage `objects` keep alive (models themselves excluded)."""
    return sum(tensor_storages(*objects).values())
