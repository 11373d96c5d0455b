import pytest
import torch

from models.backends import select_device


def test_cpu() -> None:
    assert select_device("cpu") == ("cpu", torch.float32)


def test_auto_picks_cuda_only_when_available() -> None:
    device, dtype = select_device("auto")
    if torch.cuda.is_available():
        assert device == "cuda" and dtype in (torch.bfloat16, torch.float16)
    else:
        assert (device, dtype) == ("cpu", torch.float32)


@pytest.mark.parametrize("preference", ["gpu", "cuda:", "cuda:x", "CPU", "", "mps"])
def test_rejects_unknown_preference(preference: str) -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        select_device(preference)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("preference", ["cuda", "cuda:0"])
def test_rejects_cuda_when_unavailable(preference: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device(preference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rejects_out_of_range_cuda_index() -> None:
    with pytest.raises(ValueError, match="out of range"):
        select_device(f"cuda:{torch.cuda.device_count()}")
