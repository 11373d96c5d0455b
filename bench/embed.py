"""Embedding speed and retrieval quality of the all-MiniLM-L6-v2 runtimes, in one run.

Runtimes: the baseline, plain sentence-transformers
(`SentenceTransformer(model_path()).encode(batch_size=64, normalize_embeddings=True)`),
then genserve's `models.backends.sentence.load` runtimes "torch", "onnx" (ONNX Runtime,
fp32) and "onnx-int8" (int8 dynamic quantisation), all on CPU in float32, batch 64.

Passages: the SciFact corpus abstracts as "title. text" (5,183; --limit N keeps the first
N). Speed: passages/s over a fixed subset of them (--timing-passages, every k-th passage
so it spans the corpus's lengths), --repeat rounds with the runtimes interleaved in each
round, so that load from other processes falls on all of them; the median round counts.
Beside wall-clock figures, passages per CPU second of the process, steadier on a shared
machine (torch's OpenMP threads may spin while waiting, which counts against it there).
Quality: nDCG@10 of the 300 test claims (qrels/test.tsv), each runtime embedding the
whole corpus and the claims, by exact inner-product search in numpy.

About 15 minutes on 2 cores for the full corpus; the ONNX files are exported once into
.cache/models/onnx.

    .venv/bin/python -m bench.embed | tee /tmp/embed_bench.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from bench import scifact
from bench.retrieval import ndcg_at

Encode = Callable[[list[str]], np.ndarray]
BASELINE = "sentence-transformers"
RUNTIMES = (BASELINE, "torch", "onnx", "onnx-int8")
BATCH_SIZE = 64
CACHE = scifact.ROOT / ".cache" / "models"


def passages_of(corpus: list[scifact.Document]) -> list[str]:
    return [f"{doc.title}. {doc.text}" if doc.title else doc.text for doc in corpus]


def load_encoders() -> tuple[dict[str, Encode], dict[str, float]]:
    """Each runtime's encode function, and its load time in seconds (export included)."""
    from sentence_transformers import SentenceTransformer

    from models.backends.sentence import load, model_path
    from models.registry import get_spec

    encoders: dict[str, Encode] = {}
    load_s: dict[str, float] = {}
    started = time.perf_counter()
    baseline = SentenceTransformer(str(model_path()), device="cpu")
    encoders[BASELINE] = lambda texts: baseline.encode(
        texts, batch_size=BATCH_SIZE, normalize_embeddings=True, show_progress_bar=False
    )
    load_s[BASELINE] = time.perf_counter() - started
    spec = get_spec(scifact.EMBEDDING_MODEL)
    for runtime in RUNTIMES[1:]:
        started = time.perf_counter()
        embedder = load(spec, cache_dir=CACHE, device="cpu", dtype=torch.float32, runtime=runtime)
        encoders[runtime] = partial(embedder.encode, batch_size=BATCH_SIZE)
        load_s[runtime] = time.perf_counter() - started
    return encoders, load_s


def mean_tokens(passages: list[str]) -> tuple[float, float]:
    """Mean tokens per passage (special tokens included): as written, and as embedded."""
    from models.backends.onnx_embedder import load_tokenizer, read_sentence_config
    from models.backends.sentence import model_path

    source = model_path()
    tokenizer = load_tokenizer(source, max_tokens=None)
    counts = np.array([len(encoding.ids) for encoding in tokenizer.encode_batch(passages)])
    return float(counts.mean()), float(np.minimum(counts, read_sentence_config(source)).mean())


def cut_to_tokens(passages: list[str], tokens: int) -> list[str]:
    """Each passage cut after its first `tokens` tokens (as chunks of that size are)."""
    from models.backends.onnx_embedder import load_tokenizer
    from models.backends.sentence import model_path

    tokenizer = load_tokenizer(model_path(), max_tokens=None)
    cut = []
    for text, encoding in zip(passages, tokenizer.encode_batch(passages), strict=True):
        spans = [span for span in encoding.offsets if span != (0, 0)]
        cut.append(text[: spans[min(tokens, len(spans)) - 1][1]] if spans else text)
    return cut


def rates(encode: Encode, texts: list[str]) -> tuple[float, float]:
    """(passages per wall second, passages per CPU second of this process) for one encode."""
    wall, cpu = time.perf_counter(), time.process_time()
    encode(texts)
    return len(texts) / (time.perf_counter() - wall), len(texts) / (time.process_time() - cpu)


def ndcg10(
    passage_vectors: np.ndarray,
    query_vectors: np.ndarray,
    data: scifact.SciFact,
    doc_ids: list[str],
) -> float:
    scores = query_vectors @ passage_vectors.T  # (queries, passages), exact inner products
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    per_query = [
        ndcg_at([doc_ids[index] for index in row], data.qrels[query_id], 10)
        for query_id, row in zip(data.queries, top, strict=True)
    ]
    return float(np.mean(per_query))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Figures:
    """One runtime's measurements; speeds in passages per second."""

    load_s: float
    full_pass_per_s: float = 0.0
    ndcg10: float = 0.0
    wall_rounds: list[float] = field(default_factory=list)
    cpu_rounds: list[float] = field(default_factory=list)

    @property
    def passages_per_s(self) -> float:
        return statistics.median(self.wall_rounds)

    @property
    def passages_per_cpu_s(self) -> float:
        return statistics.median(self.cpu_rounds)


