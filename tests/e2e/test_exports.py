"""Exports end to end: a history of real generations and of rows stored as the worker
stores them (with exact and near duplicates planted), exported through the API by the real
worker, and read back through the files API."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pytest

from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Generation
from service.turns import is_text_turn, turn_text
from tests.e2e.conftest import Live
from tests.utils.factories import store_turn
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"
DIMENSION = 384  # all-minilm-l6-v2, the worker's embedding model
TERMINAL = ("succeeded", "failed", "cancelled")
SEEDED = {"source": "seeded"}


@dataclass(frozen=True)
class History:
    writer: str
    reader: str
    prompts: dict[str, str]  # name -> the prompt of each seeded row
    split: str  # an instant between the first seeded rows and the last two
    api_generations: list[dict[str, Any]]


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _at_cosine(vector: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    other = rng.standard_normal(DIMENSION).astype(np.float32)
    other -= (other @ vector) * vector
    return _unit(cosine * vector + np.sqrt(1 - cosine**2) * _unit(other))


def _seed(live: Live, tenant_id: int, rows: list[dict[str, Any]]) -> dict[str, Generation]:
    """Store rows as the worker does; a row's vector is both its prompt's and its output's
    embedding, so the vector an export compares is that vector itself."""
    engine = make_engine(live.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            return {
                row["name"]: store_turn(
                    session,
                    tenant_id,
                    turn_input=row["input"],
                    output=row["output"],
                    vectors={}
                    if row.get("vector") is None
                    else {"prompt": row["vector"].tobytes(), "output": row["vector"].tobytes()},
                    model=row.get("model", MODEL),
                    metadata={**SEEDED, **row.get("metadata", {})},
                )
                for row in rows
            }
    finally:
        engine.dispose()


def _tenant(live: Live) -> tuple[str, str, int]:
    name = f"exports{uuid.uuid4().hex[:8]}"
    writer = live.service.create_key(name, "writer")
    reader = live.service.create_key(name, "reader")
    with live.service.client(writer) as client:
        created = client.post("/v1/jobs", json={"model": MODEL, "input": {"prompt": "who am i"}})
        job = wait_for_job(client, created.json()["id"])
    engine = make_engine(live.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            row = session.get(Generation, job["generation_id"])
            assert row is not None
            return writer, reader, row.tenant_id
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def history(live: Live) -> History:
    """A tenant with three generations made through the API and eight seeded rows:
    r2 an exact duplicate of r1, r3 a near one (cosine 0.97), r4 just below the default
    threshold (0.92), r5 without embeddings, r6 no text pair (an image's); r7 (synthetic,
    a chat) and r8 come after `split`."""
    writer, reader, tenant_id = _tenant(live)
    rng = np.random.default_rng(11)
    base = _unit(rng.standard_normal(DIMENSION))
    first = [
        {
            "name": "r1",
            "input": {"prompt": "What is the capital of France?"},
            "output": "Paris.",
            "vector": base,
            "metadata": {"tags": ["geo", "keep"], "team": "a", "priority": 2},
        },
        {
            "name": "r2",
            "input": {"prompt": "what is the capital   of FRANCE?"},
            "output": "PARIS.",
            "vector": _unit(rng.standard_normal(DIMENSION)),
            "metadata": {"tags": ["geo"]},
        },
        {
            "name": "r3",
            "input": {"prompt": "What's the capital of France?"},
            "output": "It is Paris.",
            "vector": _at_cosine(base, 0.97, rng),
            "metadata": {"tags": ["geo"]},
        },
        {
            "name": "r4",
            "input": {"prompt": "Which city is the capital of France?"},
            "output": "Paris, France.",
            "vector": _at_cosine(base, 0.92, rng),
            "metadata": {"team": "b"},
        },
        {"name": "r5", "input": {"prompt": "Name a prime."}, "output": "7", "vector": None},
        {
            "name": "r6",
            "input": {"images": {"n": 1}},
            "output": "",
            "vector": _unit(rng.standard_normal(DIMENSION)),
        },
    ]
    seeded = _seed(live, tenant_id, first)
    time.sleep(0.05)
    split = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    chat = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "How many legs does a spider have?"},
        ]
    }
    later = [
        {
            "name": "r7",
            "input": chat,
            "output": "Eight.",
            "vector": _unit(rng.standard_normal(DIMENSION)),
            "model": "other-model",
            "metadata": {"tags": ["keep"], "synthetic": True},
        },
        {
            "name": "r8",
            "input": {"prompt": "Translate 'cat' to French."},
            "output": "chat",
            "vector": _unit(rng.standard_normal(DIMENSION)),
            "model": "other-model",
            "metadata": {"priority": 2},
        },
    ]
    seeded |= _seed(live, tenant_id, later)
    with live.service.client(writer) as client:
        for name, body in (("r8", {"score": 4}), ("r4", {"score": 1, "label": "helpful"})):
            given = client.post(f"/v1/generations/{seeded[name].id}/feedback", json=body)
            assert given.status_code == 201, given.text
        made = [
            client.post(
                "/v1/jobs",
                json={
                    "model": MODEL,
                    "input": {"prompt": f"api prompt {n}"},
                    "params": {"max_tokens": 4, "temperature": 0},
                    "metadata": {"source": "api"},
                },
            ).json()["id"]
            for n in range(2)
        ]
        chat_completion = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": chat["messages"], "max_tokens": 4},
        )
        assert chat_completion.status_code == 200, chat_completion.text
        api_generations = [
            client.get(f"/v1/generations/{wait_for_job(client, job)['generation_id']}").json()
            for job in made
        ]
    prompts = {
        row["name"]: turn_text(row["input"]) for row in first + later if is_text_turn(row["input"])
    }
    return History(writer, reader, prompts, split, api_generations)


def _finished(client: httpx.Client, export_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        export = client.get(f"/v1/exports/{export_id}").json()
        if export["status"] in TERMINAL:
            return dict(export)
        time.sleep(0.2)
    raise TimeoutError(f"export {export_id} did not finish: {export}")


def _export(client: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = client.post("/v1/exports", json=body)
    assert answer.status_code == 202, answer.text
    assert answer.headers["Location"] == f"/v1/exports/{answer.json()['id']}"
    export = _finished(client, answer.json()["id"])
    assert export["status"] == "succeeded", export
    return export


def _content(client: httpx.Client, export: dict[str, Any]) -> bytes:
    answer = client.get(f"/v1/files/{export['output_file_id']}/content")
    assert answer.status_code == 200, answer.text
    return answer.content


def _lines(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


def _user_text(line: dict[str, Any]) -> str:
    if "messages" in line:
        return str(next(m for m in reversed(line["messages"]) if m["role"] == "user")["content"])
    return str(line["prompt"])


def _exported(client: httpx.Client, history: History, **filters: Any) -> set[str]:
    """The seeded rows an export with these filters writes, by name."""
    export = _export(client, filters={"metadata": SEEDED, **filters})
    by_prompt = {prompt: name for name, prompt in history.prompts.items()}
    return {by_prompt[_user_text(line)] for line in _lines(_content(client, export))}


def test_both_formats_write_jsonl_whose_manifest_adds_up(live: Live, history: History) -> None:
    with live.service.client(history.writer) as client:
        chat = _export(client, format="openai_chat", filters={"metadata": SEEDED})
        data = _content(client, chat)
        manifest = chat["manifest"]
        counts = manifest["counts"]
        assert counts == {
            "matched": 8,
            "written": 5,
            "exact_duplicates": 1,
            "near_duplicates": 1,
            "not_embedded": 1,
            "skipped": 1,
        }
        assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
        assert manifest["bytes"] == len(data) and manifest["lines"] == 5
        lines = _lines(data)
        for line in lines:
            assert list(line) == ["messages"]
            assert line["messages"][-1]["role"] == "assistant"
            assert all(set(m) == {"role", "content"} for m in line["messages"])
        assert lines[0]["messages"] == [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
        assert lines[3]["messages"][0] == {"role": "system", "content": "Answer briefly."}
        file = client.get(f"/v1/files/{chat['output_file_id']}").json()
        assert file["purpose"] == "export" and file["sha256"] == manifest["sha256"]
        assert file["metadata"] == manifest
        assert manifest["snapshot"]["max_generation_id"].startswith("gen_")
        assert manifest["index"]["kind"] == "flat"
        assert manifest["embedding_model"] == "all-minilm-l6-v2"

        plain = _export(client, format="prompt_completion", filters={"metadata": SEEDED})
        pairs = _lines(_content(client, plain))
        assert [list(pair) for pair in pairs] == [["prompt", "completion"]] * 5
        assert pairs[0] == {"prompt": "What is the capital of France?", "completion": "Paris."}
        assert pairs[3]["prompt"] == "How many legs does a spider have?"
        assert plain["manifest"]["counts"] == counts

        # The whole history: the generations made through the API too (not /v1/jobs' only).
        everything = _export(client, dedup={"near": False})
        texts = {_user_text(line) for line in _lines(_content(client, everything))}
        for generation in history.api_generations:
            assert (generation["prompt"] in texts) == bool(generation["output"].strip())
        total = everything["manifest"]["counts"]
        assert total["matched"] == sum(
            total[name] for name in ("skipped", "exact_duplicates", "near_duplicates", "written")
        )


def test_filters_select_the_right_rows(live: Live, history: History) -> None:
    with live.service.client(history.writer) as client:
        assert _exported(client, history, model="other-model") == {"r7", "r8"}
        assert _exported(client, history, tags=["keep"]) == {"r1", "r7"}
        assert _exported(client, history, tags=["geo", "keep"]) == {"r1"}
        assert _exported(client, history, metadata={**SEEDED, "team": "a"}) == {"r1"}
        assert _exported(client, history, metadata={**SEEDED, "priority": 2}) == {"r1", "r8"}
        assert _exported(client, history, min_feedback_score=3) == {"r8"}
        assert _exported(client, history, label="helpful") == {"r4"}
        assert _exported(client, history, origin="synthetic") == {"r7"}
        assert _exported(client, history, origin="real") == {"r1", "r4", "r5", "r8"}
        assert _exported(client, history, created_before=history.split) == {"r1", "r4", "r5"}
        assert _exported(client, history, created_after=history.split) == {"r7", "r8"}
        unknown = _export(client, filters={"model": "no-such-model"})
        assert unknown["manifest"]["counts"]["matched"] == 0
        assert _content(client, unknown) == b""


def test_duplicates_follow_the_options_and_the_threshold(live: Live, history: History) -> None:
    with live.service.client(history.writer) as client:

        def written(**dedup: Any) -> tuple[set[str], dict[str, int]]:
            export = _export(client, filters={"metadata": SEEDED}, dedup=dedup)
            by_prompt = {prompt: name for name, prompt in history.prompts.items()}
            lines = _lines(_content(client, export))
            return {by_prompt[_user_text(line)] for line in lines}, export["manifest"]["counts"]

        kept, counts = written()
        assert kept == {"r1", "r4", "r5", "r7", "r8"}
        # r4 (0.92) is below 0.95 but not below 0.9.
        kept, counts = written(threshold=0.9)
        assert kept == {"r1", "r5", "r7", "r8"} and counts["near_duplicates"] == 2
        kept, counts = written(exact=False)  # r2 is then judged by its vector: far
        assert "r2" in kept and counts["exact_duplicates"] == 0
        kept, counts = written(exact=False, near=False)
        assert kept == {f"r{n}" for n in (1, 2, 3, 4, 5, 7, 8)}
        assert counts["not_embedded"] == 0 and counts["skipped"] == 1


def test_limit_stops_after_that_many_rows(live: Live, history: History) -> None:
    with live.service.client(history.writer) as client:
        export = _export(client, filters={"metadata": SEEDED}, limit=2)
        assert [_user_text(line) for line in _lines(_content(client, export))] == [
            history.prompts["r1"],
            history.prompts["r4"],
        ]
        counts = export["manifest"]["counts"]
        assert counts == {
            "matched": 4,
            "written": 2,
            "exact_duplicates": 1,
            "near_duplicates": 1,
            "not_embedded": 0,
            "skipped": 0,
        }
        listed = client.get("/v1/exports", params={"limit": 1})
        assert listed.status_code == 200 and listed.json()["has_more"] is True
        assert listed.json()["data"][0]["id"] == export["id"]
        assert client.get(f"/v1/exports/{export['id']}").json()["limit"] == 2


def test_the_same_export_with_its_snapshot_writes_the_same_bytes(live: Live) -> None:
    writer, _, tenant_id = _tenant(live)
    rng = np.random.default_rng(5)
    rows = [
        {
            "name": f"s{n}",
            "input": {"prompt": f"snap {n}"},
            "output": f"out {n}",
            "vector": _unit(rng.standard_normal(DIMENSION)),
        }
        for n in range(3)
    ]
    _seed(live, tenant_id, rows)
    with live.service.client(writer) as client:
        body = {"format": "prompt_completion", "filters": {"metadata": SEEDED}, "limit": 10}
        first = _export(client, **body)
        again = _export(client, **body)
        assert again["manifest"]["sha256"] == first["manifest"]["sha256"]
        assert again["output_file_id"] != first["output_file_id"]
        late = {**rows[0], "name": "late", "input": {"prompt": "late"}}
        _seed(live, tenant_id, [{**late, "vector": _unit(rng.standard_normal(DIMENSION))}])
        snapshot = first["manifest"]["snapshot"]["max_generation_id"]
        rerun = _export(client, **body, snapshot=snapshot)
        assert rerun["manifest"]["sha256"] == first["manifest"]["sha256"]
        assert rerun["manifest"]["snapshot"]["max_generation_id"] == snapshot
        assert _content(client, rerun) == _content(client, first)
        latest = _export(client, **body)
        assert latest["manifest"]["counts"]["written"] == 4
        assert latest["manifest"]["sha256"] != first["manifest"]["sha256"]


def test_exports_are_not_counted_as_requests(live: Live, history: History) -> None:
    with live.service.client(history.writer) as client:
        before = client.get("/v1/usage").json()["total"]["requests"]
        _export(client, filters={"metadata": SEEDED})
        assert client.get("/v1/usage").json()["total"]["requests"] == before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "filters": {
                    "created_after": "2026-02-01T00:00:00Z",
                    "created_before": "2026-01-01T00:00:00Z",
                }
            },
            "filters",
        ),
        ({"dedup": {"threshold": 0.3}}, "dedup.threshold"),
        ({"dedup": {"threshold": 1.5}}, "dedup.threshold"),
        ({"limit": 0}, "limit"),
        ({"format": "csv"}, "format"),
        ({"filters": {"origin": "fake"}}, "filters.origin"),
        ({"filters": {"tags": [""]}}, "filters.tags"),
        ({"filters": {"min_feedback_score": "high"}}, "filters.min_feedback_score"),
        ({"filters": {"unknown": 1}}, "filters.unknown"),
        ({"snapshot": "job_1"}, "snapshot"),
        ({"extra": True}, "extra"),
        ([1, 2], None),
    ],
)
def test_bad_requests_get_400_naming_the_field(
    live: Live, history: History, body: Any, param: str | None
) -> None:
    with live.service.client(history.writer) as client:
        answer = client.post("/v1/exports", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    if param:
        assert error["param"] and error["param"].startswith(param), error


def test_roles_unknown_exports_and_cancelling(live: Live, history: History) -> None:
    with live.service.client(history.reader) as reader:
        assert reader.post("/v1/exports", json={}).status_code == 403
        assert reader.get("/v1/exports").status_code == 200
    with live.service.client(history.writer) as client:
        assert client.get("/v1/exports/job_missing").status_code == 404
        job = client.post("/v1/jobs", json={"model": MODEL, "input": {"prompt": "x"}}).json()
        assert client.get(f"/v1/exports/{job['id']}").status_code == 404  # a job, no export
        created = client.post("/v1/exports", json={"filters": {"metadata": SEEDED}}).json()
        cancelled = client.post(f"/v1/exports/{created['id']}/cancel")
        ended = _finished(client, created["id"])
        if cancelled.status_code == 409:  # it had already finished
            assert ended["status"] == "succeeded"
        else:
            assert cancelled.status_code == 200, cancelled.text
            assert ended["status"] in ("cancelled", "succeeded")
        if ended["status"] == "cancelled":
            assert ended["output_file_id"] is None
        again = client.post(f"/v1/exports/{created['id']}/cancel")
        assert again.status_code == (409 if ended["status"] == "succeeded" else 200)


def test_another_tenant_cannot_read_an_export_or_its_file(live: Live, history: History) -> None:
    with live.service.client(history.writer) as client:
        export = _export(client, filters={"metadata": SEEDED})
    with live.service.client(live.other) as other:
        for path in (
            f"/v1/exports/{export['id']}",
            f"/v1/files/{export['output_file_id']}",
            f"/v1/files/{export['output_file_id']}/content",
        ):
            assert other.get(path).status_code == 404, path
        assert other.post(f"/v1/exports/{export['id']}/cancel").status_code == 404
        assert export["id"] not in other.get("/v1/exports").text
        assert export["output_file_id"] not in other.get("/v1/files").text
