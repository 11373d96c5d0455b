import dataclasses
import subprocess
import sys

import pytest

from models.registry import REGISTRY, ModelSpec, get_spec


def test_get_spec_returns_registered_entries() -> None:
    chat = get_spec("smollm2-135m-instruct")
    assert chat.task == "chat"
    assert chat.loader == "models.backends.smollm2:load"
    assert (chat.context_length, chat.max_output_tokens, chat.default_max_tokens) == (
        8192,
        2048,
        256,
    )
    embedder = get_spec("all-minilm-l6-v2")
    assert (embedder.task, embedder.dimension, embedder.context_length) == ("embedding", 384, 256)
    assert embedder.max_output_tokens == 0
    tiny = get_spec("tiny-random-llama")
    assert (tiny.context_length, tiny.max_output_tokens, tiny.default_max_tokens) == (512, 256, 16)
    assert set(REGISTRY) == {"smollm2-135m-instruct", "all-minilm-l6-v2", "tiny-random-llama"}
    assert all(name == spec.name for name, spec in REGISTRY.items())


def test_get_spec_unknown_name_lists_known_models() -> None:
    with pytest.raises(KeyError, match=r"unknown model 'gpt-9'; known: all-minilm-l6-v2"):
        get_spec("gpt-9")


def test_specs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("tiny-random-llama").context_length = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes",
    [
        {"task": "translate"},
        {"family": "rnn"},
        {"loader": "models.backends.tiny"},
        {"max_output_tokens": 9999},
        {"default_max_tokens": 0},
    ],
)
def test_spec_rejects_bad_fields(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(get_spec("tiny-random-llama"), **changes)


def test_embedding_spec_needs_dimension() -> None:
    with pytest.raises(ValueError, match="dimension"):
        dataclasses.replace(get_spec("all-minilm-l6-v2"), dimension=None)


def test_importing_registry_and_backends_does_not_import_torch() -> None:
    code = (
        "import sys, models.registry, models.backends; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_spec_is_exported() -> None:
    assert isinstance(get_spec("tiny-random-llama"), ModelSpec)
