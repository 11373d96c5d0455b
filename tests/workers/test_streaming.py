"""A job's stream carries the text as it will be stored."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.events import make_sink, make_source
from workers.streaming import TokenPublisher, storable


def test_the_stream_carries_storable_text(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.sqlite'}"
    sink = make_sink(url)
    tokens = TokenPublisher(sink, "job_1", attempt=1)
    tokens.start()
    for piece in ("a", "\x00", "b"):
        tokens(piece)
    tokens.end("succeeded")
    sink.close()

    async def read() -> list:
        source = make_source(url)
        try:
            return await source.read("job_1", after=None, timeout_s=1)
        finally:
            await source.close()

    events = asyncio.run(read())
    assert [e.type for e in events][0] == "start" and events[-1].type == "end"
    streamed = "".join(e.data["text"] for e in events if e.type == "token")
    # What the worker stores for a model output of "a\x00b": the stream must be its prefix.
    assert streamed == storable("a\x00b") == "a\ufffdb"
