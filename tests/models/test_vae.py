"""The VAE family through classic.train/save/load/sample, with a tiny config on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import vae
from models.backends import classic

TINY = {
    "widths": [8, 16],
    "latent_dim": 4,
    "prior_components": 1,
    "epochs": 3,
    "batch_size": 8,
    "learning_rate": 1e-2,
}


def bars(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 1, 8, 8) images of one bright row or column each: a structured toy set."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, 8, 8)
    positions = torch.randint(0, 8, (count,), generator=generator)
    for index, position in enumerate(positions.tolist()):
        if index % 2:
            images[index, 0, position, :] = 1.0
        else:
            images[index, 0, :, position] = 1.0
    return images


@pytest.fixture(scope="module")
def trained() -> tuple[classic.Trained, list[classic.Progress]]:
    torch.set_num_threads(1)
    reports: list[classic.Progress] = []
    result = classic.train("vae", TINY, bars(48), seed=0, report=reports.append)
    return result, reports


def test_family_follows_the_protocol() -> None:
    family = classic.family("vae")
    assert family is vae.FAMILY
    assert (family.name, family.data_kind) == ("vae", "images")
    assert family.tasks == frozenset({"images", "anomaly"})


def test_config_takes_the_image_shape_from_the_data() -> None:
    config = vae.FAMILY.make_config({"widths": [8, 16]}, torch.rand(4, 3, 12, 16))
    assert (config.channels, config.height, config.width) == (3, 12, 16)
    assert config.widths == (8, 16)
    saved = classic.config_dict(config)
    assert vae.FAMILY.config_from_dict({**saved, "widths": list(saved["widths"])}) == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"beta": -1.0}, "beta"),
        ({"epochs": 1.5}, "epochs"),
        ({"widths": [8, 3]}, "widths"),
        ({"height": 8}, "height"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        vae.FAMILY.make_config(overrides, bars(4))


def test_refuses_images_the_architecture_cannot_halve() -> None:
    with pytest.raises(ValueError, match="height 7"):
        vae.FAMILY.make_config({}, torch.rand(4, 1, 7, 8))


def test_training_reports_every_epoch_and_lowers_the_loss(trained) -> None:
    result, reports = trained
    assert [report.epoch for report in reports] == [1, 2, 3]
    losses = [report.losses["loss"] for report in reports]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert np.isfinite(result.metrics["val_loss"]) and np.isfinite(result.metrics["train_loss"])


def test_samples_are_uint8_images_of_the_training_shape(trained) -> None:
    result, _ = trained
    sampled = classic.sample(result, {"task": "images", "n": 5}, seed=1)
    assert sampled.images is not None
    assert sampled.images.shape == (5, 8, 8) and sampled.images.dtype == np.uint8
    assert sampled.meta == {"n": 5}


def test_same_seed_same_images_and_different_seeds_differ(trained) -> None:
    result, _ = trained
    first, again, other = (
        classic.sample(result, {"task": "images", "n": 4}, seed=seed).images for seed in (1, 1, 2)
    )
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_interpolation_runs_between_the_seeds_latents(trained) -> None:
    result, _ = trained
    request = {"task": "images", "interpolate": {"from_seed": 3, "to_seed": 4, "steps": 5}}
    sampled = classic.sample(result, request, seed=0)
    assert sampled.images.shape == (5, 8, 8)
    assert sampled.meta["interpolate"]["method"] == "slerp"
    linear = {**request["interpolate"], "method": "linear"}
    ends = classic.sample(result, {"task": "images", "interpolate": linear}, seed=9).images
    # Both methods start and end at the seeds' own latents; the request seed plays no part.
    assert np.array_equal(ends[[0, -1]], sampled.images[[0, -1]])


def test_anomaly_scores_structured_images_below_noise(trained) -> None:
    result, _ = trained
    noise = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    samples = torch.cat([bars(8, seed=1), noise])
    sampled = classic.sample(result, {"task": "anomaly", "samples": samples}, seed=0)
    scores = np.array(sampled.scores)
    assert scores.shape == (16,) and np.isfinite(scores).all()
    assert scores[:8].mean() < scores[8:].mean()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"task": "images", "n": 0}, "n"),
        ({"task": "images", "n": 257}, "n"),
        ({"task": "images", "n": "4"}, "n"),
        ({"task": "rows", "n": 4}, "task"),
        ({"task": "images", "interpolate": {"from_seed": 1, "to_seed": 2, "steps": 1}}, "steps"),
        ({"task": "images", "interpolate": {"from_seed": -1, "to_seed": 2}}, "from_seed"),
        (
            {"task": "images", "interpolate": {"from_seed": 1, "to_seed": 2, "method": "x"}},
            "method",
        ),
        ({"task": "anomaly", "samples": torch.rand(2, 1, 4, 4)}, "samples"),
    ],
)
def test_bad_request_fields_raise_naming_the_field(trained, request_: dict, field: str) -> None:
    result, _ = trained
    with pytest.raises(ValueError, match=field):
        classic.sample(result, request_, seed=0)


def test_save_load_round_trip_gives_identical_samples(trained, tmp_path: Path) -> None:
    result, _ = trained
    classic.save(result, tmp_path / "vae.safetensors")
    loaded = classic.load(tmp_path / "vae.safetensors")
    assert loaded.config == result.config
    request = {"task": "images", "n": 6}
    assert np.array_equal(
        classic.sample(loaded, request, seed=7).images,
        classic.sample(result, request, seed=7).images,
    )


def test_mixture_prior_trains_samples_and_round_trips(tmp_path: Path) -> None:
    overrides = {**TINY, "epochs": 2, "prior_components": 3}
    reports: list[classic.Progress] = []
    result = classic.train("vae", overrides, bars(24), seed=0, report=reports.append)
    assert all(np.isfinite(report.val_loss) for report in reports)
    classic.save(result, tmp_path / "mixture.safetensors")
    loaded = classic.load(tmp_path / "mixture.safetensors")
    request = {"task": "images", "interpolate": {"from_seed": 1, "to_seed": 2, "steps": 3}}
    for request_ in ({"task": "images", "n": 4}, request):
        first = classic.sample(result, request_, seed=5).images
        assert np.array_equal(first, classic.sample(loaded, request_, seed=5).images)
    assert classic.sample(result, {"task": "images", "n": 4}, seed=6).images.shape == (4, 8, 8)


def test_should_stop_raises_stopped() -> None:
    with pytest.raises(classic.Stopped):
        classic.train("vae", TINY, bars(16), should_stop=lambda: True)
