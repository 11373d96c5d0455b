"""DDPM (Ho et al. 2020, arXiv:2006.11239) on diffusers' UNet2DModel, sampled with DDIM.

Training follows Ho et al.'s algorithm 1: noise an image to a uniformly drawn timestep
with `DDPMScheduler.add_noise` (their eq. 4) and regress the noise with an MSE (their
simplified objective, eq. 14). Sampling runs the deterministic DDIM update (Song et al.
2020, arXiv:2010.02502, eq. 12 with eta = 0) through `DDIMScheduler`, which reuses the
trained noise schedule with far fewer steps. Images are scaled to [-1, 1]; sides that the
UNet's downsampling cannot halve evenly are padded with background (-1) and cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from models import configs
from models.backends import classic
from models.configs import BETA_SCHEDULES, DiffusionConfig

MAX_SIDE = 64
# The validation noise and timesteps come from this fixed seed, so val_loss is comparable
# across epochs and does not consume the training generator.
VAL_SEED = 0


def validate(config: DiffusionConfig) -> DiffusionConfig:
    """Check what the fields allow together (`configs.check` bounds each one);
    ValueError names the field and what it must be."""
    channels = config.block_channels
    if not isinstance(channels, tuple) or not 1 <= len(channels) <= 4:
        raise ValueError(
            f"diffusion config block_channels={channels!r} must hold 1 to 4 channel counts"
        )
    if any(width % config.norm_groups for width in channels):
        raise ValueError(
            f"diffusion config norm_groups={config.norm_groups} must divide every "
            f"block_channels entry {channels}"
        )
    if config.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"diffusion config beta_schedule={config.beta_schedule!r} must be one of "
            f"{list(BETA_SCHEDULES)}"
        )
    for name in ("height", "width"):
        side = getattr(config, name)
        if not 4 <= side <= MAX_SIDE:
            raise ValueError(
                f"diffusion cannot take images of {name} {side}: allowed [4, {MAX_SIDE}]"
            )
    return config


def padded_side(side: int, config: DiffusionConfig) -> int:
    """The side rounded up so that every UNet downsampling halves it exactly."""
    factor = 2 ** (len(config.block_channels) - 1)
    return math.ceil(side / factor) * factor


def build_unet(config: DiffusionConfig) -> UNet2DModel:
    """The noise-prediction UNet for the config's (padded) image size."""
    levels = len(config.block_channels)
    return UNet2DModel(
        sample_size=(padded_side(config.height, config), padded_side(config.width, config)),
        in_channels=config.channels,
        out_channels=config.channels,
        block_out_channels=config.block_channels,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        add_attention=config.attention,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_groups,
        attention_head_dim=8,
    )


def noise_scheduler(config: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type="epsilon",
    )


def pad(images: torch.Tensor, config: DiffusionConfig) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> padded with background (-1) to the UNet's size."""
    extra_h = padded_side(config.height, config) - config.height
    extra_w = padded_side(config.width, config) - config.width
    if not extra_h and not extra_w:
        return images
    sides = (extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2)
    return F.pad(images, sides, value=-1.0)


def crop(images: torch.Tensor, config: DiffusionConfig) -> torch.Tensor:
    """The inverse of `pad`: the centre (B, C, height, width)."""
    top = (images.shape[2] - config.height) // 2
    left = (images.shape[3] - config.width) // 2
    return images[:, :, top : top + config.height, left : left + config.width]


