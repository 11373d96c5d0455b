"""Evaluation sets and runs: upload or build a set, run a model over it, compare runs."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import pydantic_core
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import UploadFile

from service import storable
from service.api.deps import (
    Caller,
    CallerDep,
    EmbedderDep,
    LimitsDep,
    PublisherDep,
    ServedModelsDep,
    SessionDep,
    SessionmakerDep,
    WriterDep,
    audit,
)
from service.api.errors import ERROR_RESPONSES, Conflict, InvalidRequest, NotFound
from service.api.routes.listing import Cursor, Limit
from service.api.schemas import (
    EvalComparison,
    EvalComparisonItem,
    EvalItemPublic,
    EvalOutcome,
    EvalResultPublic,
    EvalRunCreate,
    EvalRunPublic,
    EvalScoreDeltas,
    EvalSetCreate,
    EvalSetPublic,
    Page,
)
from service.db import evals
from service.db.tables import EvalRun, EvalSet
from service.evals import metrics, runs, sets
from service.search.embedder import LazyEmbedder
from service.submit import resolve_max_tokens, served_model

PREFIX = "/v1/evals"
router = APIRouter(prefix=PREFIX, tags=["evals"], responses=ERROR_RESPONSES)

# Models of bodies create_eval_set reads itself, for the OpenAPI schema's components.
BODY_MODELS = (EvalSetCreate,)
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EvalSetCreate"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "metadata": {"type": "string", "description": "a JSON object"},
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL: one {input, reference, metadata} a line",
                        },
                    },
                    "required": ["name", "file"],
                }
            },
        },
    }
}


def _eval_set(session: Session, tenant_id: int, ref: str, param: str = "set_id") -> EvalSet:
    found = evals.get_set(session, tenant_id=tenant_id, ref=ref)
    if found is None:
        raise NotFound(f"evaluation set {ref!r} not found", param=param)
    return found


def _run(session: Session, tenant_id: int, run_id: str, param: str = "run_id") -> EvalRun:
    found = evals.get_run(session, tenant_id=tenant_id, run_id=run_id)
    if found is None:
        raise NotFound(f"evaluation run {run_id!r} not found", param=param)
    return found


def _seq(cursor: str | None) -> int | None:
    """An item cursor: the seq of the last item of the page before."""
    if cursor is None:
        return None
    if not (cursor.isascii() and cursor.isdigit() and int(cursor) < 2**31):
        raise InvalidRequest(f"cursor {cursor!r} is not an item's seq", param="cursor")
    return int(cursor)


def _settled(session: Session, run: EvalRun, embedder: LazyEmbedder) -> EvalRunPublic:
    def embed(texts: list[str]) -> list[Any]:
        return [embedder.encode_one(text) for text in texts]

    progress = runs.settle(session, run=run, embed=embed)
    return EvalRunPublic.from_row(run, progress)


# --- sets --------------------------------------------------------------------------------


async def _form_body(request: Request) -> EvalSetCreate:
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload, fields = form.get("file"), {}
        for field in ("name", "description", "metadata"):
            value = form.get(field)
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"{field} must be a form field, not a file", param=field)
            if value is not None and (reason := storable.problem(value)) is not None:
                raise InvalidRequest(f"{field} {reason}", param=field, code="invalid_text")
            fields[field] = value
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("the form carries no file: send the JSONL as 'file'", param="file")
        items = sets.parse_jsonl(await upload.read())
    finally:
        await form.close()
    shape: dict[str, Any] = {key: value for key, value in fields.items() if value is not None}
    shape.update(metadata=sets.form_metadata(fields["metadata"]), items=items)
    try:
        return EvalSetCreate.model_validate(shape)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from exc


def _json_body(raw: bytes) -> EvalSetCreate:
    # Parsed without NaN and Infinity, which SQL's JSON types cannot hold.
    try:
        document = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    try:
        return EvalSetCreate.model_validate(document)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from exc


def _store_set(
    factory: sessionmaker[Session], caller: Caller, body: EvalSetCreate
) -> EvalSetPublic:
    with factory() as session:
        try:
            eval_set = sets.create_set(session, tenant_id=caller.tenant_id, body=body)
            audit(session, caller, "eval_set.create", eval_set.id, name=body.name)
            session.commit()
        except IntegrityError:
            session.rollback()
            raise Conflict(
                f"an evaluation set named {body.name!r} exists already",
                param="name",
                code="name_taken",
            ) from None
        return EvalSetPublic.from_row(eval_set)


@router.post(
    "/sets",
    response_model=EvalSetPublic,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=UPLOAD_BODY,
)
async def create_eval_set(
    request: Request, caller: WriterDep, factory: SessionmakerDep
) -> JSONResponse:
    """Create a set: JSON with items or from_history, or a multipart JSONL upload (field
    'file', with 'name', 'description' and 'metadata' fields)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body = await _form_body(request)
    elif content_type.startswith("application/json"):
        body = _json_body(await request.body())
    else:
        raise InvalidRequest(
            "send application/json, or multipart/form-data with a JSONL file",
            param="Content-Type",
            code="unsupported_media_type",
        )
    created = await anyio.to_thread.run_sync(_store_set, factory, caller, body)
    return JSONResponse(
        created.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED,
        headers={"Location": f"{PREFIX}/sets/{created.id}"},
    )


