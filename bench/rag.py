"""Retrieval-augmented generation on BEIR SciFact, end to end through the API.

Starts `genserve serve` on a fresh data directory (SQLite, the embedded broker), uploads
the 5,183 abstracts as one JSONL file into a collection and times the ingestion until
every chunk is stored and embedded. Then, for the 300 test claims:

- retrieval: the collection's hybrid search, as a grounded job retrieves; recall@5 of
  the documents of the 5 passages a job is handed, nDCG@10 of the first 10 documents;
- answers (--answers of them, SmolLM2-135M-Instruct, greedy): the fraction of answers
  whose citations all point to passages the model was given, and the fraction that cite
  at least one document the qrels judge relevant.

The last line is JSON: ingest_s, passages_per_s, ndcg10, recall5,
citations_valid_fraction, cites_relevant_fraction (and the rest of the figures).

    .venv/bin/python -m bench.rag --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import scifact
from bench.generate import free_port, machine, served, wait_up
from bench.retrieval import ndcg_at, recall_at
from service.config import Settings
from service.rag.grounding import cited_numbers

ROOT = Path(__file__).resolve().parents[1]
CHAT_MODEL = "smollm2-135m-instruct"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=0, help="test claims to search; 0: all")
    parser.add_argument("--answers", type=int, default=30, help="claims answered by the model")
    parser.add_argument("--k", type=int, default=5, help="passages handed to the model")
    parser.add_argument("--mode", default="hybrid", choices=("vector", "keyword", "hybrid"))
    parser.add_argument("--limit", type=int, default=0, help="abstracts to ingest; 0: all")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def ingest(client: httpx.Client, data: scifact.SciFact, folder: Path) -> dict[str, Any]:
    """Upload the corpus as one JSONL file and wait for its ingestion; its figures."""
    path = folder / "scifact.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for doc in data.corpus:
            out.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}) + "\n")
    collection = client.post("/v1/collections", json={"name": "scifact"}).json()
    started = time.perf_counter()
    with open(path, "rb") as handle:
        answer = client.post(
            f"/v1/collections/{collection['id']}/documents",
            files={"file": ("scifact.jsonl", handle, "application/jsonl")},
        )
    answer.raise_for_status()
    location = answer.headers["Location"]
    while (ingestion := client.get(location).json())["status"] in ("queued", "running"):
        time.sleep(0.5)
    elapsed = time.perf_counter() - started
    if ingestion["status"] != "succeeded":
        raise SystemExit(f"ingestion {ingestion['status']}: {ingestion}")
    progress = ingestion["progress"]
    return {
        "collection": collection["id"],
        "ingest_s": round(elapsed, 1),
        "documents": progress["documents"]["created"],
        "chunks": progress["chunks"],
        "passages_per_s": round(progress["chunks"] / elapsed, 1),
    }


def documents(passages: list[dict[str, Any]]) -> list[str]:
    """The documents of ranked passages, each once, in the order first seen."""
    return list(dict.fromkeys(passage["external_id"] for passage in passages))


def evaluate_retrieval(
    client: httpx.Client, collection: int, data: scifact.SciFact, queries: list[str], args: Any
) -> dict[str, Any]:
    ndcg, recall, latency = [], [], []
    for query_id in queries:
        started = time.perf_counter()
        answer = client.post(
            f"/v1/collections/{collection}/search",
            json={"query": data.queries[query_id], "mode": args.mode, "k": 30},
        )
        latency.append(time.perf_counter() - started)
        answer.raise_for_status()
        passages = answer.json()["data"]
        relevant = data.qrels[query_id]
        ndcg.append(ndcg_at(documents(passages), relevant, 10))
        recall.append(recall_at(documents(passages[: args.k]), relevant, 5))
    latency.sort()
    return {
        "ndcg10": round(sum(ndcg) / len(ndcg), 4),
        "recall5": round(sum(recall) / len(recall), 4),
        "search_ms_p50": round(1000 * latency[len(latency) // 2], 1),
    }


def evaluate_answers(
    client: httpx.Client, collection: int, data: scifact.SciFact, queries: list[str], args: Any
) -> dict[str, Any]:
    jobs = {}
    for query_id in queries:
        answer = client.post(
            "/v1/jobs",
            json={
                "model": CHAT_MODEL,
                "input": {"prompt": data.queries[query_id]},
                "params": {"max_tokens": 96, "temperature": 0},
                "rag": {"collections": [collection], "k": args.k, "mode": args.mode},
            },
        )
        answer.raise_for_status()
        jobs[query_id] = answer.json()["id"]
    citing = valid = relevant_cited = 0
    for query_id, job_id in jobs.items():
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            time.sleep(0.5)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
        generation = client.get(f"/v1/generations/{job['generation_id']}").json()
        sources = client.get(f"/v1/generations/{generation['id']}/sources").json()["data"]
        given = {source["number"]: source for source in sources}
        cited = cited_numbers(generation["output"])
        if cited:
            citing += 1
            valid += all(number in given for number in cited)
        # The relevant corpus ids, as the collection's document ids.
        docs = client.get(
            f"/v1/collections/{collection}/documents",
            params={"limit": 100, "external_id": list(data.qrels[query_id])},
        ).json()["data"]
        relevant_ids = {doc["id"] for doc in docs}
        relevant_cited += any(
            number in given and given[number]["document_id"] in relevant_ids for number in cited
        )
    answered = len(jobs)
    return {
        "answers": answered,
        "citing_fraction": round(citing / answered, 4) if answered else None,
        "citations_valid_fraction": round(valid / citing, 4) if citing else None,
        "cites_relevant_fraction": round(relevant_cited / answered, 4) if answered else None,
    }


def main() -> None:
    args = parse_args()
    data = scifact.load()
    if args.limit:
        kept = data.corpus[: args.limit]
        data = scifact.SciFact(corpus=kept, queries=data.queries, qrels=data.qrels)
    queries = sorted(data.queries)[: args.queries or None]
    with tempfile.TemporaryDirectory(prefix="genserve-rag-") as tmp:
        folder = Path(tmp)
        port = free_port()
        env = {
            **os.environ,
            "GENSERVE_DATA_DIR": str(folder / "data"),
            "GENSERVE_CHAT_MODELS": CHAT_MODEL,
            "GENSERVE_MODEL_CACHE_DIR": str(ROOT / ".cache" / "models"),
            "GENSERVE_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        with served(command, env, folder / "serve.log", signal.SIGTERM) as process:
            url = f"http://127.0.0.1:{port}"
            key_file = folder / "data" / "admin-key.txt"
            wait_up(process, f"{url}/healthz", key_file, timeout=300)
            key = key_file.read_text().strip()
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600
            ) as client:
                figures = ingest(client, data, folder)
                retrieval = evaluate_retrieval(client, figures["collection"], data, queries, args)
                answers = evaluate_answers(
                    client, figures["collection"], data, queries[: args.answers], args
                )
    result = {
        **figures,
        **retrieval,
        **answers,
        "queries": len(queries),
        "k": args.k,
        "mode": args.mode,
        # The server's, from the environment as `genserve serve` reads it.
        "embedding_runtime": Settings().embedding_runtime,
        "machine": machine(),
    }
    del result["collection"]
    scifact.report(result, as_json=args.json)


if __name__ == "__main__":
    main()
