"""Denoising autoencoder for image anomaly scores.

An MLP over the flattened pixels with a narrow bottleneck: images like the training set
pass through it, images that are not (noise, scrambled digits) come back changed. It is
trained to rebuild clean images from corrupted ones (Gaussian noise plus randomly masked
pixels; Vincent et al. 2008), which keeps it from learning the identity. The anomaly
score of an image is its mean squared reconstruction error; the threshold travelling with
the checkpoint (a buffer) is the `threshold_quantile` of the validation scores.

An MLP rather than a conv net: it works for any image size without padding rules and its
dense bottleneck is what makes out-of-distribution inputs reconstruct badly. Its first
layer grows with the pixel count (C*H*W*hidden_size weights), so it suits small images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from models import configs
from models.backends import classic
from models.configs import AutoencoderConfig

MAX_SAMPLES = 10_000


class DenoisingAutoencoder(nn.Module):
    """Pixels -> hidden -> latent -> hidden -> pixels in [0, 1]."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        pixels = config.channels * config.height * config.width
        hidden, latent = config.hidden_size, config.latent_size
        self.encoder = nn.Sequential(
            nn.Linear(pixels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, latent),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, pixels), nn.Sigmoid(),
        )  # fmt: skip
        # Set at the end of fit; a buffer so it is saved with the weights.
        self.register_buffer("threshold", torch.tensor(math.inf))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> reconstructions (B, C, H, W)."""
        flat = images.flatten(1)
        return self.decoder(self.encoder(flat)).view_as(images)


def corrupt(
    images: torch.Tensor, config: AutoencoderConfig, generator: torch.Generator
) -> torch.Tensor:
    """Corrupt images for denoising training.

    Args:
        images: float32 (B, C, H, W) in [0, 1].
        config: Gives noise_std and mask_fraction.
        generator: CPU generator for the draws (so a seed repeats on any device).

    Returns:
        The images plus Gaussian noise, a random share of pixels zeroed, clipped to [0, 1].
    """
    noise = torch.randn(images.shape, generator=generator) * config.noise_std
    keep = torch.rand(images.shape, generator=generator) >= config.mask_fraction
    noisy = (images + noise.to(images.device)) * keep.to(images.device)
    return noisy.clamp(0.0, 1.0)


def training_step(
    model: DenoisingAutoencoder,
    optimizer: torch.optim.Optimizer,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
) -> float:
    """One optimiser step: rebuild `clean` from `corrupted`.

    Args:
        model: The autoencoder, in train mode.
        optimizer: Its optimiser.
        clean: float32 (B, C, H, W) in [0, 1].
        corrupted: The same images corrupted.

    Returns:
        The batch's mean squared error per pixel.
    """
    # bf16 on CUDA for the matmuls; the loss is taken in float32.
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=clean.device.type == "cuda"):
        rebuilt = model(corrupted)
    loss = ((rebuilt.float() - clean) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.inference_mode()
def scores(
    model: DenoisingAutoencoder, images: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Anomaly scores: mean squared reconstruction error per image.

    Args:
        model: The autoencoder (its device is used).
        images: float32 (N, C, H, W) in [0, 1], uncorrupted.
        batch_size: Images per forward pass.

    Returns:
        float32 (N,) on the CPU; higher is more anomalous.
    """
    device = next(model.parameters()).device
    out = []
    for batch in images.split(batch_size):
        batch = batch.to(device, torch.float32)
        out.append(((model(batch) - batch) ** 2).flatten(1).mean(dim=1).float().cpu())
    return torch.cat(out)


def _samples(config: AutoencoderConfig, samples: Any) -> torch.Tensor:
    """The request's images as float32 (N, C, H, W) in [0, 1]; ValueError names the field."""
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples)
    if not isinstance(samples, torch.Tensor) or not samples.is_floating_point():
        raise ValueError(f"request 'samples' must be a float tensor, got {type(samples).__name__}")
    expected = (config.channels, config.height, config.width)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != expected:
        raise ValueError(
            f"request 'samples' must have shape (N, {', '.join(map(str, expected))}) like the "
            f"training images, got {tuple(samples.shape)}"
        )
    if not 1 <= samples.shape[0] <= MAX_SAMPLES:
        raise ValueError(f"request 'samples' holds {samples.shape[0]} images; allowed [1, 10000]")
    samples = samples.float()
    if not torch.isfinite(samples).all() or samples.min() < 0 or samples.max() > 1:
        raise ValueError("request 'samples' must hold finite values in [0, 1]")
    return samples


class AutoencoderFamily:
    """The `classic.Family` of denoising autoencoders that score anomalies."""

    name = "autoencoder"
    data_kind: classic.DataKind = "images"
    tasks = frozenset({"anomaly"})

    def make_config(self, overrides: Mapping[str, Any], data: classic.Data) -> AutoencoderConfig:
        if not isinstance(data, torch.Tensor) or data.ndim != 4:
            raise ValueError("autoencoder trains on images (N, C, H, W)")
        values = configs.check(self.name, overrides)
        _, channels, height, width = data.shape
        return AutoencoderConfig(**values, channels=channels, height=height, width=width)

    def config_from_dict(self, values: Mapping[str, Any]) -> AutoencoderConfig:
        return AutoencoderConfig(**values)

    def build(self, config: AutoencoderConfig) -> DenoisingAutoencoder:
        return DenoisingAutoencoder(config)

    def fit(
        self,
        model: nn.Module,
        config: Any,
        train: classic.Data,
        val: classic.Data,
        *,
        device: str,
        generator: torch.Generator,
        report: Callable[[classic.Progress], None],
        should_stop: Callable[[], bool],
    ) -> dict[str, float]:
        assert isinstance(model, DenoisingAutoencoder)
        assert isinstance(train, torch.Tensor) and isinstance(val, torch.Tensor)
        images = train.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        step, train_loss, val_loss = 0, math.nan, math.nan
        for epoch in range(1, config.epochs + 1):
            model.train()
            losses = []
            for batch in torch.randperm(len(images), generator=generator).split(config.batch_size):
                if should_stop():
                    raise classic.Stopped
                clean = images[batch.to(device)]
                corrupted = corrupt(clean, config, generator)
                losses.append(training_step(model, optimizer, clean, corrupted))
                step += 1
            train_loss = sum(losses) / len(losses)
            model.eval()
            val_scores = scores(model, val)
            val_loss = float(val_scores.mean())
            report(classic.Progress(epoch, step, {"train_loss": train_loss}, val_loss))
        threshold = torch.quantile(val_scores, config.threshold_quantile)
        model.threshold.fill_(float(threshold))
        return {"train_loss": train_loss, "val_loss": val_loss, "threshold": float(threshold)}

    def sample(
        self,
        model: nn.Module,
        config: Any,
        request: Mapping[str, Any],
        *,
        device: str,
        generator: torch.Generator,
    ) -> classic.Sampled:
        assert isinstance(model, DenoisingAutoencoder)
        if request.get("task", "anomaly") != "anomaly":
            raise ValueError(
                f"autoencoder request 'task' must be 'anomaly', got {request['task']!r}"
            )
        images = _samples(config, request.get("samples"))
        values = scores(model, images).tolist()
        return classic.Sampled(scores=values, meta={"threshold": float(model.threshold)})


FAMILY = AutoencoderFamily()
