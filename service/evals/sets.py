"""Evaluation sets: their items from a JSON body, a JSONL file or the tenant's history."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from models.registry import REGISTRY
from service import storable
from service.api.errors import InvalidRequest, describe_validation_errors
from service.api.schemas import MAX_EVAL_ITEMS, EvalHistorySource, EvalItemIn, EvalSetCreate
from service.db import crud, evals, tenants
from service.db.tables import EvalSet
from service.redact import redact_value

CHAT_MODELS = tuple(name for name, spec in REGISTRY.items() if spec.task == "chat")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _line_error(number: int, message: str) -> InvalidRequest:
    return InvalidRequest(f"line {number}: {message}", param="file", code="invalid_line")


def _parse_line(line: str, number: int) -> EvalItemIn:
    try:
        record = json.loads(line, parse_constant=_reject_constant)
    except RecursionError:
        raise _line_error(number, "JSON nested too deeply") from None
    except ValueError as exc:  # not JSON, NaN or Infinity, too many digits
        raise _line_error(number, f"not valid JSON ({exc})") from exc
    unstorable = storable.find_unstorable(record)
    if unstorable is not None:
        raise _line_error(number, f"{unstorable[0] or 'the line'} {unstorable[1]}")
    try:
        return EvalItemIn.model_validate(record)
    except ValidationError as exc:
        message, _param = describe_validation_errors(list(exc.errors()))
        raise _line_error(number, message) from exc


def parse_jsonl(data: bytes) -> list[EvalItemIn]:
    """The items of a JSONL file, one {input, reference, metadata} per non-blank line;
    400 naming the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"the file is not UTF-8 text: {exc}", param="file", code="invalid_file"
        ) from exc
    items: list[EvalItemIn] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if len(items) == MAX_EVAL_ITEMS:
            raise InvalidRequest(
                f"the file has more than {MAX_EVAL_ITEMS} items",
                param="file",
                code="too_many_lines",
            )
        items.append(_parse_line(line, number))
    if not items:
        raise InvalidRequest("the file has no items", param="file", code="empty_file")
    return items


def form_metadata(raw: str | None) -> dict[str, Any]:
    """The metadata form field: a JSON object, or nothing."""
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            f"metadata must be a JSON object: {exc}", param="metadata", code="invalid_value"
        ) from exc
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be a JSON object", param="metadata")
    unstorable = storable.find_unstorable(value, ("metadata",))
    if unstorable is not None:
        raise InvalidRequest(" ".join(unstorable), param=unstorable[0], code="invalid_text")
    return value


def history_items(
    session: Session, *, tenant_id: int, source: EvalHistorySource
) -> list[evals.NewItem]:
    """Items from the tenant's language-model generations; 400 when none matches."""
    filters = crud.Filters(
        model=source.model,
        tags=tuple(source.tags),
        metadata=dict(source.metadata),
        created_after=source.created_after,
        created_before=source.created_before,
        min_feedback_score=source.min_feedback_score,
    )
    items = evals.history_items(
        session, tenant_id=tenant_id, filters=filters, chat_models=CHAT_MODELS, limit=source.limit
    )
    if not items:
        raise InvalidRequest(
            "no generation of a language model matches from_history",
            param="from_history",
            code="no_generations",
        )
    return items


def create_set(session: Session, *, tenant_id: int, body: EvalSetCreate) -> EvalSet:
    """Store a set with its items (flushed, not committed). A tenant that redacts has its
    items redacted as its jobs' inputs and outputs are."""
    if body.from_history is not None:
        items = history_items(session, tenant_id=tenant_id, source=body.from_history)
    else:
        items = [
            evals.NewItem(input=item.job_input(), reference=item.reference, metadata=item.metadata)
            for item in body.items or ()
        ]
    if tenants.redacts_pii(session, tenant_id=tenant_id):
        items = [
            evals.NewItem(
                input=redact_value(item.input)[0],
                reference=redact_value(item.reference)[0],
                metadata=item.metadata,
            )
            for item in items
        ]
    return evals.create_set(
        session,
        tenant_id=tenant_id,
        name=body.name,
        description=body.description,
        metadata=body.metadata,
        items=items,
    )
