"""OpenAI's Files API shapes, as genserve answers them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int  # unix seconds
    filename: str
    purpose: str
    # A file is whole once its upload returns; OpenAI's other states never occur here.
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None
    # genserve: "real" (uploaded) or "synthetic" (made by a model: its generation and
    # model version are in generation_id and metadata).
    kind: str = "real"
    sha256: str | None = None
    generation_id: str | None = None
    metadata: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: Any) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose=row.purpose,
            kind=row.kind,
            sha256=row.sha256 or None,
            generation_id=row.generation_id,
            metadata=row.meta,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, rows: list[Any], has_more: bool) -> FileList:
        return cls(
            data=[FileObject.from_row(row) for row in rows],
            first_id=rows[0].id if rows else None,
            last_id=rows[-1].id if rows else None,
            has_more=has_more,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
