"""The Files API on the real app in-process, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service import files
from service.api.app import create_app
from service.api.routes import files as files_routes
from service.config import Settings
from service.db import tenants
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import FileChunk


@dataclass
class Service:
    client: TestClient
    sessions: sessionmaker[Session]
    writer: dict[str, str]  # Authorization headers
    reader: dict[str, str]
    other: dict[str, str]  # a writer of another tenant
    tenant_id: int  # of the writer and the reader


def _bearer(sessions: sessionmaker[Session], tenant: str, role: str) -> tuple[int, dict[str, str]]:
    with sessions() as session:
        row, plaintext = tenants.create_api_key(session, tenant_name=tenant, role=role)
        session.commit()
    return row.tenant_id, {"Authorization": f"Bearer {plaintext}"}


@pytest.fixture
def open_service(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Starts the app (lifespan included) with the given file limits."""
    with ExitStack() as stack:

        def start(*, max_file_bytes: int = 8 << 20, max_batch_lines: int = 50_000) -> Service:
            settings = Settings(
                database_url=db_url,
                data_dir=tmp_path,
                environment="test",
                max_file_bytes=max_file_bytes,
                max_batch_lines=max_batch_lines,
            )
            client = stack.enter_context(TestClient(create_app(settings)))
            engine = make_engine(db_url)
            stack.callback(engine.dispose)
            sessions = make_sessionmaker(engine)
            tenant_id, writer = _bearer(sessions, "acme", "writer")
            return Service(
                client=client,
                sessions=sessions,
                writer=writer,
                reader=_bearer(sessions, "acme", "reader")[1],
                other=_bearer(sessions, "globex", "writer")[1],
                tenant_id=tenant_id,
            )

        yield start


def upload(
    service: Service,
    data: bytes,
    *,
    purpose: str = "batch",
    headers: dict[str, str] | None = None,
    filename: str = "requests.jsonl",
) -> Any:
    return service.client.post(
        "/v1/files",
        headers=headers or service.writer,
        data={"purpose": purpose},
        files={"file": (filename, data, "application/jsonl")},
    )


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def jsonl(count: int, width: int) -> bytes:
    """count request lines of varied lengths around width bytes."""
    lines = []
    for i in range(count):
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * (width + i % 97)}]}
        lines.append(json.dumps({"custom_id": f"req-{i}", "body": body}))
    return ("\n".join(lines) + "\n").encode()


def test_upload_round_trip_across_chunks(open_service: Callable[..., Service]) -> None:
    service = open_service()
    data = jsonl(3000, 1000)  # about 3.2 MB: four chunks, lines cut at each boundary
    assert len(data) > 3 * files.CHUNK_BYTES

    created = upload(service, data)
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "file" and body["id"].startswith("file_")
    assert body["bytes"] == len(data) and body["purpose"] == "batch"
    assert body["filename"] == "requests.jsonl" and body["status"] == "processed"
    assert isinstance(body["created_at"], int)
    assert body["expires_at"] is None and body["status_details"] is None
    assert service.client.get(f"/v1/files/{body['id']}", headers=service.reader).json() == body

    content = service.client.get(f"/v1/files/{body['id']}/content", headers=service.reader)
    assert content.status_code == 200
    assert content.headers["content-type"] == "application/octet-stream"
    assert content.content == data

    expected = data.split(b"\n")[:-1]
    with service.sessions() as session:
        row = files.get_file(session, tenant_id=service.tenant_id, file_id=body["id"])
        assert row is not None
        assert row.lines == 3000 and row.sha256 == hashlib.sha256(data).hexdigest()
        sizes = [len(chunk) for chunk in files.iter_chunks(session, body["id"])]
        assert sizes == [files.CHUNK_BYTES] * 3 + [len(data) - 3 * files.CHUNK_BYTES]
        assert list(files.iter_lines(session, body["id"])) == expected
        assert list(files.iter_lines(session, body["id"], start=1234)) == expected[1234:]
        assert list(files.iter_lines(session, body["id"], start=3000)) == []


