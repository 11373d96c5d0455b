"""Liveness, readiness and metrics: what load balancers, orchestrators and Prometheus ask."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service import metrics
from service.api.schemas import Health, Readiness
from service.db import workers

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_S = 2.0


@router.get("/healthz", response_model=Health)
def read_health() -> Health:
    """The API process is up."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Something the API needs is not."}},
)
def read_readiness(request: Request) -> Any:
    """Ready to take jobs: the database answers, the broker answers, and each served model
    has at least one live worker. 503 with the same body, naming what is not, otherwise."""
    state = request.app.state
    checks: dict[str, dict[str, Any]] = {}
    try:
        with state.sessionmaker() as session:
            session.execute(text("SELECT 1"))
            live = workers.live(session, interval_s=state.heartbeat_interval_s)
        checks["database"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        live = None
    try:
        state.publisher.ping(BROKER_TIMEOUT_S)
        checks["broker"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        checks["broker"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if live is None:
        checks["workers"] = {"ok": False, "error": "unknown: the database is not reachable"}
    else:
        serving = {model: sum(model in row.models for row in live) for model in state.served_models}
        missing = [model for model, count in serving.items() if not count]
        checks["workers"] = {"ok": not missing, "live": len(live), "models": serving}
        if missing:
            checks["workers"]["error"] = f"no live worker serves {', '.join(missing)}"
    ready = all(check["ok"] for check in checks.values())
    body = Readiness(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, include_in_schema=True)
def read_metrics(request: Request) -> Response:
    """The service's metrics in Prometheus's text format (no tenant in any label)."""
    body = metrics.render(metrics.REGISTRY, request.app.state.metrics_registry)
    return Response(body, media_type=metrics.CONTENT_TYPE)
