"""The search index at scale: build, memory, latency, recall, catch-up and rebuild, in one run.

Vectors: real all-MiniLM-L6-v2 embeddings of SciFact (titles, then abstract sentences,
--real of them; embedded once and cached in .cache/bench, about a minute for the
default 2000) and, past those, copies of them moved by Gaussian noise (cosine about
0.85 to their source) up to --n, so the set keeps the clusters of real text. Queries:
the 300 SciFact test claims, embedded. Two tenants: "big" holds 99% of the rows,
"small" every 100th row (the 1%-selective tenant filter).

Each figure is genserve's VectorIndex against exact search over the same vectors (the
baseline, numpy): recall@10 unfiltered (the big tenant's whole history, as the API
searches it; also every shard at once), of the small tenant (its shard), and of a 1% id
subset of the big tenant (a selective SQL filter, searched through a FAISS IDSelector);
single-query latency; the time until
10k newly committed rows are searchable; the rebuild from SQL (SQLite by default,
--database-url for PostgreSQL); loading the persisted files.

    .venv/bin/python -m bench.search --n 100000 --json
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import psutil
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from bench import scifact
from service.db.migrate import upgrade
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Embedding, Generation, Job, Tenant, new_id
from service.search.index import VectorIndex
from service.search.shards import ShardPolicy

MODEL = scifact.EMBEDDING_MODEL
DIM = 384
K = 10
SMALL_EVERY = 100  # the small tenant's share: 1%
INSERT_CHUNK = 20_000
NOISE_COSINE = 0.85


def vectors_for(n: int, real: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n base vectors, the test queries), unit norm, float32."""
    data = scifact.load()
    texts = scifact.sentences(data.corpus)[:real]
    base = scifact.embed(texts, name="scifact-sentences")
    queries = scifact.embed(list(data.queries.values()), name="scifact-test-queries")
    if n <= len(base):
        return np.ascontiguousarray(base[:n]), queries
    rng = np.random.default_rng(seed)
    extra = n - len(base)
    sigma = np.sqrt(1 / NOISE_COSINE**2 - 1) / np.sqrt(DIM)
    out = np.empty((n, DIM), dtype=np.float32)
    out[: len(base)] = base
    for start in range(0, extra, 100_000):
        size = min(100_000, extra - start)
        block = base[rng.integers(0, len(base), size)]
        block += rng.normal(0, sigma, (size, DIM)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[len(base) + start : len(base) + start + size] = block
    return out, queries


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> list[set]:
    """The baseline: brute-force inner product over the given rows."""
    truth = []
    for query in queries:
        scores = vectors @ query
        top = np.argpartition(-scores, k)[:k]
        truth.append(set(ids[top].tolist()))
    return truth


def make_tenants(factory: sessionmaker[Session]) -> dict[str, tuple[int, str]]:
    """tenant name -> (tenant id, generation id) that the bench rows hang off."""
    made = {}
    with factory() as session:
        for name in ("big", "small"):
            tenant = Tenant(name=name)
            session.add(tenant)
            session.flush()
            job = Job(id=new_id("job"), tenant_id=tenant.id, model="m", queue="batch", input={})
            generation = Generation(
                id=new_id("gen"),
                tenant_id=tenant.id,
                job_id=job.id,
                model="m",
                model_version="1",
                input={},
                prompt="bench",
                output="bench",
                prompt_tokens=0,
                completion_tokens=0,
                finish_reason="stop",
            )
            session.add(job)
            session.flush()
            session.add(generation)
            session.commit()
            made[name] = (tenant.id, generation.id)
    return made


def insert_rows(
    factory: sessionmaker[Session],
    vectors: np.ndarray,
    first_row: int,
    tenants: dict[str, tuple[int, str]],
) -> None:
    """Rows first_row.. of vectors; every SMALL_EVERY-th row belongs to the small tenant."""
    with factory() as session:
        for start in range(0, len(vectors), INSERT_CHUNK):
            rows = []
            for offset, vector in enumerate(vectors[start : start + INSERT_CHUNK]):
                number = first_row + start + offset
                tenant, generation = tenants["small" if number % SMALL_EVERY == 0 else "big"]
                rows.append(
                    {
                        "tenant_id": tenant,
                        "generation_id": generation,
                        "kind": "output",
                        "model": MODEL,
                        "dimension": DIM,
                        "vector": vector.tobytes(),
                    }
                )
            session.execute(insert(Embedding), rows)
            session.commit()


def accept_all(ids: Sequence[int]) -> set[int]:
    return set(ids)


def timed_searches(search: Callable[[np.ndarray], list], queries: np.ndarray, rounds: int):
    latencies, results = [], []
    for round_number in range(rounds):
        for query in queries:
            started = time.perf_counter()
            hits = search(query)
            latencies.append(time.perf_counter() - started)
            if round_number == 0:
                results.append({row_id for row_id, _ in hits})
    latencies_ms = np.array(latencies) * 1000
    return results, latencies_ms


def recall(found: list[set], truth: list[set]) -> float:
    return float(np.mean([len(f & t) / max(1, len(t)) for f, t in zip(found, truth, strict=True)]))


def run(args: argparse.Namespace) -> dict:
    process = psutil.Process()
    vectors, queries = vectors_for(args.n + args.catchup, args.real)
    new_vectors, vectors = vectors[args.n :], vectors[: args.n]
    workdir = Path(tempfile.mkdtemp(prefix="genserve-bench-search-"))
    url = args.database_url or f"sqlite:///{workdir / 'bench.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    tenants = make_tenants(factory)
    started = time.perf_counter()
    insert_rows(factory, vectors, 0, tenants)
    insert_s = time.perf_counter() - started
    with factory() as session:  # the ids the rows got, in insert order
        ids = np.array(
            [
                row_id
                for (row_id,) in session.execute(
                    Embedding.__table__.select()
                    .with_only_columns(Embedding.id)
                    .order_by(Embedding.id)
                )
            ],
            dtype=np.int64,
        )
    small_mask = np.arange(args.n) % SMALL_EVERY == 0
    policy = ShardPolicy(
        ivf_threshold=args.ivf_threshold, encoding=args.encoding, nprobe=args.nprobe
    )

    rss_before = process.memory_info().rss
    index = VectorIndex(model=MODEL, dimension=DIM, directory=workdir / "index", policy=policy)
    started = time.perf_counter()
    index.open(factory)  # nothing on disk: built from SQL, then persisted
    build_s = time.perf_counter() - started
    rss_after = process.memory_info().rss
    index_bytes = sum(path.stat().st_size for path in index.directory.glob("*.faiss"))

    rounds = max(1, args.searches // len(queries))
    # Unfiltered: the big tenant's whole history (99% of the rows), as the API searches it.
    big_tenant = tenants["big"][0]
    truth = exact_top_k(vectors[~small_mask], ids[~small_mask], queries, K)
    found, latency = timed_searches(
        lambda q: index.search(q, K, accept_all, tenant_id=big_tenant), queries, rounds
    )
    # Every shard at once (no tenant): not an API path, an administrator's view.
    all_truth = exact_top_k(vectors, ids, queries, K)
    all_found, all_latency = timed_searches(
        lambda q: index.search(q, K, accept_all), queries, rounds
    )

    small_tenant = tenants["small"][0]
    small_truth = exact_top_k(vectors[small_mask], ids[small_mask], queries, K)
    small_found, small_latency = timed_searches(
        lambda q: index.search(q, K, accept_all, tenant_id=small_tenant), queries, rounds
    )

    big_ids = ids[~small_mask]
    rng = np.random.default_rng(1)
    subset = np.sort(rng.choice(big_ids, size=max(K, len(big_ids) // 100), replace=False))
    subset_rows = np.isin(ids, subset)
    subset_truth = exact_top_k(vectors[subset_rows], ids[subset_rows], queries, K)
    subset_found, subset_latency = timed_searches(
        lambda q: index.search(q, K, accept_all, tenant_id=big_tenant, allowed=subset),
        queries,
        rounds,
    )

    insert_rows(factory, new_vectors, args.n, tenants)  # committed: the clock starts
    started = time.perf_counter()
    with factory() as session:
        index.catch_up(session)
    probe = index.search(new_vectors[-1], 1, accept_all)
    catchup_s = time.perf_counter() - started
    with factory() as session:
        newest = max(
            row_id
            for (row_id,) in session.execute(
                Embedding.__table__.select()
                .with_only_columns(Embedding.id)
                .order_by(Embedding.id.desc())
                .limit(1)
            )
        )
    assert probe and probe[0][0] == newest, "the newest row is not searchable after catch-up"

    started = time.perf_counter()
    index.persist()
    persist_s = time.perf_counter() - started
    index.close()
    reader = VectorIndex(model=MODEL, dimension=DIM, directory=workdir / "index", policy=policy)
    started = time.perf_counter()
    reader.open(factory)
    load_s = time.perf_counter() - started
    assert not reader.rebuilt
    reader.close()
    engine.dispose()

    kinds = sorted(set(index.shard_kinds().values()))
    return {
        "n": args.n,
        "dim": DIM,
        "index_type": f"tenant shards: {'+'.join(kinds)}"
        + (f" (IVF {args.encoding}, threshold {args.ivf_threshold})" if "ivf" in kinds else ""),
        # Lists searched in the big tenant's shard; None when every shard is exact.
        "nprobe": policy.nprobe_for(policy.nlist_for(int((~small_mask).sum())))
        if "ivf" in kinds
        else None,
        "database": url.split(":", 1)[0],
        "insert_s": round(insert_s, 2),
        "build_s": round(build_s, 2),
        "index_bytes": index_bytes,
        "rss_growth_bytes": rss_after - rss_before,
        "recall_at_10": round(recall(found, truth), 4),
        "p50_ms": round(float(np.percentile(latency, 50)), 3),
        "p99_ms": round(float(np.percentile(latency, 99)), 3),
        "qps": round(len(latency) / (latency.sum() / 1000), 1),
        "all_shards_recall_at_10": round(recall(all_found, all_truth), 4),
        "all_shards_p99_ms": round(float(np.percentile(all_latency, 99)), 3),
        "filtered_recall_at_10": round(recall(small_found, small_truth), 4),
        "filtered_p50_ms": round(float(np.percentile(small_latency, 50)), 3),
        "filtered_p99_ms": round(float(np.percentile(small_latency, 99)), 3),
        "subset_recall_at_10": round(recall(subset_found, subset_truth), 4),
        "subset_p99_ms": round(float(np.percentile(subset_latency, 99)), 3),
        "catchup_s_10k": round(catchup_s, 3),
        "rebuild_vectors_per_s": round(args.n / build_s),
        "persist_s": round(persist_s, 2),
        "load_s": round(load_s, 2),
        "searches_per_figure": len(latency),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--real", type=int, default=2_000, help="real embeddings among them")
    parser.add_argument("--catchup", type=int, default=10_000, help="rows committed later")
    parser.add_argument("--searches", type=int, default=1_200, help="timed queries per figure")
    parser.add_argument("--ivf-threshold", type=int, default=50_000)
    parser.add_argument("--encoding", choices=("flat", "sq8"), default="flat")
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    scifact.report(run(args), as_json=args.json)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
