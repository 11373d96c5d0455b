from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import autoencoder
from models.backends import classic

TINY = {"hidden_size": 32, "latent_size": 4, "epochs": 15, "batch_size": 32}


def _bars(count: int, seed: int) -> torch.Tensor:
    """(count, 1, 8, 8) images: one bright horizontal bar at a random row."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, 8, 8)
    rows = torch.randint(0, 8, (count,), generator=generator)
    images[torch.arange(count), 0, rows] = 0.9
    return images


IMAGES = _bars(240, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One CPU thread: tiny models run faster so, and the results do not vary with it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> classic.Trained:
    return classic.train("autoencoder", TINY, IMAGES, seed=0)


def _scores(trained: classic.Trained, samples: torch.Tensor) -> list[float]:
    sampled = classic.sample(trained, {"task": "anomaly", "samples": samples})
    assert sampled.scores is not None and len(sampled.scores) == len(samples)
    return sampled.scores


def test_config_takes_the_image_shape() -> None:
    config = autoencoder.FAMILY.make_config({}, torch.zeros(3, 3, 5, 7))
    assert (config.channels, config.height, config.width) == (3, 5, 7)


def test_untrained_output_slice_matches_reference() -> None:
    config = autoencoder.FAMILY.make_config(TINY, IMAGES)
    torch.manual_seed(0)
    model = autoencoder.FAMILY.build(config).eval()
    with torch.no_grad():
        out = model(IMAGES[:1])
    assert out.shape == (1, 1, 8, 8)
    expected = torch.tensor([0.5428, 0.4674, 0.4650, 0.5214])
    torch.testing.assert_close(out[0, 0, 0, :4], expected, atol=1e-3, rtol=0)


def test_noise_scores_above_real_images(trained: classic.Trained) -> None:
    real = _scores(trained, _bars(50, seed=1))
    noise = _scores(trained, torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    assert min(noise) > max(real)
    sampled = classic.sample(trained, {"task": "anomaly", "samples": _bars(4, seed=3)})
    threshold = sampled.meta["threshold"]
    assert max(real) < 2 * threshold < min(noise)


def test_scores_are_deterministic(trained: classic.Trained) -> None:
    images = _bars(10, seed=4)
    assert _scores(trained, images) == _scores(trained, images)


def test_training_lowers_the_loss() -> None:
    progress: list[classic.Progress] = []
    classic.train("autoencoder", TINY, IMAGES, seed=0, report=progress.append)
    assert len(progress) == TINY["epochs"]
    first, last = progress[0].val_loss, progress[-1].val_loss
    assert first is not None and last is not None and last < 0.5 * first


def test_save_load_round_trip_keeps_scores_and_threshold(
    trained: classic.Trained, tmp_path: Path
) -> None:
    path = tmp_path / "autoencoder.safetensors"
    classic.save(trained, path)
    loaded = classic.load(path)
    images = _bars(8, seed=5)
    before = classic.sample(trained, {"task": "anomaly", "samples": images})
    after = classic.sample(loaded, {"task": "anomaly", "samples": images})
    assert after.scores == before.scores
    assert after.meta == before.meta and before.meta["threshold"] > 0


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (torch.zeros(2, 1, 8, 9), "shape"),
        (torch.zeros(2, 8, 8), "shape"),
        (torch.zeros(2, 3, 8, 8), "shape"),
        (torch.full((2, 1, 8, 8), 2.0), r"\[0, 1\]"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), "float"),
        (None, "samples"),
    ],
)
def test_bad_samples_raise(trained: classic.Trained, samples: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        classic.sample(trained, {"task": "anomaly", "samples": samples})
    assert "samples" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"latent": 4}, "latent"),
        ({"height": 4}, "height"),
        ({"noise_std": -1}, "noise_std"),
        ({"threshold_quantile": 1.5}, "threshold_quantile"),
        ({"batch_size": "64"}, "batch_size"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        classic.train("autoencoder", overrides, IMAGES)


def test_should_stop_raises_stopped() -> None:
    with pytest.raises(classic.Stopped):
        classic.train("autoencoder", TINY, IMAGES, should_stop=lambda: True)
