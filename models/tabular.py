"""Conditional VAE for synthetic tabular rows with numeric and categorical columns.

A column is numeric when every training value parses as a finite float, else categorical
(`column_types` overrides). Numbers are standardised, categories one-hot. The decoder
gives means for the numbers with Gaussian noise N(0, L L^T), L learned and shared by all
rows (a full-covariance form of the calibrated decoder of Rybkin et al. 2021), and logits
for the categories, sampled from their softmax. Latents are drawn from a Gaussian fitted
to the aggregate posterior after training (Ghosh et al. 2020, ex-post density
estimation), not from N(0, I), which it rarely matches.

Each column in `condition_columns` enters encoder and decoder as its encoding plus a
"given" bit; training drops each condition with probability `condition_dropout`, so one
model samples with any subset of them given. Given values are copied into the rows.
Numbers are clipped to the training range (as SDV's `enforce_min_max_values`) and
rounded to the column's decimals; all-integer columns stay integers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import configs
from models.backends import classic
from models.configs import TabularConfig

MAX_CATEGORIES = 1000
MAX_DECIMALS = 6


def _mlp(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [nn.Linear(inputs if i == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*modules, nn.Linear(hidden, outputs))


def _condition_widths(config: TabularConfig) -> list[int]:
    # Per condition column: its one-hot (or one number), then the "given" bit.
    return [len(config.categories.get(c, [0])) + 1 for c in config.condition_columns]


class TabularCVAE(nn.Module):
    """Encoder q(z | x, c), decoder p(x | z, c) with a learned noise scale per number."""

    def __init__(self, config: TabularConfig) -> None:
        super().__init__()
        self.config = config
        self.num_numeric = len(config.numeric)
        self.category_sizes = [len(config.categories[c]) for c in config.categorical]
        features = self.num_numeric + sum(self.category_sizes)
        conditions = sum(_condition_widths(config))
        size, layers = config.hidden_size, config.num_layers
        self.encoder = _mlp(features + conditions, size, layers, 2 * config.latent_size)
        self.decoder = _mlp(config.latent_size + conditions, size, layers, features)
        # Shared noise N(0, L L^T): residual correlations the latent misses survive.
        self.log_sigma = nn.Parameter(torch.zeros(self.num_numeric))
        self.noise_tril = nn.Parameter(torch.zeros(self.num_numeric, self.num_numeric))
        # The latent Gaussian fitted after training (see the module docstring).
        self.register_buffer("latent_mean", torch.zeros(config.latent_size))
        self.register_buffer("latent_tril", torch.eye(config.latent_size))

    def noise_scale(self) -> torch.Tensor:
        """L (numeric, numeric): lower-triangular with a positive diagonal."""
        diagonal = self.log_sigma.clamp(min=math.log(1e-3)).exp()
        return self.noise_tril.tril(-1) + torch.diag(diagonal)

    def decode(
        self, z: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, latent), (B, cond) -> numeric means (B, num_numeric) and logits per category."""
        out = self.decoder(torch.cat([z, cond], dim=1))
        means, logits = out.split([self.num_numeric, sum(self.category_sizes)], dim=1)
        return means, list(logits.split(self.category_sizes, dim=1))

    def loss(self, x: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Per-row negative ELBO (nats), mean over the batch; z = mu when `noise` is None."""
        mu, log_var = self.encoder(torch.cat([x, cond], dim=1)).chunk(2, dim=1)
        z = mu if noise is None else mu + noise * (0.5 * log_var).exp()
        means, logits = self.decode(z, cond)
        numbers, codes = x[:, : self.num_numeric], x[:, self.num_numeric :]
        # Gaussian NLL under N(means, L L^T), constants included so it reads as nats.
        scale = self.noise_scale()
        white = torch.linalg.solve_triangular(scale, (numbers - means).T, upper=False)
        log_det = scale.diagonal().log().sum()
        recon = (
            0.5 * (white**2).sum(dim=0) + log_det + 0.5 * self.num_numeric * math.log(2 * math.pi)
        )
        for part, code in zip(logits, codes.split(self.category_sizes, dim=1), strict=True):
            recon = recon + F.cross_entropy(part, code.argmax(dim=1), reduction="none")
        kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(dim=1)
        return (recon + self.config.kl_weight * kl).mean()


def _encode_rows(config: TabularConfig, rows: list[tuple[str, ...]]) -> torch.Tensor:
    """Rows of strings -> float32 (N, features): standardised numbers, then one-hots."""
    index = {c: i for i, c in enumerate(config.columns)}
    parts = []
    for c in config.numeric:
        values = torch.tensor([float(r[index[c]]) for r in rows], dtype=torch.float64)
        parts.append(((values - config.means[c]) / config.stds[c]).float()[:, None])
    for c in config.categorical:
        position = {v: i for i, v in enumerate(config.categories[c])}
        codes = torch.tensor([position[r[index[c]]] for r in rows])
        parts.append(F.one_hot(codes, len(position)).float())
    return torch.cat(parts, dim=1)


def _encode_conditions(config: TabularConfig, given: list[dict[str, float | str]]) -> torch.Tensor:
    """Per row, the condition values given -> float32 (N, condition size); absent ones zero."""
    blocks = [torch.zeros(len(given), 0)]
    for c, width in zip(config.condition_columns, _condition_widths(config), strict=True):
        block, cats = torch.zeros(len(given), width), config.categories.get(c)
        for i, row in ((i, row) for i, row in enumerate(given) if c in row):
            block[i, -1] = 1.0
            if cats:
                block[i, cats.index(str(row[c]))] = 1.0
            else:
                block[i, 0] = (float(row[c]) - config.means[c]) / config.stds[c]
        blocks.append(block)
    return torch.cat(blocks, dim=1)


def training_step(
    model: TabularCVAE,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    cond: torch.Tensor,
    noise: torch.Tensor,
) -> float:
    """One optimiser step on a batch.

    Args:
        model: The CVAE, in train mode.
        optimizer: Its optimiser.
        x: float32 (B, features) encoded rows.
        cond: float32 (B, condition size), some conditions already dropped.
        noise: float32 (B, latent) standard normal draws for the reparameterisation.

    Returns:
        The batch's negative ELBO in nats per row.
    """
    loss = model.loss(x, cond, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.inference_mode()
def sample(
    model: TabularCVAE, n: int, conditions: Mapping[str, float | str], generator: torch.Generator
) -> list[tuple[str, ...]]:
    """Draw `n` rows, each with `conditions` (already validated) given.

    Args:
        model: The CVAE (its device is used).
        n: Number of rows.
        conditions: Column -> value for some of `condition_columns`.
        generator: CPU generator for every draw.

    Returns:
        Rows of strings in the training column order.
    """
    config, device = model.config, next(model.parameters()).device
    model.eval()
    cond = _encode_conditions(config, [dict(conditions)] * n).to(device)
    z = torch.randn(n, config.latent_size, generator=generator)
    z = (model.latent_mean.cpu() + z @ model.latent_tril.cpu().T).to(device)
    means, logits = model.decode(z, cond)
    noise = torch.randn(means.shape, generator=generator) @ model.noise_scale().float().cpu().T
    numbers = means.float().cpu() + noise
    values: dict[str, list[str]] = {}
    for j, c in enumerate(config.numeric):
        column = numbers[:, j].double() * config.stds[c] + config.means[c]
        column = column.clamp(config.minimums[c], config.maximums[c])
        values[c] = [_format(float(v), config.decimals[c]) for v in column]
    for part, c in zip(logits, config.categorical, strict=True):
        probs = torch.softmax(part.float().cpu(), dim=1)
        picks = torch.multinomial(probs, 1, generator=generator)[:, 0]
        values[c] = [config.categories[c][i] for i in picks.tolist()]
    for c, value in conditions.items():
        decimals = config.decimals.get(c)
        given = str(value) if decimals is None else _format(float(value), decimals)
        values[c] = [given] * n
    return list(zip(*(values[c] for c in config.columns), strict=True))


def _format(value: float, decimals: int) -> str:
    return str(round(value)) if decimals < 0 else f"{value:.{decimals}f}"


def _parse_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _decimals(texts: list[str]) -> int:
    """-1 when every value is a whole number, else the most digits after a point seen."""
    if all(float(t).is_integer() for t in texts):
        return -1
    digits = (MAX_DECIMALS if "e" in t.lower() else len(t.partition(".")[2]) for t in texts)
    return min(max(digits), MAX_DECIMALS)


def _schema(config: TabularConfig, table: classic.Table) -> None:
    """Fill the data-derived fields of `config` from `table`."""
    overrides = dict(config.column_types)
    config.columns, config.column_types = list(table.columns), {}
    for i, c in enumerate(table.columns):
        texts = [row[i] for row in table.rows]
        parsed = [_parse_float(t) for t in texts]
        numeric = all(v is not None for v in parsed)
        wanted = overrides.get(c, "numeric" if numeric else "categorical")
        if wanted == "numeric" and not numeric:
            bad = next(t for t, v in zip(texts, parsed, strict=True) if v is None)
            raise ValueError(f"column_types[{c!r}] is 'numeric' but it holds {bad!r}")
        config.column_types[c] = wanted
        if wanted == "categorical":
            config.categories[c] = sorted(set(texts))
            if len(config.categories[c]) > MAX_CATEGORIES:
                raise ValueError(
                    f"categorical column {c!r} has {len(config.categories[c])} distinct values "
                    f"(at most {MAX_CATEGORIES}); drop it or set column_types[{c!r}]='numeric'"
                )
            continue
        values = torch.tensor(parsed, dtype=torch.float64)
        std = float(values.std(unbiased=False))
        config.means[c], config.stds[c] = float(values.mean()), std if std > 0 else 1.0
        config.minimums[c], config.maximums[c] = float(values.min()), float(values.max())
        config.decimals[c] = _decimals(texts)


def _check_columns(config: TabularConfig, columns: tuple[str, ...]) -> None:
    """ValueError for condition_columns or column_types naming unknown columns or types."""
    names, types = config.condition_columns, config.column_types
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise ValueError(f"tabular config 'condition_columns' must be a list of names: {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"tabular config 'condition_columns' must list distinct columns: {names}")
    if not isinstance(types, dict):
        raise ValueError(f"tabular config 'column_types' must be a mapping: {types!r}")
    for c in [*names, *types]:
        if c not in columns:
            raise ValueError(f"config names column {c!r}, not in the table; columns: {columns}")
    for c, kind in types.items():
        if kind not in ("numeric", "categorical"):
            raise ValueError(f"column_types[{c!r}]={kind!r} must be 'numeric' or 'categorical'")


def _conditions(config: TabularConfig, conditions: Any) -> dict[str, float | str]:
    """Validated request conditions: a column of condition_columns -> a value it can take."""
    if not isinstance(conditions, Mapping):
        raise ValueError(f"request 'conditions' must be a mapping, got {conditions!r}")
    checked: dict[str, float | str] = {}
    for c, value in conditions.items():
        if c not in config.condition_columns:
            raise ValueError(
                f"conditions[{c!r}]: not a condition column; known: {config.condition_columns}"
            )
        if config.column_types[c] == "categorical":
            text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if text not in config.categories[c]:
                raise ValueError(
                    f"conditions[{c!r}]={value!r} is not a known category: {config.categories[c]}"
                )
            checked[c] = text
            continue
        number = None if isinstance(value, bool) else _parse_float(str(value))
        if number is None:
            raise ValueError(f"conditions[{c!r}]={value!r} must be a number (numeric column)")
        checked[c] = number
    return checked


class TabularFamily:
    """The `classic.Family` of conditional tabular generators."""

    name = "tabular"
    data_kind: classic.DataKind = "table"
    tasks = frozenset({"rows"})

    def make_config(self, overrides: Mapping[str, Any], data: classic.Data) -> TabularConfig:
        if not isinstance(data, classic.Table):
            raise ValueError(f"tabular trains on a table, got {type(data).__name__}")
        values = configs.check(self.name, overrides)
        config = TabularConfig(**values)
        _check_columns(config, data.columns)
        _schema(config, data)
        return config

    def config_from_dict(self, values: Mapping[str, Any]) -> TabularConfig:
        return TabularConfig(**values)

    def build(self, config: TabularConfig) -> TabularCVAE:
        return TabularCVAE(config)

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
        assert isinstance(model, TabularCVAE) and isinstance(train, classic.Table)
        assert isinstance(val, classic.Table)
        x, cond = _encoded(config, train, device)
        val_x, val_cond = _encoded(config, val, device)
        # Which slots belong to which condition column, to drop them together.
        widths = torch.tensor(_condition_widths(config), dtype=torch.long)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        # No autocast on CUDA: these MLPs are tiny and bf16 would coarsen standardised values.
        step, train_loss, val_loss = 0, math.nan, math.nan
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(x.shape[0], generator=generator).to(device)
            losses = []
            for batch in order.split(config.batch_size):
                if should_stop():
                    raise classic.Stopped
                keep = torch.rand(len(batch), len(widths), generator=generator)
                mask = (keep >= config.condition_dropout).float().repeat_interleave(widths, dim=1)
                noise = torch.randn(len(batch), config.latent_size, generator=generator)
                masked, noise = cond[batch] * mask.to(device), noise.to(device)
                losses.append(training_step(model, optimizer, x[batch], masked, noise))
                step += 1
            train_loss = sum(losses) / len(losses)
            model.eval()
            with torch.no_grad():
                val_loss = float(model.loss(val_x, val_cond, None))
            report(classic.Progress(epoch, step, {"train_loss": train_loss}, val_loss))
        # Conditions hidden, as for rows sampled without any.
        _fit_latent(model, x, cond * 0)
        return {"train_loss": train_loss, "val_loss": val_loss}

    def sample(
        self,
        model: nn.Module,
        config: Any,
        request: Mapping[str, Any],
        *,
        device: str,
        generator: torch.Generator,
    ) -> classic.Sampled:
        assert isinstance(model, TabularCVAE)
        if request.get("task", "rows") != "rows":
            raise ValueError(f"tabular request 'task' must be 'rows', got {request['task']!r}")
        n = 1 if request.get("n") is None else request["n"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000:
            raise ValueError(f"request 'n'={n!r} must be an integer in [1, 10000]")
        conditions = _conditions(config, request.get("conditions") or {})
        rows = sample(model, n, conditions, generator)
        table = classic.Table(columns=tuple(config.columns), rows=rows)
        return classic.Sampled(table=table, meta={"conditions": conditions})


@torch.no_grad()
def _fit_latent(model: TabularCVAE, x: torch.Tensor, cond: torch.Tensor) -> None:
    """Set the latent buffers to the mean and covariance of the aggregate posterior."""
    mu, log_var = model.encoder(torch.cat([x, cond], dim=1)).float().chunk(2, dim=1)
    centred = mu - mu.mean(dim=0)
    covariance = centred.T @ centred / len(mu) + torch.diag(log_var.exp().mean(dim=0) + 1e-6)
    model.latent_mean.copy_(mu.mean(dim=0))
    model.latent_tril.copy_(torch.linalg.cholesky(covariance))


def _encoded(
    config: TabularConfig, table: classic.Table, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A table's rows and all-given conditions as tensors on `device`."""
    index = {c: i for i, c in enumerate(config.columns)}
    given = [{c: row[index[c]] for c in config.condition_columns} for row in table.rows]
    return _encode_rows(config, table.rows).to(device), _encode_conditions(config, given).to(device)


FAMILY = TabularFamily()
