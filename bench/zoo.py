"""Train every classic family from scratch and measure what it makes.

    python -m bench.zoo [--quick] [--only vae,gan] [--save models/checkpoints] [--json]

Each family trains through models.backends.classic.train, the code a training job runs,
on data that ships with the installed packages (scikit-learn's 8x8 digits and tables,
the text of Python's own documentation). The image models are judged by a digit
classifier trained on the real digits (confident fraction, smallest class share, Fréchet
distance on its features); the char-RNN against a unigram model; the autoencoder by
AUROC against noise and shuffled digits; the tabular generator by its columns' means
and correlations. --save writes the trained checkpoints that genserve ships.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import zoo_images, zoo_misc
from models.backends import classic

# name in the JSON -> (evaluation, shipped checkpoint name, targets: metric -> (op, bound)).
FAMILIES: dict[str, tuple[Callable[..., Any], str, dict[str, tuple[str, float]]]] = {
    "vae": (
        zoo_images.evaluate_vae,
        "digits-vae",
        {"confident_fraction": (">=", 0.80), "min_class_fraction": (">=", 0.03)},
    ),
    "gan": (
        zoo_images.evaluate_gan,
        "digits-gan",
        {"confident_fraction": (">=", 0.80), "min_class_fraction": (">=", 0.03)},
    ),
    "diffusion": (
        zoo_images.evaluate_diffusion,
        "digits-diffusion",
        {"confident_fraction": (">=", 0.80), "min_class_fraction": (">=", 0.03)},
    ),
    "rnn": (zoo_misc.evaluate_rnn, "pydoc-char-rnn", {}),
    "autoencoder": (
        zoo_misc.evaluate_autoencoder,
        "digits-autoencoder",
        {"auroc_noise": (">=", 0.95), "auroc_shuffled": (">=", 0.95)},
    ),
    "tabular": (
        zoo_misc.evaluate_tabular,
        "diabetes-tabular",
        {"max_mean_rel_err": ("<=", 0.10), "max_corr_abs_err": ("<=", 0.10)},
    ),
}


def _meets(metrics: dict[str, float], family: str) -> bool:
    targets = dict(FAMILIES[family][2])
    if family == "rnn":
        return metrics["val_loss"] <= 0.70 * metrics["unigram_loss"]
    return all(
        metrics[name] >= bound if op == ">=" else metrics[name] <= bound
        for name, (op, bound) in targets.items()
    )


def _save(family: str, trained: classic.Trained, metrics: dict[str, Any], folder: Path) -> Path:
    """The checkpoint genserve ships: the family's own metrics plus the bench's."""
    name = FAMILIES[family][1]
    trained.metrics = {**trained.metrics, **metrics}
    path = folder / f"{name}.safetensors"
    classic.save(trained, path, extra={"name": name, "trained_by": "bench.zoo"})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small budgets (about 3 minutes)")
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--save", type=Path, help="write the trained checkpoints to this folder")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = [f for f in args.only.split(",") if f] or list(FAMILIES)
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {list(FAMILIES)}")

    results: dict[str, Any] = {}
    started = time.perf_counter()
    for family in chosen:
        evaluate = FAMILIES[family][0]
        metrics, trained = evaluate(quick=args.quick, seed=args.seed)
        metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        metrics["meets_target"] = _meets(metrics, family)
        results[family] = metrics
        if args.save:
            path = _save(family, trained, metrics, args.save)
            metrics["checkpoint_bytes"] = path.stat().st_size
        if not args.json:
            print(f"{family:12s} {json.dumps(metrics)}", flush=True)
    total_s = time.perf_counter() - started
    if not args.json:
        print(
            f"\n{'quick' if args.quick else 'full'} run: {total_s:.0f} s on "
            f"{platform.processor() or platform.machine()}, torch threads {args.threads}"
        )
    print(json.dumps({**results, "quick": args.quick, "total_s": round(total_s, 1)}))
    return 0 if all(r["meets_target"] for r in results.values()) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
