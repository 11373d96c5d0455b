"""oneDNN's packed linear layers (models/backends/packed_linear.py), which CPU decoding uses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.backends import packed_linear
from models.backends.causal_lm import CausalLM

pytestmark = pytest.mark.skipif(
    not packed_linear.available(), reason="this PyTorch build has no oneDNN packed linear"
)


def test_a_packed_linear_computes_what_the_linear_does() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80)
    packed = packed_linear.PackedLinear(linear)
    x = torch.randn(3, 5, 48)
    with torch.inference_mode():
        assert packed(x).shape == (3, 5, 80)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert "packed" in repr(packed)
    twin = copy.deepcopy(packed)
    with torch.inference_mode():
        assert torch.equal(twin(x), packed(x))


def test_each_row_comes_out_the_same_whatever_else_is_in_the_batch() -> None:
    torch.manual_seed(1)
    packed = packed_linear.PackedLinear(nn.Linear(576, 1536, bias=False))
    rows = torch.randn(70, 576)
    with torch.inference_mode():
        together = packed(rows)
        for count in (1, 2, 3, 7, 11, 32, 70):
            assert torch.equal(packed(rows[:count]), together[:count]), count
        assert torch.equal(packed(rows[40:41]), together[40:41])


def test_only_float32_linears_on_a_cpu_are_packed() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    assert packed_linear.pack_linears(model) == 2
    assert isinstance(model[0], packed_linear.PackedLinear)
    assert isinstance(model[2][0], packed_linear.PackedLinear)
    assert packed_linear.pack_linears(nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16))) == 0


def test_a_chat_model_on_a_cpu_decodes_with_packed_linears(tiny_lm: CausalLM) -> None:
    if tiny_lm.device != "cpu":
        pytest.skip("packing is for CPU models")
    modules = list(tiny_lm.model.modules())
    assert not any(type(m) is nn.Linear for m in modules)
    assert any(isinstance(m, packed_linear.PackedLinear) for m in modules)
