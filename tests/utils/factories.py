"""Rows made through crud, as the service makes them."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db import crud, tenants
from service.db.tables import Generation, Job, new_id


def make_key(session: Session, tenant: str = "acme", role: str = "writer") -> tuple[int, str]:
    row, plaintext = tenants.create_api_key(session, tenant_name=tenant, role=role)
    session.commit()
    return row.tenant_id, plaintext


def make_job(
    session: Session,
    tenant_id: int,
    *,
    model: str = "tiny-random-llama",
    prompt: str = "hello",
    metadata: dict[str, Any] | None = None,
    max_tokens: int = 8,
    parent: str | None = None,
    conversation_id: str | None = None,
) -> Job:
    job = crud.create_job(
        session,
        tenant_id=tenant_id,
        model=model,
        queue="interactive",
        input={"prompt": prompt},
        params={"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": []},
        metadata=metadata or {},
        conversation_id=conversation_id,
        parent_generation_id=parent,
    )
    session.commit()
    return job


def make_generation_row(
    session: Session,
    tenant_id: int,
    *,
    prompt: str = "hi",
    output: str = "hello",
    meta: dict[str, Any] | None = None,
) -> Generation:
    """A stored generation (and its job) written directly, as a finished worker leaves it."""
    job = Job(id=new_id("job"), tenant_id=tenant_id, model="chat", queue="interactive", input={})
    generation = Generation(
        id=new_id("gen"),
        tenant_id=tenant_id,
        job_id=job.id,
        model="chat",
        model_version="1",
        input={"prompt": prompt},
        prompt=prompt,
        output=output,
        meta=meta or {},
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason="stop",
    )
    session.add(job)
    session.flush()
    session.add(generation)
    session.flush()
    return generation


def finish(sessions: sessionmaker[Session], job: Job, output: str) -> None:
    """Store the job's result as a worker does."""
    with sessions() as session:
        claimed = crud.claim_job(session, job_id=job.id, lease_s=60)
        assert claimed is not None
        generation = Generation(
            id=new_id("gen"),
            tenant_id=job.tenant_id,
            job_id=job.id,
            model=job.model,
            model_version="1",
            input=job.input,
            prompt="hello",
            output=output,
            prompt_tokens=1,
            completion_tokens=2,
            finish_reason="stop",
        )
        crud.store_generation(
            session, job=claimed, generation=generation, vectors={}, model="m", dimension=3
        )
        session.commit()