@router.get("/sets", response_model=Page[EvalSetPublic])
def read_eval_sets(
    caller: CallerDep, session: SessionDep, cursor: Cursor = None, limit: Limit = 20
) -> Page[EvalSetPublic]:
    """The caller's evaluation sets, newest first."""
    rows, has_more = evals.list_sets(session, tenant_id=caller.tenant_id, after=cursor, limit=limit)
    return Page[EvalSetPublic].of(rows, has_more, EvalSetPublic.from_row)


@router.get("/sets/{set_id}", response_model=EvalSetPublic)
def read_eval_set(set_id: str, caller: CallerDep, session: SessionDep) -> EvalSetPublic:
    """An evaluation set, by id or name."""
    return EvalSetPublic.from_row(_eval_set(session, caller.tenant_id, set_id))


@router.get("/sets/{set_id}/items", response_model=Page[EvalItemPublic])
def read_eval_items(
    set_id: str, caller: CallerDep, session: SessionDep, cursor: Cursor = None, limit: Limit = 20
) -> Page[EvalItemPublic]:
    """A set's items in order; the cursor is the last seq of the page before."""
    eval_set = _eval_set(session, caller.tenant_id, set_id)
    rows, has_more = evals.list_items(
        session, set_id=eval_set.id, after_seq=_seq(cursor), limit=limit
    )
    return Page[EvalItemPublic](
        data=[EvalItemPublic.from_row(row) for row in rows],
        has_more=has_more,
        next_cursor=str(rows[-1].seq) if has_more else None,
    )