def measure(
    passages: list[str], data: scifact.SciFact, doc_ids: list[str], args: argparse.Namespace
) -> dict[str, Figures]:
    """Load each runtime, embed everything for nDCG@10, then time the interleaved rounds."""
    queries = list(data.queries.values())
    step = max(1, len(passages) // args.timing_passages)
    timed = passages[::step][: args.timing_passages]
    if args.timing_tokens:
        timed = cut_to_tokens(timed, args.timing_tokens)
    encoders, load_s = load_encoders()
    figures = {name: Figures(load_s=load_s[name]) for name in encoders}
    for name, encode in encoders.items():
        if args.speed_only:
            break
        log(f"{name}: embedding {len(passages)} passages and {len(queries)} queries")
        encode(passages[:BATCH_SIZE])  # warm-up: first-call allocations and kernel choices
        started = time.perf_counter()
        passage_vectors = encode(passages)
        figures[name].full_pass_per_s = len(passages) / (time.perf_counter() - started)
        figures[name].ndcg10 = ndcg10(passage_vectors, encode(queries), data, doc_ids)
    for round_index in range(args.repeat):
        for name, encode in encoders.items():
            wall, cpu = rates(encode, timed)
            figures[name].wall_rounds.append(wall)
            figures[name].cpu_rounds.append(cpu)
            log(f"round {round_index + 1}/{args.repeat} {name}: {wall:.1f} passages/s")
    return figures


def print_table(figures: dict[str, Figures]) -> None:
    base = figures[BASELINE]
    header = (
        f"{'runtime':<22}{'passages/s':>11}{'speedup':>9}{'per CPU s':>11}{'speedup':>9}"
        f"{'full pass/s':>13}{'nDCG@10':>9}{'delta':>9}{'load s':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, row in figures.items():
        print(
            f"{name:<22}{row.passages_per_s:>11.1f}"
            f"{row.passages_per_s / base.passages_per_s:>8.2f}x"
            f"{row.passages_per_cpu_s:>11.1f}"
            f"{row.passages_per_cpu_s / base.passages_per_cpu_s:>8.2f}x"
            + (
                f"{row.full_pass_per_s:>13.1f}{row.ndcg10:>9.4f}{row.ndcg10 - base.ndcg10:>+9.4f}"
                if row.full_pass_per_s  # 0 with --speed-only: no full pass, no nDCG@10
                else f"{'-':>13}{'-':>9}{'-':>9}"
            )
            + f"{row.load_s:>8.1f}"
        )
    print()


def run(args: argparse.Namespace) -> dict:
    data = scifact.load()
    corpus = data.corpus[: args.limit] if args.limit else data.corpus
    passages = passages_of(corpus)
    figures = measure(passages, data, [doc.id for doc in corpus], args)
    print_table(figures)
    base = figures[BASELINE]
    step = max(1, len(passages) // args.timing_passages)
    timed = passages[::step][: args.timing_passages]
    written, embedded = mean_tokens(
        cut_to_tokens(timed, args.timing_tokens) if args.timing_tokens else passages
    )
    return {
        "passages": len(passages),
        "timed_passages": min(len(passages), args.timing_passages),
        "repeat": args.repeat,
        "batch_size": BATCH_SIZE,
        "mean_tokens_per_passage": round(written, 1),
        "mean_tokens_embedded": round(embedded, 1),
        "passages_per_s": {name: round(row.passages_per_s, 1) for name, row in figures.items()},
        "speedup": {
            name: round(row.passages_per_s / base.passages_per_s, 2)
            for name, row in figures.items()
        },
        "passages_per_cpu_s": {
            name: round(row.passages_per_cpu_s, 1) for name, row in figures.items()
        },
        "speedup_cpu": {
            name: round(row.passages_per_cpu_s / base.passages_per_cpu_s, 2)
            for name, row in figures.items()
        },
        "rounds_passages_per_s": {
            name: [round(value, 1) for value in row.wall_rounds] for name, row in figures.items()
        },
        "full_pass_per_s": {name: round(row.full_pass_per_s, 1) for name, row in figures.items()},
        "ndcg10": {name: round(row.ndcg10, 4) for name, row in figures.items()},
        "ndcg10_delta": {name: round(row.ndcg10 - base.ndcg10, 4) for name, row in figures.items()},
        "load_s": {name: round(row.load_s, 1) for name, row in figures.items()},
        "threads": f"torch {torch.get_num_threads()}, onnxruntime {len(os.sched_getaffinity(0))}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N passages (default all)")
    parser.add_argument("--timing-passages", type=int, default=512, help="passages timed a round")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the median counts")
    parser.add_argument(
        "--timing-tokens", type=int, default=0, help="cut timed passages to N tokens (0: whole)"
    )
    parser.add_argument("--speed-only", action="store_true", help="skip the nDCG@10 passes")
    args = parser.parse_args()
    if args.repeat < 1 or args.timing_passages < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--limit, --timing-passages and --repeat must be >= 1")
    scifact.report(run(args), as_json=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
