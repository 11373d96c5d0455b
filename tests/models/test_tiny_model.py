from pathlib import Path

import torch

from models.backends import load_model
from models.backends.causal_lm import CausalLM
from models.backends.tiny import build_tokenizer
from models.registry import get_spec


def _load_tiny(tmp_path: Path) -> CausalLM:
    model = load_model(
        get_spec("tiny-random-llama"), cache_dir=tmp_path, device="cpu", dtype=torch.float32
    )
    assert isinstance(model, CausalLM)
    return model


def test_two_loads_have_identical_weights(tmp_path: Path) -> None:
    first, second = _load_tiny(tmp_path), _load_tiny(tmp_path)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, tensor in first_state.items():
        assert torch.equal(tensor, second_state[name]), name
    assert not list(tmp_path.iterdir()), "the tiny model must not write files"


def test_loading_leaves_global_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _load_tiny(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_logits_slice_matches_reference(tmp_path: Path) -> None:
    lm = _load_tiny(tmp_path)
    ids = lm.encode_prompt("genserve")
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids])).logits
    assert logits.shape == (1, 8, 260)
    expected = torch.tensor([3.0079, 1.4238, -0.1583, -0.8285, -2.2390, -0.8420])
    torch.testing.assert_close(logits[0, -1, :6], expected, atol=1e-3, rtol=0)


def test_model_properties(tmp_path: Path) -> None:
    lm = _load_tiny(tmp_path)
    assert (lm.name, lm.device, lm.context_length) == ("tiny-random-llama", "cpu", 512)
    assert not lm.model.training
    assert lm.model.config.vocab_size == len(lm.tokenizer) == 260


def test_byte_level_tokenizer_round_trips() -> None:
    tokenizer = build_tokenizer()
    text = "héllo, 日本 <|im_start|>!"
    ids = tokenizer(text)["input_ids"]
    assert ids[:2] == [ord("h"), 0xC3]  # one token per UTF-8 byte
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|pad|>"
