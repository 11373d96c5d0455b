"""The Batch API's life cycle: a file of requests becomes low-priority jobs, then two files.

    validating ──prepare──▶ in_progress ──last job ends──▶ finalizing ──▶ completed
         │                      │ cancel / past expires_at                ├─▶ cancelled
         └──▶ failed            └──▶ cancelling (or expired_at set) ──────┴─▶ expired

- prepare (a worker task) reads the input file line by line, never whole. Each line
  becomes one job: a valid one queued on the batch queue, a bad one stored failed with
  its error, so it lands in the error file and never stops the batch. It commits every
  PREPARE_CHUNK lines and resumes after the last committed line if its worker is lost.
- The worker that ends a batch's last job, or the API on cancel, or the sweeper as a
  backstop, moves the batch to finalizing (a conditional UPDATE: once) and sends
  finalize, which writes the output and error files in one transaction.
- request_counts are read from the jobs, so they are always current.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import storable
from service.api.errors import GenserveError, describe_validation_errors
from service.db import crud
from service.db.tables import Batch, Job, new_id, utcnow
from service.files import FileWriter, get_file, iter_lines
from service.openai_compat.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from service.openai_compat.responses import failure_error, response_body
from service.queue import FINALIZE_BATCH_TASK, PREPARE_BATCH_TASK, JobPublisher
from service.submit import JobRequest, served_model, store_job

logger = logging.getLogger("genserve.batches")

BATCH_QUEUE = "batch"
COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
PREPARE_CHUNK = 500
FINALIZE_PAGE = 500
PENDING = ("queued", "running")
# Each endpoint a batch may call: the schema of a line's body, the task its model must
# serve, and the API its jobs answer in.
ENDPOINTS: dict[str, tuple[type[BaseModel], str, str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "chat", "chat.completions"),
    "/v1/completions": (CompletionRequest, "chat", "completions"),
    "/v1/embeddings": (EmbeddingRequest, "embedding", "embeddings"),
}


@dataclass(frozen=True)
class Models:
    """What this deployment serves, to check each line's model."""

    chat: tuple[str, ...]
    embedding: str


@dataclass(frozen=True)
class RequestCounts:
    total: int
    completed: int
    failed: int


# --- reading and creating ----------------------------------------------------------------


def get_batch(session: Session, *, tenant_id: int, batch_id: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))