# (what is written, piece by piece; the lines read back), with 8-byte chunks.
EDGE_CASES = [
    ([b"ab\ncd\n"], [b"ab", b"cd"]),
    ([b"abc", b"def\n", b"\n", b"g"], [b"abcdef", b"", b"g"]),  # final line unterminated
    ([b"1234567\n89\n\n"], [b"1234567", b"89", b""]),  # a newline ends chunk one
    ([b"x" * 20, b"\ny" * 3], [b"x" * 20, b"y", b"y", b"y"]),  # a line of three chunks
    ([b"\n\n"], [b"", b""]),
    ([], []),
]


def test_writer_and_readers_agree_at_chunk_edges(db_url: str) -> None:
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        tenant = tenants.ensure_tenant(session, name="acme")
        for pieces, lines in EDGE_CASES:
            data = b"".join(pieces)
            writer = files.FileWriter(
                session=session,
                tenant_id=tenant.id,
                purpose="batch",
                filename="edges.jsonl",
                max_bytes=None,
                max_lines=None,
                chunk_bytes=8,
            )
            for piece in pieces:
                writer.write(piece)
            row = writer.close()
            session.commit()
            assert (row.bytes, row.lines) == (len(data), len(lines)), pieces
            assert row.sha256 == hashlib.sha256(data).hexdigest()
            chunks = list(files.iter_chunks(session, row.id))
            assert b"".join(chunks) == data and all(len(c) == 8 for c in chunks[:-1]), pieces
            assert list(files.iter_lines(session, row.id)) == lines, pieces
            assert list(files.iter_lines(session, row.id, start=1)) == lines[1:], pieces
    engine.dispose()


def test_writer_refuses_past_its_bounds(db_url: str) -> None:
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        tenant = tenants.ensure_tenant(session, name="acme")

        def writer(*, max_bytes: int | None, max_lines: int | None) -> files.FileWriter:
            return files.FileWriter(
                session=session,
                tenant_id=tenant.id,
                purpose="batch",
                filename="f",
                max_bytes=max_bytes,
                max_lines=max_lines,
            )

        with pytest.raises(files.FileTooLarge):
            writer(max_bytes=10, max_lines=None).write(b"x" * 11)
        with pytest.raises(files.TooManyLines):
            writer(max_bytes=None, max_lines=2).write(b"a\nb\nc\n")
        exactly = writer(max_bytes=None, max_lines=2)
        exactly.write(b"a\nb\n")
        assert exactly.close().lines == 2
        unterminated = writer(max_bytes=None, max_lines=2)
        unterminated.write(b"a\nb\nc")
        with pytest.raises(files.TooManyLines):
            unterminated.close()
        session.rollback()
    engine.dispose()


def test_list_orders_and_pages(open_service: Callable[..., Service]) -> None:
    service = open_service()
    ids = [upload(service, b'{"n": %d}\n' % i).json()["id"] for i in range(3)]
    newest_first = sorted(ids, reverse=True)

    listed = service.client.get("/v1/files", headers=service.reader).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [f["id"] for f in listed["data"]] == newest_first
    assert (listed["first_id"], listed["last_id"]) == (newest_first[0], newest_first[-1])

    ascending = service.client.get("/v1/files?order=asc", headers=service.reader).json()
    assert [f["id"] for f in ascending["data"]] == sorted(ids)

    page = service.client.get("/v1/files?limit=2", headers=service.reader).json()
    assert [f["id"] for f in page["data"]] == newest_first[:2] and page["has_more"] is True
    rest = service.client.get(
        f"/v1/files?limit=2&after={page['last_id']}", headers=service.reader
    ).json()
    assert [f["id"] for f in rest["data"]] == newest_first[2:] and rest["has_more"] is False

    after_asc = service.client.get(
        f"/v1/files?order=asc&after={sorted(ids)[0]}", headers=service.reader
    ).json()
    assert [f["id"] for f in after_asc["data"]] == sorted(ids)[1:]

    other_purpose = service.client.get("/v1/files?purpose=batch_output", headers=service.reader)
    assert other_purpose.json()["data"] == [] and other_purpose.json()["first_id"] is None
    too_many = service.client.get("/v1/files?limit=10001", headers=service.reader)
    assert error_of(too_many, 400)["param"] == "limit"


