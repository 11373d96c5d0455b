"""Quality checks of the char_rnn, tabular and autoencoder families, for bench/zoo.py.

Each function builds its dataset as file bytes, goes through `classic.parse_dataset` and
`classic.train` exactly as the service does, measures the trained model and returns
(metrics, trained). `quick` trains with small overrides (a smoke run); without it the
config defaults, which are the budget that ships, are used.

- rnn: the English text of Python's own documentation (`pydoc_data.topics`, part of the
  stdlib), a fixed 250 kB slice. val_loss is the model's cross-entropy (nats/char) on the
  held-out tail that `classic.train` keeps for validation; unigram_loss is the add-one
  smoothed unigram model of the training part on the same tail. Target (full):
  val_loss <= 0.70 * unigram_loss.
- tabular: scikit-learn's diabetes table, unscaled (442 rows: age, sex, bmi, bp, s1-s6,
  target; every mean far from zero), with `sex` (1 or 2) declared categorical and the
  condition column. 5000 sampled rows against the real table: max_mean_rel_err over the
  numeric columns and max_corr_abs_err over their pairs (targets <= 0.10), and
  condition_honoured, the share of rows sampled with sex=1 that have it.
- autoencoder: scikit-learn's 8x8 digits, 20% held out by seed; held-out digits scored
  against uniform noise images and against themselves with their pixels shuffled;
  auroc_noise and auroc_shuffled (targets >= 0.95).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from models.backends import classic

Report = Callable[[classic.Progress], None]
TEXT_CHARS = 250_000
TABLE_SAMPLES = 5000


def _train(
    arch: str, overrides: dict, filename: str, payload: bytes, seed: int, report: Report | None
) -> tuple[classic.Trained, float]:
    family = classic.family(arch)
    data = classic.parse_dataset(family.data_kind, filename, payload)
    started = time.perf_counter()
    trained = classic.train(
        arch, overrides, data, device="cpu", seed=seed, report=report or (lambda progress: None)
    )
    return trained, time.perf_counter() - started


def evaluate_rnn(
    *, quick: bool, seed: int = 0, report: Report | None = None
) -> tuple[dict, classic.Trained]:
    """char_rnn on Python's documentation text.

    Returns:
        ({"val_loss", "unigram_loss", "train_s"}, trained), losses in nats per character.
    """
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics.values())[:TEXT_CHARS]
    overrides = {"epochs": 2, "steps_per_epoch": 25} if quick else {}
    trained, seconds = _train("char_rnn", overrides, "docs.txt", text.encode(), seed, report)
    # The same tail classic.train held out for validation.
    train_text, val_text = classic.split(text, val_fraction=0.1, seed=seed)
    assert isinstance(train_text, str) and isinstance(val_text, str)
    counts, vocab = Counter(train_text), set(text)
    total = len(train_text) + len(vocab)
    unigram = -sum(math.log((counts[c] + 1) / total) for c in val_text) / len(val_text)
    metrics = {"val_loss": trained.metrics["val_loss"], "unigram_loss": unigram, "train_s": seconds}
    return metrics, trained


def _diabetes_csv() -> bytes:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*bunch.feature_names, "target"])
    for row, target in zip(bunch.data, bunch.target, strict=True):
        writer.writerow([f"{value:g}" for value in (*row, target)])
    return out.getvalue().encode()


def _numbers(table: classic.Table, columns: list[str]) -> np.ndarray:
    index = [table.columns.index(c) for c in columns]
    return np.array([[float(row[i]) for i in index] for row in table.rows])


def evaluate_tabular(
    *, quick: bool, seed: int = 0, report: Report | None = None
) -> tuple[dict, classic.Trained]:
    """tabular on the unscaled diabetes table, conditioned on sex.

    Returns:
        ({"max_mean_rel_err", "max_corr_abs_err", "condition_honoured", "train_s"}, trained).
    """
    overrides: dict = {"condition_columns": ["sex"], "column_types": {"sex": "categorical"}}
    if quick:
        overrides["epochs"] = 60
    payload = _diabetes_csv()
    trained, seconds = _train("tabular", overrides, "diabetes.csv", payload, seed, report)
    real_table = classic.parse_dataset("table", "diabetes.csv", payload)
    assert isinstance(real_table, classic.Table)
    numeric = trained.config.numeric
    sampled = classic.sample(trained, {"task": "rows", "n": TABLE_SAMPLES}, seed=seed)
    assert sampled.table is not None
    real, synthetic = _numbers(real_table, numeric), _numbers(sampled.table, numeric)
    mean_err = np.abs(synthetic.mean(0) - real.mean(0)) / np.abs(real.mean(0))
    corr_err = np.abs(np.corrcoef(synthetic.T) - np.corrcoef(real.T))
    conditioned = classic.sample(
        trained, {"task": "rows", "n": 1000, "conditions": {"sex": "1"}}, seed=seed + 1
    )
    assert conditioned.table is not None
    sex = conditioned.table.columns.index("sex")
    honoured = float(np.mean([row[sex] == "1" for row in conditioned.table.rows]))
    metrics = {
        "max_mean_rel_err": float(mean_err.max()),
        "max_corr_abs_err": float(corr_err.max()),
        "condition_honoured": honoured,
        "train_s": seconds,
    }
    return metrics, trained


def evaluate_autoencoder(
    *, quick: bool, seed: int = 0, report: Report | None = None
) -> tuple[dict, classic.Trained]:
    """autoencoder on scikit-learn digits; held-out digits against noise and shuffles.

    Returns:
        ({"auroc_noise", "auroc_shuffled", "train_s"}, trained).
    """
    from sklearn.datasets import load_digits
    from sklearn.metrics import roc_auc_score

    # (1797, 8, 8), values 0-16, uploaded as floats in [0, 1] (the dataset convention).
    digits = (load_digits().images / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(digits))
    cut = len(digits) // 5
    test, train = digits[order[:cut]], digits[order[cut:]]
    buffer = io.BytesIO()
    np.savez(buffer, images=train)
    overrides = {"epochs": 10} if quick else {}
    trained, seconds = _train(
        "autoencoder", overrides, "digits.npz", buffer.getvalue(), seed, report
    )
    real = torch.from_numpy(test)[:, None]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(real.shape, generator=generator)
    flat = real.flatten(1)
    shuffled = torch.stack(
        [image[torch.randperm(flat.shape[1], generator=generator)] for image in flat]
    )
    shuffled = shuffled.view_as(real)

    def auroc(anomalies: torch.Tensor) -> float:
        scores = classic.sample(
            trained, {"task": "anomaly", "samples": torch.cat([real, anomalies])}
        )
        assert scores.scores is not None
        labels = [0] * len(real) + [1] * len(anomalies)
        return float(roc_auc_score(labels, scores.scores))

    metrics = {"auroc_noise": auroc(noise), "auroc_shuffled": auroc(shuffled), "train_s": seconds}
    return metrics, trained
