"""Retrieval quality on BEIR SciFact: nDCG@10 and recall@100 of vector, keyword and hybrid.

The corpus goes through genserve's own search: each abstract is stored as a generation
(title as prompt, abstract as output) with its all-MiniLM-L6-v2 embedding, in a SQLite
database made by the migrations (or --database-url); the 300 test claims are searched
with search_generations in each mode, over prompt and output. Published figures on this
split: BM25 0.665 (BEIR), all-MiniLM-L6-v2 0.645.

Documents are embedded once (cached in .cache/bench; about 20 minutes on 2 cores), cut
at --max-seq-length tokens.

    .venv/bin/python -m bench.retrieval --json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from bench import scifact
from service.db import crud
from service.db.migrate import upgrade
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Embedding, Generation, Job, Tenant, new_id
from service.search.generations import Fusion, search_generations
from service.search.index import VectorIndex

MODES = ("vector", "keyword", "hybrid")


def ndcg_at(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(rank + 2) for rank, rel in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    hits = {doc for doc, rel in relevant.items() if rel > 0}
    return len(hits & set(ranked[:k])) / len(hits) if hits else 0.0


def store_corpus(url: str, data: scifact.SciFact, vectors: np.ndarray) -> tuple[int, dict]:
    """Each document as a generation with its embedding; returns (tenant, gen id -> doc id)."""
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    doc_of: dict[str, str] = {}
    with factory() as session:
        tenant = Tenant(name="scifact")
        session.add(tenant)
        session.flush()
        jobs, generations, embeddings = [], [], []
        for doc, vector in zip(data.corpus, vectors, strict=True):
            job_id, generation_id = new_id("job"), new_id("gen")
            doc_of[generation_id] = doc.id
            jobs.append(
                {
                    "id": job_id,
                    "tenant_id": tenant.id,
                    "model": "corpus",
                    "queue": "batch",
                    "input": {},
                    "status": "succeeded",
                }
            )
            generations.append(
                {
                    "id": generation_id,
                    "tenant_id": tenant.id,
                    "job_id": job_id,
                    "model": "corpus",
                    "model_version": "beir",
                    "input": {},
                    "prompt": doc.title,
                    "output": doc.text,
                    "meta": {"doc_id": doc.id},
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "finish_reason": "stop",
                }
            )
            embeddings.append(
                {
                    "tenant_id": tenant.id,
                    "generation_id": generation_id,
                    "kind": "output",
                    "model": scifact.EMBEDDING_MODEL,
                    "dimension": vectors.shape[1],
                    "vector": np.asarray(vector, dtype=np.float32).tobytes(),
                }
            )
        session.execute(insert(Job), jobs)
        session.execute(insert(Generation), generations)
        session.execute(insert(Embedding), embeddings)
        session.commit()
        tenant_id = tenant.id
    engine.dispose()
    return tenant_id, doc_of


def run(args: argparse.Namespace) -> dict:
    data = scifact.load()
    started = time.perf_counter()
    doc_vectors = scifact.embed(
        scifact.document_texts(data.corpus),
        name=f"scifact-docs-{args.max_seq_length}",
        max_seq_length=args.max_seq_length,
    )
    query_ids = list(data.queries)
    query_vectors = scifact.embed(
        [data.queries[qid] for qid in query_ids], name="scifact-test-queries"
    )
    embed_s = time.perf_counter() - started
    workdir = Path(tempfile.mkdtemp(prefix="genserve-bench-retrieval-"))
    url = args.database_url or f"sqlite:///{workdir / 'scifact.sqlite'}"
    upgrade(url)
    tenant_id, doc_of = store_corpus(url, data, doc_vectors)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    index = VectorIndex(
        model=scifact.EMBEDDING_MODEL, dimension=doc_vectors.shape[1], directory=workdir / "index"
    )
    index.open(factory)
    vector_of = dict(zip(query_ids, query_vectors, strict=True))
    fusion = Fusion(vector=args.vector_weight, keyword=args.keyword_weight, rrf_k=args.rrf_k)
    result: dict = {}
    with factory() as session:
        for mode in MODES:
            ndcg, recall = [], []
            started = time.perf_counter()
            for qid in query_ids:
                found = search_generations(
                    session,
                    tenant_id=tenant_id,
                    query=data.queries[qid],
                    mode=mode,
                    target="both",
                    filters=crud.Filters(),
                    offset=0,
                    limit=100,
                    index=index,
                    embed=lambda _text, qid=qid: vector_of[qid],
                    fusion=fusion,
                )
                ranked = [doc_of[hit.generation.id] for hit in found.hits]
                ndcg.append(ndcg_at(ranked, data.qrels[qid], 10))
                recall.append(recall_at(ranked, data.qrels[qid], 100))
            result[f"ndcg10_{mode}"] = round(float(np.mean(ndcg)), 4)
            result[f"recall100_{mode}"] = round(float(np.mean(recall)), 4)
            result[f"ms_per_query_{mode}"] = round(
                (time.perf_counter() - started) * 1000 / len(query_ids), 2
            )
    index.close()
    engine.dispose()
    result.update(
        queries=len(query_ids),
        documents=len(data.corpus),
        max_seq_length=args.max_seq_length,
        fusion=f"rrf k={args.rrf_k}, weights vector {args.vector_weight}, "
        f"keyword {args.keyword_weight}",
        keyword_engine=url.split(":", 1)[0],
        embed_s=round(embed_s, 1),
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--rrf-k", type=int, default=60)
    parser.add_argument("--vector-weight", type=float, default=1.0)
    parser.add_argument("--keyword-weight", type=float, default=1.0)
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    scifact.report(run(args), as_json=args.json)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
