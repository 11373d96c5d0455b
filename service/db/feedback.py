"""Feedback on generations. Callers commit."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from service.db import usage
from service.db.tables import Feedback, Generation


def add_feedback(
    session: Session,
    *,
    generation: Generation,
    score: float | None,
    label: str | None,
    comment: str | None,
    user: str | None,
    api_key_id: int | None,
) -> Feedback:
    """Store one judgement; a score moves the generation's mean and is counted in the
    model's trend on the day the generation was made.

    The mean is updated in one UPDATE from the row's own values, so concurrent feedback on
    one generation serialises on its row and none is lost.
    """
    row = Feedback(
        tenant_id=generation.tenant_id,
        generation_id=generation.id,
        score=score,
        label=label,
        comment=comment,
        user=user,
        api_key_id=api_key_id,
    )
    session.add(row)
    if score is not None:
        count = Generation.feedback_count
        mean = case((count == 0, 0.0), else_=Generation.feedback_score)
        session.execute(
            update(Generation)
            .where(Generation.id == generation.id)
            .values(feedback_score=(mean * count + score) / (count + 1), feedback_count=count + 1)
            .execution_options(synchronize_session=False)
        )
        usage.record(
            session,
            tenant_id=generation.tenant_id,
            model=generation.model,
            api_key_id=generation.job.api_key_id if generation.job else None,
            day=generation.created_at.date(),
            feedback_count=1,
            feedback_sum=score,
        )
    session.flush()
    session.refresh(generation)
    return row


def list_feedback(session: Session, *, generation_id: str) -> Sequence[Feedback]:
    return session.scalars(
        select(Feedback).where(Feedback.generation_id == generation_id).order_by(Feedback.id)
    ).all()