def list_batches(
    session: Session, *, tenant_id: int, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """The tenant's batches, newest first, after the id `after`."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    return crud.page_by_id(session, query, Batch, after=after, limit=limit)


def request_counts(session: Session, *, batch: Batch) -> RequestCounts:
    by_status = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status)
        ).all()
    )
    failed = by_status.get("failed", 0) + by_status.get("cancelled", 0)
    return RequestCounts(
        total=max(batch.total, sum(by_status.values())),
        completed=by_status.get("succeeded", 0),
        failed=failed,
    )


def create_batch(
    session: Session,
    *,
    tenant_id: int,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    metadata: dict[str, Any],
) -> Batch:
    batch = Batch(
        id=new_id("batch"),
        tenant_id=tenant_id,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status="validating",
        meta=metadata,
        total=0,
        expires_at=utcnow() + COMPLETION_WINDOWS[completion_window],
    )
    session.add(batch)
    session.flush()
    return batch


# --- state changes -------------------------------------------------------------------------


def _claim(session: Session, batch_id: str, status: str, lease_s: float) -> Batch | None:
    """Hold a batch in `status` for one worker until the lease ends (a conditional UPDATE)."""
    now = utcnow()
    claimed = session.execute(
        update(Batch)
        .where(
            Batch.id == batch_id,
            Batch.status == status,
            or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < now),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.get(Batch, batch_id, populate_existing=True)


def _has_pending(session: Session, batch_id: str) -> bool:
    return bool(
        session.scalar(select(exists().where(Job.batch_id == batch_id, Job.status.in_(PENDING))))
    )


def start_finalizing(session: Session, publisher: JobPublisher, *, batch_id: str) -> bool:
    """Move a batch with no pending line to finalizing, once, and send finalize."""
    if _has_pending(session, batch_id):
        return False
    moved = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(("in_progress", "cancelling")))
        .values(status="finalizing", finalizing_at=utcnow(), lease_expires_at=None)
    )
    session.commit()
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        return False
    publisher.send(FINALIZE_BATCH_TASK, batch_id, queue=BATCH_QUEUE)
    return True


def cancel_batch(session: Session, publisher: JobPublisher, *, batch: Batch) -> None:
    """Stop a batch: queued lines are cancelled, running ones stop at their next token."""
    if batch.status not in ("validating", "in_progress"):
        return
    now = utcnow()
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status.in_(("validating", "in_progress")))
        .values(status="cancelling", cancelling_at=now)
    )
    _stop_lines(session, batch.id)
    session.commit()
    # A batch still validating is finalized by prepare, which sees it is cancelling.
    if batch.status != "validating":
        start_finalizing(session, publisher, batch_id=batch.id)
    session.refresh(batch)


def _stop_lines(session: Session, batch_id: str) -> None:
    crud.end_jobs(
        session,
        Job.batch_id == batch_id,
        Job.status == "queued",
        status="cancelled",
        cancel_requested=True,
    )
    session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == "running")
        .values(cancel_requested=True)
    )


def expire_batches(session: Session, publisher: JobPublisher, *, now: datetime) -> int:
    """Batches past their completion window stop; what finished goes to the output file."""
    due = list(
        session.scalars(
            select(Batch.id)
            .where(
                Batch.status == "in_progress", Batch.expires_at < now, Batch.expired_at.is_(None)
            )
            .limit(100)
        )
    )
    for batch_id in due:
        session.execute(update(Batch).where(Batch.id == batch_id).values(expired_at=now))
        _stop_lines(session, batch_id)
        session.commit()
        start_finalizing(session, publisher, batch_id=batch_id)
    return len(due)


def sweep_batches(
    session: Session, publisher: JobPublisher, *, now: datetime, grace_s: float
) -> int:
    """Re-send prepare or finalize for batches whose worker is gone, and expire late ones."""
    stale = or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < now)
    old = now - timedelta(seconds=grace_s)
    stuck = session.execute(
        select(Batch.id, Batch.status)
        .where(
            stale,
            or_(
                and_(Batch.status == "validating", Batch.created_at < old),
                and_(Batch.status == "finalizing", Batch.finalizing_at < old),
                Batch.status.in_(("in_progress", "cancelling")),
            ),
        )
        .limit(100)
    ).all()
    sent = 0
    for batch_id, status in stuck:
        if status == "validating":
            sent += publisher.send(PREPARE_BATCH_TASK, batch_id, queue=BATCH_QUEUE)
        elif status == "finalizing":
            sent += publisher.send(FINALIZE_BATCH_TASK, batch_id, queue=BATCH_QUEUE)
        else:
            sent += start_finalizing(session, publisher, batch_id=batch_id)
    return sent + expire_batches(session, publisher, now=now)


# --- prepare: lines become jobs ---------------------------------------------------------


def _line_error(message: str, *, code: str, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": "invalid_request_error", "param": param, "code": code}


def parse_line(
    raw: bytes, *, endpoint: str, models: Models, seen: set[str]
) -> tuple[str | None, JobRequest | dict[str, Any]]:
    """(custom_id, the job it asks for or an OpenAI error object) of one input line."""
    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, _line_error(f"the line is not JSON: {exc}", code="invalid_json")
    if not isinstance(line, dict):
        return None, _line_error("the line must be a JSON object", code="invalid_request")
    unstorable = storable.find_unstorable(line)
    if unstorable is not None:
        param, reason = unstorable
        custom_id = line.get("custom_id")
        known = custom_id if isinstance(custom_id, str) and param != "custom_id" else None
        return known, _line_error(f"{param} {reason}", code="invalid_text", param=param)
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 512:
        return None, _line_error(
            "custom_id must be a string of 1 to 512 characters",
            code="invalid_request",
            param="custom_id",
        )
    if custom_id in seen:
        return custom_id, _line_error(
            f"custom_id {custom_id!r} is used twice in this batch",
            code="duplicate_custom_id",
            param="custom_id",
        )
    seen.add(custom_id)
    if line.get("method") != "POST" or line.get("url") != endpoint:
        message = f"each line must be method POST to url {endpoint} (the batch's endpoint)"
        return custom_id, _line_error(message, code="invalid_url", param="url")
    return custom_id, _parse_body(line.get("body"), endpoint=endpoint, models=models)


def _parse_body(body: Any, *, endpoint: str, models: Models) -> JobRequest | dict[str, Any]:
    schema, task, _api = ENDPOINTS[endpoint]
    try:
        request = schema.model_validate(body)
    except ValidationError as exc:
        message, param = describe_validation_errors(list(exc.errors()))
        return _line_error(message, code="invalid_value", param=param and f"body.{param}")
    if getattr(request, "stream", False):
        return _line_error(
            "batch requests cannot stream", code="invalid_value", param="body.stream"
        )
    served = models.chat if task == "chat" else (models.embedding,)
    try:
        spec = served_model(request.model, served, task=task)  # type: ignore[attr-defined]
        return request.to_job(spec, queue=BATCH_QUEUE)  # type: ignore[attr-defined]
    except GenserveError as exc:
        return _line_error(exc.message, code=exc.code or "invalid_value", param=exc.param)


def _nonblank_lines(session: Session, file_id: str) -> Iterator[bytes]:
    for raw in iter_lines(session, file_id):
        if raw.strip():
            yield raw


def _store_line(
    session: Session, batch: Batch, custom_id: str | None, parsed: JobRequest | dict[str, Any]
) -> Job:
    if isinstance(parsed, JobRequest):
        return store_job(
            session,
            tenant_id=batch.tenant_id,
            request=parsed,
            batch_id=batch.id,
            custom_id=custom_id,
        )
    return crud.create_failed_job(
        session,
        tenant_id=batch.tenant_id,
        api=ENDPOINTS[batch.endpoint][2],
        batch_id=batch.id,
        custom_id=custom_id,
        error=parsed,
    )


def _fail(session: Session, batch: Batch, code: str, message: str) -> str:
    batch.status, batch.failed_at, batch.lease_expires_at = "failed", utcnow(), None
    batch.errors = [{"code": code, "message": message, "param": "input_file_id", "line": None}]
    session.commit()
    return "failed"


def prepare_batch(
    factory: sessionmaker[Session],
    publisher: JobPublisher,
    batch_id: str,
    *,
    models: Models,
    lease_s: float,
) -> str:
    """Turn the batch's input file into jobs; resumes after the lines already stored."""
    with factory() as session, factory() as reader:
        batch = _claim(session, batch_id, "validating", lease_s)
        if batch is None:
            return "skipped"
        if get_file(reader, tenant_id=batch.tenant_id, file_id=batch.input_file_id) is None:
            return _fail(session, batch, "file_not_found", f"file {batch.input_file_id} is gone")
        done = crud.batch_custom_ids(session, batch_id=batch.id)
        seen = {custom_id for custom_id in done if custom_id}
        unpublished: list[Job] = []
        for index, raw in enumerate(_nonblank_lines(reader, batch.input_file_id)):
            if index < len(done):
                continue
            custom_id, parsed = parse_line(raw, endpoint=batch.endpoint, models=models, seen=seen)
            job = _store_line(session, batch, custom_id, parsed)
            if job.status == "queued":
                unpublished.append(job)
            if (index + 1) % PREPARE_CHUNK == 0:
                _commit_and_publish(session, publisher, batch, unpublished, lease_s)
        _commit_and_publish(session, publisher, batch, unpublished, lease_s)
        return _begin(session, publisher, batch)


def _commit_and_publish(
    session: Session, publisher: JobPublisher, batch: Batch, jobs: list[Job], lease_s: float
) -> None:
    batch.lease_expires_at = utcnow() + timedelta(seconds=lease_s)
    session.commit()
    for job in jobs:
        if publisher.publish(job.id, job.queue):
            crud.mark_published(session, job_id=job.id)
    session.commit()
    jobs.clear()


def _begin(session: Session, publisher: JobPublisher, batch: Batch) -> str:
    total = crud.count_batch_jobs(session, batch_id=batch.id)
    moved = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == "validating")
        .values(status="in_progress", in_progress_at=utcnow(), total=total, lease_expires_at=None)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        # Cancelled while validating: what was queued is stopped, then finalized.
        session.execute(
            update(Batch).where(Batch.id == batch.id).values(total=total, lease_expires_at=None)
        )
        _stop_lines(session, batch.id)
    session.commit()
    start_finalizing(session, publisher, batch_id=batch.id)
    return "prepared"


