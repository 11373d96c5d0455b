"""DCGAN (Radford et al. 2015, arXiv:1511.06434): a CNN generator and discriminator.

Following the paper's guidelines: strided (transposed) convolutions instead of pooling,
batch norm in both nets except the discriminator's input layer and the generator's
output, ReLU in the generator with a tanh output, LeakyReLU(0.2) in the discriminator,
Adam with beta1 0.5 (lr 5e-4 rather than the paper's 2e-4: these nets are small).
Trained with the non-saturating loss of Goodfellow et al. 2014 plus a stabiliser (see
`GANConfig.real_label`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import configs
from models.backends import classic
from models.configs import GANConfig

MAX_SIDE = 128
# Validation fakes come from this fixed seed so that val_loss is comparable across epochs.
VAL_SEED = 0


def validate(config: GANConfig) -> GANConfig:
    """Check what the fields allow together (`configs.check` bounds each one);
    ValueError names the field and what it must be."""
    if not isinstance(config.widths, tuple) or not 1 <= len(config.widths) <= 4:
        raise ValueError(f"gan config widths={config.widths!r} must hold 1 to 4 channel counts")
    factor = 2 ** (len(config.widths) - 1)
    for name in ("height", "width"):
        side = getattr(config, name)
        if side % factor or not factor <= side <= MAX_SIDE:
            raise ValueError(
                f"gan cannot take images of {name} {side}: it must be in [{factor}, {MAX_SIDE}] "
                f"and divisible by {factor} (2 ** (len(widths) - 1))"
            )
    return config


class Generator(nn.Module):
    """z (B, latent_dim) -> images (B, C, H, W) in [-1, 1]."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        widths = config.widths[::-1]  # lowest resolution first
        factor = 2 ** (len(widths) - 1)
        self.inner = (widths[0], config.height // factor, config.width // factor)
        # DCGAN projects z with one matrix multiply, then reshapes (paper, section 3).
        self.project = nn.Linear(config.latent_dim, math.prod(self.inner), bias=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for before, after in zip(widths, widths[1:], strict=False):
            layers += [
                nn.ConvTranspose2d(before, after, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(after),
                nn.ReLU(),
            ]
        layers += [nn.Conv2d(widths[-1], config.channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(latents).view(-1, *self.inner))


class Discriminator(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> real/fake logits (B,)."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        widths = config.widths
        factor = 2 ** (len(widths) - 1)
        layers: list[nn.Module] = [
            nn.Conv2d(config.channels, widths[0], 3, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for before, after in zip(widths, widths[1:], strict=False):
            layers += [
                nn.Conv2d(before, after, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(after),
                nn.LeakyReLU(0.2),
            ]
        inner = widths[-1] * (config.height // factor) * (config.width // factor)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(inner, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).squeeze(1)


class GAN(nn.Module):
    """The two nets in one module, so that one state dict holds both."""

    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        for module in self.modules():
            # N(0, 0.02) initial weights, as in the paper (section 4).
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)


def discriminator_loss(
    model: GAN, real: torch.Tensor, fake: torch.Tensor, config: GANConfig
) -> torch.Tensor:
    """Binary cross-entropy of real images against `real_label` and fakes against 0."""
    real_logits = model.discriminator(real).float()
    fake_logits = model.discriminator(fake).float()
    targets = torch.full_like(real_logits, config.real_label)
    real_loss = F.binary_cross_entropy_with_logits(real_logits, targets)
    fake_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real_loss + fake_loss


def training_step(
    model: GAN,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    real: torch.Tensor,
    config: GANConfig,
    *,
    generator: torch.Generator,
) -> dict[str, float]:
    """One discriminator step, then one generator step, on a batch of real images.

    Args:
        model: The GAN, in train mode, on the batch's device.
        optimizers: Adam for the generator, Adam for the discriminator.
        real: (B, C, H, W) in [-1, 1].
        config: The model's config.
        generator: CPU generator for the latents.

    Returns:
        d_loss and g_loss of the step (and r1 when the penalty is on).
    """
    g_optimizer, d_optimizer = optimizers
    cuda = real.device.type == "cuda"
    latents = torch.randn(real.shape[0], config.latent_dim, generator=generator).to(real.device)
    losses = {}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        fake = model.generator(latents)
        d_loss = discriminator_loss(model, real, fake.detach(), config)
    if config.r1_gamma > 0:
        # R1 (Mescheder et al. 2018, eq. 9): penalise the discriminator's gradient on real
        # data, which keeps it from growing steep where the generator has to follow it.
        real = real.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model.discriminator(real).sum(), real, create_graph=True)
        penalty = gradient.pow(2).flatten(1).sum(1).mean()
        d_loss = d_loss + 0.5 * config.r1_gamma * penalty
        losses["r1"] = penalty.item()
    d_optimizer.zero_grad(set_to_none=True)
    d_loss.backward()
    d_optimizer.step()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        fake_logits = model.discriminator(fake).float()
    # Non-saturating generator loss (Goodfellow et al. 2014, section 3): -log D(G(z)).
    g_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    g_optimizer.zero_grad(set_to_none=True)
    g_loss.backward()
    g_optimizer.step()
    return {"d_loss": d_loss.item(), "g_loss": g_loss.item(), **losses}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W) for one channel, else (N, H, W, C)."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


def sample(
    model: GAN,
    config: GANConfig,
    request: Mapping[str, Any],
    *,
    device: str,
    generator: torch.Generator,
) -> classic.Sampled:
    """Generate images from z ~ N(0, I), keeping the candidates the discriminator rates
    most real (`GANConfig.keep_fraction`).

    This is discriminator rejection sampling (Azadi et al. 2019, arXiv:1810.06758) in its
    top-k form: the trained discriminator still tells the generator's good samples from
    its poor ones, so drawing n / keep_fraction candidates and keeping the n with the
    highest logits trades some diversity for fidelity. The kept images stay in draw order.

    Args:
        model: A trained GAN on `device`.
        config: Its config.
        request: {"task": "images", "n": 1..256}.
        device: Where the model runs.
        generator: CPU generator for the latents.

    Returns:
        Sampled with uint8 images and meta {"n", "candidates"}.
    """
    if request.get("task") != "images":
        raise ValueError(f"task must be 'images' for gan, got {request.get('task')!r}")
    n = request.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 256:
        raise ValueError(f"n must be an integer in [1, 256], got {n!r}")
    candidates = math.ceil(n / config.keep_fraction)
    latents = torch.randn(candidates, config.latent_dim, generator=generator).to(device)
    model.eval()
    with torch.inference_mode():
        images = model.generator(latents)
        if candidates > n:
            realness = model.discriminator(images).float()
            images = images[realness.topk(n).indices.sort().values]
    return classic.Sampled(images=to_uint8(images), meta={"n": n, "candidates": candidates})


def use_average(
    network: Generator,
    averaged: list[torch.Tensor],
    config: GANConfig,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Load the averaged weights, then re-estimate batch-norm statistics for them: the
    running statistics were gathered with the live weights."""
    device = next(network.parameters()).device
    with torch.no_grad():
        for parameter, mean in zip(network.parameters(), averaged, strict=True):
            parameter.copy_(mean)
        network.train()
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the batches below
        for _ in range(20):
            network(torch.randn(batch_size, config.latent_dim, generator=generator).to(device))
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
    network.eval()


class GANFamily:
    """The DCGAN behind the `classic.Family` protocol."""

    name = "gan"
    data_kind: classic.DataKind = "images"
    tasks = frozenset({"images"})

    def make_config(self, overrides: Mapping[str, Any], data: classic.Data) -> GANConfig:
        values = configs.check(self.name, overrides)
        if not isinstance(data, torch.Tensor) or data.ndim != 4:
            raise ValueError("gan trains on images: a float tensor (N, C, H, W)")
        channels, height, width = data.shape[1:]
        return validate(GANConfig(**values, channels=channels, height=height, width=width))

    def config_from_dict(self, values: Mapping[str, Any]) -> GANConfig:
        return validate(GANConfig(**{**values, "widths": tuple(values["widths"])}))

    def build(self, config: GANConfig) -> GAN:
        return GAN(config)

    def sample(
        self,
        model: nn.Module,
        config: GANConfig,
        request: Mapping[str, Any],
        *,
        device: str,
        generator: torch.Generator,
    ) -> classic.Sampled:
        assert isinstance(model, GAN)
        return sample(model, config, request, device=device, generator=generator)

    def fit(
        self,
        model: nn.Module,
        config: GANConfig,
        train: classic.Data,
        val: classic.Data,
        *,
        device: str,
        generator: torch.Generator,
        report: Callable[[classic.Progress], None],
        should_stop: Callable[[], bool],
    ) -> dict[str, float]:
        """Alternate D and G steps over seeded shuffled batches; val_loss is the
        discriminator's loss on the validation images against as many fixed fakes."""
        assert isinstance(model, GAN) and isinstance(train, torch.Tensor)
        assert isinstance(val, torch.Tensor)
        betas = (config.beta1, 0.999)
        optimizers = (
            torch.optim.Adam(model.generator.parameters(), lr=config.learning_rate, betas=betas),
            torch.optim.Adam(
                model.discriminator.parameters(), lr=config.learning_rate, betas=betas
            ),
        )
        train, val = train.to(device) * 2 - 1, val.to(device) * 2 - 1
        val_latents = torch.randn(
            val.shape[0], config.latent_dim, generator=torch.Generator().manual_seed(VAL_SEED)
        ).to(device)
        # Full batches only: batch norm needs more than one image per batch.
        batch_size = min(config.batch_size, train.shape[0])
        batches = train.shape[0] // batch_size
        schedules = [
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * batches)
            for optimizer in (optimizers if config.lr_decay else ())
        ]
        averaged = [p.detach().clone() for p in model.generator.parameters()]
        step, metrics = 0, {}
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(train.shape[0], generator=generator)
            totals: dict[str, float] = {}
            for index in order[: batches * batch_size].view(batches, batch_size):
                if should_stop():
                    raise classic.Stopped()
                real = train[index.to(device)]
                losses = training_step(model, optimizers, real, config, generator=generator)
                for schedule in schedules:
                    schedule.step()
                if config.ema_decay:
                    with torch.no_grad():
                        weights = list(model.generator.parameters())
                        torch._foreach_lerp_(averaged, weights, 1 - config.ema_decay)
                step += 1
                totals = {k: totals.get(k, 0.0) + v / batches for k, v in losses.items()}
            model.eval()
            with torch.no_grad():
                fake = model.generator(val_latents)
                val_loss = discriminator_loss(model, val, fake, config).item()
            report(classic.Progress(epoch, step, totals, val_loss))
            metrics = {**totals, "train_loss": totals["d_loss"], "val_loss": val_loss}
        if config.ema_decay:
            use_average(model.generator, averaged, config, batch_size, generator)
        return metrics


FAMILY = GANFamily()
