"""One place that decides the device and dtype: CUDA (bf16 where supported), then MPS, then CPU."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Platform:
    device: torch.device
    dtype: torch.dtype
    description: str

    @property
    def kind(self) -> str:
        return self.device.type

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.kind == "cuda" else "gloo"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def detect_platform(device: str = "auto", dtype: str = "auto", local_rank: int = 0) -> Platform:
    """Resolve `auto` to the best available device; check explicit choices are possible here."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("platform.device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    if device == "mps" and not _mps_available():
        raise ValueError("platform.device: mps was asked for but MPS is not available; use auto or cpu")
    if device not in ("cuda", "mps", "cpu"):
        raise ValueError(f"platform.device: {device!r} is not one of auto, cuda, mps, cpu")

    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            # MPS bf16 support depends on the OS version and is slow where it exists; CPU bf16 is slow.
            dtype = "float32"
    if dtype not in DTYPES:
        raise ValueError(f"platform.dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if device == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError("platform.dtype: this GPU does not support bfloat16; use float16 or auto")

    if device == "cuda":
        torch_device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        name = torch.cuda.get_device_name(torch_device)
    else:
        torch_device = torch.device(device)
        name = {"mps": "Apple MPS", "cpu": f"CPU ({torch.get_num_threads()} threads)"}[device]
    return Platform(torch_device, DTYPES[dtype], f"{name}, {dtype}")
