"""Usage over time per tenant, key, model and day, and a model's behaviour per day."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from models.registry import REGISTRY
from service import trained
from service.api.deps import CallerDep, SessionDep
from service.api.errors import ERROR_RESPONSES, InvalidRequest, NotFound
from service.api.schemas import ModelTrends, UsageReport, UsageSummary
from service.db import usage
from service.db.tables import utcnow

router = APIRouter(prefix="/v1", tags=["usage"], responses=ERROR_RESPONSES)

DEFAULT_DAYS = 30
MAX_DAYS = 366

Start = Annotated[date | None, Query(description="first UTC day; default: 29 days before end")]
End = Annotated[date | None, Query(description="last UTC day, included; default: today")]


def _days(start: date | None, end: date | None) -> tuple[date, date]:
    end = end or utcnow().date()
    start = start or end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise InvalidRequest(f"start {start} is after end {end}", param="start")
    if (end - start).days >= MAX_DAYS:
        raise InvalidRequest(f"ask for at most {MAX_DAYS} days at once", param="start")
    return start, end


def _group_by(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in usage.GROUPS]
    if unknown or len(set(names)) != len(names):
        raise InvalidRequest(
            f"group_by takes distinct names among {list(usage.GROUPS)}, comma-separated; "
            f"got {value!r}",
            param="group_by",
        )
    return names


@router.get("/usage", response_model=UsageReport)
def read_usage(
    caller: CallerDep,
    session: SessionDep,
    start: Start = None,
    end: End = None,
    group_by: Annotated[
        str, Query(max_length=64, description="comma-separated: day, api_key_id, model")
    ] = "day",
    model: Annotated[str | None, Query(max_length=128)] = None,
    api_key_id: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
) -> UsageReport:
    """The tenant's requests, tokens, errors, latency percentiles and cache hits, counted as
    requests finish, per UTC day, key and model as grouped."""
    start, end = _days(start, end)
    by = _group_by(group_by)
    found = usage.report(
        session,
        tenant_id=caller.tenant_id,
        start=start,
        end=end,
        by=by,
        model=model,
        api_key_id=api_key_id,
    )
    return UsageReport(
        start=start,
        end=end,
        group_by=by,
        total=UsageSummary(**found.total),
        data=[UsageSummary(**group) for group in found.groups],
    )


@router.get("/models/{model}/trends", response_model=ModelTrends)
def read_model_trends(
    model: str, caller: CallerDep, session: SessionDep, start: Start = None, end: End = None
) -> ModelTrends:
    """How a model behaved for this tenant, day by day: output length, latency, feedback
    score (on the day the outputs were made), error and refusal rates, cache hits. Days
    with nothing to show are left out."""
    if (
        model not in REGISTRY
        and trained.resolve_version(session, tenant_id=caller.tenant_id, model=model) is None
    ):
        raise NotFound(f"model {model!r} is not served here", param="model", code="model_not_found")
    start, end = _days(start, end)
    found = usage.report(
        session, tenant_id=caller.tenant_id, start=start, end=end, by=["day"], model=model
    )
    return ModelTrends(
        model=model,
        start=start,
        end=end,
        data=[UsageSummary(**day) for day in found.groups],
    )
