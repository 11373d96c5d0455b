"""The checkpoints that ship in models/checkpoints: each loads, samples, and carries the
figures bench/zoo.py measured when it trained them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.zoo import FAMILIES
from models.backends import classic
from service import checkpoints

SHIPPED = {name: family for family, (_, name, _) in FAMILIES.items()}
REQUESTS = {
    "char_rnn": {"task": "text", "prefix": "The ", "max_length": 40, "temperature": 0.8},
    "vae": {"task": "images", "n": 4},
    "gan": {"task": "images", "n": 4},
    "diffusion": {"task": "images", "n": 2, "steps": 10},
    "tabular": {"task": "rows", "n": 5, "conditions": {}},
}


def test_every_zoo_family_ships_a_checkpoint() -> None:
    names = {path.stem for path in checkpoints.BUILTIN_DIR.glob("*.safetensors")}
    assert names == set(SHIPPED)


@pytest.mark.parametrize("path", sorted(checkpoints.BUILTIN_DIR.glob("*.safetensors")), ids=str)
def test_a_shipped_checkpoint_loads_samples_and_met_its_targets(path: Path) -> None:
    header = checkpoints.read_header(path)
    assert header.extra["trained_by"] == "bench.zoo" and header.metrics["meets_target"] is True
    trained = classic.load(path)
    assert trained.arch == header.arch
    if header.arch == "autoencoder":
        # Digits like its training set score below uniform noise.
        from sklearn.datasets import load_digits

        digits = torch.from_numpy(load_digits().images[:50] / 16.0).float()[:, None]
        noise = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        real = classic.sample(trained, {"task": "anomaly", "samples": digits}).scores
        odd = classic.sample(trained, {"task": "anomaly", "samples": noise}).scores
        assert real is not None and odd is not None and len(real) == len(odd) == 50
        assert min(odd) > max(real)
        return
    sampled = classic.sample(trained, REQUESTS[header.arch], seed=1)
    if header.arch == "char_rnn":
        assert sampled.text and len(sampled.text) == 40
    elif header.arch == "tabular":
        assert sampled.table is not None and len(sampled.table.rows) == 5
    else:
        assert sampled.images is not None and sampled.images.shape[1:] == (8, 8)
        assert sampled.images.std() > 10  # not a blank or constant image
