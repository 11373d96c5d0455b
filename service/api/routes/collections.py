"""Collections of documents: upload, ingest, list, delete, and search their passages."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from service.api.deps import (
    CallerDep,
    EmbeddingModelDep,
    PublisherDep,
    SessionDep,
    SessionmakerDep,
    WriterDep,
    audit,
)
from service.api.errors import (
    ERROR_RESPONSES,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from service.api.routes.files import upload_filename
from service.api.routes.listing import Cursor, Limit, metadata_pairs
from service.api.schemas import (
    ChunkingOptions,
    CollectionCreate,
    CollectionList,
    CollectionPublic,
    CollectionSearchRequest,
    DocumentFiltersIn,
    DocumentPublic,
    DocumentsCreate,
    IngestionPublic,
    Page,
    PassageList,
    PassagePublic,
    ScorePart,
    SearchScores,
)
from service.db import rag, tenants
from service.db.rag import DocumentFilters
from service.db.tables import Collection, Job, new_id
from service.files import CHUNK_BYTES, FileLimits, FileWriter
from service.queue import JobPublisher
from service.rag.extract import ExtractionError, validate
from service.rag.retrieval import Passage, Retriever
from service.search.generations import Fusion, Part
from service.submit import publish_job

PREFIX = "/v1/collections"
# Uploads stream to SQL as they arrive (the middleware's stream paths), bounded per request.
UPLOAD_PATH = re.compile(r"^/v1/collections/[^/]+/documents$")
MAX_FILES_PER_UPLOAD = 100
INGEST_QUEUE = "embed"
STAGING_PURPOSE = "collection"  # uploads wait in the files table until ingested

router = APIRouter(prefix=PREFIX, tags=["collections"], responses=ERROR_RESPONSES)


def get_retriever(request: Request) -> Retriever:
    return request.app.state.retriever


RetrieverDep = Annotated[Retriever, Depends(get_retriever)]


def _public(collection: Collection, counts: rag.CollectionCounts) -> CollectionPublic:
    return CollectionPublic(
        id=collection.id,
        name=collection.name,
        kind=collection.kind,
        embedding_model=collection.embedding_model,
        chunking=ChunkingOptions(
            max_tokens=collection.chunk_tokens, overlap_tokens=collection.chunk_overlap
        ),
        metadata=collection.meta,
        document_count=counts.documents,
        chunk_count=counts.chunks,
        created_at=collection.created_at,
    )


def _collection(session: Session, tenant_id: int, ref: str) -> Collection:
    collection = rag.get_collection(session, tenant_id=tenant_id, ref=ref)
    if collection is None:
        raise NotFound(f"collection {ref!r} not found", param="collection")
    return collection


def _with_counts(session: Session, collection: Collection) -> CollectionPublic:
    counts = rag.collection_counts(session, ids=[collection.id])[collection.id]
    return _public(collection, counts)


@router.post("", response_model=CollectionPublic, status_code=status.HTTP_201_CREATED)
def create_collection(
    body: CollectionCreate,
    caller: WriterDep,
    session: SessionDep,
    embedding_model: EmbeddingModelDep,
) -> CollectionPublic:
    """Create a collection: documents to search and ground answers in, or (kind history)
    the tenant's past generations."""
    model = body.embedding_model or embedding_model
    if model != embedding_model:
        raise InvalidRequest(
            f"embedding_model {model!r} is not served here; this server embeds with "
            f"{embedding_model!r}",
            param="embedding_model",
            code="model_not_found",
        )
    try:
        collection = rag.create_collection(
            session,
            tenant_id=caller.tenant_id,
            name=body.name,
            kind=body.kind,
            embedding_model=model,
            chunk_tokens=body.chunking.max_tokens,
            chunk_overlap=body.chunking.overlap_tokens,
            metadata=body.metadata,
        )
        audit(session, caller, "collection.create", str(collection.id), name=body.name)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(
            f"a collection named {body.name!r} exists already", param="name", code="name_taken"
        ) from None
    return _public(collection, rag.CollectionCounts())


@router.get("", response_model=CollectionList)
def read_collections(caller: CallerDep, session: SessionDep) -> CollectionList:
    """The caller's collections, oldest first, with their document and chunk counts."""
    rows = rag.list_collections(session, tenant_id=caller.tenant_id)
    counts = rag.collection_counts(session, ids=[row.id for row in rows])
    return CollectionList(data=[_public(row, counts[row.id]) for row in rows])


@router.get("/{collection}", response_model=CollectionPublic)
def read_collection(collection: str, caller: CallerDep, session: SessionDep) -> CollectionPublic:
    """A collection, by id or name."""
    return _with_counts(session, _collection(session, caller.tenant_id, collection))


@router.delete("/{collection}", status_code=status.HTTP_204_NO_CONTENT)
def delete_collection(collection: str, caller: WriterDep, session: SessionDep) -> None:
    """Delete a collection with its documents, chunks and vectors; search stops finding
    them at once. Answers grounded in them keep their copies of the passages."""
    row = _collection(session, caller.tenant_id, collection)
    audit(session, caller, "collection.delete", str(row.id), name=row.name)
    rag.delete_collection(session, collection=row)
    session.commit()


