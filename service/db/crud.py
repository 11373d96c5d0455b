"""Queries and writes. Keyword-only, session first; callers commit unless stated."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    delete,
    exists,
    func,
    literal_column,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session
from sqlalchemy.sql import type_coerce

from service.db import partitions, tenants, usage
from service.db.tables import (
    Batch,
    Conversation,
    Document,
    Embedding,
    EmbeddingDeletion,
    Feedback,
    File,
    Generation,
    Job,
    TrainingJob,
    new_id,
    utcnow,
)

R = TypeVar("R", Job, Generation, File, Batch, TrainingJob, Document)
Q = TypeVar("Q", Job, TrainingJob)  # the two kinds of job a worker claims
# How long before its row's created_at a generation's id may have been made, at most: the
# worker makes both in one step, moments apart; a day is the margin.
ID_BEFORE_ROW = timedelta(days=1)


@dataclass(frozen=True)
class Filters:
    """Filters shared by the job and generation listings and by search."""

    status: str | None = None
    model: str | None = None
    tags: Sequence[str] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None
    conversation_id: str | None = None
    # Generations only: their feedback, and the category set on them.
    min_feedback_score: float | None = None
    max_feedback_score: float | None = None
    label: str | None = None  # some feedback on it has this label
    category: str | None = None
    # Rows marked metadata.synthetic = true (a trained model's samples, or rows so marked),
    # or only the others; None: both.
    synthetic: bool | None = None

    @property
    def narrows_generations(self) -> bool:
        """Whether these filters leave out some of a tenant's generations (status is a job's)."""
        return any(
            getattr(self, spec.name) not in (None, (), [], {})
            for spec in dataclasses.fields(self)
            if spec.name != "status"
        )


# --- filters -----------------------------------------------------------------------------


def json_value_matches(column: Any, key: str, value: Any, dialect: str) -> ColumnElement[bool]:
    """metadata[key] == value, of the same JSON type; a numeric string (from a query
    string) also matches the number.

    PostgreSQL: JSON containment, which never fails on a row whose value at key has
    another type (a cast of "abc" to a number would). SQLite: json_type and json_extract.
    """
    number: float | None = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):
            number = None  # "nan", "inf": JSON has no such numbers
    if dialect == "postgresql":
        document = type_coerce(column, JSONB)
        matches = document.contains({key: value})
        return matches if number is None else or_(matches, document.contains({key: number}))
    path = f'$."{key}"'
    kind, found = func.json_type(column, path), func.json_extract(column, path)

    def typed(wanted: Any) -> ColumnElement[bool]:
        if isinstance(wanted, bool):
            return kind == ("true" if wanted else "false")
        if isinstance(wanted, int | float):
            return and_(kind.in_(("integer", "real")), found == wanted)
        return and_(kind == "text", found == wanted)

    return typed(value) if number is None else or_(typed(value), typed(number))


def _has_tags(column: Any, tags: Sequence[str], dialect: str) -> list[ColumnElement[bool]]:
    """The row's metadata.tags holds every one of tags.

    PostgreSQL: one containment test, answered by the GIN index on metadata -> 'tags'
    (migration 0007) when the planner expects few matches. The expression is written as
    the index's, with the key inline: PostgreSQL matches an index expression as written,
    and the subscript metadata['tags'] (SQLAlchemy's rendering of ["tags"]) is another.
    """
    if dialect == "postgresql":
        tags_of = type_coerce(column.op("->")(literal_column("'tags'")), JSONB)
        return [tags_of.contains(list(tags))]
    clauses: list[ColumnElement[bool]] = []
    for tag in tags:
        values = func.json_each(column, "$.tags").table_valued("value")
        clauses.append(exists(select(1).select_from(values).where(values.c.value == tag)))
    return clauses


def _marked_synthetic(column: Any, dialect: str) -> ColumnElement[bool]:
    """metadata.synthetic is JSON true; never NULL, so its negation holds for every other row."""
    if dialect == "postgresql":
        return type_coerce(column, JSONB).contains({"synthetic": True})
    return func.coalesce(func.json_type(column, "$.synthetic"), "") == "true"


def _id_bounds(filters: Filters) -> list[ColumnElement[bool]]:
    """The id range a time filter implies for generations, whose ids sort by the time the
    worker made the row (service/db/partitions.py): PostgreSQL then reads only the
    partitions of that time, and each from where it begins. An id is made before its row's
    created_at, at most moments before (ID_BEFORE_ROW: far more), so the bounds keep every
    row the time filter keeps."""
    bounds: list[ColumnElement[bool]] = []
    if filters.created_after:
        bounds.append(Generation.id >= partitions.bound(filters.created_after - ID_BEFORE_ROW))
    if filters.created_before:
        bounds.append(
            Generation.id < partitions.bound(filters.created_before + timedelta(seconds=1))
        )
    return bounds


def filter_clauses(
    table: type[Job] | type[Generation], filters: Filters, dialect: str
) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if filters.model:
        clauses.append(table.model == filters.model)
    if filters.created_after:
        clauses.append(table.created_at >= filters.created_after)
    if filters.created_before:
        clauses.append(table.created_at < filters.created_before)
    if table is Generation:
        clauses += _id_bounds(filters)
    if filters.conversation_id:
        clauses.append(table.conversation_id == filters.conversation_id)
    if filters.tags:
        clauses.extend(_has_tags(table.meta, filters.tags, dialect))
    clauses.extend(
        json_value_matches(table.meta, key, value, dialect)
        for key, value in filters.metadata.items()
    )
    if filters.category is not None:
        clauses.append(json_value_matches(table.meta, "category", filters.category, dialect))
    if filters.synthetic is not None:
        marked = _marked_synthetic(table.meta, dialect)
        clauses.append(marked if filters.synthetic else not_(marked))
    feedback = (filters.min_feedback_score, filters.max_feedback_score, filters.label)
    if any(value is not None for value in feedback):
        if table is not Generation:
            raise ValueError("feedback filters apply to generations only")
        clauses.extend(_feedback_clauses(filters))
    return clauses


def _feedback_clauses(filters: Filters) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if filters.min_feedback_score is not None:
        clauses.append(Generation.feedback_score >= filters.min_feedback_score)
    if filters.max_feedback_score is not None:
        clauses.append(Generation.feedback_score <= filters.max_feedback_score)
    if filters.label is not None:
        # A correlated EXISTS: PostgreSQL plans it as a semi-join on the label's index.
        labelled = select(1).where(
            Feedback.tenant_id == Generation.tenant_id,
            Feedback.label == filters.label,
            Feedback.generation_id == Generation.id,
        )
        clauses.append(exists(labelled))
    return clauses


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def page_by_id(
    session: Session,
    query: Select[R],
    table: type[R],
    *,
    after: str | None,
    limit: int,
    descending: bool = True,
) -> tuple[list[R], bool]:
    """A page of query's rows in id order from the id `after`, and whether more follow.

    Public ids sort by creation time, so this is newest (or oldest) first.
    """
    if after:
        query = query.where(table.id < after if descending else table.id > after)
    order = table.id.desc() if descending else table.id.asc()
    rows = list(session.scalars(query.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# --- jobs --------------------------------------------------------------------------------


def create_job(
    session: Session,
    *,
    tenant_id: int,
    model: str,
    queue: str,
    input: dict[str, Any],
    params: dict[str, Any],
    metadata: dict[str, Any],
    conversation_id: str | None,
    parent_generation_id: str | None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    api: str = "jobs",
    store: bool = False,
    batch_id: str | None = None,
    custom_id: str | None = None,
    context: dict[str, Any] | None = None,
    api_key_id: int | None = None,
    cache_key: str | None = None,
    cache_scope: str | None = None,
) -> Job:
    """A queued job; a new conversation is started when it continues none."""
    if conversation_id is None:
        conversation = Conversation(id=new_id("conv"), tenant_id=tenant_id, meta={})
        session.add(conversation)
        session.flush()
        conversation_id = conversation.id
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        model=model,
        queue=queue,
        status="queued",
        input=input,
        params=params,
        meta=metadata,
        conversation_id=conversation_id,
        parent_generation_id=parent_generation_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        api=api,
        store=store,
        batch_id=batch_id,
        custom_id=custom_id,
        context=context,
        api_key_id=api_key_id,
        cache_key=cache_key,
        cache_scope=cache_scope,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, tenant_id: int, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def get_job_by_idempotency_key(session: Session, *, tenant_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def list_jobs(
    session: Session,
    *,
    tenant_id: int,
    filters: Filters,
    cursor: str | None,
    limit: int,
    ids: Sequence[str] = (),
) -> tuple[list[Job], bool]:
    """A page of the tenant's jobs, newest first; with ids, only those among them."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    query = query.where(*filter_clauses(Job, filters, _dialect(session)))
    if filters.status:
        query = query.where(Job.status == filters.status)
    if ids:
        query = query.where(Job.id.in_(ids))
    return page_by_id(session, query, Job, after=cursor, limit=limit)


def mark_published(session: Session, *, job_id: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(published_at=utcnow(), publish_count=Job.publish_count + 1)
    )


# What the usage counts of a job that ends (usage.Ended), read back by UPDATE ... RETURNING.
ENDED = (Job.tenant_id, Job.model, Job.api_key_id, Job.created_at, Job.api)


def end_jobs(session: Session, *where: ColumnElement[bool], status: str, **values: Any) -> int:
    """Move the jobs matching where to a final status and count them in the usage;
    returns how many moved."""
    ended = session.execute(
        update(Job)
        .where(*where)
        .values(status=status, finished_at=utcnow(), **values)
        .returning(*ENDED)
        .execution_options(synchronize_session=False)
    ).all()
    usage.record_ended(session, (usage.Ended(*row) for row in ended), status=status)
    return len(ended)


def cancel_job(session: Session, *, job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next token."""
    if job.status == "queued":
        end_jobs(
            session,
            Job.id == job.id,
            Job.status == "queued",
            status="cancelled",
            cancel_requested=True,
        )
    elif job.status == "running":
        session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    session.flush()
    session.refresh(job)
    return job


def list_stored_jobs(
    session: Session,
    *,
    tenant_id: int,
    api: str,
    filters: Filters,
    after: str | None,
    limit: int,
    descending: bool,
) -> tuple[list[Job], bool]:
    """Succeeded jobs of api sent with store=true, in id (creation) order from after."""
    query = select(Job).where(
        Job.tenant_id == tenant_id,
        Job.api == api,
        Job.store.is_(True),
        Job.status == "succeeded",
        *filter_clauses(Job, filters, _dialect(session)),
    )
    return page_by_id(session, query, Job, after=after, limit=limit, descending=descending)


def set_job_metadata(session: Session, *, job: Job, metadata: dict[str, Any]) -> None:
    """Replace the metadata of a job and of its generation (search filters read the latter)."""
    job.meta = metadata
    if job.generation is not None:
        job.generation.meta = metadata
    session.flush()


def delete_job(session: Session, *, job: Job) -> None:
    """Remove a job with its generation and embeddings (logged for the indexes)."""
    if job.generation is not None:
        delete_generation(session, generation=job.generation)
    session.delete(job)
    session.flush()


# --- the lines of a batch ---------------------------------------------------------------


def create_failed_job(
    session: Session,
    *,
    tenant_id: int,
    api: str,
    batch_id: str,
    custom_id: str | None,
    error: dict[str, Any],
) -> Job:
    """A batch line that could not become a request: stored failed, with its error."""
    now = utcnow()
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        model="",
        queue="batch",
        status="failed",
        input={},
        params={},
        meta={},
        api=api,
        batch_id=batch_id,
        custom_id=custom_id,
        error=error["message"],
        result={"error": error},
        finished_at=now,
    )
    session.add(job)
    session.flush()
    usage.record_ended(session, [usage.Ended(tenant_id, "", None, now)], status="failed")
    return job


def batch_custom_ids(session: Session, *, batch_id: str) -> list[str | None]:
    """The custom_id of each line stored so far, in line order."""
    return list(
        session.scalars(select(Job.custom_id).where(Job.batch_id == batch_id).order_by(Job.id))
    )


def count_batch_jobs(session: Session, *, batch_id: str) -> int:
    return (
        session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id)) or 0
    )


def iter_batch_jobs(session: Session, *, batch_id: str, page: int) -> Iterator[Job]:
    """The batch's jobs in line order, a page at a time (each page forgotten after use)."""
    after = ""
    while True:
        rows = list(
            session.scalars(
                select(Job)
                .where(Job.batch_id == batch_id, Job.id > after)
                .order_by(Job.id)
                .limit(page)
            )
        )
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1].id
        for row in rows:
            session.expunge(row)


# --- generations and conversations -------------------------------------------------------


def get_generation(session: Session, *, tenant_id: int, generation_id: str) -> Generation | None:
    return session.scalar(
        select(Generation).where(Generation.id == generation_id, Generation.tenant_id == tenant_id)
    )


def list_generations(
    session: Session, *, tenant_id: int, filters: Filters, cursor: str | None, limit: int
) -> tuple[list[Generation], bool]:
    query = select(Generation).where(Generation.tenant_id == tenant_id)
    query = query.where(*filter_clauses(Generation, filters, _dialect(session)))
    return page_by_id(session, query, Generation, after=cursor, limit=limit)


def delete_generation(session: Session, *, generation: Generation) -> None:
    """Remove the text and the embeddings; log the embedding ids for the indexes."""
    embeddings = session.execute(
        select(Embedding.id, Embedding.model).where(Embedding.generation_id == generation.id)
    ).all()
    session.add_all(
        EmbeddingDeletion(embedding_id=eid, model=model, tenant_id=generation.tenant_id)
        for eid, model in embeddings
    )
    session.execute(delete(Embedding).where(Embedding.generation_id == generation.id))
    # The files it made go with it (their chunks by ON DELETE CASCADE).
    session.execute(delete(File).where(File.generation_id == generation.id))
    session.delete(generation)
    session.flush()


def get_conversation(
    session: Session, *, tenant_id: int, conversation_id: str
) -> Conversation | None:
    return session.scalar(
        select(Conversation).where(
            Conversation.id == conversation_id, Conversation.tenant_id == tenant_id
        )
    )


def conversation_turns(session: Session, *, conversation_id: str) -> list[Generation]:
    return list(
        session.scalars(
            select(Generation)
            .where(Generation.conversation_id == conversation_id)
            .order_by(Generation.created_at, Generation.id)
        )
    )


def latest_generation(session: Session, *, conversation_id: str) -> Generation | None:
    return session.scalar(
        select(Generation)
        .where(Generation.conversation_id == conversation_id)
        .order_by(Generation.id.desc())
        .limit(1)
    )


def ancestors(session: Session, *, generation_id: str | None, limit: int = 256) -> list[Generation]:
    """The chain of turns ending at generation_id, oldest first."""
    chain: list[Generation] = []
    while generation_id is not None and len(chain) < limit:
        turn = session.get(Generation, generation_id)
        if turn is None:
            break
        chain.append(turn)
        generation_id = turn.parent_id
    return chain[::-1]


def _visible_embeddings(
    session: Session, *columns: Any, tenant_id: int, kinds: Sequence[str], filters: Filters
) -> Select[Any]:
    """SELECT columns of the tenant's embeddings of kinds whose generation passes filters."""
    return (
        select(*columns)
        .join(Generation, Generation.id == Embedding.generation_id)
        .where(
            Embedding.tenant_id == tenant_id,
            Embedding.kind.in_(list(kinds)),
            *filter_clauses(Generation, filters, _dialect(session)),
        )
    )


def generations_for_embeddings(
    session: Session,
    *,
    tenant_id: int,
    embedding_ids: Sequence[int],
    kinds: Sequence[str],
    filters: Filters,
) -> dict[int, tuple[str, str]]:
    """Of the given embedding ids, those the caller may see: id -> (generation id, kind)."""
    query = _visible_embeddings(
        session,
        Embedding.id,
        Embedding.generation_id,
        Embedding.kind,
        tenant_id=tenant_id,
        kinds=kinds,
        filters=filters,
    ).where(Embedding.id.in_(list(embedding_ids)))
    return {eid: (gid, kind) for eid, gid, kind in session.execute(query)}


def embedding_ids_matching(
    session: Session,
    *,
    tenant_id: int,
    model: str,
    kinds: Sequence[str],
    filters: Filters,
    limit: int,
) -> list[int] | None:
    """Ids of the tenant's embeddings whose generation passes filters; None if over limit."""
    query = (
        _visible_embeddings(
            session, Embedding.id, tenant_id=tenant_id, kinds=kinds, filters=filters
        )
        .where(Embedding.model == model)
        .limit(limit + 1)
    )
    ids = list(session.scalars(query))
    return ids if len(ids) <= limit else None


def get_generations(session: Session, *, ids: Sequence[str]) -> dict[str, Generation]:
    rows = session.scalars(select(Generation).where(Generation.id.in_(list(ids))))
    return {row.id: row for row in rows}


# --- the worker's side -------------------------------------------------------------------


def claim_job(session: Session, *, job_id: str, lease_s: float) -> Job | None:
    """Mark a job running if it is queued, or running with an expired lease; else None."""
    return claim(session, Job, job_id=job_id, lease_s=lease_s)


def claim(session: Session, table: type[Q], *, job_id: str, lease_s: float) -> Q | None:
    """Mark a job (or training job) running if it is queued, or running with an expired
    lease, and not asked to cancel; else None.

    The conditional UPDATE is the claim: of two deliveries of one job, one wins.
    """
    now = utcnow()
    claimable = or_(
        table.status == "queued",
        and_(table.status == "running", table.lease_expires_at < now),
    )
    result = session.execute(
        update(table)
        .where(table.id == job_id, claimable, table.cancel_requested.is_(False))
        .values(
            status="running",
            attempts=table.attempts + 1,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.get(table, job_id, populate_existing=True)


def renew_leases(session: Session, *, job_ids: Collection[str], lease_s: float) -> set[str]:
    """Extend the leases of those jobs still running; returns the ids asked to cancel."""
    if not job_ids:
        return set()
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return set(
        session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested.is_(True)))
    )


def finish_job(
    session: Session,
    *,
    job_id: str,
    status: str,
    error: str | None = None,
    result: dict[str, Any] | None = None,
    generation: Generation | None = None,
) -> bool:
    """Move a running job to a final status and count it in the usage; False when it was
    not running. A succeeded job's generation gives the tokens counted."""
    values: dict[str, Any] = {
        "status": status,
        "error": error,
        "finished_at": utcnow(),
        "lease_expires_at": None,
    }
    if result is not None:
        values["result"] = result
    finished = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(**values)
        .returning(*ENDED)
        .execution_options(synchronize_session=False)
    ).first()
    if finished is None:
        return False
    tokens: dict[str, Any] = {}
    if generation is not None:
        tokens = {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "refusal": usage.is_refusal(generation.output),
        }
    elif result is not None and "prompt_tokens" in result:
        tokens = {"prompt_tokens": result["prompt_tokens"]}
    usage.record_ended(session, [usage.Ended(*finished)], status=status, **tokens)
    return True


