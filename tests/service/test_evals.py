"""An evaluation run's results are settled once and the run ends once, on both backends,
also when its jobs end without the worker's scoring (cancelled, deleted, unscored)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session

from service.db import crud, evals
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import EvalRun, EvalSet, Job, utcnow
from service.evals import metrics, runs
from tests.utils.factories import finish, make_job, make_key


def _vectors(texts: list[str]) -> list[np.ndarray]:
    """Embeddings of the normalised text (a stand-in for the embedding model)."""
    normalised = [metrics.normalize(text) for text in texts]
    return [np.array([len(text), text.count(" ") + 1.0]) for text in normalised]


def _run_of(
    session: Session, tenant_id: int, name: str, references: list[str]
) -> tuple[EvalRun, list[Job]]:
    items = [
        evals.NewItem(input={"prompt": f"q{n}"}, reference=reference, metadata={})
        for n, reference in enumerate(references)
    ]
    eval_set = evals.create_set(
        session, tenant_id=tenant_id, name=name, description="", metadata={}, items=items
    )
    run = evals.create_run(
        session,
        tenant_id=tenant_id,
        eval_set=eval_set,
        model="tiny-random-llama",
        model_version="1",
        params={},
        metadata={},
    )
    jobs = [make_job(session, tenant_id, prompt=f"q{n}") for n in range(len(references))]
    rows = evals.all_items(session, set_id=eval_set.id)
    evals.add_results(
        session,
        run_id=run.id,
        jobs=[(i, seq, job.id) for (i, seq, _), job in zip(rows, jobs, strict=True)],
    )
    session.commit()
    return run, jobs


def test_results_settle_once_and_the_run_finishes_once(db_url: str) -> None:
    factory = make_sessionmaker(make_engine(db_url))
    with factory() as session:
        tenant_id, _ = make_key(session)
        run, jobs = _run_of(session, tenant_id, "three", ["the cat sat", "a dog", "blue"])
    finish(factory, jobs[0], "The cat sat.")
    with factory() as session:
        found = evals.pending_result(session, run_id=run.id, job_id=jobs[0].id)
        assert found is not None
        result, item = found
        assert item.reference == "the cat sat"
        generation = _job(session, jobs[0].id).generation
        assert generation is not None
        scores = runs.score_output(generation.output, item.reference, _vectors)
        assert evals.record_scores(
            session,
            result_id=result.id,
            generation_id=generation.id,
            output=generation.output,
            scores=scores,
        )
        assert not evals.record_error(session, result_id=result.id, error="late")  # once only
        session.commit()
        assert evals.pending_result(session, run_id=run.id, job_id=jobs[0].id) is None
        assert not evals.finish_run(session, run_id=run.id)  # two still pending
        # The second job is cancelled while queued; the third succeeds, unscored (its
        # worker died before scoring), long enough ago for a read to score it.
        crud.cancel_job(session, job=_job(session, jobs[1].id))
        session.commit()
    finish(factory, jobs[2], "blue")
    with factory() as session:
        session.execute(
            update(Job)
            .where(Job.id == jobs[2].id)
            .values(finished_at=utcnow() - timedelta(minutes=5))
        )
        session.commit()
        run = session.get(EvalRun, run.id) or run
        progress = runs.settle(session, run=run, embed=_vectors)
        assert (progress.done, progress.scored, progress.failed) == (3, 2, 1)
        assert run.status == "succeeded" and run.finished_at is not None
        assert not evals.finish_run(session, run_id=run.id)  # it has ended already
        rows, _more = evals.list_results(session, run_id=run.id, after_seq=None, limit=10)
        results = {row.seq: row for row, _item in rows}
    assert results[1].scores == scores and scores["exact_match"] == 1.0
    assert scores["cosine"] == 1.0  # the two texts normalise alike, so do their vectors
    assert results[2].error == "the item's job was cancelled" and results[2].scores is None
    assert results[3].scores is not None and results[3].scores["exact_match"] == 1.0
    assert run.aggregates is not None
    assert run.aggregates == metrics.aggregate([results[1].scores, None, results[3].scores])


def _job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    assert job is not None
    return job


def _summary(run: EvalRun) -> dict[str, Any]:
    assert run.aggregates is not None
    return run.aggregates


def test_a_run_whose_items_all_failed_fails_and_deleting_its_set_cancels_jobs(db_url: str) -> None:
    factory = make_sessionmaker(make_engine(db_url))
    with factory() as session:
        tenant_id, _ = make_key(session)
        run, jobs = _run_of(session, tenant_id, "one", ["x"])
        crud.delete_job(session, job=_job(session, jobs[0].id))
        session.commit()
        runs.settle(session, run=run, embed=_vectors)
        assert run.status == "failed" and "deleted" in (run.error or "")
        assert _summary(run)["failed"] == 1 and _summary(run)["means"]["token_f1"] is None

        other, queued = _run_of(session, tenant_id, "two", ["y", "z"])
        eval_set = session.get(EvalSet, other.set_id)
        assert eval_set is not None
        evals.delete_set(session, eval_set=eval_set)
        session.commit()
        assert evals.get_run(session, tenant_id=tenant_id, run_id=other.id) is None
        session.expire_all()
        statuses = {_job(session, job.id).status for job in queued}
        assert statuses == {"cancelled"}