# --- finalize: two files -----------------------------------------------------------------


def output_line(job: Job) -> tuple[bool, dict[str, Any]]:
    """(succeeded, the output or error file's line) of one batch job."""
    line: dict[str, Any] = {
        "id": f"batch_req_{job.id.removeprefix('job_')}",
        "custom_id": job.custom_id,
    }
    if job.status == "succeeded":
        body = response_body(job)
        line["response"] = {"status_code": 200, "request_id": job.id, "body": body}
        line["error"] = None
        return True, line
    status, error = failure_error(job)
    if job.attempts == 0 and job.result:  # refused before it ran: the line itself is bad
        line["response"] = None
        line["error"] = {"code": error.get("code"), "message": error["message"]}
    else:
        line["response"] = {"status_code": status, "request_id": job.id, "body": {"error": error}}
        line["error"] = None
    return False, line


def _final_status(batch: Batch) -> dict[str, Any]:
    now = utcnow()
    if batch.cancelling_at is not None:
        return {"status": "cancelled", "cancelled_at": now}
    if batch.expired_at is not None:
        return {"status": "expired"}
    return {"status": "completed", "completed_at": now}


def finalize_batch(factory: sessionmaker[Session], batch_id: str, *, lease_s: float) -> str:
    """Write the output and error files and end the batch, in one transaction."""
    with factory() as session:
        batch = _claim(session, batch_id, "finalizing", lease_s)
        if batch is None:
            return "skipped"
        writers = {
            ok: FileWriter(
                session=session,
                tenant_id=batch.tenant_id,
                purpose="batch_output",
                filename=f"{batch.id}_{'output' if ok else 'error'}.jsonl",
                max_bytes=None,
                max_lines=None,
            )
            for ok in (True, False)
        }
        for job in crud.iter_batch_jobs(session, batch_id=batch.id, page=FINALIZE_PAGE):
            ok, line = output_line(job)
            writers[ok].write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        output, errors = writers[True].close(), writers[False].close()
        for file in (output, errors):
            if file.lines == 0:
                session.delete(file)
        batch.output_file_id = output.id if output.lines else None
        batch.error_file_id = errors.id if errors.lines else None
        batch.lease_expires_at = None
        for name, value in _final_status(batch).items():
            setattr(batch, name, value)
        session.commit()
        logger.info(
            "batch %s %s: %d ok, %d failed", batch.id, batch.status, output.lines, errors.lines
        )
        return batch.status
