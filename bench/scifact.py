"""BEIR SciFact (../shared/data/scifact) and its all-MiniLM-L6-v2 embeddings, cached.

The retrieval evaluation uses the corpus, the test queries and their judgements; the
index benchmark uses the embeddings of the corpus split into sentences as real vectors
for recall. Embeddings are computed once and kept in .cache/bench (a few minutes on
2 cores the first time).
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "scifact"
CACHE = ROOT / ".cache" / "bench"
EMBEDDING_MODEL = "all-minilm-l6-v2"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class SciFact:
    corpus: list[Document]
    queries: dict[str, str]  # test queries only: id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def report(result: dict, *, as_json: bool) -> None:
    """Print a bench's result as aligned lines, then (for --json) as one JSON line."""
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if as_json:
        print(json.dumps(result))


def data_dir(path: Path | None = None) -> Path:
    directory = path or DATA
    if not (directory / "corpus.jsonl").is_file():
        raise SystemExit(f"SciFact not found in {directory} (expected corpus.jsonl there)")
    return directory


def load(path: Path | None = None) -> SciFact:
    directory = data_dir(path)
    with open(directory / "corpus.jsonl", encoding="utf-8") as handle:
        corpus = [
            Document(row["_id"], row.get("title") or "", row.get("text") or "")
            for row in map(json.loads, handle)
        ]
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(directory / "qrels" / "test.tsv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    with open(directory / "queries.jsonl", encoding="utf-8") as handle:
        queries = {
            row["_id"]: row["text"] for row in map(json.loads, handle) if row["_id"] in qrels
        }
    return SciFact(corpus=corpus, queries=queries, qrels=dict(qrels))


def sentences(corpus: list[Document]) -> list[str]:
    """Titles and abstract sentences: tens of thousands of short real texts (titles first)."""
    texts = [doc.title for doc in corpus if doc.title]
    for doc in corpus:
        texts.extend(part for part in _SENTENCE_END.split(doc.text) if len(part) > 20)
    return texts


def document_texts(corpus: list[Document]) -> list[str]:
    return [f"{doc.title} {doc.text}".strip() for doc in corpus]


def embed(
    texts: list[str], *, name: str, max_seq_length: int | None = None, cache: Path = CACHE
) -> np.ndarray:
    """Unit-norm float32 embeddings of texts, cached under name.

    The texts of one name come from the data in one order, so a cache of more texts of
    that name holds these as its first rows.
    """
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-{EMBEDDING_MODEL}-{len(texts)}.npy"
    for cached in sorted(cache.glob(f"{name}-{EMBEDDING_MODEL}-*.npy")):
        count = cached.stem.rsplit("-", 1)[-1]
        if count.isdigit() and int(count) >= len(texts):
            return np.load(cached, mmap_mode="r")[: len(texts)].copy()
    from models.backends import load_model, select_device
    from models.registry import get_spec

    device, dtype = select_device("cpu")
    embedder = load_model(
        get_spec(EMBEDDING_MODEL), cache_dir=ROOT / ".cache" / "models", device=device, dtype=dtype
    )
    if max_seq_length is not None:
        embedder.model.max_seq_length = max_seq_length  # type: ignore[attr-defined]
    vectors = embedder.encode(texts, batch_size=64)  # type: ignore[attr-defined]
    temp = path.with_suffix(".tmp.npy")
    np.save(temp, vectors)
    temp.replace(path)
    return vectors
