"""Export jobs and the rows they read. Keyword-only, session first; callers commit.

An export is a job (api "export") on the batch queue: its request is in params, its
manifest in result once done (service/exports/run.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, null, select
from sqlalchemy.orm import Session

from service.db import crud, tenants
from service.db.session import BINARY_RESULTS
from service.db.tables import Embedding, Generation, Job, new_id

EXPORT_API = "export"
EXPORT_QUEUE = "batch"
# The embeddings a row is compared by: its prompt's and its output's (service/exports).
VECTOR_KINDS = ("prompt", "output")


def create_export(
    session: Session,
    *,
    tenant_id: int,
    api_key_id: int | None,
    embedding_model: str,
    params: dict[str, Any],
    metadata: dict[str, Any],
) -> Job:
    """A queued export job, counted as a request of the tenant's day (its quotas)."""
    tenants.count_usage(session, tenant_id=tenant_id, requests=1)
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        model=embedding_model,
        queue=EXPORT_QUEUE,
        status="queued",
        input={},
        params=params,
        meta=metadata,
        api=EXPORT_API,
        api_key_id=api_key_id,
    )
    session.add(job)
    session.flush()
    return job


def get_export(session: Session, *, tenant_id: int, export_id: str) -> Job | None:
    return session.scalar(
        select(Job).where(Job.id == export_id, Job.tenant_id == tenant_id, Job.api == EXPORT_API)
    )


def list_exports(
    session: Session, *, tenant_id: int, after: str | None, limit: int
) -> tuple[list[Job], bool]:
    """The tenant's exports, newest first."""
    query = select(Job).where(Job.tenant_id == tenant_id, Job.api == EXPORT_API)
    return crud.page_by_id(session, query, Job, after=after, limit=limit)


def latest_generation_id(session: Session, *, tenant_id: int) -> str | None:
    """The highest id among the tenant's generations: an export's snapshot."""
    return session.scalar(
        select(Generation.id)
        .where(Generation.tenant_id == tenant_id)
        .order_by(Generation.id.desc())
        .limit(1)
    )


def export_rows(
    session: Session,
    *,
    tenant_id: int,
    filters: crud.Filters,
    embedding_model: str | None,
    after: str,
    until: str,
    limit: int,
) -> Sequence[Row[Any]]:
    """The next page of generations passing filters with after < id <= until, in id order:
    (id, input, output, prompt_vector, output_vector); a vector is None when missing, and
    always without an embedding model.
    """

    def vector(kind: str) -> Any:
        if embedding_model is None:
            return null()
        return (
            select(Embedding.vector)
            .where(
                Embedding.generation_id == Generation.id,
                Embedding.kind == kind,
                Embedding.model == embedding_model,
            )
            .order_by(Embedding.id)
            .limit(1)
            .scalar_subquery()
        )

    dialect = session.get_bind().dialect.name
    query = (
        select(
            Generation.id,
            Generation.input,
            Generation.output,
            *(vector(kind).label(f"{kind}_vector") for kind in VECTOR_KINDS),
        )
        .where(
            Generation.tenant_id == tenant_id,
            Generation.id > after,
            Generation.id <= until,
            *crud.filter_clauses(Generation, filters, dialect),
        )
        .order_by(Generation.id)
        .limit(limit)
    )
    return session.execute(query.execution_options(**{BINARY_RESULTS: True})).all()