def reject_job(
    session: Session, *, job_id: str, message: str, param: str | None, code: str | None
) -> bool:
    """Fail a job whose input the model cannot take; the API answers with this error."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return finish_job(
        session, job_id=job_id, status="failed", error=message, result={"error": error}
    )


def store_generation(
    session: Session,
    *,
    job: Job,
    generation: Generation,
    vectors: dict[str, bytes],
    model: str,
    dimension: int,
) -> bool:
    """Store a result and its embeddings and mark the job succeeded, in the caller's
    transaction. False (and nothing written) if the job is no longer running."""
    if not finish_job(session, job_id=job.id, status="succeeded", generation=generation):
        return False
    session.add(generation)
    session.flush()
    tenants.count_usage(
        session,
        tenant_id=job.tenant_id,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
    )
    session.add_all(
        Embedding(
            tenant_id=job.tenant_id,
            generation_id=generation.id,
            kind=kind,
            model=model,
            dimension=dimension,
            vector=vector,
        )
        for kind, vector in vectors.items()
    )
    session.flush()
    return True


# --- the sweeper's side ------------------------------------------------------------------


def stale_jobs(
    session: Session,
    *,
    now: datetime,
    requeue_after_s: float,
    never_published_after_s: float,
    limit: int = 500,
) -> list[Job]:
    """Queued jobs whose message may be lost, and running jobs whose worker is gone."""
    oldest_backoff = now - timedelta(seconds=requeue_after_s)
    query = (
        select(Job)
        .where(
            or_(
                and_(
                    Job.status == "queued",
                    Job.published_at.is_(None),
                    Job.created_at < now - timedelta(seconds=never_published_after_s),
                ),
                and_(Job.status == "queued", Job.published_at < oldest_backoff),
                and_(Job.status == "running", Job.lease_expires_at < now),
            )
        )
        .order_by(Job.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def requeue_job(session: Session, *, job: Job | TrainingJob, max_attempts: int) -> bool:
    """Claim a stale job or training job for re-publishing (a conditional UPDATE, so one
    sweeper wins).

    A job that has used all its attempts is failed instead; returns whether to publish.
    """
    table = type(job)
    same_state = and_(
        table.id == job.id, table.status == job.status, table.publish_count == job.publish_count
    )
    if job.attempts >= max_attempts:
        error = f"gave up after {job.attempts} attempts (worker lost or timed out)"
        if isinstance(job, Job):  # a request: counted in the usage as it ends
            end_jobs(session, same_state, status="failed", error=error, lease_expires_at=None)
        else:
            session.execute(
                update(table)
                .where(same_state)
                .values(status="failed", finished_at=utcnow(), error=error, lease_expires_at=None)
            )
        session.commit()
        return False
    result = session.execute(
        update(table)
        .where(same_state)
        .values(
            status="queued",
            published_at=utcnow(),
            publish_count=job.publish_count + 1,
            lease_expires_at=None,
        )
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]
