"""Evaluation runs: one generation job per item, scored as each ends, then aggregated.

Starting a run stores the run, one batch-queue job per item (service.submit.store_job,
so usage, redaction and the worker's continuous batching treat them like any job) and
one pending result per item naming its job, in one transaction; then it publishes the
jobs. The worker that ends an eval job scores it (workers/evals.py) and tries to finish
the run. Jobs that end without passing the worker's hook (cancelled while queued, failed
by the task's failure hook, given up by the sweeper, deleted) are settled when the run
is read (settle), which also tries to finish it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.registry import ModelSpec
from service.api.errors import InvalidRequest, TooManyRequests
from service.db import crud, evals
from service.db.tables import EvalRun, EvalSet, Generation, Job, utcnow
from service.evals import metrics
from service.queue import JobPublisher
from service.submit import JobRequest, admit, store_job

EVAL_QUEUE = "batch"
# The job metadata that marks an eval job (the result row naming the job is the link).
RUN_KEY, ITEM_KEY = "eval_run", "eval_item"
# A succeeded item its worker did not score (it died, or its database write failed) is
# scored when the run is read this long after its job ended.
SCORE_AFTER = timedelta(seconds=30)

# Embeds texts; returns one vector per text.
Embed = Callable[[list[str]], Any]


def score_output(output: str, reference: str, embed: Embed) -> dict[str, float | None]:
    """Every score of an output against its reference. Blank text has no meaningful
    embedding: cosine is 1.0 when both are blank and 0.0 when one is."""
    scores: dict[str, float | None] = {**metrics.text_scores(output, reference)}
    if output.strip() and reference.strip():
        first, second = embed([output, reference])
        scores["cosine"] = metrics.cosine(first, second)
    else:
        scores["cosine"] = float(not output.strip() and not reference.strip())
    return scores


def _check_room(session: Session, *, tenant_id: int, items: int, max_queued: int) -> None:
    """Unlike a batch, a run stores all its jobs at once: the queue's bound must hold
    them all."""
    if items > max_queued:
        raise InvalidRequest(
            f"the set has {items} items, more than this tenant may have queued "
            f"({max_queued}); split it",
            param="set_id",
            code="set_too_large",
        )
    queued = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status == "queued")
    )
    if (queued or 0) + items > max_queued:
        raise TooManyRequests(
            f"{queued} jobs are queued for this tenant; the run's {items} more would pass "
            f"the limit of {max_queued}; retry when some have run",
            code="queue_full",
        )


def start_run(
    session: Session,
    publisher: JobPublisher,
    *,
    tenant_id: int,
    api_key_id: int | None,
    eval_set: EvalSet,
    spec: ModelSpec,
    params: dict[str, Any],
    metadata: dict[str, Any],
    max_queued: int,
) -> EvalRun:
    """Store a run with a job and a pending result per item, commit, publish the jobs."""
    admit(session, tenant_id=tenant_id, max_queued=max_queued)  # the quotas of the day
    _check_room(session, tenant_id=tenant_id, items=eval_set.item_count, max_queued=max_queued)
    run = evals.create_run(
        session,
        tenant_id=tenant_id,
        eval_set=eval_set,
        model=spec.name,
        model_version=spec.version,
        params=params,
        metadata=metadata,
    )
    jobs = []
    for item_id, seq, item_input in evals.all_items(session, set_id=eval_set.id):
        request = JobRequest(
            model=spec.name,
            queue=EVAL_QUEUE,
            input=item_input,
            params=params,
            metadata={RUN_KEY: run.id, ITEM_KEY: seq},
        )
        job = store_job(session, tenant_id=tenant_id, request=request, api_key_id=api_key_id)
        jobs.append((item_id, seq, job.id))
    evals.add_results(session, run_id=run.id, jobs=jobs)
    session.commit()
    # Rule 2: stored first; a publish lost here is sent again by the sweeper.
    for _item_id, _seq, job_id in jobs:
        if publisher.publish(job_id, EVAL_QUEUE):
            crud.mark_published(session, job_id=job_id)
    session.commit()
    return run


def _failure(pending: evals.Unsettled) -> str:
    if pending.job_status is None:
        return "the item's job was deleted"
    return pending.job_error or f"the item's job was {pending.job_status}"


def settle(session: Session, *, run: EvalRun, embed: Embed) -> evals.Progress:
    """Settle the results of a running run whose jobs ended without being scored, finish
    the run when none is left pending, and return its progress (commits)."""
    if run.status == "running":
        now = utcnow()
        for pending in evals.unsettled(session, run_id=run.id):
            if pending.generation_id is None:
                evals.record_error(session, result_id=pending.result_id, error=_failure(pending))
            elif pending.finished_at is not None and now - pending.finished_at > SCORE_AFTER:
                _score_here(session, pending, embed)
        session.commit()
    progress = evals.run_progress(session, run=run)
    if run.status == "running" and progress.done >= progress.total:
        evals.finish_run(session, run_id=run.id)
        session.commit()
        session.refresh(run)
    return progress


def _score_here(session: Session, pending: evals.Unsettled, embed: Embed) -> None:
    result, item = evals.result_of(session, result_id=pending.result_id)
    generation = session.get(Generation, pending.generation_id)
    assert generation is not None  # just joined
    evals.record_scores(
        session,
        result_id=result.id,
        generation_id=generation.id,
        output=generation.output,
        scores=score_output(generation.output, item.reference, embed),
    )
