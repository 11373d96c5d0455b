"""What became of a set of submitted jobs, read from SQL, and the file the suite's rows
go to (tests/faults/report.py prints it)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

RESULTS = Path(os.environ.get("GENSERVE_FAULTS_RESULTS", "var/faults/results.json"))
# A chat generation embeds its prompt and its output.
EMBEDDINGS_PER_GENERATION = 2


@dataclass
class Row:
    fault: str
    submitted: int
    completed: int
    failed: int
    lost: int
    duplicated: int


def _query(database_url: str, sql: str, params: dict[str, Any]) -> list[Any]:
    """The rows of one statement, on a connection of its own."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql), params).all())
    finally:
        engine.dispose()


def tally(fault: str, database_url: str, job_ids: list[str]) -> Row:
    """Count each job once: completed (succeeded with exactly one generation and its
    embeddings), failed with a reason, or lost (anything else); duplicated counts jobs
    with more than one generation, or more embeddings than one generation makes."""
    params = {"ids": job_ids}
    jobs = _query(database_url, "SELECT id, status, error FROM jobs WHERE id = ANY(:ids)", params)
    generations = dict(
        _query(
            database_url,
            "SELECT job_id, count(*) FROM generations WHERE job_id = ANY(:ids) GROUP BY job_id",
            params,
        )
    )
    embeddings = dict(
        _query(
            database_url,
            "SELECT g.job_id, count(*) FROM embeddings e "
            "JOIN generations g ON g.id = e.generation_id "
            "WHERE g.job_id = ANY(:ids) GROUP BY g.job_id",
            params,
        )
    )
    completed = failed = duplicated = 0
    for job_id, status, error in jobs:
        made, vectors = generations.get(job_id, 0), embeddings.get(job_id, 0)
        if made > 1 or vectors > EMBEDDINGS_PER_GENERATION:
            duplicated += 1
        elif status == "succeeded" and made == 1 and vectors == EMBEDDINGS_PER_GENERATION:
            completed += 1
        elif status == "failed" and error:
            failed += 1
    lost = len(job_ids) - completed - failed - duplicated
    return Row(fault, len(job_ids), completed, failed, lost, duplicated)


def deliveries(database_url: str, job_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Job id -> (attempts, publish_count): how often it was claimed and published."""
    rows = _query(
        database_url,
        "SELECT id, attempts, publish_count FROM jobs WHERE id = ANY(:ids)",
        {"ids": job_ids},
    )
    return {job_id: (attempts, published) for job_id, attempts, published in rows}


def record(row: Row) -> None:
    """Put the fault's row in the results file (replacing an earlier one of that fault)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    rows = [r for r in rows if r["fault"] != row.fault] + [asdict(row)]
    RESULTS.write_text(json.dumps(rows, indent=1))


def count_jobs(database_url: str, *, fault: str) -> int:
    """Jobs stored with metadata {"fault": fault}."""
    sql = "SELECT count(*) FROM jobs WHERE metadata ->> 'fault' = :fault"
    return int(_query(database_url, sql, {"fault": fault})[0][0])


def generation_ids(database_url: str, *, tenant: str) -> set[str]:
    """The tenant's generations that have an output embedding."""
    rows = _query(
        database_url,
        "SELECT DISTINCT g.id FROM generations g "
        "JOIN tenants t ON t.id = g.tenant_id "
        "JOIN embeddings e ON e.generation_id = g.id AND e.kind = 'output' "
        "WHERE t.name = :tenant",
        {"tenant": tenant},
    )
    return {row[0] for row in rows}
