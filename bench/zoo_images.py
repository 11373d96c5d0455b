"""Image families of the model zoo (VAE, GAN, diffusion) scored on scikit-learn's digits.

Each `evaluate_*` trains its family exactly as the service does (the training digits
packed into an .npz, parsed by `classic.parse_dataset`, trained by `classic.train`),
draws 1000 samples through `classic.sample`, and scores them with a small CNN digit
classifier trained here on the same real training digits:

- confident_fraction: share of samples whose top class probability is >= 0.9;
- min_class_fraction: share of the rarest of the 10 predicted classes (mode coverage);
- fd: Fréchet distance (Heusel et al. 2017) between the classifier's penultimate-layer
  features of the samples and of the held-out real test digits;
- train_s: seconds spent in `classic.train` (and train_cpu_s, its CPU seconds, which
  with one thread is what train_s would be on an otherwise idle machine).

The test split and the classifier are fixed (seed 0) so that figures of different model
seeds are measured with the same instrument; `seed` drives training and sampling.

    .venv/bin/python -m bench.zoo_images vae --quick --threads 1
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from models.backends import classic

SAMPLES = 1000
TEST_FRACTION = 0.2
CONFIDENT = 0.9
SPLIT_SEED = 0
QUICK = {
    "vae": {"epochs": 40},
    "gan": {"epochs": 30},
    "diffusion": {"epochs": 12},
}


@cache
def digit_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits (N, 8, 8) in 0-16 and labels, split into train and test (seeded)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    n_test = int(len(images) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return images[train], digits.target[train], images[test], digits.target[test]


class DigitClassifier(nn.Module):
    """Two conv layers and a 128-unit hidden layer whose activations are the FD features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(128, 10))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return features, self.head(features)


@cache
def classifier() -> tuple[DigitClassifier, float]:
    """The classifier trained on the real training digits, and its test accuracy."""
    train_x, train_y, test_x, test_y = digit_splits()
    images = torch.from_numpy(train_x / 16.0)[:, None]
    labels = torch.from_numpy(train_y).long()
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    torch.manual_seed(SPLIT_SEED)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(20):
        model.train()
        for index in torch.randperm(len(images), generator=generator).split(64):
            _, logits = model(images[index])
            loss = nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    probabilities, _ = classify(model, torch.from_numpy(test_x / 16.0)[:, None])
    accuracy = float((probabilities.argmax(1) == test_y).mean())
    return model, accuracy


def classify(model: DigitClassifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) in [0, 1] -> class probabilities (N, 10), features (N, 128)."""
    with torch.inference_mode():
        features, logits = model(images.float())
    return logits.softmax(1).numpy(), features.numpy().astype(np.float64)


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two feature sets."""
    mean_1, mean_2 = first.mean(0), second.mean(0)
    # A small ridge: dead ReLU units make the covariances singular, and sqrtm then warns.
    ridge = 1e-6 * np.eye(first.shape[1])
    cov_1, cov_2 = np.cov(first, rowvar=False) + ridge, np.cov(second, rowvar=False) + ridge
    root = scipy.linalg.sqrtm(cov_1 @ cov_2)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mean_1 - mean_2) ** 2).sum() + np.trace(cov_1 + cov_2 - 2 * root))


def training_data() -> torch.Tensor:
    """The training digits as the service would receive them: an uploaded .npz, parsed."""
    train_x, *_ = digit_splits()
    buffer = io.BytesIO()
    # Floats in [0, 1], as parse_dataset requires of non-uint8 pixels (digits are 0-16).
    np.savez(buffer, images=train_x / 16.0)
    data = classic.parse_dataset("images", "digits.npz", buffer.getvalue())
    assert isinstance(data, torch.Tensor)
    return data


def score(images: np.ndarray) -> dict[str, float]:
    """The figures of uint8 samples (N, 8, 8) against the held-out real digits."""
    model, accuracy = classifier()
    *_, test_x, _ = digit_splits()
    probabilities, features = classify(model, torch.from_numpy(images / 255.0)[:, None])
    _, real_features = classify(model, torch.from_numpy(test_x / 16.0)[:, None])
    counts = np.bincount(probabilities.argmax(1), minlength=10)
    return {
        "confident_fraction": float((probabilities.max(1) >= CONFIDENT).mean()),
        "min_class_fraction": float(counts.min() / len(images)),
        "fd": frechet_distance(features, real_features),
        "classifier_accuracy": accuracy,
    }


def evaluate(
    arch: str, *, quick: bool, seed: int = 0, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, float], classic.Trained]:
    """Train `arch` on the digits (quick or full budget), sample 1000 images, score them."""
    classifier()  # trained before the clock starts
    chosen = {**(QUICK[arch] if quick else {}), **(overrides or {})}
    data = training_data()
    started, cpu_started = time.perf_counter(), time.process_time()
    trained = classic.train(arch, chosen, data, device="cpu", seed=seed, report=lambda p: None)
    train_s = time.perf_counter() - started
    # CPU seconds: with one thread, what train_s would be on an idle machine.
    train_cpu_s = time.process_time() - cpu_started
    batches, per_call = [], 250
    for index in range(SAMPLES // per_call):
        request = {"task": "images", "n": per_call}
        batches.append(classic.sample(trained, request, seed=seed * 1000 + index).images)
    figures = score(np.concatenate(batches))
    figures["train_s"] = train_s
    figures["train_cpu_s"] = train_cpu_s
    figures["sample_s"] = time.perf_counter() - started - train_s
    figures["val_loss"] = trained.metrics.get("val_loss", float("nan"))
    return figures, trained


def evaluate_vae(*, quick: bool, seed: int = 0) -> tuple[dict[str, float], classic.Trained]:
    """The VAE on the digits; see `evaluate`."""
    return evaluate("vae", quick=quick, seed=seed)


def evaluate_gan(*, quick: bool, seed: int = 0) -> tuple[dict[str, float], classic.Trained]:
    """The GAN on the digits; see `evaluate`."""
    return evaluate("gan", quick=quick, seed=seed)


def evaluate_diffusion(*, quick: bool, seed: int = 0) -> tuple[dict[str, float], classic.Trained]:
    """DDPM on the digits, sampled with DDIM; see `evaluate`."""
    return evaluate("diffusion", quick=quick, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(QUICK))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", default="{}", help="JSON config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures, _ = evaluate(
        args.arch, quick=args.quick, seed=args.seed, overrides=json.loads(args.set)
    )
    print(json.dumps({"arch": args.arch, "quick": args.quick, "threads": args.threads, **figures}))


if __name__ == "__main__":
    main()
