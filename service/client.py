"""A small typed client of genserve's native API, over HTTP to any server.

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key) as client:
        job = client.submit("smollm2-135m-instruct", prompt="Write a haiku about the sea.")
        for text in client.stream(job.id):
            print(text, end="", flush=True)
        generation = client.generation(client.wait(job.id).generation_id)

The base URL and the key default to GENSERVE_URL and GENSERVE_API_KEY. Answers are the
API's own models (service/api/schemas.py, the OpenAI-compatible files and batches); an
answer of 4xx or 5xx raises ApiError with the error body's message, param and code.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel

from service.api.schemas import (
    CollectionCreate,
    CollectionPublic,
    ExportCreate,
    ExportPublic,
    GenerationPublic,
    IngestionPublic,
    JobCreate,
    JobPublic,
    Page,
    SearchRequest,
    SearchResponse,
    TrainingEventList,
    TrainingJobCreate,
    TrainingJobPublic,
    UsageReport,
)
from service.db.tables import TERMINAL_STATUSES
from service.openai_compat.files_protocol import FileObject
from service.openai_compat.protocol import BatchObject, ModelList

DEFAULT_URL = "http://127.0.0.1:8000"
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An answer of 4xx or 5xx, or a stream that ended in an error event."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _tokens(lines: Iterator[str]) -> Iterator[str]:
    """The text pieces of a job's event stream (Server-Sent Events), until its `end`."""
    event = "message"
    for line in lines:
        if line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data = json.loads(line.removeprefix("data:"))
            if event == "token":
                yield data["text"]
            elif event == "end":
                return
            elif event == "error":  # the job restarted: its result will be in wait()
                raise ApiError(0, data["message"], param=data.get("param"), code=data.get("code"))


