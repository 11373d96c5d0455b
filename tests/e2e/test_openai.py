"""The official openai client against a running genserve (real API, broker, worker, models)."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.conftest import Live
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

CHAT = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
EMBEDDER = "all-minilm-l6-v2"
LONG_PROMPT = "Count from 1 to 300, separated by commas."


def client_for(live: Live, key: str) -> openai.OpenAI:
    # No retries: a test sees each answer as the server gave it.
    return openai.OpenAI(base_url=f"{live.service.base_url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def oai(live: Live) -> Iterator[openai.OpenAI]:
    with client_for(live, live.writer) as client:
        yield client


def job_of(completion_id: str) -> str:
    return "job_" + completion_id.split("-", 1)[1]


def test_models_are_listed(oai: openai.OpenAI) -> None:
    names = {model.id for model in oai.models.list()}
    assert {CHAT, TINY, EMBEDDER} <= names
    assert oai.models.retrieve(CHAT).id == CHAT


def test_chat_completion_is_a_searchable_generation(live: Live, oai: openai.OpenAI) -> None:
    marker = f"zebra{uuid.uuid4().hex[:8]}"
    completion = oai.chat.completions.create(
        model=CHAT,
        messages=[
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": f"What colour is a {marker}?"},
        ],
        max_tokens=12,
        temperature=0,
    )
    assert completion.object == "chat.completion"
    assert completion.model == CHAT
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    with live.service.client(live.reader) as native:
        job = native.get(f"/v1/jobs/{job_of(completion.id)}").json()
        generation = native.get(f"/v1/generations/{job['generation_id']}").json()
        assert generation["output"] == choice.message.content
        hits = native.post("/v1/search", json={"query": marker, "mode": "keyword"}).json()["data"]
    assert [hit["generation"]["id"] for hit in hits] == [job["generation_id"]]


def test_streamed_chat_arrives_while_the_worker_generates(live: Live, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = []
    status_at_first_token = None
    with live.service.client(live.reader) as native:
        for chunk in stream:
            chunks.append(chunk)
            if status_at_first_token is None and chunk.choices and chunk.choices[0].delta.content:
                job = native.get(f"/v1/jobs/{job_of(chunk.id)}").json()
                status_at_first_token = job["status"]
    # The first token was relayed while the job was still generating, not after it ended.
    assert status_at_first_token == "running"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 48 or finals[0].choices[0].finish_reason == "stop"
    with live.service.client(live.reader) as native:
        job = wait_for_job(native, job_of(chunks[0].id))
        generation = native.get(f"/v1/generations/{job['generation_id']}").json()
    assert generation["output"] == text
    assert generation["usage"]["completion_tokens"] == usage.completion_tokens


def test_sse_framing_ends_with_done(live: Live) -> None:
    body = {
        "model": TINY,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        # Greedy: the tiny model's sampled text may end early; its greedy text does not.
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        live.service.client(live.writer) as native,
        native.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    usage = json.loads(frames[-2].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    finish = json.loads(frames[-3].removeprefix("data: "))
    assert finish["choices"][0]["finish_reason"] == "length"


def test_closing_a_stream_cancels_its_generation(live: Live, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=1500,
        temperature=0,
        stream=True,
    )
    completion_id = None
    for count, chunk in enumerate(stream):
        completion_id = chunk.id
        if count == 3:
            break
    stream.close()
    assert completion_id is not None
    with live.service.client(live.reader) as native:
        job = wait_for_job(native, job_of(completion_id), timeout=60)
    # A generation of 1500 tokens takes minutes here; the job ended because the client left.
    assert job["status"] == "cancelled"
    assert job["generation_id"] is None


def test_text_completion(oai: openai.OpenAI) -> None:
    # Greedy, so the text runs to max_tokens (OpenAI's default temperature 1 samples, and
    # the tiny model may sample its end-of-text token early).
    completion = oai.completions.create(
        model=TINY, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    streamed = list(
        oai.completions.create(model=TINY, prompt="Once", max_tokens=3, temperature=0, stream=True)
    )
    assert all(chunk.object == "text_completion" for chunk in streamed)
    assert streamed[-1].choices[0].finish_reason == "length"


def test_embeddings(oai: openai.OpenAI) -> None:
    sentence = "The quick brown fox jumps over the lazy dog."
    result = oai.embeddings.create(model=EMBEDDER, input=[sentence, sentence, "Stock prices fell."])
    vectors = np.array([item.embedding for item in result.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert [item.index for item in result.data] == [0, 1, 2]
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(vectors[0] @ vectors[2]) < 0.5
    assert result.usage.prompt_tokens > 0
    encoded = oai.embeddings.create(model=EMBEDDER, input=sentence, encoding_format="base64")
    assert isinstance(encoded.data[0].embedding, str)
    decoded = np.frombuffer(base64.b64decode(encoded.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-6)


def test_stored_completions(oai: openai.OpenAI) -> None:
    run = uuid.uuid4().hex
    stored = [
        oai.chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": f"question {i}"}],
            max_tokens=3,
            store=True,
            metadata={"run": run, "kind": kind},
        )
        for i, kind in enumerate(("a", "b"))
    ]
    unstored = oai.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "x"}], max_tokens=2, metadata={"run": run}
    )
    listed = oai.chat.completions.list(metadata={"run": run})
    assert [c.id for c in listed.data] == [c.id for c in stored]
    only_b = oai.chat.completions.list(metadata={"run": run, "kind": "b"})
    assert [c.id for c in only_b.data] == [stored[1].id]
    page = oai.chat.completions.list(metadata={"run": run}, limit=1)
    assert [c.id for c in page.data] == [stored[0].id] and page.has_more
    read = oai.chat.completions.retrieve(stored[0].id)
    assert read.choices[0].message.content == stored[0].choices[0].message.content
    messages = oai.chat.completions.messages.list(stored[0].id)
    assert [(m.role, m.content) for m in messages.data] == [("user", "question 0")]
    updated = oai.chat.completions.update(stored[0].id, metadata={"run": run, "kind": "z"})
    assert updated.metadata == {"run": run, "kind": "z"}
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.retrieve(unstored.id)
    deleted = oai.chat.completions.delete(stored[1].id)
    assert deleted.deleted and deleted.id == stored[1].id
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.retrieve(stored[1].id)


def batch_file(valid: int) -> tuple[bytes, set[str], set[str]]:
    """valid chat lines plus invalid ones: (JSONL, valid custom_ids, invalid custom_ids)."""
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": TINY,
                "messages": [{"role": "user", "content": f"n {i}"}],
                "max_tokens": 2,
            },
        }
        for i in range(valid)
    ]
    bad = [
        {
            "custom_id": "bad-model",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        },
        {
            "custom_id": "bad-param",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": TINY, "messages": [{"role": "user", "content": "x"}], "n": 3},
        },
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:100] + bad + lines[100:])
    return (
        (text + "\n{not json\n").encode(),
        {line["custom_id"] for line in lines},
        {line["custom_id"] for line in bad},
    )


def test_files_and_batches_round_trip(oai: openai.OpenAI) -> None:
    content, valid, invalid = batch_file(200)
    uploaded = oai.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch")
    assert uploaded.bytes == len(content) and uploaded.purpose == "batch"
    assert oai.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert oai.files.content(uploaded.id).content == content
    batch = oai.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "e2e"},
    )
    assert batch.status in ("validating", "in_progress")
    deadline = time.monotonic() + 240
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
        batch = oai.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (204, 200)
    assert batch.request_counts.failed == 4
    assert batch.output_file_id and batch.error_file_id
    outputs = [
        json.loads(line) for line in oai.files.content(batch.output_file_id).text.splitlines()
    ]
    assert {line["custom_id"] for line in outputs} == valid
    assert all(line["response"]["status_code"] == 200 for line in outputs)
    assert all(line["response"]["body"]["object"] == "chat.completion" for line in outputs)
    errors = [json.loads(line) for line in oai.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == 4
    assert {line["custom_id"] for line in errors} == invalid | {None}
    assert batch.id in {listed.id for listed in oai.batches.list()}
    oai.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(uploaded.id)


def test_errors_are_openai_errors(live: Live, oai: openai.OpenAI) -> None:
    message = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.chat.completions.create(model="no-such-model", messages=message)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=TINY, messages=message, logprobs=True)
    assert bad.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as unknown:
        oai.chat.completions.create(model=TINY, messages=message, extra_body={"mystery": 1})
    assert unknown.value.param == "mystery"
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model=EMBEDDER, input="x", dimensions=128)
    with client_for(live, "gsk_not-a-key") as stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with client_for(live, live.reader) as reader, pytest.raises(openai.PermissionDeniedError):
        reader.chat.completions.create(model=TINY, messages=message)
    with client_for(live, live.other) as other, pytest.raises(openai.NotFoundError):
        other.batches.retrieve("batch_does_not_exist")


def test_native_job_events_stream(live: Live) -> None:
    with live.service.client(live.writer) as native:
        job = native.post(
            "/v1/jobs",
            json={"model": TINY, "input": {"prompt": "hello"}, "params": {"max_tokens": 6}},
        ).json()
        with native.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            assert response.status_code == 200
            events = _sse_events(response)
        generation = native.get(f"/v1/jobs/{job['id']}").json()["generation_id"]
        output = native.get(f"/v1/generations/{generation}").json()["output"]
    assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded"
    assert "".join(data["text"] for name, data in events if name == "token") == output


def _sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events
