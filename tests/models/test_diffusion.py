"""The DDPM family through classic.train/save/load/sample, with a tiny UNet on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import diffusion
from models.backends import classic

TINY = {
    "block_channels": [8, 16],
    "norm_groups": 4,
    "timesteps": 100,
    "epochs": 3,
    "batch_size": 8,
    "learning_rate": 5e-3,
}


def bars(count: int, seed: int = 0, side: int = 8) -> torch.Tensor:
    """(count, 1, side, side) images of one bright row or column each."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, side, side)
    positions = torch.randint(0, side, (count,), generator=generator)
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
    result = classic.train("diffusion", TINY, bars(32), seed=0, report=reports.append)
    return result, reports


def test_family_follows_the_protocol() -> None:
    family = classic.family("diffusion")
    assert family is diffusion.FAMILY
    assert (family.name, family.data_kind, family.tasks) == ("diffusion", "images", {"images"})


def test_config_takes_the_image_shape_from_the_data() -> None:
    config = diffusion.FAMILY.make_config(TINY, torch.rand(4, 3, 12, 16))
    assert (config.channels, config.height, config.width) == (3, 12, 16)
    saved = classic.config_dict(config)
    restored = {**saved, "block_channels": list(saved["block_channels"])}
    assert diffusion.FAMILY.config_from_dict(restored) == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"timesteps": 5}, "timesteps"),
        ({"block_channels": [8, 12], "norm_groups": 8}, "norm_groups"),
        ({"beta_schedule": "cubic"}, "beta_schedule"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"attention": "yes"}, "attention"),
        ({"channels": 1}, "channels"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        diffusion.FAMILY.make_config(overrides, bars(4))


def test_refuses_images_too_large() -> None:
    with pytest.raises(ValueError, match="height 100"):
        diffusion.FAMILY.make_config({}, torch.rand(2, 1, 100, 8))


def test_training_reports_every_epoch_and_lowers_the_loss(trained) -> None:
    result, reports = trained
    assert [report.epoch for report in reports] == [1, 2, 3]
    losses = [report.losses["loss"] for report in reports]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert np.isfinite(result.metrics["val_loss"])


def test_samples_are_uint8_images_of_the_training_shape(trained) -> None:
    result, _ = trained
    sampled = classic.sample(result, {"task": "images", "n": 3, "steps": 4}, seed=1)
    assert sampled.images.shape == (3, 8, 8) and sampled.images.dtype == np.uint8
    assert sampled.meta == {"n": 3, "steps": 4}


def test_odd_sizes_are_padded_for_the_unet_and_cropped_back() -> None:
    overrides = {**TINY, "epochs": 1, "ema_decay": 0.9}
    result = classic.train("diffusion", overrides, bars(8, side=6).expand(-1, 3, -1, -1))
    sampled = classic.sample(result, {"task": "images", "n": 2, "steps": 2}, seed=0)
    assert sampled.images.shape == (2, 6, 6, 3)


def test_same_seed_same_images_and_different_seeds_differ(trained) -> None:
    result, _ = trained
    first, again, other = (
        classic.sample(result, {"task": "images", "n": 4, "steps": 3}, seed=seed).images
        for seed in (1, 1, 2)
    )
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"task": "images", "n": 0}, "n"),
        ({"task": "images", "n": 257}, "n"),
        ({"task": "images", "n": 2, "steps": 0}, "steps"),
        ({"task": "images", "n": 2, "steps": 101}, "steps"),
        ({"task": "images", "n": 2, "steps": 2.5}, "steps"),
        ({"task": "anomaly"}, "task"),
    ],
)
def test_bad_request_fields_raise_naming_the_field(trained, request_: dict, field: str) -> None:
    result, _ = trained
    with pytest.raises(ValueError, match=field):
        classic.sample(result, request_, seed=0)


def test_save_load_round_trip_gives_identical_samples(trained, tmp_path: Path) -> None:
    result, _ = trained
    classic.save(result, tmp_path / "diffusion.safetensors")
    loaded = classic.load(tmp_path / "diffusion.safetensors")
    assert loaded.config == result.config
    request = {"task": "images", "n": 3, "steps": 3}
    assert np.array_equal(
        classic.sample(loaded, request, seed=7).images,
        classic.sample(result, request, seed=7).images,
    )


def test_should_stop_raises_stopped() -> None:
    with pytest.raises(classic.Stopped):
        classic.train("diffusion", TINY, bars(16), should_stop=lambda: True)
