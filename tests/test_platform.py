import pytest
import torch

from cross_model.platform import detect_platform


def test_cpu_defaults_to_fp32():
    p = detect_platform("cpu", "auto")
    assert p.device.type == "cpu" and p.dtype == torch.float32 and p.dist_backend == "gloo"


def test_explicit_dtype_is_honoured():
    assert detect_platform("cpu", "bfloat16").dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_requested_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        detect_platform("cuda", "auto")


def test_auto_picks_an_available_device():
    p = detect_platform("auto", "auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert p.device.type == expected
