from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import char_rnn
from models.backends import classic

TEXT = "the quick brown fox jumps over the lazy dog; " * 30
TINY = {
    "hidden_size": 16,
    "embedding_size": 8,
    "seq_len": 16,
    "batch_size": 8,
    "epochs": 2,
    "steps_per_epoch": 5,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One CPU thread: tiny models run faster so, and the results do not vary with it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> classic.Trained:
    return classic.train("char_rnn", TINY, TEXT, seed=0)


def _text(trained: classic.Trained, seed: int = 0, **request: object) -> str:
    sampled = classic.sample(trained, {"task": "text", "max_length": 30, **request}, seed=seed)
    assert sampled.text is not None
    return sampled.text


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_every_cell_trains_and_samples(cell: str) -> None:
    result = classic.train("char_rnn", {**TINY, "cell": cell, "num_layers": 2}, TEXT, seed=0)
    assert result.metrics["val_loss"] > 0
    sampled = classic.sample(result, {"task": "text", "prefix": "the ", "max_length": 25})
    assert sampled.text is not None and len(sampled.text) == 25
    assert set(sampled.text) <= set(TEXT)
    assert sampled.meta == {"prefix": "the "}


def test_config_takes_vocab_from_the_data(trained: classic.Trained) -> None:
    assert trained.config.vocab == "".join(sorted(set(TEXT)))
    assert trained.model.head.out_features == len(trained.config.vocab)


def test_untrained_logits_slice_matches_reference() -> None:
    config = char_rnn.FAMILY.make_config(TINY, TEXT)
    torch.manual_seed(0)
    model = char_rnn.FAMILY.build(config).eval()
    with torch.no_grad():
        logits, _ = model(char_rnn.encode("the", config.vocab)[None])
    assert logits.shape == (1, 3, len(config.vocab))
    expected = torch.tensor([-0.0069, -0.0742, 0.1215, -0.1633, -0.1573])
    torch.testing.assert_close(logits[0, -1, :5], expected, atol=1e-3, rtol=0)


def test_same_seed_same_text_and_greedy_ignores_the_seed(trained: classic.Trained) -> None:
    assert _text(trained, seed=1) == _text(trained, seed=1)
    assert _text(trained, seed=1) != _text(trained, seed=2)
    assert _text(trained, seed=1, temperature=0) == _text(trained, seed=2, temperature=0)
    assert _text(trained, seed=1, top_k=1) == _text(trained, seed=2, temperature=0)


def test_training_lowers_the_loss() -> None:
    config = char_rnn.FAMILY.make_config(TINY, TEXT)
    torch.manual_seed(0)
    before = char_rnn.evaluate(
        char_rnn.FAMILY.build(config), char_rnn.encode(TEXT[-100:], config.vocab), 16
    )
    progress: list[classic.Progress] = []
    overrides = {**TINY, "epochs": 3, "steps_per_epoch": 10, "learning_rate": 1e-2}
    classic.train("char_rnn", overrides, TEXT, seed=0, report=progress.append)
    assert [p.epoch for p in progress] == [1, 2, 3]
    assert progress[-1].val_loss is not None and progress[-1].val_loss < before - 0.5


def test_save_load_round_trip_gives_identical_samples(
    trained: classic.Trained, tmp_path: Path
) -> None:
    path = tmp_path / "char_rnn.safetensors"
    classic.save(trained, path)
    loaded = classic.load(path)
    assert loaded.config == trained.config
    assert _text(loaded, seed=3, prefix="lazy ") == _text(trained, seed=3, prefix="lazy ")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_length", 0),
        ("max_length", 10_001),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("top_k", 0),
        ("prefix", 5),
        ("task", "images"),
    ],
)
def test_bad_request_fields_raise_naming_them(
    trained: classic.Trained, field: str, value: object
) -> None:
    with pytest.raises(ValueError, match=field):
        classic.sample(trained, {"task": "text", field: value})


def test_prefix_outside_the_vocabulary_names_the_characters(trained: classic.Trained) -> None:
    with pytest.raises(ValueError, match="'Z'"):
        classic.sample(trained, {"task": "text", "prefix": "the Zoo"})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"layers": 2}, "layers"),
        ({"vocab": "abc"}, "vocab"),
        ({"cell": "transformer"}, "cell"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"dropout": 1.5}, "dropout"),
        ({"epochs": 1.5}, "epochs"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        classic.train("char_rnn", overrides, TEXT)


def test_should_stop_raises_stopped() -> None:
    with pytest.raises(classic.Stopped):
        classic.train("char_rnn", TINY, TEXT, should_stop=lambda: True)
