"""Publishing a job's tokens while it runs (service/events.py is the channel)."""

from __future__ import annotations

import logging
import time
from typing import Any

from service.events import CHANNEL_ERRORS, EventSink

logger = logging.getLogger("genserve.worker")

# Tokens made within this long of the last publish wait for the next one: on a GPU that
# turns hundreds of publishes a second into fifty, on a CPU nearly every token goes alone.
FLUSH_EVERY_S = 0.02


def storable(text: str) -> str:
    """Text as it is stored: a model may emit U+0000, which PostgreSQL text cannot hold.

    The stream carries the same text, so a reader's streamed text is a prefix of the
    stored output.
    """
    return text.replace("\x00", "\ufffd")


class TokenPublisher:
    """One job attempt's stream: start, coalesced token deltas, end.

    A publish that fails is logged and dropped, never raised: the stream is a courtesy
    and the result in SQL is what counts (readers fall back to it).
    """

    def __init__(self, sink: EventSink | None, job_id: str, attempt: int) -> None:
        self._sink = sink
        self._job_id = job_id
        self._attempt = attempt
        self._pending: list[str] = []
        self._last_flush = 0.0
        self._broken = False

    def start(self) -> None:
        self._publish("start", {})

    def __call__(self, text: str) -> None:
        """The decoding loop's on_token callback."""
        self._pending.append(text)
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_EVERY_S:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._pending:
            self._publish("token", {"text": storable("".join(self._pending))})
            self._pending.clear()
        self._last_flush = time.monotonic() if now is None else now

    def end(self, status: str) -> None:
        """After the job's final status is committed."""
        self.flush()
        self._publish("end", {"status": status})

    def _publish(self, type: str, data: dict[str, Any]) -> None:
        if self._sink is None or self._broken:
            return
        try:
            self._sink.publish(self._job_id, type, {"attempt": self._attempt, **data})
        except CHANNEL_ERRORS as exc:
            self._broken = True
            logger.warning(
                "job %s: token stream unavailable, readers use SQL: %s", self._job_id, exc
            )
