"""Scores of an output against its reference, and their aggregates over a run.

Text is compared after SQuAD's normalisation (Rajpurkar et al. 2016, the official v1.1
evaluation script): lowercase, ASCII punctuation removed, the articles a/an/the removed,
whitespace collapsed. exact_match and token_f1 are that script's; rouge_l is the
F-measure (beta 1) of the longest common subsequence of the normalised tokens (Lin 2004,
section 3.1). cosine compares two embeddings. Plain Python and numpy only.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("exact_match", "token_f1", "rouge_l", "cosine")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's normalize_answer: lowercase, no punctuation or articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


def _f_measure(overlap: int, predicted: int, expected: int) -> float:
    """F1 of `overlap` tokens in common; two empty texts agree, one empty agrees with none."""
    if predicted == 0 or expected == 0:
        return float(predicted == expected)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / expected
    return 2 * precision * recall / (precision + recall)


def token_f1(output: str, reference: str) -> float:
    """F1 of the bags of normalised tokens (shared tokens counted with multiplicity)."""
    predicted, expected = tokens(output), tokens(reference)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    return _f_measure(overlap, len(predicted), len(expected))


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming on one row."""
    if len(second) > len(first):
        first, second = second, first
    row = [0] * (len(second) + 1)
    for item in first:
        diagonal = 0  # row[j - 1] of the previous line
        for j, other in enumerate(second, 1):
            above = row[j]
            row[j] = diagonal + 1 if item == other else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure over the normalised tokens."""
    predicted, expected = tokens(output), tokens(reference)
    return _f_measure(lcs_length(predicted, expected), len(predicted), len(expected))


def cosine(first: Any, second: Any) -> float:
    """Cosine similarity of two vectors, in [-1, 1]; 0.0 when either is all zeros."""
    a = np.asarray(first, dtype=np.float64).ravel()
    b = np.asarray(second, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"vectors of different sizes: {a.shape[0]} and {b.shape[0]}")
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0:
        return 0.0
    return float(np.clip(np.dot(a, b) / norms, -1.0, 1.0))  # rounding may pass 1 by an ulp


def text_scores(output: str, reference: str) -> dict[str, float]:
    """exact_match, token_f1 and rouge_l of an output against its reference."""
    return {
        "exact_match": exact_match(output, reference),
        "token_f1": token_f1(output, reference),
        "rouge_l": rouge_l(output, reference),
    }


def aggregate(results: Iterable[Mapping[str, float | None] | None]) -> dict[str, Any]:
    """Counts and the mean of each score over a run's results.

    Each result is an item's scores, or None for an item that failed. Means are over
    the scored items (None when there are none); failed items are counted, not averaged
    in as zeros, so compare runs on their `failed` counts as well.
    """
    items = scored = 0
    sums = dict.fromkeys(METRICS, 0.0)
    counts = dict.fromkeys(METRICS, 0)
    for scores in results:
        items += 1
        if scores is None:
            continue
        scored += 1
        for name in METRICS:
            value = scores.get(name)
            if value is not None:
                sums[name] += value
                counts[name] += 1
    means = {name: sums[name] / counts[name] if counts[name] else None for name in METRICS}
    return {"items": items, "scored": scored, "failed": items - scored, "means": means}


def _difference(first: float | None, second: float | None) -> float | None:
    return None if first is None or second is None else second - first


def deltas(
    first: Mapping[str, float | None] | None, second: Mapping[str, float | None] | None
) -> dict[str, float | None]:
    """second minus first for each score; None where either lacks it."""
    first, second = first or {}, second or {}
    return {name: _difference(first.get(name), second.get(name)) for name in METRICS}
