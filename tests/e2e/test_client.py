"""The Python client against the live API and worker: submit, stream, wait, read back,
search, files and batches, and the API's errors as ApiError."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from service.api.schemas import JobPublic
from service.cli import app
from service.client import ApiError, Client
from tests.e2e.conftest import Live

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"


def test_a_job_submitted_streams_and_is_stored(live: Live) -> None:
    tag = f"client-{uuid.uuid4().hex[:8]}"
    with Client(live.service.base_url, live.writer) as client:

        def submit() -> JobPublic:
            return client.submit(
                MODEL,
                prompt="The client says hello",
                params={"max_tokens": 8, "temperature": 0.0},
                metadata={"tags": [tag]},
                idempotency_key=tag,
            )

        job = submit()
        assert job.status in ("queued", "running") and job.model == MODEL
        assert submit().id == job.id  # replayed, not submitted twice
        with pytest.raises(ApiError) as reused:  # the same key, another request
            client.submit(MODEL, prompt="other", idempotency_key=tag)
        assert reused.value.status == 409
        streamed = "".join(client.stream(job.id))
        done = client.wait(job.id, timeout_s=180)
        assert done.status == "succeeded" and done.generation_id is not None
        generation = client.generation(done.generation_id)
        assert generation.output == streamed and generation.output
        page = client.generations(tag=tag)
        assert [g.id for g in page.data] == [generation.id]
        assert [j.id for j in client.jobs(tag=tag, status="succeeded").data] == [job.id]
        found = client.search("client says hello", mode="keyword", filters={"tags": [tag]})
        assert [hit.generation.id for hit in found.data] == [generation.id]


def test_files_and_batches(live: Live) -> None:
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    }
    with Client(live.service.base_url, live.writer) as client:
        uploaded = client.upload((json.dumps(line) + "\n").encode(), filename="one.jsonl")
        assert uploaded.filename == "one.jsonl" and uploaded.purpose == "batch"
        assert client.file_content(uploaded.id) == (json.dumps(line) + "\n").encode()
        batch = client.batch(uploaded.id, metadata={"by": "client"})
        assert batch.input_file_id == uploaded.id
        assert client.batch_status(batch.id).id == batch.id


def test_the_apis_errors_are_raised_with_their_details(live: Live) -> None:
    with Client(live.service.base_url, live.writer) as client:
        with pytest.raises(ApiError) as missing:
            client.job("job_nothere")
        assert missing.value.status == 404 and missing.value.param == "job_id"
        with pytest.raises(ApiError) as unknown:
            client.submit("no-such-model", prompt="hi")
        assert unknown.value.status in (400, 404) and "no-such-model" in unknown.value.message
    with Client(live.service.base_url, live.reader) as reader, pytest.raises(ApiError) as denied:
        reader.submit(MODEL, prompt="hi")
    assert denied.value.status == 403
    with Client(live.service.base_url, "gs-wrong") as stranger, pytest.raises(ApiError) as refused:
        stranger.jobs()
    assert refused.value.status == 401


def test_the_cli_submits_through_the_client(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_URL", live.service.base_url)
    monkeypatch.setenv("GENSERVE_API_KEY", live.writer)
    runner = CliRunner()
    streamed = runner.invoke(app, ["submit", MODEL, "hello there", "--max-tokens", "4", "--stream"])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output.strip()
    as_json = runner.invoke(app, ["submit", MODEL, "hello there", "--max-tokens", "4", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["status"] == "succeeded"
    refused = runner.invoke(app, ["submit", "no-such-model", "hi"])
    assert refused.exit_code == 1 and refused.output.startswith("error: ")
    assert len(refused.output.strip().splitlines()) == 1
    unreachable = runner.invoke(app, ["submit", MODEL, "hi", "--url", "http://127.0.0.1:9"])
    assert unreachable.exit_code == 1 and "cannot reach" in unreachable.output
