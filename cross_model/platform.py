"""One place that decides the device and dtype: CUDA (bf16 where supported), then MPS, then CPU."""

from __future__ import annotations

import logging
import os
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


def _visible_devices_text(visible: int) -> str:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{visible} visible CUDA device(s), CUDA_VISIBLE_DEVICES={env if env is not None else '(unset)'}"


def cuda_index_for_rank(local_rank: int, visible: int, local_world_size: int | None = None) -> int:
    """The one rule for which GPU a rank uses.

    Rank i of a node uses GPU i when the node's ranks share the visible GPUs (torchrun
    --nproc_per_node = GPUs); a rank that sees exactly one GPU uses it (srun --gpus-per-task=1, or
    CUDA_VISIBLE_DEVICES set per rank). Anything else, more ranks than GPUs above all, is an error:
    two ranks on one GPU would run at half speed and nccl refuses them."""
    if visible < 1:
        raise ValueError(
            f"platform.device: no CUDA device for LOCAL_RANK={local_rank} ({_visible_devices_text(visible)})"
        )
    if visible > 1 and local_world_size is not None and local_world_size > visible:
        raise ValueError(
            f"platform.device: {local_world_size} ranks on this node (LOCAL_WORLD_SIZE) but {_visible_devices_text(visible)}; "
            f"start one rank per GPU (torchrun --nproc_per_node={visible}) or give each rank its own GPU (srun --gpus-per-task=1)"
        )
    if local_rank < visible:
        return local_rank
    if (
        visible == 1
        and os.environ.get("CUDA_VISIBLE_DEVICES") is None
        and (local_world_size or 1) > 1
    ):
        # Every rank of this node sees the same single GPU (nothing gave each its own).
        raise ValueError(
            f"platform.device: {local_world_size} ranks on this node (LOCAL_WORLD_SIZE) all see the one GPU "
            f"({_visible_devices_text(visible)}); start one rank per GPU (torchrun --nproc_per_node=1 here), or give "
            f"each rank its own GPU (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES per rank)"
        )
    if visible == 1:
        return 0
    raise ValueError(
        f"platform.device: LOCAL_RANK={local_rank} has no GPU of its own: {_visible_devices_text(visible)}; start at most "
        f"{visible} ranks per node (torchrun --nproc_per_node={visible}) or give each rank its own GPU (srun --gpus-per-task=1)"
    )


def check_distinct_devices(devices: list[tuple[str, str]]) -> None:
    """`devices[rank]` = (host, GPU uuid): refuse two ranks on one GPU, naming them."""
    seen: dict[tuple[str, str], int] = {}
    for rank, key in enumerate(devices):
        if key in seen:
            raise ValueError(
                f"platform.device: ranks {seen[key]} and {rank} both run on GPU {key[1]} of {key[0]}; each rank needs "
                f"its own GPU: start one rank per GPU, or with one GPU visible per rank set CUDA_VISIBLE_DEVICES "
                f"(or srun --gpus-per-task=1) so that each rank sees a different one"
            )
        seen[key] = rank


def local_world_size() -> int | None:
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


def detect_platform(device: str = "auto", dtype: str = "auto", local_rank: int = 0) -> Platform:
    """Resolve `auto` to the best available device; check explicit choices are possible here."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "platform.device: cuda was asked for but no CUDA device is visible; use auto or cpu"
        )
    if device == "mps" and not _mps_available():
        raise ValueError(
            "platform.device: mps was asked for but MPS is not available; use auto or cpu"
        )
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
        torch_device = torch.device(
            "cuda", cuda_index_for_rank(local_rank, torch.cuda.device_count(), local_world_size())
        )
        name = torch.cuda.get_device_name(torch_device)
    else:
        torch_device = torch.device(device)
        name = {"mps": "Apple MPS", "cpu": f"CPU ({torch.get_num_threads()} threads)"}[device]
    return Platform(torch_device, DTYPES[dtype], f"{name}, {dtype}")