@router.delete("/sets/{set_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_eval_set(set_id: str, caller: WriterDep, session: SessionDep) -> None:
    """Delete a set with its runs and results; their unfinished jobs are cancelled."""
    eval_set = _eval_set(session, caller.tenant_id, set_id)
    audit(session, caller, "eval_set.delete", eval_set.id, name=eval_set.name)
    evals.delete_set(session, eval_set=eval_set)
    session.commit()


# --- runs --------------------------------------------------------------------------------


@router.post("/runs", response_model=EvalRunPublic, status_code=status.HTTP_202_ACCEPTED)
def create_eval_run(
    body: EvalRunCreate,
    caller: WriterDep,
    session: SessionDep,
    publisher: PublisherDep,
    served: ServedModelsDep,
    limits: LimitsDep,
    response: Response,
) -> EvalRunPublic:
    """Run a language model over a set: a batch-queue job per item, scored as each ends."""
    eval_set = _eval_set(session, caller.tenant_id, body.set_id)
    spec = served_model(body.model, served, task="chat")
    params = body.params.model_dump()
    params["max_tokens"] = resolve_max_tokens(spec, params["max_tokens"], param="params.max_tokens")
    run = runs.start_run(
        session,
        publisher,
        tenant_id=caller.tenant_id,
        api_key_id=caller.key_id,
        eval_set=eval_set,
        spec=spec,
        params=params,
        metadata=body.metadata,
        max_queued=limits.max_queued_jobs_per_tenant,
    )
    response.headers["Location"] = f"{PREFIX}/runs/{run.id}"
    return EvalRunPublic.from_row(run, evals.run_progress(session, run=run))


@router.get("/runs", response_model=Page[EvalRunPublic])
def read_eval_runs(
    caller: CallerDep,
    session: SessionDep,
    set_id: Annotated[str | None, Query(max_length=128, description="id or name")] = None,
    cursor: Cursor = None,
    limit: Limit = 20,
) -> Page[EvalRunPublic]:
    """The caller's evaluation runs, newest first, of one set if set_id is given."""
    set_filter = _eval_set(session, caller.tenant_id, set_id).id if set_id else None
    rows, has_more = evals.list_runs(
        session, tenant_id=caller.tenant_id, set_id=set_filter, after=cursor, limit=limit
    )
    return Page[EvalRunPublic].of(
        rows,
        has_more,
        lambda row: EvalRunPublic.from_row(row, evals.run_progress(session, run=row)),
    )


@router.get("/runs/{run_id}", response_model=EvalRunPublic)
def read_eval_run(
    run_id: str, caller: CallerDep, session: SessionDep, embedder: EmbedderDep
) -> EvalRunPublic:
    """A run: its status, progress and, once it has ended, the aggregates of its scores."""
    return _settled(session, _run(session, caller.tenant_id, run_id), embedder)


@router.get("/runs/{run_id}/results", response_model=Page[EvalResultPublic])
def read_eval_results(
    run_id: str,
    caller: CallerDep,
    session: SessionDep,
    embedder: EmbedderDep,
    cursor: Cursor = None,
    limit: Limit = 20,
) -> Page[EvalResultPublic]:
    """A run's results in item order: input, reference, output, scores or error."""
    run = _run(session, caller.tenant_id, run_id)
    _settled(session, run, embedder)
    rows, has_more = evals.list_results(session, run_id=run.id, after_seq=_seq(cursor), limit=limit)
    return Page[EvalResultPublic](
        data=[EvalResultPublic.of(result, item) for result, item in rows],
        has_more=has_more,
        next_cursor=str(rows[-1][1].seq) if has_more else None,
    )


@router.get("/compare", response_model=EvalComparison)
def read_eval_comparison(
    caller: CallerDep,
    session: SessionDep,
    embedder: EmbedderDep,
    a: Annotated[str, Query(max_length=40, description="a run's id")],
    b: Annotated[str, Query(max_length=40, description="another run's id, of the same set")],
    cursor: Cursor = None,
    limit: Limit = 20,
) -> EvalComparison:
    """Two runs of one set side by side, item by item; each delta is b's score minus a's."""
    first, second = _run(session, caller.tenant_id, a, "a"), _run(session, caller.tenant_id, b, "b")
    if first.set_id != second.set_id:
        raise InvalidRequest(
            f"runs {a!r} and {b!r} are of different sets; compare runs of one set",
            param="b",
            code="different_sets",
        )
    run_a, run_b = _settled(session, first, embedder), _settled(session, second, embedder)
    rows, has_more = evals.compare_runs(
        session, first=first.id, second=second.id, after_seq=_seq(cursor), limit=limit
    )
    means = [
        run.aggregates.means.model_dump() if run.aggregates else None for run in (run_a, run_b)
    ]
    return EvalComparison(
        set_id=first.set_id,
        a=run_a,
        b=run_b,
        delta=EvalScoreDeltas(**metrics.deltas(*means)),
        data=[
            EvalComparisonItem(
                seq=item.seq,
                input=item.input,
                reference=item.reference,
                a=EvalOutcome.from_row(result_a),
                b=EvalOutcome.from_row(result_b),
                delta=EvalScoreDeltas(**metrics.deltas(result_a.scores, result_b.scores)),
            )
            for item, result_a, result_b in rows
        ],
        has_more=has_more,
        next_cursor=str(rows[-1][0].seq) if has_more else None,
    )
