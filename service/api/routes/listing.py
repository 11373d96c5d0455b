"""Query parameters shared by the listing routes."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Query

from service.api.errors import InvalidRequest
from service.db.crud import Filters


def metadata_pairs(items: list[str] | None) -> dict[str, str]:
    """The metadata filters of a query string: each key=value, repeatable."""
    pairs: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"metadata filter {item!r} is not key=value", param="metadata")
        pairs[key] = value
    return pairs


def list_filters(
    model: Annotated[str | None, Query(max_length=128)] = None,
    tag: Annotated[list[str] | None, Query(description="Repeat to require several tags")] = None,
    metadata: Annotated[
        list[str] | None, Query(description="key=value on the metadata; repeatable")
    ] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    conversation_id: Annotated[str | None, Query(max_length=40)] = None,
) -> Filters:
    return Filters(
        model=model,
        tags=tuple(tag or ()),
        metadata=metadata_pairs(metadata),
        created_after=created_after,
        created_before=created_before,
        conversation_id=conversation_id,
    )


def generation_filters(
    filters: Annotated[Filters, Depends(list_filters)],
    min_feedback_score: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    max_feedback_score: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    label: Annotated[
        str | None, Query(max_length=64, description="some feedback on it has this label")
    ] = None,
    category: Annotated[str | None, Query(max_length=64)] = None,
) -> Filters:
    """The listing filters, and those of what is known about a generation afterwards."""
    return replace(
        filters,
        min_feedback_score=min_feedback_score,
        max_feedback_score=max_feedback_score,
        label=label,
        category=category,
    )


Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=40, description="next_cursor of the last page")]
