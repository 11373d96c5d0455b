"""Request dependencies: a database session, the caller, and long-lived objects."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.api.errors import PermissionDenied, TooManyRequests, Unauthorized
from service.cache import ResponseCache
from service.db import tenants
from service.events import EventSource
from service.openai_compat.serving import Serving
from service.queue import JobPublisher
from service.ratelimit import effective_rate
from service.search.embedder import LazyEmbedder
from service.search.index import VectorIndex

ROLE_RANK = {"reader": 0, "writer": 1, "admin": 2}
logger = logging.getLogger("genserve.api")


def get_db(request: Request) -> Iterator[Session]:
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        try:
            session.close()
        except SQLAlchemyError as exc:
            # The connection died after the route was done (its ROLLBACK failed): the
            # answer stands, the pool discards the connection, and raising here, with the
            # response already started, would cut the client's keep-alive connection.
            logger.warning("closing a request's session failed: %s", exc)


SessionDep = Annotated[Session, Depends(get_db)]

bearer = HTTPBearer(auto_error=False, description="A genserve API key")


@dataclass(frozen=True)
class Caller:
    key_id: int
    tenant_id: int
    tenant: str
    role: str
    request_id: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"key:{self.key_id}"


def get_caller(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    if credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key = tenants.get_api_key(session, plaintext=credentials.credentials)
    if key is None:
        raise Unauthorized("invalid, revoked or expired API key")
    rate = effective_rate(
        key.rate_limit_per_minute,
        key.tenant.rate_limit_per_minute,
        request.app.state.default_rate_limit,
    )
    if rate is not None:
        wait_s = request.app.state.rate_limiter.acquire(f"key:{key.id}", rate)
        if wait_s > 0:
            raise TooManyRequests(
                f"this key may send {rate} requests a minute; retry in {wait_s:.1f} s",
                retry_after=math.ceil(wait_s),
            )
    caller = Caller(
        key_id=key.id,
        tenant_id=key.tenant_id,
        tenant=key.tenant.name,
        role=key.role,
        request_id=getattr(request.state, "request_id", None),
    )
    # Give the connection back now: the session lives as long as the response, and a
    # streamed response may last minutes. A route that uses the session begins anew.
    session.close()
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def _require(role: str):  # noqa: ANN202 - a dependency factory
    def check(caller: CallerDep) -> Caller:
        if ROLE_RANK[caller.role] < ROLE_RANK[role]:
            raise PermissionDenied(f"this needs the {role!r} role; the key has {caller.role!r}")
        return caller

    return check


WriterDep = Annotated[Caller, Depends(_require("writer"))]
AdminDep = Annotated[Caller, Depends(_require("admin"))]


def audit(session: Session, caller: Caller, action: str, target: str, **detail: Any) -> None:
    """Log a change the caller makes, in the session's transaction (it commits with it)."""
    tenants.audit(
        session,
        tenant_id=caller.tenant_id,
        actor=caller.actor,
        actor_key_id=caller.key_id,
        actor_role=caller.role,
        action=action,
        target=target,
        detail=detail or None,
        request_id=caller.request_id,
    )


@dataclass(frozen=True)
class ApiLimits:
    max_queued_jobs_per_tenant: int


def get_limits(request: Request) -> ApiLimits:
    return request.app.state.limits


def get_events(request: Request) -> EventSource:
    return request.app.state.events


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessionmaker


def get_publisher(request: Request) -> JobPublisher:
    return request.app.state.publisher


def get_index(request: Request) -> VectorIndex:
    return request.app.state.index


def get_embedder(request: Request) -> LazyEmbedder:
    return request.app.state.embedder


def get_response_cache(request: Request) -> ResponseCache:
    return request.app.state.response_cache


def get_served_models(request: Request) -> tuple[str, ...]:
    return request.app.state.served_models


def get_embedding_model(request: Request) -> str:
    return request.app.state.embedder.model


PublisherDep = Annotated[JobPublisher, Depends(get_publisher)]
IndexDep = Annotated[VectorIndex, Depends(get_index)]
EmbedderDep = Annotated[LazyEmbedder, Depends(get_embedder)]
ResponseCacheDep = Annotated[ResponseCache, Depends(get_response_cache)]
ServedModelsDep = Annotated[tuple[str, ...], Depends(get_served_models)]
EmbeddingModelDep = Annotated[str, Depends(get_embedding_model)]
LimitsDep = Annotated[ApiLimits, Depends(get_limits)]
EventsDep = Annotated[EventSource, Depends(get_events)]
# For work that outlives the request's session (a stream read after the route returns).
SessionmakerDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]


def get_serving(
    request: Request,
    caller: WriterDep,
    factory: SessionmakerDep,
    source: EventsDep,
    publisher: PublisherDep,
) -> Serving:
    return Serving(
        factory=factory,
        source=source,
        publisher=publisher,
        tenant_id=caller.tenant_id,
        api_key_id=caller.key_id,
        retriever=getattr(request.app.state, "retriever", None),
        cache=getattr(request.app.state, "response_cache", None),
    )


# Submitting and following jobs for a writer (the OpenAI generation routes).
ServingDep = Annotated[Serving, Depends(get_serving)]
