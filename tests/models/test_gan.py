"""The DCGAN family through classic.train/save/load/sample, with a tiny config on CPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from models import gan
from models.backends import classic

TINY = {"widths": [8, 16], "latent_dim": 4, "epochs": 3, "batch_size": 8}


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
    result = classic.train("gan", TINY, bars(48), seed=0, report=reports.append)
    return result, reports


def test_family_follows_the_protocol() -> None:
    family = classic.family("gan")
    assert family is gan.FAMILY
    assert (family.name, family.data_kind, family.tasks) == ("gan", "images", {"images"})


def test_config_takes_the_image_shape_from_the_data() -> None:
    config = gan.FAMILY.make_config({"widths": [8, 16]}, torch.rand(4, 3, 12, 16))
    assert (config.channels, config.height, config.width) == (3, 12, 16)
    saved = classic.config_dict(config)
    assert gan.FAMILY.config_from_dict({**saved, "widths": list(saved["widths"])}) == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"real_label": 0.2}, "real_label"),
        ({"r1_gamma": -1.0}, "r1_gamma"),
        ({"batch_size": 1}, "batch_size"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"width": 8}, "width"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        gan.FAMILY.make_config(overrides, bars(4))


def test_refuses_images_the_architecture_cannot_halve() -> None:
    with pytest.raises(ValueError, match="width 9"):
        gan.FAMILY.make_config({}, torch.rand(4, 1, 8, 9))


def test_training_reports_every_epoch_with_finite_losses(trained) -> None:
    result, reports = trained
    assert [report.epoch for report in reports] == [1, 2, 3]
    for report in reports:
        assert np.isfinite(
            [report.losses["d_loss"], report.losses["g_loss"], report.val_loss]
        ).all()
    assert {"d_loss", "g_loss", "train_loss", "val_loss"} <= result.metrics.keys()


def test_r1_penalty_trains_and_reports_it() -> None:
    reports: list[classic.Progress] = []
    overrides = {**TINY, "epochs": 1, "r1_gamma": 1.0, "real_label": 1.0}
    classic.train("gan", overrides, bars(16), report=reports.append)
    assert np.isfinite(reports[-1].losses["r1"])


def test_averaged_generator_with_lr_decay_trains_and_samples() -> None:
    overrides = {**TINY, "epochs": 1, "ema_decay": 0.9, "lr_decay": True}
    result = classic.train("gan", overrides, bars(16))
    images = classic.sample(result, {"task": "images", "n": 3}, seed=0).images
    assert images.shape == (3, 8, 8) and np.isfinite(result.metrics["val_loss"])


def test_samples_are_uint8_images_of_the_training_shape(trained) -> None:
    result, _ = trained
    sampled = classic.sample(result, {"task": "images", "n": 5}, seed=1)
    assert sampled.images.shape == (5, 8, 8) and sampled.images.dtype == np.uint8
    assert sampled.meta == {"n": 5, "candidates": 5}


def test_same_seed_same_images_and_different_seeds_differ(trained) -> None:
    result, _ = trained
    first, again, other = (
        classic.sample(result, {"task": "images", "n": 4}, seed=seed).images for seed in (1, 1, 2)
    )
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_sampling_keeps_the_draws_the_discriminator_rates_most_real(trained) -> None:
    result, _ = trained
    config = dataclasses.replace(result.config, keep_fraction=0.25)
    request = {"task": "images", "n": 3}
    generator = torch.Generator().manual_seed(5)
    kept = gan.sample(result.model, config, request, device="cpu", generator=generator)
    assert kept.meta == {"n": 3, "candidates": 12}
    # The same 12 draws, ranked by the discriminator by hand.
    latents = torch.randn(12, config.latent_dim, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        draws = result.model.generator(latents)
        best = result.model.discriminator(draws).topk(3).indices.sort().values
    assert np.array_equal(kept.images, gan.to_uint8(draws[best]))
    everything = dataclasses.replace(result.config, keep_fraction=1.0)
    generator = torch.Generator().manual_seed(5)
    plain = gan.sample(result.model, everything, request, device="cpu", generator=generator)
    assert plain.meta == {"n": 3, "candidates": 3}
    latents = torch.randn(3, config.latent_dim, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert np.array_equal(plain.images, gan.to_uint8(result.model.generator(latents)))


def test_training_is_repeatable_with_a_seed() -> None:
    first, second = (
        classic.train("gan", {**TINY, "epochs": 1}, bars(16), seed=3) for _ in range(2)
    )
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"task": "images", "n": 0}, "n"),
        ({"task": "images", "n": 300}, "n"),
        ({"task": "images", "n": True}, "n"),
        ({"task": "anomaly"}, "task"),
    ],
)
def test_bad_request_fields_raise_naming_the_field(trained, request_: dict, field: str) -> None:
    result, _ = trained
    with pytest.raises(ValueError, match=field):
        classic.sample(result, request_, seed=0)


def test_save_load_round_trip_gives_identical_samples(trained, tmp_path: Path) -> None:
    result, _ = trained
    classic.save(result, tmp_path / "gan.safetensors")
    loaded = classic.load(tmp_path / "gan.safetensors")
    assert loaded.config == result.config
    request = {"task": "images", "n": 6}
    assert np.array_equal(
        classic.sample(loaded, request, seed=7).images,
        classic.sample(result, request, seed=7).images,
    )


def test_should_stop_raises_stopped() -> None:
    with pytest.raises(classic.Stopped):
        classic.train("gan", TINY, bars(16), should_stop=lambda: True)
