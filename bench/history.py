"""The history at scale on PostgreSQL: list, filter and usage queries over --n generations.

Loads one tenant's --n generations (default 1M; their jobs too) into a fresh PostgreSQL
database with server-side generate_series: 90 days of history, three models, tags from
a vocabulary of 50 (a generation has one to three), a category on a quarter of them, a
feedback score on 10% and labelled feedback on 2%, and 90 days of usage rollups. Then
each query the API runs for GET /v1/generations (unfiltered and with each filter) and
GET /v1/usage is timed through genserve's own functions, --repeat times each: median
and p99 in ms, with the plan's access path from EXPLAIN. The same queries run again
after dropping the indexes migration 0007 added (the baseline), in the same run.

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

from sqlalchemy import select, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ClauseElement, Executable

from service.db import crud, usage
from service.db.migrate import upgrade
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Generation, UsageRollup, utcnow
from tests.conftest import create_pg_database, drop_pg_database

DAYS = 90
INDEXES_0007 = (
    "ix_generations_tags",
    "ix_generations_tenant_model",
    "ix_generations_tenant_feedback",
    "ix_generation_feedback_label",
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
    return runs | {"usage_30_days": usage_report}


def _plan(session: Session, name: str) -> str:
    """The access path of a query, from EXPLAIN (its first scan nodes)."""
    if name == "usage_30_days":
        query: Any = select(UsageRollup).where(
            UsageRollup.tenant_id == 1, UsageRollup.day >= date.today() - timedelta(days=29)
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
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    url = create_pg_database()
    try:
        upgrade(url)
        load_s = load(url, args.n)
        print(f"loaded {args.n} generations in {load_s:.1f} s")
        genserve = measure(url, args.repeat)
        engine = make_engine(url)
        with engine.begin() as connection:
            for index in INDEXES_0007:
                connection.execute(text(f"DROP INDEX {index}"))
            connection.execute(text("ANALYZE"))
        engine.dispose()
        baseline = measure(url, max(5, args.repeat // 10))
    finally:
        drop_pg_database(url)
    print(f"{'query':<24} {'p50 ms':>8} {'p99 ms':>8} {'no-0007 p99':>12}  plan")
    for name, row in genserve.items():
        print(
            f"{name:<24} {row['p50_ms']:>8} {row['p99_ms']:>8} {baseline[name]['p99_ms']:>12}"
            f"  {row['plan']}"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    print(f"machine: {machine}")
    if args.json:
        print(
            json.dumps(
                {"n": args.n, "machine": machine, "genserve": genserve, "baseline": baseline}
            )
        )


if __name__ == "__main__":
    main()
