"""OpenAI's Files API: upload, list, read, download and delete files kept in SQL."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from service import files, storable
from service.api.deps import CallerDep, SessionDep, WriterDep, audit
from service.api.errors import ERROR_RESPONSES, InvalidRequest, NotFound, PayloadTooLarge
from service.db.tables import File
from service.files import CHUNK_BYTES, FileLimits, FileWriter
from service.openai_compat.files_protocol import FileDeleted, FileList, FileObject

UPLOAD_PATH = "/v1/files"
# What a multipart body may carry beyond the file itself: boundaries, headers, purpose.
MULTIPART_OVERHEAD_BYTES = 1 << 20
# batch: request lines; fine-tune: a training dataset; user_data: samples to score.
UPLOAD_PURPOSES = ("batch", "fine-tune", "user_data")
MAX_FILENAME_CHARS = 255  # files.filename is String(255)

router = APIRouter(prefix=UPLOAD_PATH, tags=["files"], responses=ERROR_RESPONSES)


def get_file_limits(request: Request) -> FileLimits:
    return request.app.state.file_limits


FileLimitsDep = Annotated[FileLimits, Depends(get_file_limits)]


def upload_filename(filename: str | None, *, default: str = "upload.jsonl") -> str:
    """The name an upload is stored under; 400 for one SQL cannot store or too long."""
    # Only the last component is kept: a name such as "../../etc/passwd" must never
    # come back in a Content-Disposition as a path for a client to write to.
    name = PurePosixPath((filename or "").replace("\\", "/")).name or default
    if len(name) > MAX_FILENAME_CHARS:
        raise InvalidRequest(
            f"the filename must be at most {MAX_FILENAME_CHARS} characters", param="file"
        )
    reason = storable.problem(name)
    if reason is not None:
        raise InvalidRequest(f"the filename {reason}", param="file", code="invalid_text")
    return name


def _copy(upload: UploadFile, writer: FileWriter) -> File:
    """Copy the spooled upload into SQL a chunk at a time; limits become API errors."""
    try:
        while data := upload.file.read(CHUNK_BYTES):
            writer.write(data)
        return writer.close()
    except files.FileTooLarge as exc:
        raise PayloadTooLarge(str(exc), param="file", code="file_too_large") from exc
    except files.TooManyLines as exc:
        raise InvalidRequest(str(exc), param="file", code="too_many_lines") from exc


@router.post("", response_model=FileObject, form_limits={"max_files": 1, "max_fields": 8})
def create_file(
    file: UploadFile,
    purpose: Annotated[str, Form(max_length=32)],
    caller: WriterDep,
    session: SessionDep,
    limits: FileLimitsDep,
) -> FileObject:
    """Upload a file: batch requests, a training dataset, or samples to score."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"purpose {purpose!r} cannot be uploaded here; allowed: {list(UPLOAD_PURPOSES)}",
            param="purpose",
            code="invalid_value",
        )
    if file.size is not None and file.size > limits.max_bytes:
        raise PayloadTooLarge(
            f"the file is larger than the limit of {limits.max_bytes} bytes",
            param="file",
            code="file_too_large",
        )
    writer = FileWriter(
        session=session,
        tenant_id=caller.tenant_id,
        purpose=purpose,
        filename=upload_filename(file.filename),
        max_bytes=limits.max_bytes,
        max_lines=limits.max_lines,
    )
    row = _copy(file, writer)
    if row.bytes == 0:
        raise InvalidRequest("the file is empty", param="file", code="empty_file")
    session.commit()
    return FileObject.from_row(row)


@router.get("", response_model=FileList)
def read_files(
    caller: CallerDep,
    session: SessionDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    kind: Annotated[
        Literal["real", "synthetic"] | None,
        Query(description="real: uploaded; synthetic: made by a model"),
    ] = None,
    after: Annotated[
        str | None, Query(max_length=40, description="last_id of the page before")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """The caller's files by creation time, newest first unless order=asc."""
    rows, has_more = files.list_files(
        session,
        tenant_id=caller.tenant_id,
        purpose=purpose,
        kind=kind,
        after=after,
        limit=limit,
        order=order,
    )
    return FileList.of(rows, has_more)


def _get_file(session: Session, tenant_id: int, file_id: str) -> File:
    row = files.get_file(session, tenant_id=tenant_id, file_id=file_id)
    if row is None:
        raise NotFound(f"file {file_id!r} not found", param="file_id")
    return row


@router.get("/{file_id}", response_model=FileObject)
def read_file(file_id: str, caller: CallerDep, session: SessionDep) -> FileObject:
    """A file's metadata."""
    return FileObject.from_row(_get_file(session, caller.tenant_id, file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def read_file_content(
    file_id: str, caller: CallerDep, session: SessionDep, request: Request
) -> StreamingResponse:
    """A file's bytes, streamed from SQL a chunk at a time."""
    row = _get_file(session, caller.tenant_id, file_id)
    return StreamingResponse(
        files.stream_chunks(request.app.state.sessionmaker, row.id),
        media_type="application/octet-stream",
        # A download cut short (the file deleted meanwhile) then shows as incomplete.
        headers={"Content-Length": str(row.bytes)},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, caller: WriterDep, session: SessionDep) -> FileDeleted:
    """Delete a file and its bytes."""
    row = _get_file(session, caller.tenant_id, file_id)
    files.delete_file(session, file=row)
    audit(session, caller, "file.delete", row.id, filename=row.filename)
    session.commit()
    return FileDeleted(id=file_id)
