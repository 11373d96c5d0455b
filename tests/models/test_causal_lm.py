import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from models.backends import load_model
from models.backends.causal_lm import CausalLM
from models.backends.decoding import TextAssembler
from models.registry import get_spec


@pytest.fixture(scope="module")
def prompt(tiny_lm: CausalLM) -> list[int]:
    return tiny_lm.encode_chat([{"role": "user", "content": "Say something."}])


def _reference_greedy(lm: CausalLM, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running the full sequence every step, without a KV cache."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = lm.model(torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def test_encode_chat_renders_chatml(tiny_lm: CausalLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = tiny_lm.encode_chat(messages)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tiny_lm.tokenizer.decode(ids) == expected
    assert ids[0] == tiny_lm.tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 1}]],
)
def test_encode_chat_rejects_bad_messages(tiny_lm: CausalLM, messages: list) -> None:
    with pytest.raises(ValueError, match="message"):
        tiny_lm.encode_chat(messages)


def test_encode_prompt_and_count_tokens(tiny_lm: CausalLM) -> None:
    assert tiny_lm.encode_prompt("abc") == [97, 98, 99]
    assert tiny_lm.count_tokens("héllo") == 6


def test_greedy_matches_full_forward_reference(tiny_lm: CausalLM, prompt: list[int]) -> None:
    out = tiny_lm.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert out.token_ids == _reference_greedy(tiny_lm, prompt, 12)[: len(out.token_ids)]
    assert out.finish_reason == "length" and out.completion_tokens == 12
    again = tiny_lm.generate(prompt, max_new_tokens=12, temperature=0.0, seed=99)
    assert (again.token_ids, again.text) == (out.token_ids, out.text)
    assert out.prompt_tokens == len(prompt)


def test_seeded_sampling_is_reproducible(tiny_lm: CausalLM, prompt: list[int]) -> None:
    def sample(seed: int) -> list[int]:
        out = tiny_lm.generate(prompt, max_new_tokens=32, temperature=1.0, top_p=0.9, seed=seed)
        return out.token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_sampling_without_seed_varies(tiny_lm: CausalLM, prompt: list[int]) -> None:
    outputs = {tuple(tiny_lm.generate(prompt, max_new_tokens=32).token_ids) for _ in range(3)}
    assert len(outputs) > 1


def test_stop_string_spanning_tokens(tiny_lm: CausalLM, prompt: list[int]) -> None:
    full = tiny_lm.generate(prompt, max_new_tokens=40, temperature=0.0).text
    start = next(i for i in range(5, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]  # three characters: at least three byte tokens
    streamed: list[str] = []
    out = tiny_lm.generate(
        prompt,
        max_new_tokens=40,
        temperature=0.0,
        stop=["never-produced", stop],
        on_token=streamed.append,
    )
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(stop)]
    assert "".join(streamed) == out.text
    assert out.completion_tokens < 40


def test_eos_from_generation_config_stops(tiny_lm: CausalLM, prompt: list[int]) -> None:
    first_token = tiny_lm.generate(prompt, max_new_tokens=1, temperature=0.0).token_ids[0]
    model = copy.deepcopy(tiny_lm.model)
    model.generation_config.eos_token_id = [tiny_lm.tokenizer.eos_token_id, first_token]
    lm = CausalLM(model, tiny_lm.tokenizer, name="eos-test", device="cpu", context_length=512)
    out = lm.generate(prompt, max_new_tokens=10, temperature=0.0)
    assert (out.finish_reason, out.token_ids, out.text) == ("stop", [first_token], "")


def test_should_cancel_is_checked_every_token(tiny_lm: CausalLM, prompt: list[int]) -> None:
    calls: list[int] = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 3

    out = tiny_lm.generate(prompt, max_new_tokens=20, should_cancel=should_cancel)
    assert (out.finish_reason, out.completion_tokens, len(calls)) == ("cancelled", 3, 4)
    before_start = tiny_lm.generate(prompt, max_new_tokens=5, should_cancel=lambda: True)
    assert (before_start.finish_reason, before_start.token_ids, before_start.text) == (
        "cancelled",
        [],
        "",
    )


def test_on_token_deltas_concatenate_to_text(tiny_lm: CausalLM, prompt: list[int]) -> None:
    streamed: list[str] = []
    out = tiny_lm.generate(prompt, max_new_tokens=64, seed=3, on_token=streamed.append)
    assert streamed and all(streamed)
    assert "".join(streamed) == out.text


def test_text_assembler_waits_for_complete_characters(tiny_lm: CausalLM) -> None:
    streamed: list[str] = []
    assembler = TextAssembler(tiny_lm.tokenizer, context_ids=[], stop=[], on_token=streamed.append)
    for byte in "a日b".encode():
        assembler.add(byte)
    assert streamed == ["a", "日", "b"]
    assert assembler.finish() == "a日b"


def test_text_assembler_holds_back_possible_stop_prefix(tiny_lm: CausalLM) -> None:
    streamed: list[str] = []
    assembler = TextAssembler(
        tiny_lm.tokenizer, context_ids=[], stop=["END"], on_token=streamed.append
    )
    for byte in b"xEN":
        assert not assembler.add(byte)
    assert streamed == ["x"]  # "EN" might still become "END"
    assert assembler.add(ord("D"))
    assert assembler.finish() == "x" and streamed == ["x"]


def test_text_assembler_flushes_incomplete_character(tiny_lm: CausalLM) -> None:
    assembler = TextAssembler(tiny_lm.tokenizer, context_ids=[], stop=[], on_token=None)
    for byte in "ok日".encode()[:-1]:
        assembler.add(byte)
    assert assembler.finish() == "ok\ufffd"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, r"max_new_tokens must be >= 1, got 0"),
        ({"max_new_tokens": 600}, r"must be <= 512"),
        ({"temperature": -0.1}, r"temperature must be in \[0, 2\], got -0.1"),
        ({"temperature": 2.1}, r"temperature must be in \[0, 2\]"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
        ({"seed": -1}, r"seed must be in"),
        ({"stop": "x"}, r"stop must be a sequence of non-empty strings"),
        ({"stop": [""]}, r"stop must be a sequence of non-empty strings"),
    ],
)
def test_generate_validates_arguments(
    tiny_lm: CausalLM, prompt: list[int], kwargs: dict, message: str
) -> None:
    arguments = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_lm.generate(prompt, **arguments)


def test_generate_rejects_bad_prompts(tiny_lm: CausalLM) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        tiny_lm.generate([], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt_ids must be in \[0, 260\)"):
        tiny_lm.generate([1, 260], max_new_tokens=4)


def test_context_length_boundary_is_allowed(tiny_lm: CausalLM) -> None:
    out = tiny_lm.generate([97] * 508, max_new_tokens=4, temperature=0.0)
    assert out.prompt_tokens + out.completion_tokens <= 512


def test_load_model_rejects_missing_loader(tmp_path: Path) -> None:
    spec = dataclasses.replace(get_spec("tiny-random-llama"), loader="models.backends.tiny:nope")
    with pytest.raises(ValueError, match="nope"):
        load_model(spec, cache_dir=tmp_path, device="cpu", dtype=torch.float32)