def test_delete_removes_the_file_and_its_chunks(open_service: Callable[..., Service]) -> None:
    service = open_service()
    file_id = upload(service, jsonl(1200, 1000)).json()["id"]  # two chunks
    assert error_of(service.client.delete(f"/v1/files/{file_id}", headers=service.reader), 403)

    deleted = service.client.delete(f"/v1/files/{file_id}", headers=service.writer)
    assert deleted.status_code == 200
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}

    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        error = error_of(service.client.get(path, headers=service.writer), 404)
        assert error["param"] == "file_id"
    assert error_of(service.client.delete(f"/v1/files/{file_id}", headers=service.writer), 404)
    with service.sessions() as session:
        count = session.scalar(
            select(func.count()).select_from(FileChunk).where(FileChunk.file_id == file_id)
        )
        assert count == 0


def test_tenants_and_roles(open_service: Callable[..., Service]) -> None:
    service = open_service()
    file_id = upload(service, b'{"a": 1}\n').json()["id"]

    unknown = error_of(service.client.get("/v1/files/file_nope", headers=service.writer), 404)
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        theirs = error_of(service.client.get(path, headers=service.other), 404)
        assert theirs["param"] == "file_id" and theirs["type"] == unknown["type"]
    assert error_of(service.client.delete(f"/v1/files/{file_id}", headers=service.other), 404)
    assert service.client.get("/v1/files", headers=service.other).json()["data"] == []

    refused = error_of(upload(service, b'{"a": 1}\n', headers=service.reader), 403)
    assert refused["type"] == "permission_error"
    assert error_of(service.client.get("/v1/files"), 401)
    assert service.client.get(f"/v1/files/{file_id}", headers=service.reader).status_code == 200


def test_upload_refusals(open_service: Callable[..., Service]) -> None:
    service = open_service(max_file_bytes=100_000, max_batch_lines=5)

    purpose = error_of(upload(service, b'{"a": 1}\n', purpose="assistants"), 400)
    assert purpose["param"] == "purpose" and "'batch'" in purpose["message"]
    lines = error_of(upload(service, b"{}\n" * 6), 400)
    assert (lines["param"], lines["code"]) == ("file", "too_many_lines")
    empty = error_of(upload(service, b""), 400)
    assert (empty["param"], empty["code"]) == ("file", "empty_file")

    # Past the file limit but within the multipart bound: the route refuses it.
    large = error_of(upload(service, b"x" * 150_000), 413)
    assert large["code"] == "file_too_large" and "100000" in large["message"]
    # Past the multipart bound: the middleware refuses it, by Content-Length or by count.
    huge = b"x" * (100_000 + files_routes.MULTIPART_OVERHEAD_BYTES + 1)
    declared = upload(service, huge)
    assert error_of(declared, 413)["code"] == "payload_too_large"
    assert declared.headers["x-request-id"]
    chunked = service.client.post(
        "/v1/files",
        headers={**service.writer, "Content-Type": "multipart/form-data; boundary=b"},
        content=iter([b"--b\r\n", huge]),
    )
    assert "content-length" not in chunked.request.headers
    assert error_of(chunked, 413) == {
        "message": f"request body is larger than {100_000 + (1 << 20)} bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": "payload_too_large",
    }
    assert service.client.get("/v1/files", headers=service.writer).json()["data"] == []

    # Other routes still read bodies whole, up to max_body_bytes.
    big_job = {"model": "m", "input": {"prompt": "x" * 1_100_000}}
    refused = service.client.post("/v1/jobs", headers=service.writer, json=big_job)
    assert error_of(refused, 413)["message"] == "request body is larger than 1000000 bytes"
