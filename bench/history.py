"""The history at scale on PostgreSQL: list, filter and usage queries, and exports, over
--n generations.

Loads one tenant's --n generations (default 1M; their jobs too) into a fresh PostgreSQL
database with server-side generate_series: 90 days of history, three models, tags from
a vocabulary of 50 (a generation has one to three), a category on a quarter of them, a
feedback score on 10% and labelled feedback on 2%, and 90 days of usage rollups. Then
each query the API runs for GET /v1/generations (unfiltered and with each filter) and
GET /v1/usage is timed through genserve's own functions, --repeat times each: median
and p99 in ms, with the plan's access path from EXPLAIN. The listings of one API's jobs
(exports, stored chat completions) are timed too. After the exports (below), the
generations are partitioned by month with their rows copied (service/db/partitions.py,
split_history) and the queries run again. The baseline runs before that, after dropping
the indexes migrations 0007 and 0008 added (built again after it), all in the same run.

Exports (--export-repeat > 0): 2% of the generations are given the texts of an earlier
one (exact duplicates), and every generation a prompt and an output embedding (the same
random unit vector, 384 floats, COPY'd in), 5% of them near copies (cosine 0.97) of an
earlier one, in clusters of about two copies per original. The whole history is then
exported in-process through genserve's export function (service.exports.run, as the
worker runs it, not over HTTP) with exact and near dedup, and with dedup off, the median
of --export-repeat runs each; each run writes its file and rolls it back. On the first
--slice rows the near-duplicate index is timed against the exact flat index alone, whose
drops are the truth its recall is measured against.

    .venv/bin/python -m bench.history --n 1000000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ClauseElement, Executable

from service.api.schemas import DedupOptions, ExportCreate
from service.db import crud, exports, partitions, usage
from service.db.migrate import upgrade
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Generation, Job, UsageRollup, utcnow
from service.exports.dedup import NearDuplicates
from service.exports.run import DEDUP_BATCH, run_export
from tests.conftest import create_pg_database, drop_pg_database

DAYS = 90
# The baseline runs without the history's filter indexes (0007) and the jobs' by API (0008).
BASELINE_DROPS = (
    "ix_generations_tags",
    "ix_generations_tenant_model",
    "ix_generations_tenant_feedback",
    "ix_generation_feedback_label",
    "ix_jobs_tenant_api",
)

LOAD = [
    "INSERT INTO tenants (id, name, created_at, redact_pii) VALUES (1, 'bench', now(), false)",
    # Ids sort by creation time, as new_id's do: 12 hex digits of ms, then a counter.
    """INSERT INTO jobs (id, tenant_id, model, queue, status, input, params, metadata,
            attempts, publish_count, cancel_requested, api, store, created_at)
       SELECT 'job_' || lpad(to_hex(ms), 12, '0') || lpad(to_hex(i), 12, '0'), 1,
              'model-' || (i % 3), 'interactive', 'succeeded', '{}', '{}', '{}',
              1, 1, false, 'jobs', false, to_timestamp(ms / 1000.0)
       FROM (SELECT i, (extract(epoch FROM now()) * 1000)::bigint
                       - ((:n - i)::bigint * :span_ms / :n) AS ms
             FROM generate_series(1, :n) AS i) AS s""",
    """INSERT INTO generations (id, tenant_id, job_id, model, model_version, input, prompt,
            output, params, metadata, prompt_tokens, completion_tokens, finish_reason,
            timings, feedback_score, feedback_count, created_at)
       SELECT 'gen_' || substr(j.id, 5), 1, j.id, j.model, '1',
              jsonb_build_object('prompt', 'question ' || i), 'question ' || i,
              'answer ' || i || ' about topic ' || (i % 977), '{}',
              jsonb_build_object('tags', (SELECT jsonb_agg('t' || ((i * k * 7919) % 50))
                                          FROM generate_series(1, 1 + i % 3) AS k))
                || CASE WHEN i % 4 = 0
                        THEN jsonb_build_object('category', 'c' || (i % 8)) ELSE '{}' END,
              20, 40, 'stop', '{}',
              CASE WHEN i % 10 = 0 THEN (i % 5) + 1 END,
              CASE WHEN i % 10 = 0 THEN 1 ELSE 0 END,
              j.created_at
       FROM (SELECT id, model, created_at, row_number() OVER (ORDER BY id) AS i FROM jobs) AS j""",
    """INSERT INTO generation_feedback (tenant_id, generation_id, score, label, created_at)
       SELECT 1, id, feedback_score,
              (ARRAY['helpful', 'wrong', 'unsafe', 'style'])[1 + (feedback_count + length(id)) % 4],
              created_at
       FROM generations WHERE feedback_score IS NOT NULL AND right(id, 1) IN ('0', '5', 'a')""",
    """INSERT INTO usage_rollups (tenant_id, day, api_key_id, model, bucket, requests,
            succeeded, failed, prompt_tokens, completion_tokens, latency_ms)
       SELECT 1, current_date - d, k, 'model-' || m, b, 100, 98, 2, 2000, 4000, 100 * (b + 1) * 50
       FROM generate_series(0, 89) AS d, generate_series(1, 5) AS k,
            generate_series(0, 2) AS m, generate_series(0, 11) AS b""",
    "ANALYZE",
]


# Exports: exact duplicates (the texts of every 50th row, from 0, again seven rows later)
# and near copies.
DIMENSION = 384
EMBEDDER = "bench-embedder"
NEAR_SHARE = 0.05
NEAR_COSINE = 0.97
COPY_SOURCES = """
    UPDATE generations AS g
    SET input = s.input, prompt = s.prompt, output = s.output
    FROM (SELECT id, lead(id, 7) OVER (ORDER BY id) AS copy, input, prompt, output,
                 row_number() OVER (ORDER BY id) AS i
          FROM generations) AS s
    WHERE g.id = s.copy AND (s.i - 1) % 50 = 0"""


class Explain(Executable, ClauseElement):
    """EXPLAIN of a statement, its parameters bound as the statement's own."""

    inherit_cache = False

    def __init__(self, statement: Any) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _explain(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN " + compiler.process(element.statement, **kw)


def load(url: str, n: int) -> float:
    started = time.perf_counter()
    engine = make_engine(url)
    with engine.begin() as connection:
        for statement in LOAD:
            connection.execute(text(statement), {"n": n, "span_ms": DAYS * 86_400_000})
    engine.dispose()
    return time.perf_counter() - started


def plant(url: str, seed: int = 0) -> dict[str, Any]:
    """Exact duplicates and every generation's embeddings, with near copies planted."""
    started = time.perf_counter()
    engine = make_engine(url)
    with engine.begin() as connection:
        exact = connection.execute(text(COPY_SOURCES)).rowcount
        ids = list(connection.scalars(text("SELECT id FROM generations ORDER BY id")))
    vectors, near = planted_vectors(len(ids), exact_every=50, seed=seed)
    raw = engine.raw_connection()
    try:
        driver: Any = raw.driver_connection  # psycopg's, for COPY
        with (
            driver.cursor() as cursor,
            cursor.copy(
                "COPY embeddings (tenant_id, generation_id, kind, model, dimension, vector, "
                "created_at) FROM STDIN"
            ) as copy,
        ):
            now = utcnow()
            for gid, vector in zip(ids, vectors, strict=True):
                data = vector.tobytes()
                for kind in ("prompt", "output"):
                    copy.write_row((1, gid, kind, EMBEDDER, DIMENSION, data, now))
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as connection:
        connection.execute(text("ANALYZE embeddings"))
    engine.dispose()
    return {"exact": exact, "near": near, "load_s": round(time.perf_counter() - started, 1)}


def planted_vectors(count: int, *, exact_every: int, seed: int) -> tuple[np.ndarray, int]:
    """count random unit vectors in id order; an exact duplicate (row i of each
    exact_every from i = 7) gets its source's vector, and NEAR_SHARE of the others are near
    copies of an earlier original, about two copies to an original. Returns the vectors
    and the number of near copies."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIMENSION), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = np.arange(count)
    exact = index % exact_every == 7
    vectors[exact] = vectors[index[exact] - 7]
    free = index[~exact & (index % exact_every != 0) & (index > 1000)]
    copies = np.sort(rng.choice(free, size=int(NEAR_SHARE * count), replace=False))
    originals = np.setdiff1d(index[~exact], copies)
    pool = np.sort(rng.choice(originals, size=len(copies) // 2, replace=False))
    for copy in copies:
        source = pool[rng.integers(0, max(1, np.searchsorted(pool, copy)))]
        noise = rng.standard_normal(DIMENSION).astype(np.float32)
        noise -= (noise @ vectors[source]) * vectors[source]
        noise /= np.linalg.norm(noise)
        vectors[copy] = NEAR_COSINE * vectors[source] + np.sqrt(1 - NEAR_COSINE**2) * noise
    return vectors, len(copies)


def measure_exports(url: str, repeat: int) -> dict[str, dict[str, Any]]:
    """The whole history exported with dedup (exact and near), exact only, and without:
    median rows/s. Without near dedup no embeddings are read."""
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    modes = {
        "dedup": DedupOptions(),
        "exact_only": DedupOptions(near=False),
        "no_dedup": DedupOptions(exact=False, near=False),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, dedup in modes.items():
        times, manifest = [], {}
        for _ in range(repeat):
            with factory() as session:
                started = time.perf_counter()
                manifest = run_export(
                    session,
                    export_id=f"bench_{name}",
                    tenant_id=1,
                    request=ExportCreate(dedup=dedup),
                    embedding_model=EMBEDDER,
                )
                times.append(time.perf_counter() - started)
                session.rollback()
        seconds = statistics.median(times)
        results[name] = {
            "seconds": round(seconds, 1),
            "rows_per_s": round(manifest["counts"]["matched"] / seconds),
            "runs_s": [round(t, 1) for t in times],
            "counts": manifest["counts"],
            "index": manifest["index"],
            "mb": round(manifest["bytes"] / 2**20, 1),
        }
    engine.dispose()
    return results


def measure_index(vectors: np.ndarray) -> dict[str, Any]:
    """The near-duplicate index against the exact flat index alone on the same rows."""
    found: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name, index in (
        ("flat", NearDuplicates(DIMENSION, 0.95, ivf_after=len(vectors) + 1)),
        ("genserve", NearDuplicates(DIMENSION, 0.95)),
    ):
        started = time.perf_counter()
        found[name] = np.concatenate(
            [
                index.keep(vectors[start : start + DEDUP_BATCH])
                for start in range(0, len(vectors), DEDUP_BATCH)
            ]
        )
        seconds[name] = time.perf_counter() - started
    truth, kept = ~found["flat"], ~found["genserve"]
    return {
        "rows": len(vectors),
        "flat_rows_per_s": round(len(vectors) / seconds["flat"]),
        "genserve_rows_per_s": round(len(vectors) / seconds["genserve"]),
        "flat_dropped": int(truth.sum()),
        "genserve_dropped": int(kept.sum()),
        "recall": round(float((truth & kept).sum() / max(1, truth.sum())), 4),
        "false_drops": int((kept & ~truth).sum()),
    }


def listings() -> dict[str, crud.Filters]:
    """The filters of each GET /v1/generations query timed."""
    week_ago = utcnow() - timedelta(days=7)
    return {
        "list": crud.Filters(),
        "filter_model": crud.Filters(model="model-1"),
        "filter_tag": crud.Filters(tags=("t17",)),
        "filter_two_tags": crud.Filters(tags=("t17", "t3")),
        "filter_category": crud.Filters(category="c4"),
        "filter_min_score": crud.Filters(min_feedback_score=5),
        "filter_label": crud.Filters(label="unsafe"),
        "filter_time_range": crud.Filters(created_after=week_ago, model="model-2"),
        "filter_model_tag_score": crud.Filters(model="model-0", tags=("t9",), min_feedback_score=4),
    }


def usage_report(session: Session) -> Any:
    """GET /v1/usage?group_by=day,model over the last 30 days."""
    end = date.today()
    start = end - timedelta(days=29)
    return usage.report(session, tenant_id=1, start=start, end=end, by=["day", "model"])


def queries() -> dict[str, Callable[[Session], Any]]:
    def listing(filters: crud.Filters) -> Callable[[Session], Any]:
        return lambda session: crud.list_generations(
            session, tenant_id=1, filters=filters, cursor=None, limit=20
        )

    runs = {name: listing(filters) for name, filters in listings().items()}
    return runs | {
        "usage_30_days": usage_report,
        "list_exports": lambda session: exports.list_exports(
            session, tenant_id=1, after=None, limit=20
        ),
        "list_stored_chat": lambda session: crud.list_stored_jobs(
            session,
            tenant_id=1,
            api="chat.completions",
            filters=crud.Filters(),
            after=None,
            limit=20,
            descending=True,
        ),
    }


def _plan(session: Session, name: str) -> str:
    """The access path of a query, from EXPLAIN (its first scan nodes)."""
    if name == "usage_30_days":
        query: Any = select(UsageRollup).where(
            UsageRollup.tenant_id == 1, UsageRollup.day >= date.today() - timedelta(days=29)
        )
    elif name in ("list_exports", "list_stored_chat"):
        api = "export" if name == "list_exports" else "chat.completions"
        query = (
            select(Job).where(Job.tenant_id == 1, Job.api == api).order_by(Job.id.desc()).limit(21)
        )
    else:
        clauses = crud.filter_clauses(Generation, listings()[name], "postgresql")
        query = (
            select(Generation)
            .where(Generation.tenant_id == 1, *clauses)
            .order_by(Generation.id.desc())
            .limit(21)
        )
    lines = [row[0] for row in session.execute(Explain(query))]
    scans = [line.strip().lstrip("-> ") for line in lines if "Scan" in line]
    return "; ".join(scan.split("  (")[0] for scan in scans[:3])


def measure(url: str, repeat: int) -> dict[str, dict[str, Any]]:
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    results: dict[str, dict[str, Any]] = {}
    for name, run in queries().items():
        times = []
        with factory() as session:
            run(session)  # warm the cache
            for _ in range(repeat):
                started = time.perf_counter()
                run(session)
                times.append((time.perf_counter() - started) * 1000)
                session.rollback()
            plan = _plan(session, name)
        times.sort()
        results[name] = {
            "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
            "plan": plan,
        }
    engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--export-repeat", type=int, default=3, help="0: no exports")
    parser.add_argument("--slice", type=int, default=50_000, help="rows of the index check")
    parser.add_argument(
        "--no-partition", action="store_true", help="skip partitioning by month and its rerun"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    url = create_pg_database()
    exported: dict[str, Any] = {}
    partitioned: dict[str, dict[str, Any]] = {}
    split_s = None
    try:
        upgrade(url)
        load_s = load(url, args.n)
        print(f"loaded {args.n} generations in {load_s:.1f} s")
        genserve = measure(url, args.repeat)
        if args.export_repeat:
            exported = export_phase(url, args.n, args.export_repeat, args.slice)
        # The baseline, without the indexes; then they are built again.
        engine = make_engine(url)
        with engine.begin() as connection:
            definitions = [
                connection.scalar(
                    text("SELECT pg_get_indexdef(CAST(:name AS regclass))"), {"name": index}
                )
                for index in BASELINE_DROPS
            ]
            for index in BASELINE_DROPS:
                connection.execute(text(f"DROP INDEX {index}"))
            connection.execute(text("ANALYZE"))
        baseline = measure(url, max(5, args.repeat // 10))
        with engine.begin() as connection:
            for definition in definitions:
                connection.execute(text(definition))
            connection.execute(text("ANALYZE"))
        engine.dispose()
        if not args.no_partition:
            split_s = partition(url)
            print(f"partitioned by month (rows copied) in {split_s:.1f} s", flush=True)
            partitioned = measure(url, args.repeat)
    finally:
        drop_pg_database(url)
    print(f"{'query':<24} {'p50 ms':>8} {'p99 ms':>8} {'by month':>9} {'no index':>9}  plan")
    for name, row in genserve.items():
        by_month = partitioned.get(name, {}).get("p99_ms", "-")
        print(
            f"{name:<24} {row['p50_ms']:>8} {row['p99_ms']:>8} {by_month:>9}"
            f" {baseline[name]['p99_ms']:>9}  {row['plan']}"
        )
        if name in partitioned:
            print(f"{'':<24} by month: {partitioned[name]['plan']}")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    print(f"machine: {machine}")
    if args.json:
        print(
            json.dumps(
                {
                    "n": args.n,
                    "machine": machine,
                    "genserve": genserve,
                    "baseline": baseline,
                    "partitioned": partitioned,
                    "partition_s": split_s,
                    "exports": exported,
                }
            )
        )


def partition(url: str) -> float:
    """Partition the generations by month, their rows copied (service/db/partitions.py)."""
    started = time.perf_counter()
    engine = make_engine(url)
    with engine.begin() as connection:
        partitions.partition_generations(connection, now=utcnow(), split_history=True)
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started


def export_phase(url: str, n: int, repeat: int, slice_rows: int) -> dict[str, Any]:
    """Plant duplicates and embeddings, export the whole history, and check the index."""
    planted = plant(url)
    print(
        f"planted {planted['exact']} exact and {planted['near']} near duplicates and "
        f"{2 * n} embeddings in {planted['load_s']} s"
    )
    runs = measure_exports(url, repeat)
    print(f"{'export':<11} {'rows/s':>8} {'median s':>9}  counts")
    for name, row in runs.items():
        print(f"{name:<11} {row['rows_per_s']:>8} {row['seconds']:>9}  {row['counts']}")
    vectors, _ = planted_vectors(min(n, slice_rows), exact_every=50, seed=0)
    index = measure_index(vectors)
    print(f"index on {index['rows']} rows: {index}")
    return {"planted": planted, "runs": runs, "index": index}


if __name__ == "__main__":
    main()
