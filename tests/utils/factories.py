"""Rows made through crud, as the service makes them."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db import crud, tenants
from service.db.tables import Generation, Job, new_id
from service.turns import is_text_turn, turn_text


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


def store_turn(
    session: Session,
    tenant_id: int,
    *,
    turn_input: dict[str, Any],
    output: str,
    vectors: dict[str, bytes],
    model: str = "tiny-random-llama",
    metadata: dict[str, Any] | None = None,
    embedding_model: str = "all-minilm-l6-v2",
) -> Generation:
    """A generation and its embeddings (kind -> float32 bytes), stored through crud as the
    worker stores one: its job made, claimed, then ended by the generation."""
    job = crud.create_job(
        session,
        tenant_id=tenant_id,
        model=model,
        queue="batch",
        input=turn_input,
        params={},
        metadata=metadata or {},
        conversation_id=None,
        parent_generation_id=None,
    )
    session.commit()
    claimed = crud.claim_job(session, job_id=job.id, lease_s=60)
    assert claimed is not None
    generation = Generation(
        id=new_id("gen"),
        tenant_id=tenant_id,
        job_id=job.id,
        conversation_id=job.conversation_id,
        model=model,
        model_version="1",
        input=turn_input,
        prompt=turn_text(turn_input) if is_text_turn(turn_input) else json.dumps(turn_input),
        output=output,
        meta=metadata or {},
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason="stop",
    )
    dimension = len(next(iter(vectors.values()), b"")) // 4
    stored = crud.store_generation(
        session,
        job=claimed,
        generation=generation,
        vectors=vectors,
        model=embedding_model,
        dimension=dimension,
    )
    assert stored
    session.commit()
    return generation
