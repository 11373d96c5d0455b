"""Keys that expire, usage counted per day, tenants deleted with their vectors, the audit
log, and the per-key rate limiter in memory and in Redis."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from service.db import crud, tenants
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Embedding, EmbeddingDeletion, Generation, Job, Tenant, new_id, utcnow
from service.ratelimit import LocalRateLimiter, RedisRateLimiter, effective_rate
from service.submit import admit
from tests.utils.factories import make_job, make_key


def _session(url: str):  # noqa: ANN202
    return make_sessionmaker(make_engine(url))()


def _store(session, job: Job, *, prompt_tokens: int, completion_tokens: int) -> Generation:  # noqa: ANN001
    crud.claim_job(session, job_id=job.id, lease_s=60)
    generation = Generation(
        id=new_id("gen"),
        tenant_id=job.tenant_id,
        job_id=job.id,
        model=job.model,
        model_version="1",
        input=job.input,
        prompt="p",
        output="o",
        params={},
        meta={},
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason="stop",
        timings={},
    )
    vectors = {"prompt": b"\0" * 8, "output": b"\0" * 8}
    assert crud.store_generation(
        session, job=job, generation=generation, vectors=vectors, model="m", dimension=2
    )
    session.commit()
    return generation


def test_expired_and_revoked_keys_are_refused(db_url: str) -> None:
    with _session(db_url) as session:
        live, live_key = tenants.create_api_key(
            session, tenant_name="acme", role="reader", expires_at=utcnow() + timedelta(hours=1)
        )
        _, expired_key = tenants.create_api_key(
            session, tenant_name="acme", role="reader", expires_at=utcnow() - timedelta(seconds=1)
        )
        revoked, revoked_key = tenants.create_api_key(session, tenant_name="acme", role="reader")
        tenants.revoke_api_key(session, key=revoked)
        session.commit()
        assert tenants.get_api_key(session, plaintext=live_key) == live
        assert tenants.get_api_key(session, plaintext=expired_key) is None
        assert tenants.get_api_key(session, plaintext=revoked_key) is None
        listed = tenants.list_api_keys(session, tenant_id=live.tenant_id)
        assert len(listed) == 3 and listed[2].revoked_at is not None


def test_usage_is_counted_per_day_as_jobs_are_made_and_stored(db_url: str) -> None:
    from service.submit import JobRequest, store_job

    with _session(db_url) as session:
        tenant_id, _ = make_key(session, "acme")
        other_id, _ = make_key(session, "globex")
        request = JobRequest(
            model="tiny-random-llama", queue="interactive", input={"prompt": "a"}, params={}
        )
        jobs = [store_job(session, tenant_id=tenant_id, request=request) for _ in range(3)]
        store_job(session, tenant_id=other_id, request=request)
        session.commit()
        _store(session, jobs[0], prompt_tokens=5, completion_tokens=7)
        _store(session, jobs[1], prompt_tokens=1, completion_tokens=2)
        used = tenants.usage_of_day(session, tenant_id=tenant_id)
        assert (used.requests, used.prompt_tokens, used.completion_tokens) == (3, 6, 9)
        assert tenants.usage_of_day(session, tenant_id=other_id).requests == 1
        yesterday = used.day - timedelta(days=1)
        assert tenants.usage_of_day(session, tenant_id=tenant_id, day=yesterday).requests == 0


def test_quotas_of_the_day_refuse_with_the_time_until_midnight(db_url: str) -> None:
    from service.api.errors import TooManyRequests

    with _session(db_url) as session:
        tenant_id, _ = make_key(session, "acme")
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        tenant.requests_per_day, tenant.tokens_per_day = 2, 10
        session.commit()
        admit(session, tenant_id=tenant_id, max_queued=100)
        tenants.count_usage(session, tenant_id=tenant_id, requests=2)
        session.commit()
        with pytest.raises(TooManyRequests) as refused:
            admit(session, tenant_id=tenant_id, max_queued=100)
        assert refused.value.code == "quota_exceeded" and "2 requests" in refused.value.message
        assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 86_400
        tenant.requests_per_day = None
        tenants.count_usage(session, tenant_id=tenant_id, prompt_tokens=4, completion_tokens=5)
        session.commit()
        admit(session, tenant_id=tenant_id, max_queued=100)  # 9 of 10 tokens
        tenants.count_usage(session, tenant_id=tenant_id, completion_tokens=1)
        session.commit()
        with pytest.raises(TooManyRequests, match="10 of its 10 tokens"):
            admit(session, tenant_id=tenant_id, max_queued=100)


def test_deleting_a_tenant_removes_its_rows_and_logs_its_vectors(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, _ = make_key(session, "acme")
        other_id, _ = make_key(session, "globex")
        mine = _store(session, make_job(session, tenant_id), prompt_tokens=1, completion_tokens=1)
        theirs = _store(session, make_job(session, other_id), prompt_tokens=1, completion_tokens=1)
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        assert tenants.delete_tenant(session, tenant=tenant) == 2
        session.commit()
        stored = session.scalars(select(Generation.id)).all()
        assert stored == [theirs.id] and mine.id not in stored
        count = select(func.count()).select_from(Embedding)
        assert session.scalar(count.where(Embedding.tenant_id == tenant_id)) == 0
        assert session.scalar(count.where(Embedding.tenant_id == other_id)) == 2
        logged = session.scalars(select(EmbeddingDeletion.tenant_id)).all()
        assert logged == [tenant_id, tenant_id]
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_the_audit_log_pages_newest_first_per_tenant(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, _ = make_key(session, "acme")
        other_id, _ = make_key(session, "globex")
        for index in range(5):
            tenants.audit(
                session, tenant_id=tenant_id, actor="cli", action="key.create", target=str(index)
            )
        tenants.audit(session, tenant_id=other_id, actor="cli", action="key.revoke", target="x")
        session.commit()
        first = tenants.list_audit(session, tenant_id=tenant_id, after=None, limit=3)
        rest = tenants.list_audit(session, tenant_id=tenant_id, after=first[-1].id, limit=3)
        assert [e.target for e in (*first, *rest)] == ["4", "3", "2", "1", "0"]
        assert (
            tenants.list_audit(
                session, tenant_id=tenant_id, after=None, limit=9, action="key.revoke"
            )
            == []
        )


def test_effective_rate_is_the_strictest_that_is_set() -> None:
    assert effective_rate(None, 0, None) is None
    assert effective_rate(None, 60, 0) == 60
    assert effective_rate(100, 60, 600) == 60


def _allowed(
    limiter: LocalRateLimiter | RedisRateLimiter, key: str, rate: int, n: int
) -> list[bool]:
    return [limiter.acquire(key, rate) == 0 for _ in range(n)]


def test_the_local_limiter_allows_a_burst_then_one_per_interval() -> None:
    now = [1000.0]
    limiter = LocalRateLimiter(clock=lambda: now[0])
    # 3 a minute: a burst of 3, then the 4th waits one interval (20 s).
    assert _allowed(limiter, "a", 3, 4) == [True, True, True, False]
    assert limiter.acquire("a", 3) == 20.0
    assert _allowed(limiter, "b", 3, 1) == [True]  # keys are apart
    now[0] += 19.9
    assert not _allowed(limiter, "a", 3, 1)[0]
    now[0] += 0.1
    assert _allowed(limiter, "a", 3, 2) == [True, False]  # one interval: one request
    now[0] += 60
    assert _allowed(limiter, "a", 3, 4) == [True, True, True, False]  # a quiet minute: a burst


@pytest.mark.redis
def test_processes_that_share_redis_share_the_count(redis_url: str) -> None:
    first, second = RedisRateLimiter(redis_url), RedisRateLimiter(redis_url)
    key = f"test-{time.time_ns()}"
    try:
        assert _allowed(first, key, 4, 2) + _allowed(second, key, 4, 2) == [True] * 4
        assert first.acquire(key, 4) > 0 and second.acquire(key, 4) > 0
        wait = second.acquire(key, 4)
        assert 14 < wait <= 15
    finally:
        first.close()
        second.close()


def test_a_redis_that_is_down_lets_requests_through() -> None:
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0")
    try:
        assert _allowed(limiter, "k", 1, 3) == [True, True, True]
    finally:
        limiter.close()
