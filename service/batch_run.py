"""`genserve batch run FILE.jsonl`: each line a job, each result a line of JSONL.

A line is a request, either genserve's own or OpenAI's batch format:

    {"id": "q1", "model": "smollm2-135m-instruct", "prompt": "…", "params": {"max_tokens": 64}}
    {"messages": [{"role": "user", "content": "…"}], "metadata": {"tags": ["eval"]}}
    {"custom_id": "q2", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "…", "messages": […], "max_tokens": 64}}

Every line is checked before anything is submitted. Then up to `concurrency` jobs are in
flight at once; one request a poll follows them all (GET /v1/jobs?id=…), and each that
ends is appended to the output as it ends:

    {"line": 3, "id": "q2", "job_id": "job_…", "status": "succeeded", "output": "…",
     "error": null, "generation_id": "gen_…", "finish_reason": "stop", "usage": {…}}

Resuming: run the same command again. Lines already in the output are not submitted;
the others are submitted with the same idempotency key as before, so a job submitted
before the interruption is followed, not run twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.api.schemas import JobCreate, JobPublic
from service.client import ApiError, Client
from service.db.tables import TERMINAL_STATUSES

# GET /v1/jobs names at most this many jobs at once (service/api/routes/jobs.py).
IDS_PER_POLL = 100
# Sampling params an OpenAI batch line's body may carry, as genserve names them.
OPENAI_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop")
# A native line's own keys, beside a job request's: its id, and the shorthand input.
LINE_KEYS = ("id", "custom_id", "prompt", "messages")
# Answers after which the same submission is tried again, after a wait.
RETRY_STATUSES = (429, 502, 503, 504)
RETRY_WAIT_S = 2.0


class BatchFileError(ValueError):
    """A line of the input cannot be a job; the message names the line."""


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, in the input file
    id: str | None  # the line's own id (id or custom_id), echoed in its result
    request: JobCreate


@dataclass
class Tally:
    """What a run has done so far; `done` counts lines finished in earlier runs too."""

    total: int
    done: int = 0
    failed: int = 0
    tokens: int = 0  # completion tokens of the lines finished by this run
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def read_lines(
    path: Path, *, model: str | None = None, params: dict[str, Any] | None = None
) -> list[Line]:
    """The file's requests, each checked as the API will check it.

    Args:
        model: For lines that name none.
        params: Defaults under each line's own params.

    Raises:
        BatchFileError: a line is not JSON, or not a request; the message names it.
    """
    lines = []
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                document = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise BatchFileError(
                    f"line {number}: not JSON: {exc.msg} at column {exc.colno}"
                ) from None
            if not isinstance(document, dict):
                raise BatchFileError(f"line {number}: a line must be a JSON object")
            lines.append(_line(number, document, model, params or {}))
    if not lines:
        raise BatchFileError(f"{path} has no requests")
    return lines


def _line(
    number: int, document: dict[str, Any], model: str | None, defaults: dict[str, Any]
) -> Line:
    line_id = document.get("id", document.get("custom_id"))
    if "body" in document:  # OpenAI's batch format
        body = document["body"]
        if not isinstance(body, dict):
            raise BatchFileError(f"line {number}: body must be an object")
        source: dict[str, Any] = {
            "model": body.get("model"),
            "input": {key: body[key] for key in ("messages", "prompt") if key in body},
            "params": {key: body[key] for key in OPENAI_PARAMS if key in body},
            "metadata": body.get("metadata") or {},
        }
    else:  # a job request, with a prompt or messages at the top as a shorthand
        source = {key: value for key, value in document.items() if key not in LINE_KEYS}
        shorthand = {key: document[key] for key in ("messages", "prompt") if key in document}
        source.setdefault("input", shorthand)
    source["model"] = source.get("model") or model
    if not source["model"]:
        raise BatchFileError(f"line {number}: no model: name one in the line or with --model")
    if not source["input"]:
        raise BatchFileError(f"line {number}: a line needs a prompt, messages or an input")
    params = source.get("params") or {}
    if isinstance(params, dict):  # else the check below names it
        source["params"] = {**defaults, **params}
    try:
        request = JobCreate.model_validate({**source, "queue": "batch"})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BatchFileError(f"line {number}: {where}: {first['msg']}") from None
    return Line(number, None if line_id is None else str(line_id), request)


def run_id(path: Path, lines: list[Line]) -> str:
    """Names a run by what it asks: the same file and options give the same id."""
    digest = hashlib.sha256(path.read_bytes())
    for line in lines:  # the options (--model, params) are in the parsed requests
        digest.update(line.request.model_dump_json().encode())
    return digest.hexdigest()[:20]


def finished_lines(output: Path) -> set[int]:
    """The line numbers whose result the output already holds; a torn last line (a run
    stopped while writing it) is cut off, so appending goes on from a whole line."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        output.write_bytes(data)
    found = set()
    for text in data.decode("utf-8", errors="replace").splitlines():
        try:
            found.add(int(json.loads(text)["line"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


class BatchRunner:
    """Runs the lines not yet in the output, `concurrency` jobs at a time.

    Args:
        client: The server, as the caller.
        lines: The checked requests (read_lines).
        output: The JSONL results file; appended to.
        concurrency: Jobs in flight at once.
        queue: "batch" leaves interactive requests first in line; "interactive" competes.
        run: The run's id (run_id): with a line's number, its idempotency key.
        poll_s: Seconds between two polls of the jobs in flight.
    """

    def __init__(
        self,
        client: Client,
        lines: list[Line],
        output: Path,
        *,
        concurrency: int = 32,
        queue: str = "batch",
        run: str,
        poll_s: float = 0.5,
    ) -> None:
        self._client = client
        self._output = output
        self._concurrency = concurrency
        self._queue = queue
        self._run = run
        self._poll_s = poll_s
        done = finished_lines(output)
        self._pending = deque(line for line in lines if line.number not in done)
        self.tally = Tally(total=len(lines), done=len(lines) - len(self._pending))
        self._in_flight: dict[str, Line] = {}
        self._refused: dict[int, str] = {}  # line number -> why the server refused it

    def run(self, on_progress: Callable[[Tally], None] = lambda _: None) -> Tally:
        """Until every line has a result. On an interruption (Ctrl-C) the results so far
        are in the output, and the jobs in flight go on in the server."""
        with self._output.open("a", encoding="utf-8") as results:
            on_progress(self.tally)
            while self._pending or self._in_flight:
                while self._pending and len(self._in_flight) < self._concurrency:
                    line = self._pending.popleft()
                    job = self._submit(line)
                    if job is None or job.status in TERMINAL_STATUSES:
                        self._finish(results, line, job)
                        on_progress(self.tally)
                    else:
                        self._in_flight[job.id] = line
                if self._in_flight:
                    time.sleep(self._poll_s)
                    for job in self._ended():
                        self._finish(results, self._in_flight.pop(job.id), job)
                        on_progress(self.tally)
        return self.tally

    def _submit(self, line: Line) -> JobPublic | None:
        """Submit a line's job (or find the one submitted before); None when the server
        refuses the line itself (a 4xx about its content), which is then its result."""
        request = line.request.model_copy(update={"queue": self._queue})
        while True:
            try:
                return self._client.submit_request(
                    request, idempotency_key=f"genserve-batch:{self._run}:{line.number}"
                )
            except ApiError as exc:
                if exc.status in RETRY_STATUSES:
                    time.sleep(RETRY_WAIT_S)
                    continue
                if exc.status in (401, 403) or exc.status >= 500:
                    raise  # about the caller or the server, not the line: stop the run
                self._refused[line.number] = exc.message
                return None

    def _ended(self) -> Iterator[JobPublic]:
        ids = list(self._in_flight)
        for start in range(0, len(ids), IDS_PER_POLL):
            page = self._client.jobs(ids=ids[start : start + IDS_PER_POLL])
            yield from (job for job in page.data if job.status in TERMINAL_STATUSES)

    def _finish(self, results: Any, line: Line, job: JobPublic | None) -> None:
        record: dict[str, Any] = {
            "line": line.number,
            "id": line.id,
            "job_id": None if job is None else job.id,
            "status": "failed" if job is None else job.status,
            "output": None,
            "error": self._refused.pop(line.number, None) if job is None else job.error,
            "generation_id": None if job is None else job.generation_id,
            "finish_reason": None,
            "usage": None,
        }
        if job is not None and job.status == "succeeded" and job.generation_id:
            generation = self._client.generation(job.generation_id)
            record["output"] = generation.output
            record["finish_reason"] = generation.finish_reason
            record["usage"] = generation.usage.model_dump()
            self.tally.tokens += generation.usage.completion_tokens
        else:
            self.tally.failed += 1
        results.write(json.dumps(record, ensure_ascii=False) + "\n")
        results.flush()
        self.tally.done += 1
