"""Every wrong request gets a 4xx with a JSON body that names the problem."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Live

pytestmark = pytest.mark.e2e

GOOD = {"model": "tiny-random-llama", "input": {"prompt": "hi"}}


def error_of(response, status: int) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({**GOOD, "model": "no-such-model"}, 404, "model"),
        ({**GOOD, "model": "all-minilm-l6-v2"}, 404, "model"),
        ({**GOOD, "input": {"prompt": ""}}, 400, "input"),
        ({**GOOD, "input": {"prompt": "   "}}, 400, "input"),
        ({**GOOD, "input": {}}, 400, "input"),
        ({**GOOD, "input": {"messages": []}}, 400, "input"),
        ({**GOOD, "params": {"max_tokens": 100000}}, 400, "params.max_tokens"),
        ({**GOOD, "params": {"max_tokens": 0}}, 400, "params.max_tokens"),
        ({**GOOD, "params": {"max_tokens": "many"}}, 400, "params.max_tokens"),
        ({**GOOD, "params": {"temperature": 3}}, 400, "params.temperature"),
        ({**GOOD, "params": {"top_p": 0}}, 400, "params.top_p"),
        ({**GOOD, "params": {"stop": ["a", "b", "c", "d", "e"]}}, 400, "params.stop"),
        ({**GOOD, "params": {"bogus": 1}}, 400, "params.bogus"),
        ({**GOOD, "metadata": {"tags": "not-a-list"}}, 400, "metadata"),
        ({**GOOD, "metadata": "nope"}, 400, "metadata"),
        ({**GOOD, "parent_generation_id": "gen_missing"}, 404, "parent_generation_id"),
        ({**GOOD, "conversation_id": "conv_missing"}, 404, "conversation_id"),
        ([1, 2], 400, None),
    ],
)
def test_bad_job_requests(live: Live, body: object, status: int, param: str | None) -> None:
    with live.service.client(live.writer) as client:
        error = error_of(client.post("/v1/jobs", json=body), status)
    if param:
        assert error["param"] and error["param"].startswith(param), error


def test_malformed_json_and_oversized_body(live: Live) -> None:
    with live.service.client(live.writer) as client:
        malformed = client.post(
            "/v1/jobs", content=b'{"model": ', headers={"content-type": "application/json"}
        )
        huge = client.post("/v1/jobs", json={**GOOD, "input": {"prompt": "x" * 100_000}})
    assert error_of(malformed, 400)["code"] == "invalid_json"
    assert error_of(huge, 413)["code"] == "payload_too_large"


def test_keys_and_roles(live: Live) -> None:
    with live.service.client(None) as anonymous:
        assert error_of(anonymous.get("/v1/jobs"), 401)["type"] == "authentication_error"
    with live.service.client("gsk_wrong") as wrong:
        error_of(wrong.post("/v1/jobs", json=GOOD), 401)
    with live.service.client(live.reader) as reader:
        error_of(reader.post("/v1/jobs", json=GOOD), 403)
        assert reader.get("/v1/jobs").status_code == 200


def test_unknown_objects_and_bad_queries(live: Live) -> None:
    with live.service.client(live.writer) as client:
        error_of(client.get("/v1/jobs/job_missing"), 404)
        error_of(client.get("/v1/generations/gen_missing"), 404)
        error_of(client.get("/v1/conversations/conv_missing"), 404)
        error_of(client.get("/v1/nowhere"), 404)
        error_of(client.get("/v1/jobs", params={"status": "sleeping"}), 400)
        error_of(client.get("/v1/jobs", params={"limit": 1000}), 400)
        error_of(client.get("/v1/generations", params={"metadata": "novalue"}), 400)
        error_of(client.get("/v1/generations", params={"created_after": "yesterday"}), 400)
        error_of(client.post("/v1/search", json={"query": ""}), 400)
        error_of(client.post("/v1/search", json={"query": "x", "k": 0}), 400)
        error_of(client.post("/v1/search", json={"query": "x", "target": "nope"}), 400)
    with live.service.client(live.writer) as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def test_nul_characters_are_refused(live: Live) -> None:
    with live.service.client(live.writer) as client:
        prompt = client.post("/v1/jobs", json={**GOOD, "input": {"prompt": "a\u0000b"}})
        metadata = client.post("/v1/jobs", json={**GOOD, "metadata": {"k": "a\u0000b"}})
    assert error_of(prompt, 400)["param"].startswith("input")
    assert error_of(metadata, 400)["param"] == "metadata.k"


def test_an_empty_idempotency_key_is_refused_not_stored(live: Live) -> None:
    with live.service.client(live.writer) as client:
        answers = [
            client.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": ""}) for _ in "ab"
        ]
    for answer in answers:
        assert error_of(answer, 400)["param"] == "idempotency-key"
