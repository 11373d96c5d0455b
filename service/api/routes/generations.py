"""Stored generations: read, list, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy.orm import Session

from service import files
from service.api.deps import CallerDep, SessionDep, WriterDep, audit
from service.api.errors import ERROR_RESPONSES, InvalidRequest, NotFound
from service.api.routes.listing import Cursor, Limit, generation_filters
from service.api.schemas import (
    FeedbackCreate,
    FeedbackList,
    FeedbackPublic,
    GenerationPublic,
    GenerationUpdate,
    Page,
    SourceList,
    SourcePublic,
    content_files,
)
from service.db import crud, feedback
from service.db.tables import Generation

router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=ERROR_RESPONSES)


def _get_generation(session: Session, tenant_id: int, generation_id: str) -> Generation:
    row = crud.get_generation(session, tenant_id=tenant_id, generation_id=generation_id)
    if row is None:
        raise NotFound(f"generation {generation_id!r} not found", param="generation_id")
    return row


@router.get("", response_model=Page[GenerationPublic])
def read_generations(
    caller: CallerDep,
    session: SessionDep,
    filters: Annotated[crud.Filters, Depends(generation_filters)],
    cursor: Cursor = None,
    limit: Limit = 20,
) -> Page[GenerationPublic]:
    """The caller's generations, newest first, filtered (also by feedback score and label,
    tag and category)."""
    rows, has_more = crud.list_generations(
        session, tenant_id=caller.tenant_id, filters=filters, cursor=cursor, limit=limit
    )
    return Page[GenerationPublic].of(rows, has_more, GenerationPublic.from_row)


@router.get("/{generation_id}", response_model=GenerationPublic)
def read_generation(generation_id: str, caller: CallerDep, session: SessionDep) -> GenerationPublic:
    """One generation."""
    return GenerationPublic.from_row(_get_generation(session, caller.tenant_id, generation_id))


@router.patch("/{generation_id}", response_model=GenerationPublic)
def update_generation(
    generation_id: str, edit: GenerationUpdate, caller: WriterDep, session: SessionDep
) -> GenerationPublic:
    """Edit a generation's tags, category or metadata (its job's as well)."""
    row = _get_generation(session, caller.tenant_id, generation_id)
    try:
        metadata = edit.applied_to(row.meta)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="metadata") from None
    crud.set_job_metadata(session, job=row.job, metadata=metadata)
    audit(session, caller, "generation.update", row.id, fields=sorted(edit.model_fields_set))
    session.commit()
    return GenerationPublic.from_row(row)


@router.post(
    "/{generation_id}/feedback",
    response_model=FeedbackPublic,
    status_code=status.HTTP_201_CREATED,
)
def create_feedback(
    generation_id: str, given: FeedbackCreate, caller: WriterDep, session: SessionDep
) -> FeedbackPublic:
    """Judge a generation: a score, a label, a comment, and who gave it. Several may be
    given; the generation keeps the mean score, which the listings and search filter by."""
    row = _get_generation(session, caller.tenant_id, generation_id)
    stored = feedback.add_feedback(
        session,
        generation=row,
        score=given.score,
        label=given.label,
        comment=given.comment,
        user=given.user,
        api_key_id=caller.key_id,
    )
    session.commit()
    return FeedbackPublic.from_row(stored)


@router.get("/{generation_id}/feedback", response_model=FeedbackList)
def read_feedback(generation_id: str, caller: CallerDep, session: SessionDep) -> FeedbackList:
    """The feedback given on a generation, oldest first, with its mean score."""
    row = _get_generation(session, caller.tenant_id, generation_id)
    return FeedbackList(
        generation_id=row.id,
        score=row.feedback_score,
        count=row.feedback_count,
        data=[
            FeedbackPublic.from_row(f)
            for f in feedback.list_feedback(session, generation_id=row.id)
        ],
    )


@router.get(
    "/{generation_id}/content",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "text/csv": {}, "text/plain": {}}}},
)
def read_generation_content(
    generation_id: str,
    caller: CallerDep,
    session: SessionDep,
    request: Request,
    index: Annotated[int, Query(ge=0, description="which of the generation's files")] = 0,
) -> Response:
    """What the generation made: its Nth file (an image, a table), or its text."""
    row = _get_generation(session, caller.tenant_id, generation_id)
    parts = content_files(row)
    if not parts:
        if index:
            raise NotFound(f"generation {generation_id!r} made no files", param="index")
        return PlainTextResponse(row.output)
    if index >= len(parts):
        raise NotFound(
            f"generation {generation_id!r} made {len(parts)} files; index must be below that",
            param="index",
        )
    part = parts[index]
    return StreamingResponse(
        files.stream_chunks(request.app.state.sessionmaker, part.id),
        media_type=part.media_type or "application/octet-stream",
        headers={"Content-Length": str(part.bytes)},
    )


@router.delete("/{generation_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_generation(generation_id: str, caller: WriterDep, session: SessionDep) -> None:
    """Delete a generation with its request, text, files and embeddings; search stops
    finding it at once."""
    row = _get_generation(session, caller.tenant_id, generation_id)
    crud.delete_job(session, job=row.job)
    audit(session, caller, "generation.delete", row.id, job_id=row.job_id)
    session.commit()


@router.get("/{generation_id}/sources", response_model=SourceList)
def read_generation_sources(
    generation_id: str, caller: CallerDep, session: SessionDep
) -> SourceList:
    """The passages a grounded generation was given, numbered as its answer cites them,
    with where each came from, how it ranked, and whether the answer cites it. Empty for a
    generation that was not grounded."""
    row = _get_generation(session, caller.tenant_id, generation_id)
    return SourceList(
        generation_id=row.id,
        data=[
            SourcePublic(
                number=source.number,
                rank=source.rank,
                score=source.score,
                scores=source.scores,
                cited=source.cited,
                collection_id=source.collection_id,
                document_id=source.document_id,
                chunk_id=source.chunk_id,
                source_generation_id=source.source_generation_id,
                title=source.title,
                text=source.text,
            )
            for source in row.sources
        ],
    )