def epsilon_loss(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Ho et al. 2020 eq. 14: || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2."""
    noisy = scheduler.add_noise(images, noise, timesteps)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        predicted = model(noisy, timesteps).sample
    # The loss stays in float32: small noise residuals vanish in bfloat16.
    return F.mse_loss(predicted.float(), noise.float())


def validation_loss(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> float:
    """The epsilon MSE in eval mode on fixed noise and timesteps."""
    model.eval()
    with torch.no_grad():
        return epsilon_loss(model, scheduler, images, noise, timesteps).item()


def training_step(
    model: UNet2DModel,
    optimizer: torch.optim.Optimizer,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    generator: torch.Generator,
) -> dict[str, float]:
    """One step of Ho et al.'s algorithm 1 on a padded batch in [-1, 1].

    Args:
        model: The UNet, in train mode, on the batch's device.
        optimizer: Its optimizer.
        scheduler: The training noise schedule.
        images: (B, C, H', W') padded images in [-1, 1].
        generator: CPU generator for the noise and the timesteps.

    Returns:
        {"loss": the batch's epsilon MSE}.
    """
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    count = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, count, (images.shape[0],), generator=generator)
    loss = epsilon_loss(model, scheduler, images, noise, timesteps.to(images.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item()}


def sample(
    model: UNet2DModel,
    config: DiffusionConfig,
    request: Mapping[str, Any],
    *,
    device: str,
    generator: torch.Generator,
) -> classic.Sampled:
    """Deterministic DDIM sampling (eta = 0) from Gaussian noise.

    Args:
        model: The trained UNet on `device`.
        config: Its config.
        request: {"task": "images", "n": 1..256, "steps": 1..min(1000, timesteps)
            (default 50)}.
        device: Where the model runs.
        generator: CPU generator for the starting noise (the only random draw).

    Returns:
        Sampled with uint8 images of the training size and meta {"n", "steps"}.
    """
    if request.get("task") != "images":
        raise ValueError(f"task must be 'images' for diffusion, got {request.get('task')!r}")
    values = {"n": (request.get("n", 1), 256), "steps": (request.get("steps", 50), 1000)}
    for name, (value, high) in values.items():
        high = min(high, config.timesteps) if name == "steps" else high
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}")
    n, steps = values["n"][0], values["steps"][0]
    scheduler = DDIMScheduler.from_config(
        noise_scheduler(config).config,
        # "trailing" starts at t = T - 1, so few-step sampling begins from pure noise
        # (Lin et al. 2023, arXiv:2305.08891, section 3.4).
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    shape = (
        n,
        config.channels,
        padded_side(config.height, config),
        padded_side(config.width, config),
    )
    images = torch.randn(shape, generator=generator).to(device)
    model.eval()
    with torch.inference_mode():
        for timestep in scheduler.timesteps:
            predicted = model(images, timestep.to(device)).sample
            images = scheduler.step(predicted, timestep, images, eta=0.0).prev_sample
    pixels = ((crop(images, config).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.cpu().numpy()
    array = array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
    return classic.Sampled(images=np.ascontiguousarray(array), meta={"n": n, "steps": steps})


class DiffusionFamily:
    """DDPM/DDIM behind the `classic.Family` protocol."""

    name = "diffusion"
    data_kind: classic.DataKind = "images"
    tasks = frozenset({"images"})

    def make_config(self, overrides: Mapping[str, Any], data: classic.Data) -> DiffusionConfig:
        values = configs.check(self.name, overrides)
        if not isinstance(data, torch.Tensor) or data.ndim != 4:
            raise ValueError("diffusion trains on images: a float tensor (N, C, H, W)")
        channels, height, width = data.shape[1:]
        return validate(DiffusionConfig(**values, channels=channels, height=height, width=width))

    def config_from_dict(self, values: Mapping[str, Any]) -> DiffusionConfig:
        channels = tuple(values["block_channels"])
        return validate(DiffusionConfig(**{**values, "block_channels": channels}))

    def build(self, config: DiffusionConfig) -> UNet2DModel:
        return build_unet(config)

    def sample(
        self,
        model: nn.Module,
        config: DiffusionConfig,
        request: Mapping[str, Any],
        *,
        device: str,
        generator: torch.Generator,
    ) -> classic.Sampled:
        assert isinstance(model, UNet2DModel)
        return sample(model, config, request, device=device, generator=generator)

    def fit(
        self,
        model: nn.Module,
        config: DiffusionConfig,
        train: classic.Data,
        val: classic.Data,
        *,
        device: str,
        generator: torch.Generator,
        report: Callable[[classic.Progress], None],
        should_stop: Callable[[], bool],
    ) -> dict[str, float]:
        assert isinstance(model, UNet2DModel) and isinstance(train, torch.Tensor)
        assert isinstance(val, torch.Tensor)
        scheduler = noise_scheduler(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        train, val = pad(train.to(device) * 2 - 1, config), pad(val.to(device) * 2 - 1, config)
        val_generator = torch.Generator().manual_seed(VAL_SEED)
        val_noise = torch.randn(val.shape, generator=val_generator).to(device)
        val_steps = torch.randint(0, config.timesteps, (val.shape[0],), generator=val_generator)
        averaged = [p.detach().clone() for p in model.parameters()] if config.ema_decay else []
        batch_size = min(config.batch_size, train.shape[0])
        batches = train.shape[0] // batch_size
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR
        schedules = [cosine(optimizer, config.epochs * batches)] if config.lr_decay else []
        validation = (val, val_noise, val_steps.to(device))
        step, metrics = 0, {}
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(train.shape[0], generator=generator)
            total = 0.0
            for index in order[: batches * batch_size].view(batches, batch_size):
                if should_stop():
                    raise classic.Stopped()
                images = train[index.to(device)]
                losses = training_step(model, optimizer, scheduler, images, generator=generator)
                total += losses["loss"]
                for schedule in schedules:
                    schedule.step()
                step += 1
                if averaged:
                    with torch.no_grad():
                        torch._foreach_lerp_(
                            averaged, list(model.parameters()), 1 - config.ema_decay
                        )
            val_loss = validation_loss(model, scheduler, *validation)
            report(classic.Progress(epoch, step, {"loss": total / batches}, val_loss))
            metrics = {"train_loss": total / batches, "val_loss": val_loss}
        if averaged:
            with torch.no_grad():
                for mean, parameter in zip(averaged, model.parameters(), strict=True):
                    parameter.copy_(mean)
            metrics["val_loss"] = validation_loss(model, scheduler, *validation)
        return metrics


FAMILY = DiffusionFamily()
