"""The hyperparameters of the classic families (models/<arch>.py), without torch.

Each family trains from its config dataclass here. They live apart from the networks so
that the API, which never imports torch, can refuse a bad training config with a 400
before it queues the job; the family then adds what only the data decides (vocabulary,
image shape, column schema) and checks what the fields allow together.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# ----------------------------------------------------------------------------- char_rnn

CELLS = ("rnn", "lstm", "gru")
# Filled from the training text; an override would not match the data.
CHAR_RNN_DERIVED = ("vocab",)


@dataclass
class CharRNNConfig:
    """Hyperparameters; the defaults are the full training budget that ships."""

    cell: str = "lstm"
    num_layers: int = 1
    hidden_size: int = 256
    embedding_size: int = 64
    dropout: float = 0.1
    seq_len: int = 64  # truncated BPTT window
    batch_size: int = 64
    epochs: int = 12
    steps_per_epoch: int = 50
    learning_rate: float = 3e-3
    grad_clip: float = 1.0
    vocab: str = ""  # data-derived: the sorted characters of the training text


# name -> (low, high) inclusive; cell is checked against CELLS.
CHAR_RNN_RANGES: dict[str, tuple[float, float]] = {
    "num_layers": (1, 8),
    "hidden_size": (4, 4096),
    "embedding_size": (2, 1024),
    "dropout": (0.0, 0.9),
    "seq_len": (2, 4096),
    "batch_size": (1, 4096),
    "epochs": (1, 10_000),
    "steps_per_epoch": (1, 1_000_000),
    "learning_rate": (1e-6, 1.0),
    "grad_clip": (0.0, 1e6),
}


# ----------------------------------------------------------------------------- vae

VAE_DERIVED = ("channels", "height", "width")


@dataclass(frozen=True)
class VAEConfig:
    """Hyperparameters; the defaults are the budget the shipped checkpoints train with.

    Attributes:
        channels, height, width: The training images' shape, set from the data.
        widths: Convolution channels per resolution; each width after the first halves
            the image side, so height and width must divide by 2 ** (len(widths) - 1).
        latent_dim: Size of z.
        prior_components: 1 for the standard N(0, I) prior; K > 1 for a learned mixture of
            K diagonal Gaussians (a mixture-of-Gaussians prior as in Dilokthanakul et al.
            2016, arXiv:1611.02648), whose KL term is then a one-sample Monte Carlo
            estimate, log q(z|x) - log p(z).
        beta: Weight of the KL term.
        epochs, batch_size, learning_rate: The Adam training budget.
    """

    channels: int = 1
    height: int = 8
    width: int = 8
    widths: tuple[int, ...] = (32, 64)
    latent_dim: int = 6
    # A learned mixture prior: under N(0, I) many prior samples fall between the classes
    # the encoder separates. Measured on the digits (bench/zoo_images.py), the share of
    # samples classified with confidence >= 0.9 was 0.70-0.75 with N(0, I) for latent
    # sizes 3-8 and wider nets, and 0.85 with 16 components.
    prior_components: int = 16
    beta: float = 1.0
    epochs: int = 200
    batch_size: int = 64
    learning_rate: float = 2e-3


# field -> (low, high), inclusive; a tuple field bounds each of its entries.
VAE_RANGES: dict[str, tuple[float, float]] = {
    "widths": (4, 256),
    "latent_dim": (1, 256),
    "prior_components": (1, 64),
    "beta": (0.0, 100.0),
    "epochs": (1, 10_000),
    "batch_size": (1, 4096),
    "learning_rate": (1e-6, 1.0),
}


# ----------------------------------------------------------------------------- gan

GAN_DERIVED = ("channels", "height", "width")


@dataclass(frozen=True)
class GANConfig:
    """Hyperparameters; the defaults are the budget the shipped checkpoints train with.

    Attributes:
        channels, height, width: The training images' shape, set from the data.
        widths: Channels per resolution, full resolution first, in both nets; each width
            after the first halves the side, so sides must divide by 2 ** (len - 1).
        latent_dim: Size of the generator's input noise z.
        real_label: Target for real images in the discriminator loss; below 1 is one-sided
            label smoothing (Salimans et al. 2016, arXiv:1606.03498, section 3.4).
        r1_gamma: Weight of the R1 gradient penalty on real images (Mescheder et al. 2018,
            arXiv:1801.04406, eq. 9); 0 turns it off.
        epochs, batch_size, learning_rate, beta1: The Adam budget, shared by both nets.
        lr_decay: Anneal both learning rates to 0 along a cosine over the run.
        ema_decay: Ship an exponential moving average of the generator's weights
            (Yazici et al. 2018, arXiv:1806.04498); 0 ships the last weights.
        keep_fraction: Sampling draws n / keep_fraction candidates and keeps the n the
            discriminator rates most real (`models.gan.sample`); 1 keeps every draw.
    """

    channels: int = 1
    height: int = 8
    width: int = 8
    widths: tuple[int, ...] = (32, 64, 128)
    latent_dim: int = 32
    # The stabiliser is one-sided label smoothing, chosen by measurement on the digits
    # (bench/zoo_images.py, widths (32, 64), 120 epochs, seed 0): smoothing to 0.9 gave
    # 0.756 confident samples, rarest class 0.070, FD 13.1; R1 with gamma 1 gave 0.760,
    # 0.039, FD 11.0 at 1.6x the CPU time (a double backward). Same quality, better
    # class coverage, cheaper: smoothing. (At 60 epochs: 0.689 / 0.720 / 0.700 without.)
    real_label: float = 0.9
    r1_gamma: float = 0.0
    epochs: int = 200
    batch_size: int = 32
    learning_rate: float = 5e-4
    beta1: float = 0.5
    # Measured at widths (32, 64), 200 epochs: cosine decay 0.767 confident samples, FD 9.1;
    # constant lr 0.765, FD 10.2; weight averaging (0.999) 0.757, with decay 0.768, so off.
    lr_decay: bool = True
    ema_decay: float = 0.0
    # Other changes measured at 200 epochs, seed 0, widths (32, 64) (0.767 confident, FD
    # 9.1): spectral norm with the hinge loss 0.749; a minibatch-stddev feature with a 2x
    # discriminator learning rate 0.757; widths (64, 128) 0.748; translating real and fake
    # images by a pixel for the discriminator (DiffAugment) 0.720; truncated latents (0.8
    # sigma) 0.741. A third level, (32, 64, 128), gave 0.838 (FD 7.1; seed 1: 0.859, FD
    # 7.8), so it is the default. Keeping the discriminator's preferred 80% of draws
    # raises the share to 0.879 (seed 1: 0.888) at FD 9.2 (11.0): fidelity for diversity,
    # left to the user.
    keep_fraction: float = 1.0


# field -> (low, high), inclusive; a tuple field bounds each of its entries.
GAN_RANGES: dict[str, tuple[float, float]] = {
    "widths": (4, 512),
    "latent_dim": (1, 512),
    "real_label": (0.5, 1.0),
    "r1_gamma": (0.0, 1000.0),
    "epochs": (1, 10_000),
    "batch_size": (2, 4096),
    "learning_rate": (1e-6, 1.0),
    "beta1": (0.0, 0.999),
    "ema_decay": (0.0, 0.99999),
    "keep_fraction": (0.01, 1.0),
}


# ----------------------------------------------------------------------------- diffusion

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DIFFUSION_DERIVED = ("channels", "height", "width")


@dataclass(frozen=True)
class DiffusionConfig:
    """Hyperparameters; the defaults are the budget the shipped checkpoints train with.

    Attributes:
        channels, height, width: The training images' shape, set from the data.
        block_channels: UNet channels per resolution, full resolution first; each level
            after the first halves the (padded) side.
        layers_per_block: ResNet layers per UNet block.
        attention: Self-attention in the UNet's middle block (the lowest resolution, where
            it is cheap and sees the whole image).
        norm_groups: GroupNorm groups; must divide every entry of block_channels.
        timesteps: Diffusion steps T of the training noise schedule.
        beta_schedule: The schedule of the noise variances (diffusers' names).
        epochs, batch_size, learning_rate: The AdamW budget.
        lr_decay: Anneal the learning rate to 0 along a cosine over the run (Loshchilov &
            Hutter 2016, arXiv:1608.03983, without restarts).
        ema_decay: Decay of the exponential moving average of the weights that is kept
            and shipped (Ho et al. 2020, appendix B, use 0.9999); 0 keeps the raw weights.
    """

    channels: int = 1
    height: int = 8
    width: int = 8
    block_channels: tuple[int, ...] = (32, 48)
    layers_per_block: int = 1
    attention: bool = True
    norm_groups: int = 8
    timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    epochs: int = 120
    batch_size: int = 64
    learning_rate: float = 1e-3
    # No weight averaging by default: with the ~2400 steps of the digits budget, an average
    # over the last ~1000 steps (0.999) still carries undertrained weights and measured
    # worse (0.64 confident samples against 0.78 at 60 epochs, bench/zoo_images.py).
    ema_decay: float = 0.0
    lr_decay: bool = True


# field -> (low, high), inclusive; a tuple field bounds each of its entries.
DIFFUSION_RANGES: dict[str, tuple[float, float]] = {
    "block_channels": (8, 256),
    "layers_per_block": (1, 4),
    "norm_groups": (1, 32),
    "timesteps": (10, 4000),
    "epochs": (1, 10_000),
    "batch_size": (1, 4096),
    "learning_rate": (1e-6, 1.0),
    "ema_decay": (0.0, 0.99999),
}


# ----------------------------------------------------------------------------- tabular

# Filled from the table; an override would not match the data.
TABULAR_DERIVED = ("columns", "means", "stds", "minimums", "maximums", "decimals", "categories")


@dataclass
class TabularConfig:
    """Hyperparameters and the column schema; defaults are the full training budget."""

    condition_columns: list[str] = field(default_factory=list)
    # Column -> "numeric" | "categorical"; overrides name some columns, the data the rest.
    column_types: dict[str, str] = field(default_factory=dict)
    latent_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    epochs: int = 300
    batch_size: int = 64
    learning_rate: float = 2e-3
    condition_dropout: float = 0.5
    kl_weight: float = 1.0
    # Data-derived schema, keyed by column name.
    columns: list[str] = field(default_factory=list)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    minimums: dict[str, float] = field(default_factory=dict)
    maximums: dict[str, float] = field(default_factory=dict)
    decimals: dict[str, int] = field(default_factory=dict)  # -1: integer column
    categories: dict[str, list[str]] = field(default_factory=dict)

    @property
    def numeric(self) -> list[str]:
        return [c for c in self.columns if self.column_types[c] == "numeric"]

    @property
    def categorical(self) -> list[str]:
        return [c for c in self.columns if self.column_types[c] == "categorical"]


TABULAR_RANGES: dict[str, tuple[float, float]] = {
    "latent_size": (1, 1024),
    "hidden_size": (4, 8192),
    "num_layers": (1, 8),
    "epochs": (1, 100_000),
    "batch_size": (1, 65_536),
    "learning_rate": (1e-6, 1.0),
    "condition_dropout": (0.0, 1.0),
    "kl_weight": (0.0, 100.0),
}


# ----------------------------------------------------------------------------- autoencoder

# Filled from the images; an override would not match the data.
AUTOENCODER_DERIVED = ("channels", "height", "width")


@dataclass
class AutoencoderConfig:
    """Hyperparameters; the defaults are the full training budget that ships."""

    hidden_size: int = 256
    latent_size: int = 16
    noise_std: float = 0.2  # Gaussian corruption, in pixel units
    mask_fraction: float = 0.25  # share of pixels zeroed by the corruption
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 2e-3
    threshold_quantile: float = 0.99
    channels: int = 0
    height: int = 0
    width: int = 0


AUTOENCODER_RANGES: dict[str, tuple[float, float]] = {
    "hidden_size": (4, 8192),
    "latent_size": (1, 4096),
    "noise_std": (0.0, 1.0),
    "mask_fraction": (0.0, 0.95),
    "epochs": (1, 100_000),
    "batch_size": (1, 65_536),
    "learning_rate": (1e-6, 1.0),
    "threshold_quantile": (0.5, 1.0),
}


@dataclass(frozen=True)
class Spec:
    """How one family's overrides are checked.

    Attributes:
        config: The config dataclass.
        derived: Fields set from the training data; an override would not match it.
        ranges: Field -> inclusive (low, high); a tuple field bounds each of its entries.
        choices: Field -> the strings it may take.
    """

    config: type
    derived: Collection[str]
    ranges: Mapping[str, tuple[float, float]]
    choices: Mapping[str, Collection[str]] = field(default_factory=dict)


SPECS: dict[str, Spec] = {
    "char_rnn": Spec(CharRNNConfig, CHAR_RNN_DERIVED, CHAR_RNN_RANGES, {"cell": CELLS}),
    "vae": Spec(VAEConfig, VAE_DERIVED, VAE_RANGES),
    "gan": Spec(GANConfig, GAN_DERIVED, GAN_RANGES),
    "diffusion": Spec(
        DiffusionConfig, DIFFUSION_DERIVED, DIFFUSION_RANGES, {"beta_schedule": BETA_SCHEDULES}
    ),
    "tabular": Spec(TabularConfig, TABULAR_DERIVED, TABULAR_RANGES),
    "autoencoder": Spec(AutoencoderConfig, AUTOENCODER_DERIVED, AUTOENCODER_RANGES),
}


def check(arch: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A user's config overrides for `arch`, checked field by field.

    Each key must be a field the data does not decide. A field with a range takes a number
    of its default's type within the bounds (an integral float such as 3.0 counts as an
    integer, as it does in JSON), or, when the default is a tuple, a list of such numbers;
    a field whose default is a bool takes a bool; a field with choices takes one of them.
    The family checks its other fields (tabular's column lists) with the data.

    Returns:
        The overrides with numbers converted to the field's type and lists to tuples.

    Raises:
        ValueError: Names the key, the value and what it must be.
    """
    spec = SPECS.get(arch)
    if spec is None:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(SPECS)}")
    defaults = {f.name: getattr(spec.config, f.name, None) for f in fields(spec.config)}
    known = sorted(name for name in defaults if name not in spec.derived)
    checked: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in spec.derived:
            raise ValueError(f"{arch} config key {key!r} is set from the data")
        if key not in defaults:
            raise ValueError(f"unknown config key {key!r} for {arch}; known: {known}")
        default, bounds = defaults[key], spec.ranges.get(key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{arch} config {key!r} must be true or false, got {value!r}")
        elif key in spec.choices:
            if value not in spec.choices[key]:
                raise ValueError(
                    f"{arch} config {key!r}={value!r} must be one of {list(spec.choices[key])}"
                )
        elif bounds is not None and isinstance(default, tuple):
            if not isinstance(value, list | tuple):
                raise ValueError(f"{arch} config {key!r} must be a list, got {value!r}")
            value = tuple(_number(arch, key, v, type(default[0]), bounds) for v in value)
        elif bounds is not None:
            value = _number(arch, key, value, type(default), bounds)
        checked[key] = value
    return checked


def _number(arch: str, key: str, value: Any, kind: type, bounds: tuple[float, float]) -> Any:
    """`value` as `kind` (int or float) if it is such a number within `bounds`."""
    want_int = kind is int
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or (want_int and not float(value).is_integer()):
        what = "an integer" if want_int else "a number"
        raise ValueError(f"{arch} config {key!r} must be {what}, got {value!r}")
    low, high = bounds
    if not low <= value <= high:
        raise ValueError(f"{arch} config {key!r}={value!r} is out of range [{low}, {high}]")
    return int(value) if want_int else float(value)
