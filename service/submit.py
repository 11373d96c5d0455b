"""Submitting a job, the one way every API does it: checked, stored, then published."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.registry import REGISTRY, ModelSpec
from service import failpoints
from service.api.errors import InvalidRequest, NotFound, TooManyRequests
from service.cache import CacheKeys, keys_for
from service.db import crud, tenants
from service.db.tables import Job, Tenant, utcnow
from service.queue import JobPublisher
from service.redact import redact_value


def served_model(name: str, served: tuple[str, ...], *, task: str) -> ModelSpec:
    """The spec of a model this server runs for task; 404 model_not_found otherwise."""
    spec = REGISTRY.get(name)
    if spec is None or name not in served or spec.task != task:
        raise NotFound(
            f"model {name!r} is not served here for {task}; served: {list(served)}",
            param="model",
            code="model_not_found",
        )
    return spec


def resolve_max_tokens(spec: ModelSpec, requested: int | None, *, param: str) -> int:
    """The request's token budget, or the model's default, within the model's limit."""
    max_tokens = spec.default_max_tokens if requested is None else requested
    if max_tokens > spec.max_output_tokens:
        raise InvalidRequest(
            f"{param} {max_tokens} is above the limit of {spec.name!r} ({spec.max_output_tokens})",
            param=param,
            code="max_tokens_too_large",
        )
    return max_tokens


def admit(session: Session, *, tenant_id: int, max_queued: int) -> None:
    """429 with Retry-After unless the tenant has room for one more job: fewer than
    max_queued waiting (the queue's bound) and its quotas of the day not used up."""
    check_queue_room(session, tenant_id=tenant_id, limit=max_queued)
    tenant = session.get(Tenant, tenant_id)
    if tenant is None or not (tenant.requests_per_day or tenant.tokens_per_day):
        return
    used = tenants.usage_of_day(session, tenant_id=tenant_id)
    tokens = used.tokens
    now = utcnow()
    until_midnight = math.ceil(
        (datetime.combine(now.date() + timedelta(days=1), time(), UTC) - now).total_seconds()
    )
    if tenant.requests_per_day and used.requests >= tenant.requests_per_day:
        raise TooManyRequests(
            f"this tenant has made its {tenant.requests_per_day} requests of the day "
            "(UTC); the quota renews at midnight UTC",
            code="quota_exceeded",
            retry_after=until_midnight,
        )
    if tenant.tokens_per_day and tokens >= tenant.tokens_per_day:
        raise TooManyRequests(
            f"this tenant has used {tokens} of its {tenant.tokens_per_day} tokens of the "
            "day (UTC); the quota renews at midnight UTC",
            code="quota_exceeded",
            retry_after=until_midnight,
        )


def check_queue_room(session: Session, *, tenant_id: int, limit: int) -> None:
    """429 when the tenant already has `limit` jobs waiting (the queue's bound)."""
    queued = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status == "queued")
    )
    if (queued or 0) >= limit:
        raise TooManyRequests(
            f"{queued} jobs are already queued for this tenant (the limit is {limit}); "
            "retry when some have run",
            code="queue_full",
        )


@dataclass(frozen=True)
class JobRequest:
    """A job as an API asks for it, before it is stored."""

    model: str
    queue: str
    input: dict[str, Any]
    params: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    api: str = "jobs"
    store: bool = False
    conversation_id: str | None = None
    parent_generation_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    context: dict[str, Any] | None = None  # a grounded job's passages (service/rag)


def store_job(
    session: Session,
    *,
    tenant_id: int,
    request: JobRequest,
    batch_id: str | None = None,
    custom_id: str | None = None,
    api_key_id: int | None = None,
) -> Job:
    """Write the job row (flushed, not committed) and count it in the tenant's usage; a
    batch's line names its batch, and api_key_id the key that asked."""
    tenants.count_usage(session, tenant_id=tenant_id, requests=1)
    # Keyed on the input as sent: two prompts that redact alike are not the same request.
    keys = request_cache_keys(tenant_id, request)
    if tenants.redacts_pii(session, tenant_id=tenant_id):
        request = replace(request, input=redact_value(request.input)[0])
    return crud.create_job(
        session,
        tenant_id=tenant_id,
        model=request.model,
        queue=request.queue,
        input=request.input,
        params=request.params,
        metadata=request.metadata,
        conversation_id=request.conversation_id,
        parent_generation_id=request.parent_generation_id,
        idempotency_key=request.idempotency_key,
        request_hash=request.request_hash,
        api=request.api,
        store=request.store,
        batch_id=batch_id,
        custom_id=custom_id,
        context=request.context,
        api_key_id=api_key_id,
        cache_key=keys.key if keys else None,
        cache_scope=keys.scope if keys else None,
    )


def request_cache_keys(tenant_id: int, request: JobRequest) -> CacheKeys | None:
    """The response cache's keys of a request (None: no stored answer can stand for it)."""
    return keys_for(
        tenant_id=tenant_id,
        api=request.api,
        model=request.model,
        input=request.input,
        params=request.params,
        threaded=request.conversation_id is not None or request.parent_generation_id is not None,
        grounded=request.context is not None,
    )


def publish_job(session: Session, publisher: JobPublisher, job: Job) -> None:
    """Rule 2: publish after the commit; a failed publish leaves the job to the sweeper."""
    failpoints.reach("submit.before_publish")
    if publisher.publish(job.id, job.queue):
        crud.mark_published(session, job_id=job.id)
        session.commit()


def submit_job(
    session: Session,
    publisher: JobPublisher,
    *,
    tenant_id: int,
    request: JobRequest,
    api_key_id: int | None = None,
) -> Job:
    """Store, commit and publish one job."""
    job = store_job(session, tenant_id=tenant_id, request=request, api_key_id=api_key_id)
    session.commit()
    publish_job(session, publisher, job)
    return job
