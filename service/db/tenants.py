"""Tenants and their keys, limits, daily usage and audit log. Callers commit."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.db.tables import (
    ApiKey,
    AuditEvent,
    Embedding,
    EmbeddingDeletion,
    Tenant,
    TenantUsage,
    utcnow,
)

KEY_PREFIX = "gsk_"
# Who acts from the operator's command line (`genserve keys`, `genserve tenants`).
CLI_ACTOR = "cli"


def hash_key(key: str) -> str:
    # Keys are 256 random bits, so a fast hash is enough; no salt or KDF is needed.
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def update_tenant(
    session: Session, *, tenant: Tenant, values: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Set the tenant's settings to values; returns what changed, {name: {from, to}}."""
    changes = {
        name: {"from": getattr(tenant, name), "to": value}
        for name, value in values.items()
        if getattr(tenant, name) != value
    }
    for name, change in changes.items():
        setattr(tenant, name, change["to"])
    session.flush()
    return changes


def redacts_pii(session: Session, *, tenant_id: int) -> bool:
    """Whether the tenant has its prompts and outputs redacted before they are stored.

    Read through the session's identity map: a batch's lines, stored in one session, and
    a submission whose admission already loaded the tenant cost no further query.
    """
    tenant = session.get(Tenant, tenant_id)
    return tenant is not None and tenant.redact_pii


def get_tenant(session: Session, *, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def create_api_key(
    session: Session,
    *,
    tenant_name: str,
    role: str,
    name: str = "",
    expires_at: datetime | None = None,
    rate_limit_per_minute: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plaintext key, which is never stored."""
    tenant = ensure_tenant(session, name=tenant_name)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        tenant_id=tenant.id,
        role=role,
        name=name,
        prefix=plaintext[:12],
        key_hash=hash_key(plaintext),
        expires_at=expires_at,
        rate_limit_per_minute=rate_limit_per_minute,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def get_api_key(session: Session, *, plaintext: str) -> ApiKey | None:
    """The live key with this plaintext: not revoked, not expired."""
    return session.scalar(
        select(ApiKey).where(
            ApiKey.key_hash == hash_key(plaintext),
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow()),
        )
    )


def count_api_keys(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ApiKey)) or 0


def list_api_keys(session: Session, *, tenant_id: int) -> Sequence[ApiKey]:
    return session.scalars(
        select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id)
    ).all()


def find_api_key(session: Session, *, tenant_id: int, key_id: int) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id))


def revoke_api_key(session: Session, *, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()


def delete_tenant(session: Session, *, tenant: Tenant) -> int:
    """Remove a tenant and everything it owns; returns how many vectors go with it.

    The rows go by ON DELETE CASCADE; the vectors are logged first, like any deleted
    embedding, so every index drops them (and with them the tenant's shard).
    """
    vectors = select(Embedding.id, Embedding.model, Embedding.tenant_id).where(
        Embedding.tenant_id == tenant.id
    )
    count = session.scalar(select(func.count()).select_from(vectors.subquery())) or 0
    session.execute(
        insert(EmbeddingDeletion).from_select(["embedding_id", "model", "tenant_id"], vectors)
    )
    session.execute(delete(Tenant).where(Tenant.id == tenant.id))
    session.flush()
    return count


# --- usage of the day ----------------------------------------------------------------------


def today() -> date:
    return utcnow().date()


def count_usage(
    session: Session,
    *,
    tenant_id: int,
    requests: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> None:
    """Add to the tenant's counters of today, in the caller's transaction."""
    values = {
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    dialect = session.get_bind().dialect.name
    make = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = make(TenantUsage).values(tenant_id=tenant_id, day=today(), **values)
    table = TenantUsage.__table__
    statement = statement.on_conflict_do_update(
        index_elements=["tenant_id", "day"],
        set_={name: table.c[name] + statement.excluded[name] for name in values},
    )
    session.execute(statement)


@dataclass(frozen=True)
class Usage:
    day: date
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_of_day(session: Session, *, tenant_id: int, day: date | None = None) -> Usage:
    """The tenant's counters of a UTC day (today by default), as they are in the database."""
    day = day or today()
    row = session.execute(
        select(
            TenantUsage.requests, TenantUsage.prompt_tokens, TenantUsage.completion_tokens
        ).where(TenantUsage.tenant_id == tenant_id, TenantUsage.day == day)
    ).first()
    return Usage(day) if row is None else Usage(day, *row)


# --- the audit log -------------------------------------------------------------------------


def audit(
    session: Session,
    *,
    tenant_id: int | None,
    actor: str,
    action: str,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
    actor_key_id: int | None = None,
    actor_role: str | None = None,
    request_id: str | None = None,
) -> None:
    """Record a change in the caller's transaction: it is logged exactly when it commits."""
    session.add(
        AuditEvent(
            tenant_id=tenant_id,
            actor=actor,
            actor_key_id=actor_key_id,
            actor_role=actor_role,
            action=action,
            target=target,
            detail=detail,
            request_id=request_id,
        )
    )


def list_audit(
    session: Session, *, tenant_id: int, after: int | None, limit: int, action: str | None = None
) -> Sequence[AuditEvent]:
    """Newest first; `after` is the id of the last event of the previous page."""
    query = select(AuditEvent).where(AuditEvent.tenant_id == tenant_id)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if after is not None:
        query = query.where(AuditEvent.id < after)
    return session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)).all()


def set_key_rate(session: Session, *, key: ApiKey, rate: int | None) -> None:
    session.execute(update(ApiKey).where(ApiKey.id == key.id).values(rate_limit_per_minute=rate))
