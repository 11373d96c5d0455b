"""ASGI middleware: request ids and a bound on request bodies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestLimits:
    """Gives each request an id (X-Request-ID) and answers 413 to bodies above their bound.

    Bodies are read whole, up to max_bytes, before the app sees them; POSTs to a path of
    stream_paths (uploads) pass through as they arrive instead, counted against that
    path's own bound.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, stream_paths: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.stream_paths = dict(stream_paths or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        stream_bound = self.stream_paths.get(scope["path"]) if scope["method"] == "POST" else None
        limit = self.max_bytes if stream_bound is None else stream_bound
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(send_with_id, limit)
            return
        if stream_bound is None:
            await self._buffered(scope, receive, send_with_id)
        else:
            await self._streamed(scope, receive, send_with_id, stream_bound)

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
        body = json.dumps(
            {
                "error": {
                    "message": f"request body is larger than {limit} bytes",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "payload_too_large",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
