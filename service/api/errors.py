"""Domain errors, mapped to status codes once, with one JSON error body."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("genserve.api")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class GenserveError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        # Seconds, sent as Retry-After with a 429 or a 503 (5 when not given).
        self.retry_after = retry_after


class InvalidRequest(GenserveError):
    pass


class Unauthorized(GenserveError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GenserveError):
    status_code = 403
    type = "permission_error"
    code = "insufficient_role"


class NotFound(GenserveError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(GenserveError):
    status_code = 409
    type = "conflict_error"
    code = "conflict"


class TooManyRequests(GenserveError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class PayloadTooLarge(GenserveError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailable(GenserveError):
    status_code = 503
    type = "service_unavailable"
    code = "unavailable"


# Declared on routes so the OpenAPI docs show the error body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 429, 503)
}


def error_json(
    status_code: int,
    message: str,
    *,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    # Only the first part says where (a body field may itself be called "query").
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    return ".".join(str(part) for part in loc)


async def _genserve_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GenserveError)
    headers = None
    if exc.status_code in (429, 503):
        headers = {"Retry-After": str(max(1, exc.retry_after or 5))}
    return error_json(
        exc.status_code,
        exc.message,
        type_=exc.type,
        param=exc.param,
        code=exc.code,
        headers=headers,
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = list(exc.errors())
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        context: dict[str, Any] = first.get("ctx") or {}
        message = f"request body is not valid JSON: {context.get('error', '')}"
        return error_json(
            400, message.rstrip(": "), type_="invalid_request_error", code="invalid_json"
        )
    details, param = describe_validation_errors(errors)
    return error_json(
        400, details, type_="invalid_request_error", param=param, code="invalid_value"
    )


def describe_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """(message naming each field at fault, the first field) of pydantic's errors."""
    details = "; ".join(
        f"{_loc_to_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5]
    )
    param = _loc_to_param(tuple(errors[0].get("loc", ()))) if errors else ""
    return details or "invalid request", param or None


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    headers = dict(exc.headers) if exc.headers else None
    return error_json(exc.status_code, str(exc.detail), type_=type_, headers=headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "-")
    logger.exception(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.url.path,
        request_id,
        exc_info=exc,
    )
    return error_json(500, f"internal error (request {request_id})", type_="server_error")


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_json(
        503,
        "the database is unavailable; retry later",
        type_="service_unavailable",
        code="database_unavailable",
        headers={"Retry-After": "5"},
    )


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GenserveError, _genserve_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
