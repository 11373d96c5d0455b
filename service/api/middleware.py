"""ASGI middleware: request ids, metrics and access logs; a bound on request bodies, and
storable text."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics, storable

logger = logging.getLogger("genserve.api")
access_logger = logging.getLogger("genserve.access")


class RequestContext:
    """Gives each request an id (X-Request-ID, and every record logged while it runs),
    times it by route for /metrics, and logs one access line when it ends.

    The line has the method, the path without its query, the route, the status and the
    duration; no header and no query string, so no key or secret is ever logged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # what the client gets if the app fails before answering
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        with logs.ids(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                route = metrics.route_label(scope)
                metrics.REQUEST_DURATION.labels(scope["method"], route, str(status)).observe(
                    elapsed
                )
                access_logger.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    scope["path"],
                    status,
                    elapsed * 1000,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )


class RequestLimits:
    """Refuses what no route could take: bodies over a bound, text SQL cannot store.

    Bodies are read whole, up to max_bytes, before the app sees them, and 413 answers
    those above it; POSTs to a path of stream_paths (uploads) pass through as they
    arrive instead, counted against that path's own bound. A path, query parameter or
    JSON body with text SQL cannot store (a NUL character, an unpaired surrogate) gets
    400 naming where it is, so no route fails on it later.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        stream_paths: Mapping[re.Pattern[str], int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.stream_paths = dict(stream_paths or {})

    def _stream_bound(self, scope: Scope) -> int | None:
        """The bound of an upload path this POST goes to; None for every other request."""
        if scope["method"] != "POST":
            return None
        for pattern, bound in self.stream_paths.items():
            if pattern.fullmatch(scope["path"]):
                return bound
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope["state"]["request_id"]  # RequestContext, outside this
        unstorable = _unstorable_url(scope)
        if unstorable is not None:
            await _refuse_text(send, *unstorable)
            return
        stream_bound = self._stream_bound(scope)
        limit = self.max_bytes if stream_bound is None else stream_bound
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(send, limit)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if stream_bound is None:
                await self._buffered(scope, receive, send_tracked)
            else:
                await self._streamed(scope, receive, send_tracked, stream_bound)
        except Exception:
            # Answered here, not by Starlette's outermost handler: that one re-raises after
            # answering, and the server then drops the client's keep-alive connection.
            logger.exception(
                "unhandled error on %s %s (request %s)", scope["method"], scope["path"], request_id
            )
            if started:
                raise  # a streamed answer already begun cannot become an error
            await _error(
                send,
                500,
                f"internal error (request {request_id})",
                code="internal_error",
                type_="server_error",
            )

    async def _buffered(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read the body (bounded) before the app sees it, so a chunked upload without a
        # Content-Length cannot grow past the limit either.
        chunks: list[bytes] = []
        size = 0
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send, self.max_bytes)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        unstorable = _unstorable_body(body)
        if unstorable is not None:
            await _refuse_text(send, *unstorable)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed and scope["method"] in ("POST", "PUT", "PATCH"):
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        size = 0
        over = answered = started = False

        async def counted() -> Message:
            nonlocal size, over, answered
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    over = True
                    if not started:
                        await self._too_large(send, limit)
                        answered = True
                    # The app stops reading as if the client had left; what it answers
                    # to that is dropped below, since the 413 has gone out.
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_answered(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted, send_unless_answered)

    async def _too_large(self, send: Send, limit: int) -> None:
        await _error(
            send, 413, f"request body is larger than {limit} bytes", code="payload_too_large"
        )


def _unstorable_url(scope: Scope) -> tuple[str, str] | None:
    reason = storable.problem(scope["path"])
    if reason is not None:
        return "path", reason
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        reason = storable.problem(name) or storable.problem(value)
        if reason is not None:
            return name.encode("unicode_escape").decode("ascii"), reason
    return None


def _unstorable_body(body: bytes) -> tuple[str, str] | None:
    # Only an escape can put either into valid JSON (raw control characters and invalid
    # UTF-8 are not JSON at all), so most bodies are passed by one scan of their bytes.
    if storable.SUSPECT_ESCAPE.search(body) is None:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None  # not JSON: the route answers that
    return storable.find_unstorable(document)


async def _refuse_text(send: Send, param: str, reason: str) -> None:
    await _error(send, 400, f"{param or 'body'} {reason}", code="invalid_text", param=param)


async def _error(
    send: Send,
    status: int,
    message: str,
    *,
    code: str,
    param: str | None = None,
    type_: str = "invalid_request_error",
) -> None:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": type_,
                "param": param or None,
                "code": code,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
