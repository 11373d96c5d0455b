"""A convolutional variational autoencoder (Kingma & Welling 2013, arXiv:1312.6114).

The encoder maps an image to the mean and log-variance of a diagonal Gaussian q(z|x); a
latent drawn with the reparameterisation trick (z = mu + sigma * eps, their eq. 10) is
decoded into per-pixel Bernoulli logits. The loss is the negative ELBO: reconstruction
cross-entropy plus beta times KL(q(z|x) || p(z)) (beta = 1 is the plain VAE; Higgins et
al. 2017 for beta != 1), where the prior p(z) is N(0, I) or a learned Gaussian mixture.
The same quantity scores anomalies: a sample the model explains badly has a high
negative ELBO.
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
from models.configs import VAEConfig

MAX_SIDE = 128


def validate(config: VAEConfig) -> VAEConfig:
    """Check what the fields allow together (`configs.check` bounds each one);
    ValueError names the field and what it must be."""
    if not isinstance(config.widths, tuple) or not 1 <= len(config.widths) <= 4:
        raise ValueError(f"vae config widths={config.widths!r} must hold 1 to 4 channel counts")
    factor = 2 ** (len(config.widths) - 1)
    for name in ("height", "width"):
        side = getattr(config, name)
        if side % factor or not factor <= side <= MAX_SIDE:
            raise ValueError(
                f"vae cannot take images of {name} {side}: it must be in [{factor}, {MAX_SIDE}] "
                f"and divisible by {factor} (2 ** (len(widths) - 1))"
            )
    return config


class VAE(nn.Module):
    """Conv encoder -> (mu, log sigma^2) -> z -> transposed-conv decoder -> pixel logits."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        factor = 2 ** (len(widths) - 1)
        self.inner = (widths[-1], config.height // factor, config.width // factor)
        inner_size = math.prod(self.inner)
        layers: list[nn.Module] = [nn.Conv2d(config.channels, widths[0], 3, padding=1), nn.SiLU()]
        for before, after in zip(widths, widths[1:], strict=False):
            layers += [nn.Conv2d(before, after, 4, stride=2, padding=1), nn.SiLU()]
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.to_moments = nn.Linear(inner_size, 2 * config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, inner_size)
        layers = []
        for before, after in zip(widths[::-1], widths[::-1][1:], strict=False):
            layers += [nn.SiLU(), nn.ConvTranspose2d(before, after, 4, stride=2, padding=1)]
        if config.prior_components > 1:
            components = (config.prior_components, config.latent_dim)
            self.prior_means = nn.Parameter(torch.randn(components))
            self.prior_log_vars = nn.Parameter(torch.zeros(components))
            self.prior_logits = nn.Parameter(torch.zeros(config.prior_components))
        self.decoder = nn.Sequential(
            *layers, nn.SiLU(), nn.Conv2d(widths[0], config.channels, 3, padding=1)
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [0, 1] -> mu, log sigma^2, each (B, latent_dim)."""
        mu, log_var = self.to_moments(self.encoder(images)).chunk(2, dim=1)
        return mu, log_var

    def log_prior(self, latents: torch.Tensor) -> torch.Tensor:
        """log p(z) of latents (B, latent_dim) under the (mixture) prior -> (B,)."""
        if self.config.prior_components == 1:
            return log_normal(latents, torch.zeros_like(latents), torch.zeros_like(latents))
        weights = self.prior_logits.float().log_softmax(0)
        per_component = log_normal(
            latents.float()[:, None], self.prior_means.float(), self.prior_log_vars.float()
        )
        return torch.logsumexp(weights + per_component, dim=1)

    def draw_prior(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` latents from the prior, drawn on CPU with `generator` -> (count, D)."""
        noise = torch.randn(count, self.config.latent_dim, generator=generator)
        if self.config.prior_components == 1:
            return noise
        weights = self.prior_logits.detach().float().softmax(0).cpu()
        chosen = torch.multinomial(weights, count, replacement=True, generator=generator)
        means = self.prior_means.detach().float().cpu()[chosen]
        scales = (0.5 * self.prior_log_vars.detach().float().cpu()[chosen]).exp()
        return means + scales * noise

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_dim) -> Bernoulli logits (B, C, H, W)."""
        inner = self.from_latent(latents).view(-1, *self.inner)
        return self.decoder(inner)


def log_normal(values: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(values; mean, diag(exp(log_var))), summed over the last dimension."""
    squared = (values - mean).pow(2) / log_var.exp()
    return -0.5 * (math.log(2 * math.pi) + log_var + squared).sum(dim=-1)


def negative_elbo(
    model: VAE, images: torch.Tensor, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample reconstruction and KL terms of the negative ELBO, in nats.

    Args:
        model: The VAE.
        images: (B, C, H, W) in [0, 1].
        noise: eps (B, latent_dim) for the reparameterisation; None decodes mu itself,
            which makes the score deterministic (used for validation and anomalies).

    Returns:
        reconstruction (B,) and kl (B,).
    """
    mu, log_var = model.encode(images)
    latents = mu if noise is None else mu + torch.exp(0.5 * log_var) * noise
    logits = model.decode(latents).float()
    reconstruction = F.binary_cross_entropy_with_logits(logits, images.float(), reduction="none")
    # Closed-form KL between N(mu, sigma^2) and N(0, I): Kingma & Welling 2013, appendix B.
    if model.config.prior_components == 1:
        kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).float().sum(dim=1)
    else:
        kl = log_normal(latents.float(), mu.float(), log_var.float()) - model.log_prior(latents)
    return reconstruction.flatten(1).sum(dim=1), kl


def training_step(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    config: VAEConfig,
    *,
    generator: torch.Generator,
) -> dict[str, float]:
    """One Adam step on a batch; returns the batch's mean loss terms per sample.

    Args:
        model: The VAE, in train mode, on the batch's device.
        optimizer: Its optimizer.
        images: (B, C, H, W) in [0, 1].
        config: The model's config (beta).
        generator: CPU generator for the reparameterisation noise.
    """
    noise = torch.randn(images.shape[0], config.latent_dim, generator=generator).to(images.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        reconstruction, kl = negative_elbo(model, images, noise)
    loss = (reconstruction + config.beta * kl).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {
        "loss": loss.item(),
        "reconstruction": reconstruction.mean().item(),
        "kl": kl.mean().item(),
    }


def validation_loss(model: VAE, images: torch.Tensor, beta: float) -> float:
    """Mean negative ELBO (with beta) per image at z = mu, so it does not vary by draw."""
    with torch.no_grad():
        terms = [negative_elbo(model, batch, None) for batch in images.split(256)]
    return sum(float((rec + beta * kl).sum()) for rec, kl in terms) / images.shape[0]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (N, H, W) for one channel, else (N, H, W, C)."""
    array = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


def _int_field(
    request: Mapping[str, Any], name: str, low: int, high: int, default: int | None = None
) -> int:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def slerp(start: torch.Tensor, end: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985), which keeps the points at the norm a
    Gaussian latent typically has; (D,), (D,), (S,) -> (S, D)."""
    cosine = torch.dot(start, end) / (start.norm() * end.norm())
    angle = torch.arccos(cosine.clamp(-1.0, 1.0))
    if angle.abs() < 1e-4:  # nearly parallel: slerp is linear there, and sin(angle) ~ 0
        return torch.lerp(start, end, fractions[:, None])
    weights_start = torch.sin((1 - fractions) * angle) / torch.sin(angle)
    weights_end = torch.sin(fractions * angle) / torch.sin(angle)
    return weights_start[:, None] * start + weights_end[:, None] * end


def interpolation_latents(model: VAE, spec: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The latents of an `interpolate` request: {from_seed, to_seed, steps, method}; each
    end is the prior draw of a CPU generator seeded with its seed."""
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"interpolate must be an object with from_seed, to_seed, steps, got {spec!r}"
        )
    seeds = [_int_field(spec, name, 0, 2**63 - 1) for name in ("from_seed", "to_seed")]
    steps = _int_field(spec, "steps", 2, 64, default=8)
    method = spec.get("method", "slerp")
    if method not in ("slerp", "linear"):
        raise ValueError(f"interpolate method must be 'slerp' or 'linear', got {method!r}")
    start, end = (model.draw_prior(1, torch.Generator().manual_seed(s))[0] for s in seeds)
    fractions = torch.linspace(0, 1, steps)
    latents = (
        slerp(start, end, fractions)
        if method == "slerp"
        else torch.lerp(start, end, fractions[:, None])
    )
    meta = {"from_seed": seeds[0], "to_seed": seeds[1], "steps": steps, "method": method}
    return latents, meta


def anomaly_scores(model: VAE, config: VAEConfig, samples: Any, device: str) -> list[float]:
    """Negative ELBO (reconstruction + KL at z = mu) per sample; higher = more anomalous."""
    if not isinstance(samples, torch.Tensor | np.ndarray):
        raise ValueError("samples must be a float tensor (N, C, H, W) in [0, 1]")
    images = torch.as_tensor(samples, dtype=torch.float32)
    expected = (config.channels, config.height, config.width)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
        raise ValueError(
            f"samples must have shape (N, {', '.join(map(str, expected))}), "
            f"got {tuple(images.shape)}"
        )
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError("samples must be finite values in [0, 1]")
    scores = []
    for batch in images.split(256):
        reconstruction, kl = negative_elbo(model, batch.to(device), None)
        scores.append(reconstruction + kl)
    return torch.cat(scores).tolist()


def sample(
    model: VAE,
    config: VAEConfig,
    request: Mapping[str, Any],
    *,
    device: str,
    generator: torch.Generator,
) -> classic.Sampled:
    """Images from the prior, a latent interpolation, or anomaly scores.

    Args:
        model: A trained VAE on `device`.
        config: Its config.
        request: {"task": "images", "n"} for n images from z ~ p(z); {"task": "images",
            "interpolate": {"from_seed", "to_seed", "steps", "method"}} decodes `steps`
            evenly spaced points between the latents those seeds draw (steps default 8,
            method "slerp" or "linear", default "slerp"; `n` is then ignored);
            {"task": "anomaly", "samples": (N, C, H, W) in [0, 1]}.
        device: Where the model runs.
        generator: CPU generator for the prior draws.

    Returns:
        Sampled with images (uint8) or scores, and meta.
    """
    task = request.get("task")
    if task not in FAMILY.tasks:
        raise ValueError(f"task must be one of {sorted(FAMILY.tasks)} for vae, got {task!r}")
    model.eval()
    with torch.inference_mode():
        if task == "anomaly":
            scores = anomaly_scores(model, config, request.get("samples"), device)
            return classic.Sampled(scores=scores, meta={"score": "negative_elbo"})
        if request.get("interpolate") is not None:
            latents, meta = interpolation_latents(model, request["interpolate"])
            meta = {"interpolate": meta}
        else:
            n = _int_field(request, "n", 1, 256, default=1)
            latents, meta = model.draw_prior(n, generator), {"n": n}
        pixels = torch.sigmoid(model.decode(latents.to(device)).float())
    return classic.Sampled(images=to_uint8(pixels), meta=meta)


class VAEFamily:
    """The VAE behind the `classic.Family` protocol."""

    name = "vae"
    data_kind: classic.DataKind = "images"
    tasks = frozenset({"images", "anomaly"})

    def make_config(self, overrides: Mapping[str, Any], data: classic.Data) -> VAEConfig:
        values = configs.check(self.name, overrides)
        if not isinstance(data, torch.Tensor) or data.ndim != 4:
            raise ValueError("vae trains on images: a float tensor (N, C, H, W)")
        channels, height, width = data.shape[1:]
        return validate(VAEConfig(**values, channels=channels, height=height, width=width))

    def config_from_dict(self, values: Mapping[str, Any]) -> VAEConfig:
        return validate(VAEConfig(**{**values, "widths": tuple(values["widths"])}))

    def build(self, config: VAEConfig) -> VAE:
        return VAE(config)

    def sample(
        self,
        model: nn.Module,
        config: VAEConfig,
        request: Mapping[str, Any],
        *,
        device: str,
        generator: torch.Generator,
    ) -> classic.Sampled:
        assert isinstance(model, VAE)
        return sample(model, config, request, device=device, generator=generator)

    def fit(
        self,
        model: nn.Module,
        config: VAEConfig,
        train: classic.Data,
        val: classic.Data,
        *,
        device: str,
        generator: torch.Generator,
        report: Callable[[classic.Progress], None],
        should_stop: Callable[[], bool],
    ) -> dict[str, float]:
        assert isinstance(model, VAE) and isinstance(train, torch.Tensor)
        assert isinstance(val, torch.Tensor)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        train, val = train.to(device), val.to(device)
        batch_size = min(config.batch_size, train.shape[0])
        batches = train.shape[0] // batch_size
        step, metrics = 0, {}
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(train.shape[0], generator=generator)
            totals: dict[str, float] = {}
            for index in order[: batches * batch_size].view(batches, batch_size):
                if should_stop():
                    raise classic.Stopped()
                losses = training_step(
                    model, optimizer, train[index.to(device)], config, generator=generator
                )
                step += 1
                totals = {k: totals.get(k, 0.0) + v / batches for k, v in losses.items()}
            model.eval()
            val_loss = validation_loss(model, val, config.beta)
            report(classic.Progress(epoch, step, totals, val_loss))
            metrics = {"train_loss": totals["loss"], "val_loss": val_loss}
        return metrics


FAMILY = VAEFamily()
