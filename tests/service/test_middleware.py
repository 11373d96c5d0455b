"""The API's middleware: text SQL cannot store is refused at the edge, naming where it is,
valid Unicode passes; an unexpected error is answered as JSON with the request's id."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service import storable
from service.api.middleware import RequestContext, RequestLimits
from service.batches import parse_line


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("plain", None),
        ("🦜 emoji and 中文", None),
        ("a\x00b", ("", "NUL")),
        ("a\ud800b", ("", "U+D800")),
        (
            {"input": {"messages": [{"content": "ok"}, {"content": "\udfff"}]}},
            ("input.messages.1.content", "U+DFFF"),
        ),
        ({"meta": {"k\x00": "v"}}, ("meta.k\\x00", "a key contains a NUL")),
        ([1, 2.5, None, True], None),
    ],
)
def test_find_unstorable_names_the_first_bad_string(
    value: object, found: tuple[str, str] | None
) -> None:
    result = storable.find_unstorable(value)
    if found is None:
        assert result is None
    else:
        assert result is not None and result[0] == found[0] and found[1] in result[1]


async def fail(request: Request) -> JSONResponse:
    raise RuntimeError("a bug")


async def echo(request: Request) -> JSONResponse:
    return JSONResponse(
        {"body": (await request.body()).decode(), "query": dict(request.query_params)}
    )


@pytest.fixture
def client() -> TestClient:
    routes = [Route("/fail", fail), Route("/{rest:path}", echo, methods=["GET", "POST"])]
    # Where create_app puts it: inside Starlette's outermost error handler.
    middleware = [Middleware(RequestContext), Middleware(RequestLimits, max_bytes=1 << 20)]
    return TestClient(Starlette(routes=routes, middleware=middleware))


def test_an_unexpected_error_is_a_json_500_with_the_request_id(client: TestClient) -> None:
    response = client.get("/fail")
    request_id = response.headers["x-request-id"]
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": f"internal error (request {request_id})",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


def post(client: TestClient, raw: bytes):  # noqa: ANN201
    return client.post("/x", content=raw, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (rb'{"prompt": "a\u0000b"}', "prompt"),
        (rb'{"prompt": "a\ud83e"}', "prompt"),  # a high surrogate alone
        (rb'{"prompt": "\udd9c"}', "prompt"),  # a low one alone
        (rb'{"a": [{"b": "\ud83e\ud83e\udd9c"}]}', "a.0.b"),  # a high one before a pair
    ],
)
def test_bodies_with_unstorable_text_get_400_naming_the_field(
    client: TestClient, raw: bytes, param: str
) -> None:
    response = post(client, raw)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_text"
    assert error["message"].startswith(param + " contains")


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"prompt": "\ud83e\udd9c"}',  # a pair: one emoji
        rb'{"prompt": "\\u0000 is how JSON writes NUL"}',  # an escaped backslash, then text
        rb'{"prompt": "\\\\\ud83e\udd9c"}',
        json.dumps({"prompt": "🦜" * 10_000}).encode(),  # ensure_ascii: 10k pairs
        '{"prompt": "🦜"}'.encode(),
        b'{"prompt": "\\ud800',  # not JSON at all: the route answers that
    ],
)
def test_valid_unicode_and_non_json_pass_through(client: TestClient, raw: bytes) -> None:
    response = post(client, raw)
    assert response.status_code == 200
    assert response.json()["body"] == raw.decode()


def test_nul_in_the_path_or_the_query_gets_400(client: TestClient) -> None:
    assert client.get("/v1/jobs/a%00b").json()["error"]["param"] == "path"
    response = client.get("/v1/x", params={"model": "a\x00"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    assert client.get("/v1/x", params={"model": "ok"}).json()["query"] == {"model": "ok"}


def test_a_batch_line_with_unstorable_text_fails_alone() -> None:
    raw = json.dumps(
        {
            "custom_id": "c1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "a\x00"}]},
        }
    ).encode()
    custom_id, outcome = parse_line(raw, endpoint="/v1/chat/completions", models=None, seen=set())  # type: ignore[arg-type]
    assert custom_id == "c1"
    assert isinstance(outcome, dict) and outcome["code"] == "invalid_text"
    assert outcome["param"] == "body.messages.0.content"