# --- documents ---------------------------------------------------------------------------


def _ingestion_job(
    session: Session, *, tenant_id: int, collection: Collection, input: dict[str, Any]
) -> Job:
    tenants.count_usage(session, tenant_id=tenant_id, requests=1)
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        model=collection.embedding_model,
        queue=INGEST_QUEUE,
        status="queued",
        input={"collection_id": collection.id, **input},
        params={},
        meta={},
        api="ingest",
    )
    session.add(job)
    session.flush()
    return job


def _stage_files(
    factory: Any,
    caller: Any,
    collection_ref: str,
    uploads: list[tuple[str, str | None, bytes]],
    limits: FileLimits,
) -> Job:
    with factory() as session:
        collection = _collection(session, caller.tenant_id, collection_ref)
        _documents_only(collection)
        staged = []
        for filename, media_type, data in uploads:
            writer = FileWriter(
                session=session,
                tenant_id=caller.tenant_id,
                purpose=STAGING_PURPOSE,
                filename=filename,
                max_bytes=limits.max_bytes,
                max_lines=None,
                media_type=media_type,
            )
            for start in range(0, len(data), CHUNK_BYTES):
                writer.write(data[start : start + CHUNK_BYTES])
            staged.append(writer.close().id)
        job = _ingestion_job(
            session, tenant_id=caller.tenant_id, collection=collection, input={"files": staged}
        )
        session.commit()
        return job


def _documents_only(collection: Collection) -> None:
    if collection.kind != "documents":
        raise InvalidRequest(
            f"collection {collection.name!r} is a {collection.kind} collection; documents go "
            "into a documents collection",
            param="collection",
            code="wrong_collection_kind",
        )


def _stage_json(factory: Any, caller: Any, collection_ref: str, body: DocumentsCreate) -> Job:
    with factory() as session:
        collection = _collection(session, caller.tenant_id, collection_ref)
        _documents_only(collection)
        job = _ingestion_job(
            session,
            tenant_id=caller.tenant_id,
            collection=collection,
            input={"documents": [item.model_dump() for item in body.documents]},
        )
        session.commit()
        return job


async def _uploads(request: Request, limits: FileLimits) -> list[tuple[str, str | None, bytes]]:
    form = await request.form(max_files=MAX_FILES_PER_UPLOAD, max_fields=8)
    uploads = []
    for position, (field, value) in enumerate(form.multi_items()):
        if not isinstance(value, UploadFile):
            continue
        if field not in ("file", "files"):
            raise InvalidRequest(
                f"send files in the form field 'file' (or 'files'), not {field!r}", param=field
            )
        data = await value.read()
        if len(data) > limits.max_bytes:
            raise PayloadTooLarge(
                f"{value.filename} is larger than the limit of {limits.max_bytes} bytes",
                param="file",
                code="file_too_large",
            )
        name = upload_filename(value.filename, default="document.txt")
        if not data:
            raise InvalidRequest(f"{name} is empty", param="file", code="empty_file")
        try:
            validate(data, filename=name, media_type=value.content_type)
        except ExtractionError as exc:
            raise InvalidRequest(
                f"{name}: {exc}", param=f"file[{position}]", code="unreadable_document"
            ) from exc
        uploads.append((name, value.content_type, data))
    await form.close()
    if not uploads:
        raise InvalidRequest("the form carries no file: send one as 'file'", param="file")
    return uploads


# Models of bodies add_documents reads itself, for the OpenAPI schema's components.
BODY_MODELS = (DocumentsCreate,)
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "text, Markdown, HTML, PDF or JSONL of "
                            "{id, title, text, metadata}",
                        }
                    },
                    "required": ["file"],
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/DocumentsCreate"}},
        },
    }
}