class Client:
    """The native API of one server, as one key's caller. Close it, or use it in `with`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        key = api_key or os.environ.get("GENSERVE_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=(base_url or os.environ.get("GENSERVE_URL") or DEFAULT_URL).rstrip("/"),
            headers=headers,
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        params: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        queue: Literal["interactive", "batch"] = "interactive",
        parent_generation_id: str | None = None,
        conversation_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobPublic:
        """Submit a generation job (a prompt, or chat messages); it is stored, then queued.
        An idempotency key makes a retry return the first job rather than a second."""
        turn: dict[str, Any] = {"prompt": prompt} if messages is None else {"messages": messages}
        body = JobCreate.model_validate(
            {
                "model": model,
                "input": turn,
                "params": params or {},
                "metadata": metadata or {},
                "queue": queue,
                "parent_generation_id": parent_generation_id,
                "conversation_id": conversation_id,
            }
        )
        return self.submit_request(body, idempotency_key=idempotency_key)

    def submit_request(
        self, request: JobCreate, *, idempotency_key: str | None = None
    ) -> JobPublic:
        """Submit a job request built whole (any input: prompt, messages, images, rows)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._send(JobPublic, "POST", "/v1/jobs", json=_body(request), headers=headers)

    def job(self, job_id: str) -> JobPublic:
        return self._send(JobPublic, "GET", f"/v1/jobs/{job_id}")

    def jobs(self, *, ids: Sequence[str] = (), **filters: Any) -> Page[JobPublic]:
        """A page of the caller's jobs, newest first (status, model, tag, cursor, limit...);
        with ids (at most 100), only those: one request follows many jobs."""
        params = _query(filters)
        if ids:
            params["id"] = list(ids)
            params.setdefault("limit", len(ids))
        return self._send(Page[JobPublic], "GET", "/v1/jobs", params=params)

    def wait(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.25) -> JobPublic:
        """The job once it has ended (succeeded, failed or cancelled).

        Raises:
            TimeoutError: it had not ended after timeout_s.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job.status in TERMINAL_STATUSES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    def stream(self, job_id: str) -> Iterator[str]:
        """The job's text, piece by piece as the worker makes it, until it ends."""
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            yield from _tokens(response.iter_lines())

    def cancel(self, job_id: str) -> JobPublic:
        return self._send(JobPublic, "POST", f"/v1/jobs/{job_id}/cancel")

    # --- the history ----------------------------------------------------------------------

    def generation(self, generation_id: str) -> GenerationPublic:
        return self._send(GenerationPublic, "GET", f"/v1/generations/{generation_id}")

    def generations(self, **filters: Any) -> Page[GenerationPublic]:
        """A page of stored generations, newest first, filtered as GET /v1/generations is."""
        return self._send(Page[GenerationPublic], "GET", "/v1/generations", params=_query(filters))

    def search(self, query: str, **options: Any) -> SearchResponse:
        """Past generations by meaning, by words, or both (k, mode, target, filters...)."""
        body = SearchRequest.model_validate({"query": query, **options})
        return self._send(SearchResponse, "POST", "/v1/search", json=_body(body))

    def export(self, **request: Any) -> ExportPublic:
        """Start an export of the history as JSONL (format, filters, dedup, limit...)."""
        body = ExportCreate.model_validate(request)
        return self._send(ExportPublic, "POST", "/v1/exports", json=_body(body))

    def export_status(self, export_id: str) -> ExportPublic:
        return self._send(ExportPublic, "GET", f"/v1/exports/{export_id}")

    def usage(self, **query: Any) -> UsageReport:
        """Requests, tokens, latency and cache hits per day (start, end, group_by, model)."""
        return self._send(UsageReport, "GET", "/v1/usage", params=_query(query))

    # --- models and training --------------------------------------------------------------

    def models(self) -> ModelList:
        """The models this server serves, and the versions trained here."""
        return self._send(ModelList, "GET", "/v1/models")

    def train(
        self,
        name: str,
        arch: str,
        dataset_file_id: str,
        *,
        config: dict[str, Any] | None = None,
        seed: int = 0,
        parent_version: int | None = None,
    ) -> TrainingJobPublic:
        """Train a model of a family on an uploaded dataset (purpose fine-tune)."""
        body = TrainingJobCreate.model_validate(
            {
                "name": name,
                "arch": arch,
                "dataset_file_id": dataset_file_id,
                "config": config or {},
                "seed": seed,
                "parent_version": parent_version,
            }
        )
        return self._send(TrainingJobPublic, "POST", "/v1/training-jobs", json=_body(body))

    def training_job(self, job_id: str) -> TrainingJobPublic:
        return self._send(TrainingJobPublic, "GET", f"/v1/training-jobs/{job_id}")

    def training_progress(self, job_id: str, *, after: int = 0) -> TrainingEventList:
        """The job's reports after event id `after`, oldest first (its loss curve)."""
        return self._send(
            TrainingEventList,
            "GET",
            f"/v1/training-jobs/{job_id}/progress",
            params={"after": after},
        )

    # --- collections (documents for grounded answers) ------------------------------------

    def collection(self, collection: str) -> CollectionPublic:
        """A collection by id or name."""
        return self._send(CollectionPublic, "GET", f"/v1/collections/{collection}")

    def create_collection(self, name: str, **options: Any) -> CollectionPublic:
        body = CollectionCreate.model_validate({"name": name, **options})
        return self._send(CollectionPublic, "POST", "/v1/collections", json=_body(body))

    def add_documents(
        self, collection_id: int, files: Sequence[tuple[str, IO[bytes] | bytes]]
    ) -> IngestionPublic:
        """Upload (name, content or open file) pairs into a collection; its ingestion
        extracts, chunks, embeds and indexes them (follow it with `ingestion`)."""
        return self._send(
            IngestionPublic,
            "POST",
            f"/v1/collections/{collection_id}/documents",
            files=[("file", (name, content)) for name, content in files],
        )

    def ingestion(self, collection_id: int, ingestion_id: str) -> IngestionPublic:
        return self._send(
            IngestionPublic, "GET", f"/v1/collections/{collection_id}/ingestions/{ingestion_id}"
        )

    # --- files and batches ----------------------------------------------------------------

    def upload(
        self, file: Path | bytes, *, purpose: str = "batch", filename: str | None = None
    ) -> FileObject:
        """Upload a file (a path, or bytes with a filename) to the Files API."""
        if isinstance(file, Path):
            content, name = file.read_bytes(), filename or file.name
        else:
            content, name = file, filename or "upload.jsonl"
        return self._send(
            FileObject,
            "POST",
            "/v1/files",
            data={"purpose": purpose},
            files={"file": (name, content)},
        )

    def file_content(self, file_id: str) -> bytes:
        response = self._http.get(f"/v1/files/{file_id}/content")
        if response.status_code >= 400:
            raise _error(response)
        return response.content

    def batch(
        self,
        input_file_id: str,
        *,
        endpoint: str = "/v1/chat/completions",
        metadata: dict[str, str] | None = None,
    ) -> BatchObject:
        """Run an uploaded JSONL file of requests as a batch (OpenAI's batch format)."""
        body = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        }
        return self._send(BatchObject, "POST", "/v1/batches", json=body)

    def batch_status(self, batch_id: str) -> BatchObject:
        return self._send(BatchObject, "GET", f"/v1/batches/{batch_id}")

    # --- the wire -------------------------------------------------------------------------

    def _send(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return model.model_validate(response.json())


def _body(request: BaseModel) -> dict[str, Any]:
    """A request as JSON, checked by the API's own schema, without the fields left unset."""
    return request.model_dump(mode="json", exclude_unset=True)


def _query(filters: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in filters.items() if value is not None}


def _error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(
            response.status_code, error["message"], param=error.get("param"), code=error.get("code")
        )
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, response.text[:500] or response.reason_phrase)
