"""The worker's job function in-process, on a real database with real (tiny) models."""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db import crud
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Embedding, Generation, Job
from tests.utils.factories import make_job, make_key
from workers.engine.runtime import ModelRuntime
from workers.jobs import Outcome, encode_job, run_job
from workers.leases import LeaseKeeper

EMBEDDER = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def runtime(model_cache_dir) -> ModelRuntime:  # noqa: ANN001
    return ModelRuntime(cache_dir=model_cache_dir, device="cpu")


def _run(
    factory: sessionmaker[Session], runtime: ModelRuntime, job_id: str, time_limit_s: float = 600
) -> Outcome:
    leases = LeaseKeeper(factory, lease_s=60)
    return run_job(
        factory,
        runtime,
        job_id,
        leases=leases,
        embedding_model=EMBEDDER,
        artifacts_dir=Path(tempfile.gettempdir()),
        time_limit_s=time_limit_s,
    )


def test_job_runs_once_and_stores_embeddings(sqlite_url: str, runtime: ModelRuntime) -> None:
    factory = make_sessionmaker(make_engine(sqlite_url))
    with factory() as session:
        tenant_id, _ = make_key(session)
        job = make_job(session, tenant_id, prompt="The moon and the tides", max_tokens=6)
    first = _run(factory, runtime, job.id)
    again = _run(factory, runtime, job.id)
    assert first.status == "succeeded" and again.status == "skipped"
    with factory() as session:
        generation = session.scalar(select(Generation).where(Generation.job_id == job.id))
        assert generation is not None and generation.id == first.generation_id
        assert generation.completion_tokens >= 1
        embeddings = session.scalars(
            select(Embedding).where(Embedding.generation_id == generation.id)
        ).all()
        assert {e.kind for e in embeddings} <= {"prompt", "output"}
        prompt_vector = next(e for e in embeddings if e.kind == "prompt")
        vector = np.frombuffer(prompt_vector.vector, dtype=np.float32)
        assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-3
        assert session.get(Job, job.id).status == "succeeded"  # type: ignore[union-attr]


def test_a_job_past_its_time_limit_fails_naming_it(sqlite_url: str, runtime: ModelRuntime) -> None:
    factory = make_sessionmaker(make_engine(sqlite_url))
    with factory() as session:
        tenant_id, _ = make_key(session)
        job = make_job(session, tenant_id, prompt="A long story", max_tokens=400)
    outcome = _run(factory, runtime, job.id, time_limit_s=0.001)
    assert outcome.status == "failed"
    with factory() as session:
        stored = session.get(Job, job.id)
        assert stored is not None and stored.status == "failed"
        assert stored.error == "the job ran past its time limit of 0.001 s"
        assert session.scalar(select(Generation).where(Generation.job_id == job.id)) is None
    assert _run(factory, runtime, job.id).status == "skipped"  # never run again


def test_earlier_turns_are_given_to_the_model(sqlite_url: str, runtime: ModelRuntime) -> None:
    factory = make_sessionmaker(make_engine(sqlite_url))
    with factory() as session:
        tenant_id, _ = make_key(session)
        first = make_job(session, tenant_id, prompt="My name is Ann.")
    outcome = _run(factory, runtime, first.id)
    with factory() as session:
        second = make_job(
            session,
            tenant_id,
            prompt="What is my name?",
            parent=outcome.generation_id,
            conversation_id=first.conversation_id,
        )
        history = crud.ancestors(session, generation_id=second.parent_generation_id)
        model = runtime.chat_model("tiny-random-llama")
        with_history = model.tokenizer.decode(encode_job(model, second, history)[0])
        alone = model.tokenizer.decode(encode_job(model, second, [])[0])
    assert "My name is Ann." in with_history and "What is my name?" in with_history
    assert "My name is Ann." not in alone


def test_input_too_long_fails_with_reason(sqlite_url: str, runtime: ModelRuntime) -> None:
    factory = make_sessionmaker(make_engine(sqlite_url))
    with factory() as session:
        tenant_id, _ = make_key(session)
        job = make_job(session, tenant_id, prompt="word " * 700)
    outcome = _run(factory, runtime, job.id)
    with factory() as session:
        row = session.get(Job, job.id)
    assert outcome.status == "failed"
    assert row is not None and row.status == "failed" and row.error


def test_leases_are_renewed_together_and_bring_back_cancels(sqlite_url: str) -> None:
    factory = make_sessionmaker(make_engine(sqlite_url))
    with factory() as session:
        tenant_id, _ = make_key(session)
        jobs = [make_job(session, tenant_id, prompt=f"job {i}") for i in range(3)]
        for job in jobs:
            assert crud.claim_job(session, job_id=job.id, lease_s=5) is not None
    leases = LeaseKeeper(factory, lease_s=3600, every_s=3600)  # renewed by hand below
    events = {job.id: leases.watch(job.id) for job in jobs}
    leases.release(jobs[2].id)
    with factory() as session:
        crud.cancel_job(session, job=session.get(Job, jobs[0].id))  # type: ignore[arg-type]
        session.commit()
    leases.renew()
    with factory() as session:
        expiry = {j.id: session.get(Job, j.id).lease_expires_at for j in jobs}  # type: ignore[union-attr]
    assert events[jobs[0].id].is_set() and not events[jobs[1].id].is_set()
    assert expiry[jobs[1].id] > expiry[jobs[2].id] + timedelta(minutes=50)