@router.post(
    "/{collection}/documents",
    response_model=IngestionPublic,
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=UPLOAD_BODY,
)
async def add_documents(
    collection: str,
    request: Request,
    caller: WriterDep,
    factory: SessionmakerDep,
    publisher: PublisherDep,
) -> JSONResponse:
    """Add documents: files as multipart (field 'file', repeatable) or a JSON body
    {"documents": [{id, title, text, metadata}]}. An ingestion job extracts, chunks,
    embeds and indexes them; follow it at the Location. A document sent again with the
    same content is not stored twice; with other content its chunks are replaced."""
    limits: FileLimits = request.app.state.file_limits
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        uploads = await _uploads(request, limits)
        job = await anyio.to_thread.run_sync(
            _stage_files, factory, caller, collection, uploads, limits
        )
    elif content_type.startswith("application/json"):
        try:
            body = DocumentsCreate.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(
                [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
            ) from exc
        job = await anyio.to_thread.run_sync(_stage_json, factory, caller, collection, body)
    else:
        raise InvalidRequest(
            "send multipart/form-data with files, or application/json with documents",
            param="Content-Type",
            code="unsupported_media_type",
        )
    await anyio.to_thread.run_sync(_publish, factory, publisher, job)
    location = f"{PREFIX}/{job.input['collection_id']}/ingestions/{job.id}"
    return JSONResponse(
        IngestionPublic.from_row(job).model_dump(mode="json"),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": location},
    )


def _publish(factory: Any, publisher: JobPublisher, job: Job) -> None:
    with factory() as session:
        publish_job(session, publisher, job)


def document_filters(
    external_id: Annotated[list[str] | None, Query(description="repeatable")] = None,
    metadata: Annotated[
        list[str] | None, Query(description="key=value on the metadata; repeatable")
    ] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> DocumentFilters:
    return DocumentFilters(
        external_ids=tuple(external_id or ()),
        metadata=metadata_pairs(metadata),
        created_after=created_after,
        created_before=created_before,
    )


@router.get("/{collection}/documents", response_model=Page[DocumentPublic])
def read_documents(
    collection: str,
    caller: CallerDep,
    session: SessionDep,
    filters: Annotated[DocumentFilters, Depends(document_filters)],
    cursor: Cursor = None,
    limit: Limit = 20,
) -> Page[DocumentPublic]:
    """The collection's documents, newest first, filtered by external id or metadata."""
    row = _collection(session, caller.tenant_id, collection)
    rows, has_more = rag.list_documents(
        session, collection_id=row.id, filters=filters, after=cursor, limit=limit
    )
    return Page.of(rows, has_more, DocumentPublic.from_row)


def _document(session: Session, tenant_id: int, collection: str, document_id: str) -> Any:
    row = _collection(session, tenant_id, collection)
    document = rag.get_document(session, collection_id=row.id, document_id=document_id)
    if document is None:
        raise NotFound(f"document {document_id!r} not found", param="document_id")
    return document


@router.get("/{collection}/documents/{document_id}", response_model=DocumentPublic)
def read_document(
    collection: str, document_id: str, caller: CallerDep, session: SessionDep
) -> DocumentPublic:
    """A document with its extracted text."""
    document = _document(session, caller.tenant_id, collection, document_id)
    return DocumentPublic.from_row(document, with_text=True)


@router.delete("/{collection}/documents/{document_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_document(
    collection: str, document_id: str, caller: WriterDep, session: SessionDep
) -> None:
    """Delete a document with its chunks and vectors; search stops finding them at once."""
    document = _document(session, caller.tenant_id, collection, document_id)
    audit(session, caller, "document.delete", document.id, external_id=document.external_id)
    rag.delete_document(session, document=document)
    session.commit()


# --- ingestions --------------------------------------------------------------------------


@router.get("/{collection}/ingestions/{ingestion_id}", response_model=IngestionPublic)
def read_ingestion(
    collection: str, ingestion_id: str, caller: CallerDep, session: SessionDep
) -> IngestionPublic:
    """An ingestion and its progress: stage, files and documents done, chunks, errors."""
    row = _collection(session, caller.tenant_id, collection)
    job = session.get(Job, ingestion_id)
    if (
        job is None
        or job.tenant_id != caller.tenant_id
        or job.api != "ingest"
        or job.input.get("collection_id") != row.id
    ):
        raise NotFound(f"ingestion {ingestion_id!r} not found", param="ingestion_id")
    return IngestionPublic.from_row(job)


# --- search ------------------------------------------------------------------------------


def _score_part(part: Part | None) -> ScorePart | None:
    return ScorePart(score=part.score, rank=part.rank) if part else None


def passage_public(rank: int, passage: Passage) -> PassagePublic:
    return PassagePublic(
        rank=rank,
        score=passage.score,
        scores=SearchScores(
            vector=_score_part(passage.vector), keyword=_score_part(passage.keyword)
        ),
        collection_id=passage.collection_id,
        document_id=passage.document_id,
        external_id=passage.external_id,
        chunk_id=passage.chunk_id,
        generation_id=passage.generation_id,
        title=passage.title,
        text=passage.text,
        metadata=passage.metadata,
    )


def to_filters(filters: DocumentFiltersIn) -> DocumentFilters:
    return DocumentFilters(**filters.model_dump())


@router.post("/{collection}/search", response_model=PassageList)
def search_collection(
    collection: str,
    body: CollectionSearchRequest,
    caller: CallerDep,
    session: SessionDep,
    retriever: RetrieverDep,
) -> PassageList:
    """The collection's passages ranked for the query: by meaning (vector), by words
    (keyword) or both (hybrid, fused by reciprocal rank), with each ranking's part."""
    row = _collection(session, caller.tenant_id, collection)
    weights = body.weights
    passages = retriever.search(
        session,
        collections=[row],
        query=body.query,
        mode=body.mode,
        k=body.k,
        filters=to_filters(body.filters),
        fusion=Fusion(vector=weights.vector, keyword=weights.keyword, rrf_k=weights.rrf_k),
    )
    return PassageList(
        model=retriever.embedding_model if body.mode != "keyword" else None,
        mode=body.mode,
        data=[passage_public(rank, passage) for rank, passage in enumerate(passages, 1)],
    )
