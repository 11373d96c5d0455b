"""The worker's side of an evaluation run: score an eval job's output as it ends."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from service.db import evals
from service.db.tables import Generation, Job
from service.evals.runs import RUN_KEY, score_output
from workers.engine.runtime import ModelRuntime


def score_job(
    factory: sessionmaker[Session],
    runtime: ModelRuntime,
    job: Job,
    *,
    status: str,
    generation_id: str | None,
    embedding_model: str,
) -> None:
    """Fill the result of the eval item a job generated: its output scored against the
    reference, or the job's error; then finish the run if it was the last. Jobs that are
    not an eval run's, or were ended by another delivery (skipped), are left alone."""
    run_id = (job.meta or {}).get(RUN_KEY)
    if not isinstance(run_id, str) or status == "skipped":
        return
    with factory() as session:
        found = evals.pending_result(session, run_id=run_id, job_id=job.id)
        if found is None:
            return  # not this run's job (metadata is the caller's), or settled already
        result_id, reference = found[0].id, found[1].reference
        generation = session.get(Generation, generation_id) if generation_id else None
        output = generation.output if generation is not None else None
        ended = session.get(Job, job.id)
        error = (ended.error if ended is not None else None) or f"the item's job was {status}"
    if output is None or generation_id is None:
        with factory() as session:
            evals.record_error(session, result_id=result_id, error=error)
            session.commit()
    else:
        # No connection is held while the engine embeds.
        scores = score_output(
            output, reference, lambda texts: runtime.embed(embedding_model, texts)
        )
        with factory() as session:
            evals.record_scores(
                session,
                result_id=result_id,
                generation_id=generation_id,
                output=output,
                scores=scores,
            )
            session.commit()
    # After the commit, in a new transaction: of two workers ending the last two items,
    # at least one sees both settled.
    with factory() as session:
        evals.finish_run(session, run_id=run_id)
        session.commit()
