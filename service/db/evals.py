"""Evaluation sets, runs and their results. Keyword-only, session first; callers commit.

A run has one result row per item of its set, made with the run and naming the job that
generates the item's output. A result is pending until it holds scores or an error; each
is written once (a conditional UPDATE). The run ends when none is pending: finish_run moves
it from running once, whoever calls it first after the last result was committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from service.db import crud
from service.db.tables import (
    EvalItem,
    EvalResult,
    EvalRun,
    EvalSet,
    Generation,
    Job,
    new_id,
    utcnow,
)
from service.evals import metrics
from service.turns import is_text_turn

SET_PREFIX = "evalset"
RUN_PREFIX = "evalrun"


@dataclass(frozen=True)
class NewItem:
    input: dict[str, Any]  # {prompt} or {messages}, as a job takes it
    reference: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Progress:
    total: int
    scored: int
    failed: int

    @property
    def done(self) -> int:
        return self.scored + self.failed


@dataclass(frozen=True)
class Unsettled:
    """A pending result and the state of its job (None: the job is gone)."""

    result_id: int
    job_status: str | None
    job_error: str | None
    generation_id: str | None
    finished_at: Any


def _page(
    session: Session, query: Select[Any], order: Any, *, after: Any, limit: int
) -> tuple[list[Any], bool]:
    """A page of query's rows ordered by `order` descending from `after` on."""
    if after is not None:
        query = query.where(order < after)
    rows = list(session.scalars(query.order_by(order.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# --- sets --------------------------------------------------------------------------------


def create_set(
    session: Session,
    *,
    tenant_id: int,
    name: str,
    description: str,
    metadata: dict[str, Any],
    items: Sequence[NewItem],
) -> EvalSet:
    """A set with its items, numbered from 1 in the order given."""
    eval_set = EvalSet(
        id=new_id(SET_PREFIX),
        tenant_id=tenant_id,
        name=name,
        description=description,
        meta=metadata,
        item_count=len(items),
    )
    session.add(eval_set)
    session.flush()
    session.add_all(
        EvalItem(
            set_id=eval_set.id,
            seq=seq,
            input=item.input,
            reference=item.reference,
            meta=item.metadata,
        )
        for seq, item in enumerate(items, 1)
    )
    session.flush()
    return eval_set


def get_set(session: Session, *, tenant_id: int, ref: str) -> EvalSet | None:
    """The tenant's set by id or by name (names never look like ids)."""
    column = EvalSet.id if ref.startswith(f"{SET_PREFIX}_") else EvalSet.name
    return session.scalar(select(EvalSet).where(EvalSet.tenant_id == tenant_id, column == ref))


def list_sets(
    session: Session, *, tenant_id: int, after: str | None, limit: int
) -> tuple[list[EvalSet], bool]:
    """The tenant's sets, newest first."""
    query = select(EvalSet).where(EvalSet.tenant_id == tenant_id)
    return _page(session, query, EvalSet.id, after=after, limit=limit)


def delete_set(session: Session, *, eval_set: EvalSet) -> None:
    """Remove a set with its items, runs and results; the runs' jobs still waiting are
    cancelled and those running are asked to stop."""
    jobs = (
        select(EvalResult.job_id)
        .join(EvalRun, EvalRun.id == EvalResult.run_id)
        .where(EvalRun.set_id == eval_set.id, EvalResult.job_id.is_not(None))
        .scalar_subquery()
    )
    crud.end_jobs(
        session, Job.id.in_(jobs), Job.status == "queued", status="cancelled", cancel_requested=True
    )
    session.execute(
        update(Job)
        .where(Job.id.in_(jobs), Job.status == "running")
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.delete(eval_set)  # items, runs and results by ON DELETE CASCADE
    session.flush()


def list_items(
    session: Session, *, set_id: str, after_seq: int | None, limit: int
) -> tuple[list[EvalItem], bool]:
    """A set's items in order, after the item numbered after_seq."""
    query = select(EvalItem).where(EvalItem.set_id == set_id)
    if after_seq is not None:
        query = query.where(EvalItem.seq > after_seq)
    rows = list(session.scalars(query.order_by(EvalItem.seq).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def all_items(session: Session, *, set_id: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(id, seq, input) of every item of a set, in order."""
    query = select(EvalItem.id, EvalItem.seq, EvalItem.input).where(EvalItem.set_id == set_id)
    return [(row.id, row.seq, row.input) for row in session.execute(query.order_by(EvalItem.seq))]


def history_items(
    session: Session,
    *,
    tenant_id: int,
    filters: crud.Filters,
    chat_models: Sequence[str],
    limit: int,
) -> list[NewItem]:
    """Items from the tenant's generations of language models passing filters, newest
    first: the generation's input, its output as the reference."""
    query = (
        select(Generation)
        .where(
            Generation.tenant_id == tenant_id,
            Generation.model.in_(list(chat_models)),
            *crud.filter_clauses(Generation, filters, session.get_bind().dialect.name),
        )
        .order_by(Generation.id.desc())
        .limit(limit)
    )
    return [
        NewItem(input=row.input, reference=row.output, metadata={"generation_id": row.id})
        for row in session.scalars(query)
        if is_text_turn(row.input)
    ]


# --- runs --------------------------------------------------------------------------------


def create_run(
    session: Session,
    *,
    tenant_id: int,
    eval_set: EvalSet,
    model: str,
    model_version: str,
    params: dict[str, Any],
    metadata: dict[str, Any],
) -> EvalRun:
    run = EvalRun(
        id=new_id(RUN_PREFIX),
        tenant_id=tenant_id,
        set_id=eval_set.id,
        model=model,
        model_version=model_version,
        params=params,
        status="running",
        total=eval_set.item_count,
        meta=metadata,
    )
    session.add(run)
    session.flush()
    return run


def add_results(session: Session, *, run_id: str, jobs: Sequence[tuple[int, int, str]]) -> None:
    """The run's pending results: (item id, seq, job id) each."""
    session.add_all(
        EvalResult(run_id=run_id, item_id=item_id, seq=seq, job_id=job_id)
        for item_id, seq, job_id in jobs
    )
    session.flush()


def get_run(session: Session, *, tenant_id: int, run_id: str) -> EvalRun | None:
    return session.scalar(
        select(EvalRun).where(EvalRun.id == run_id, EvalRun.tenant_id == tenant_id)
    )


def list_runs(
    session: Session, *, tenant_id: int, set_id: str | None, after: str | None, limit: int
) -> tuple[list[EvalRun], bool]:
    """The tenant's runs, newest first, of one set if set_id is given."""
    query = select(EvalRun).where(EvalRun.tenant_id == tenant_id)
    if set_id is not None:
        query = query.where(EvalRun.set_id == set_id)
    return _page(session, query, EvalRun.id, after=after, limit=limit)


def run_progress(session: Session, *, run: EvalRun) -> Progress:
    scored, failed = session.execute(
        select(
            func.count(EvalResult.scores),  # COUNT(column) counts the non-NULL ones
            func.count(EvalResult.error),
        ).where(EvalResult.run_id == run.id)
    ).one()
    return Progress(total=run.total, scored=scored or 0, failed=failed or 0)


# --- results -----------------------------------------------------------------------------


def _pending() -> ColumnElement[bool]:
    return and_(EvalResult.scores.is_(None), EvalResult.error.is_(None))


def pending_result(
    session: Session, *, run_id: str, job_id: str
) -> tuple[EvalResult, EvalItem] | None:
    """The pending result a job generates, with its item; None if there is none."""
    row = session.execute(
        select(EvalResult, EvalItem)
        .join(EvalItem, EvalItem.id == EvalResult.item_id)
        .where(EvalResult.run_id == run_id, EvalResult.job_id == job_id, _pending())
    ).first()
    return None if row is None else (row[0], row[1])


def record_scores(
    session: Session,
    *,
    result_id: int,
    generation_id: str,
    output: str,
    scores: dict[str, float | None],
) -> bool:
    """Store a pending result's output and scores; False if it was settled meanwhile."""
    return _settle(session, result_id, generation_id=generation_id, output=output, scores=scores)


def record_error(session: Session, *, result_id: int, error: str) -> bool:
    """Mark a pending result failed; False if it was settled meanwhile."""
    return _settle(session, result_id, error=error)


def _settle(session: Session, result_id: int, **values: Any) -> bool:
    moved = session.execute(
        update(EvalResult)
        .where(EvalResult.id == result_id, _pending())
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(moved.rowcount == 1)  # type: ignore[attr-defined]


def unsettled(session: Session, *, run_id: str) -> list[Unsettled]:
    """The run's pending results whose job has ended or is gone."""
    query = (
        select(EvalResult.id, Job.status, Job.error, Generation.id, Job.finished_at)
        .outerjoin(Job, Job.id == EvalResult.job_id)
        .outerjoin(Generation, Generation.job_id == Job.id)
        .where(
            EvalResult.run_id == run_id,
            _pending(),
            or_(Job.id.is_(None), Job.status.in_(("succeeded", "failed", "cancelled"))),
        )
    )
    return [Unsettled(*row) for row in session.execute(query)]


def result_of(session: Session, *, result_id: int) -> tuple[EvalResult, EvalItem]:
    row = session.execute(
        select(EvalResult, EvalItem)
        .join(EvalItem, EvalItem.id == EvalResult.item_id)
        .where(EvalResult.id == result_id)
    ).one()
    return row[0], row[1]


def finish_run(session: Session, *, run_id: str) -> bool:
    """End a running run whose results are all settled, storing its aggregates; True for
    the one caller that moved it. Call it after the last result's commit, in a new
    transaction, so that of two workers settling the last two items one sees both."""
    rows = session.execute(
        select(EvalResult.scores, EvalResult.error).where(EvalResult.run_id == run_id)
    ).all()
    if any(scores is None and error is None for scores, error in rows):
        return False
    summary = metrics.aggregate(scores for scores, _error in rows)
    values: dict[str, Any] = {"status": "succeeded", "aggregates": summary}
    if summary["items"] and not summary["scored"]:
        first_error = next(error for _scores, error in rows if error)
        values.update(status="failed", error=f"every item failed; the first: {first_error}")
    moved = session.execute(
        update(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.status == "running")
        .values(finished_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return bool(moved.rowcount == 1)  # type: ignore[attr-defined]


def list_results(
    session: Session, *, run_id: str, after_seq: int | None, limit: int
) -> tuple[list[tuple[EvalResult, EvalItem]], bool]:
    """A run's results with their items, in item order, after the item after_seq."""
    query = (
        select(EvalResult, EvalItem)
        .join(EvalItem, EvalItem.id == EvalResult.item_id)
        .where(EvalResult.run_id == run_id)
    )
    if after_seq is not None:
        query = query.where(EvalResult.seq > after_seq)
    rows = session.execute(query.order_by(EvalResult.seq).limit(limit + 1)).all()
    return [(row[0], row[1]) for row in rows[:limit]], len(rows) > limit


def compare_runs(
    session: Session, *, first: str, second: str, after_seq: int | None, limit: int
) -> tuple[list[tuple[EvalItem, EvalResult, EvalResult]], bool]:
    """Two runs of one set item by item: (item, first's result, second's), in item order."""
    other = aliased(EvalResult)
    query = (
        select(EvalItem, EvalResult, other)
        .join(EvalResult, EvalResult.item_id == EvalItem.id)
        .join(other, other.item_id == EvalItem.id)
        .where(EvalResult.run_id == first, other.run_id == second)
    )
    if after_seq is not None:
        query = query.where(EvalItem.seq > after_seq)
    rows = session.execute(query.order_by(EvalItem.seq).limit(limit + 1)).all()
    return [(row[0], row[1], row[2]) for row in rows[:limit]], len(rows) > limit
