"""The platform rule, with what this machine lacks (CUDA, MPS) patched in or out: the rule is what is
tested, not this machine's hardware."""

import pytest
import torch

from cross_model import platform
from cross_model.platform import detect_platform


@pytest.fixture
def hardware(monkeypatch):
    def set_(cuda: int = 0, mps: bool = False, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
        monkeypatch.setattr(platform, "_mps_available", lambda: mps)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    return set_


@pytest.mark.parametrize(
    "cuda,mps,device,dtype",
    [
        (0, False, "cpu", torch.float32),
        (0, True, "mps", torch.float32),  # MPS bf16 is slow or missing: fp32
        (2, True, "cuda", torch.bfloat16),  # CUDA first, bf16 where supported
    ],
)
def test_auto_prefers_cuda_then_mps_then_cpu(hardware, cuda, mps, device, dtype):
    hardware(cuda=cuda, mps=mps)
    p = detect_platform("auto", "auto")
    assert (p.device.type, p.dtype) == (device, dtype)
    assert p.dist_backend == ("nccl" if device == "cuda" else "gloo")


def test_cuda_without_bf16_falls_back_to_fp16_and_refuses_bf16(hardware):
    hardware(cuda=1, bf16=False)
    assert detect_platform("cuda", "auto").dtype == torch.float16
    with pytest.raises(ValueError, match="does not support bfloat16"):
        detect_platform("cuda", "bfloat16")


def test_asked_for_hardware_that_is_absent_is_a_clear_error(hardware):
    hardware(cuda=0, mps=False)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        detect_platform("cuda", "auto")
    with pytest.raises(ValueError, match="MPS is not available"):
        detect_platform("mps", "auto")
    with pytest.raises(ValueError, match="'tpu' is not one of"):
        detect_platform("tpu", "auto")


def test_explicit_dtype_is_honoured(hardware):
    hardware()
    assert detect_platform("cpu", "bfloat16").dtype == torch.bfloat16
