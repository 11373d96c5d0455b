"""A tenant's own administration: its API keys, its settings and its audit log.

Keys and settings change only with an admin key, and every change is written to the
audit log in the transaction that makes it. Quotas and rates are the operator's
(`genserve tenants set`); a tenant's admin reads them here and may give a key a stricter
rate.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, status
from pydantic import BaseModel, Field, field_validator

from service.api.deps import AdminDep, Caller, CallerDep, SessionDep, audit
from service.api.errors import ERROR_RESPONSES, NotFound
from service.db import tenants
from service.db.tables import ApiKey, AuditEvent, Tenant, utcnow

router = APIRouter(prefix="/v1", tags=["admin"], responses=ERROR_RESPONSES)

KeyId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class KeyCreate(BaseModel):
    model_config = {"extra": "forbid"}

    role: Literal["admin", "writer", "reader"] = "reader"
    name: str = Field(default="", max_length=128)
    expires_at: datetime | None = Field(default=None, description="UTC; never when absent")
    rate_limit_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)

    @field_validator("expires_at")
    @classmethod
    def _in_the_future(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("give a timezone, e.g. 2027-01-01T00:00:00Z")
        if value <= utcnow():
            raise ValueError("must be in the future")
        return value


class KeyPublic(BaseModel):
    id: int
    name: str
    role: str
    prefix: str = Field(description="The first characters of the key, to tell keys apart")
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rate_limit_per_minute: int | None

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyPublic:
        return cls(
            id=row.id,
            name=row.name,
            role=row.role,
            prefix=row.prefix,
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            rate_limit_per_minute=row.rate_limit_per_minute,
        )


class KeyCreated(KeyPublic):
    key: str = Field(description="The key itself; shown this once and never stored")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyPublic]


class UsageOfDay(BaseModel):
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int


class TenantPublic(BaseModel):
    name: str
    redact_pii: bool
    rate_limit_per_minute: int | None
    requests_per_day: int | None
    tokens_per_day: int | None
    usage_today: UsageOfDay


class TenantUpdate(BaseModel):
    model_config = {"extra": "forbid"}

    redact_pii: bool | None = Field(
        default=None,
        description="Redact e-mail addresses, phone, card and IP numbers from prompts "
        "and outputs before they are stored or embedded",
    )


class AuditEventPublic(BaseModel):
    id: int
    created_at: datetime
    actor: str
    actor_role: str | None
    action: str
    target: str | None
    detail: dict[str, Any] | None
    request_id: str | None

    @classmethod
    def from_row(cls, row: AuditEvent) -> AuditEventPublic:
        return cls(
            id=row.id,
            created_at=row.created_at,
            actor=row.actor,
            actor_role=row.actor_role,
            action=row.action,
            target=row.target,
            detail=row.detail,
            request_id=row.request_id,
        )


class AuditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEventPublic]
    next_cursor: int | None = Field(description="Pass as `after` for the next (older) page")


def _key(session: SessionDep, caller: Caller, key_id: int) -> ApiKey:
    key = tenants.find_api_key(session, tenant_id=caller.tenant_id, key_id=key_id)
    if key is None:
        raise NotFound(f"key {key_id} not found", param="key_id")
    return key


@router.post("/keys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED)
def create_key(body: KeyCreate, caller: AdminDep, session: SessionDep) -> KeyCreated:
    """Create a key for this tenant; the key is in this answer only."""
    row, plaintext = tenants.create_api_key(
        session,
        tenant_name=caller.tenant,
        role=body.role,
        name=body.name,
        expires_at=body.expires_at,
        rate_limit_per_minute=body.rate_limit_per_minute,
    )
    audit(session, caller, "key.create", f"key:{row.id}", role=row.role, name=row.name)
    session.commit()
    return KeyCreated(**KeyPublic.from_row(row).model_dump(), key=plaintext)


@router.get("/keys", response_model=KeyList)
def read_keys(caller: AdminDep, session: SessionDep) -> KeyList:
    """This tenant's keys, revoked and expired ones included; never the keys themselves."""
    rows = tenants.list_api_keys(session, tenant_id=caller.tenant_id)
    return KeyList(data=[KeyPublic.from_row(row) for row in rows])


@router.get("/keys/{key_id}", response_model=KeyPublic)
def read_key(key_id: KeyId, caller: AdminDep, session: SessionDep) -> KeyPublic:
    return KeyPublic.from_row(_key(session, caller, key_id))


@router.delete("/keys/{key_id}", response_model=KeyPublic)
def revoke_key(key_id: KeyId, caller: AdminDep, session: SessionDep) -> KeyPublic:
    """Revoke a key: it is refused from the next request on."""
    key = _key(session, caller, key_id)
    if key.revoked_at is None:
        tenants.revoke_api_key(session, key=key)
        audit(session, caller, "key.revoke", f"key:{key.id}", role=key.role, name=key.name)
        session.commit()
    return KeyPublic.from_row(key)


def _tenant_public(session: SessionDep, tenant: Tenant) -> TenantPublic:
    used = tenants.usage_of_day(session, tenant_id=tenant.id)
    return TenantPublic(
        name=tenant.name,
        redact_pii=tenant.redact_pii,
        rate_limit_per_minute=tenant.rate_limit_per_minute,
        requests_per_day=tenant.requests_per_day,
        tokens_per_day=tenant.tokens_per_day,
        usage_today=UsageOfDay(
            day=used.day,
            requests=used.requests,
            prompt_tokens=used.prompt_tokens,
            completion_tokens=used.completion_tokens,
        ),
    )


def _tenant(session: SessionDep, caller: Caller) -> Tenant:
    tenant = session.get(Tenant, caller.tenant_id)
    assert tenant is not None  # the caller's key would not have passed
    return tenant


@router.get("/tenant", response_model=TenantPublic)
def read_tenant(caller: CallerDep, session: SessionDep) -> TenantPublic:
    """The caller's tenant: its settings, limits and today's usage (UTC)."""
    return _tenant_public(session, _tenant(session, caller))


@router.patch("/tenant", response_model=TenantPublic)
def update_tenant(body: TenantUpdate, caller: AdminDep, session: SessionDep) -> TenantPublic:
    """Change the tenant's settings; only the fields sent change."""
    tenant = _tenant(session, caller)
    values = body.model_dump(exclude_unset=True, exclude_none=True)
    changes = tenants.update_tenant(session, tenant=tenant, values=values)
    if changes:
        audit(session, caller, "tenant.update", f"tenant:{tenant.name}", **changes)
        session.commit()
    return _tenant_public(session, tenant)


@router.get("/audit", response_model=AuditList)
def read_audit(
    caller: AdminDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
) -> AuditList:
    """Who changed keys, roles and settings, and who deleted what; newest first."""
    rows = tenants.list_audit(
        session, tenant_id=caller.tenant_id, after=after, limit=limit, action=action
    )
    cursor = rows[-1].id if len(rows) == limit else None
    return AuditList(data=[AuditEventPublic.from_row(row) for row in rows], next_cursor=cursor)
