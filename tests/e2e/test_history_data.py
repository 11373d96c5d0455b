"""Feedback, tags and categories, usage over time, model trends and the response cache,
end to end against a real API and worker."""

from __future__ import annotations

import json
import secrets
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Live
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"


def _key(live: Live) -> str:
    return live.service.create_key(f"h{secrets.token_hex(4)}", "writer")


def _generate(client: httpx.Client, prompt: str, **body: Any) -> dict[str, Any]:
    params = {"max_tokens": 6, "temperature": 0, **body.pop("params", {})}
    answer = client.post(
        "/v1/jobs", json={"model": MODEL, "input": {"prompt": prompt}, "params": params, **body}
    )
    assert answer.status_code == 202, answer.text
    job = wait_for_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def _ids(page: httpx.Response) -> set[str]:
    assert page.status_code == 200, page.text
    return {row["id"] for row in page.json()["data"]}


def test_feedback_moves_the_mean_and_filters_list_and_search(live: Live) -> None:
    with live.service.client(_key(live)) as client:
        good = _generate(client, "feedback good one")["generation_id"]
        bad = _generate(client, "feedback bad one")["generation_id"]
        for score, label in ((5, "helpful"), (3, None), (1, "wrong")):
            given = client.post(
                f"/v1/generations/{good}/feedback",
                json={"score": score, "label": label, "user": "ann", "comment": "ok"},
            )
            assert given.status_code == 201, given.text
            assert given.json()["generation_id"] == good
        assert client.post(f"/v1/generations/{bad}/feedback", json={"score": 1}).status_code == 201
        assert (
            client.post(f"/v1/generations/{bad}/feedback", json={"label": "wrong"}).status_code
            == 201
        )

        listed = client.get(f"/v1/generations/{good}/feedback").json()
        assert [f["score"] for f in listed["data"]] == [5, 3, 1]
        assert listed["score"] == pytest.approx(3.0) and listed["count"] == 3
        assert client.get(f"/v1/generations/{bad}").json()["feedback_count"] == 1  # scored ones

        assert _ids(client.get("/v1/generations", params={"min_feedback_score": 2})) == {good}
        assert _ids(client.get("/v1/generations", params={"max_feedback_score": 2})) == {bad}
        assert _ids(client.get("/v1/generations", params={"label": "wrong"})) == {good, bad}
        assert _ids(client.get("/v1/generations", params={"label": "helpful"})) == {good}
        found = client.post(
            "/v1/search",
            json={"query": "feedback", "mode": "keyword", "filters": {"label": "helpful"}},
        )
        assert {hit["generation"]["id"] for hit in found.json()["data"]} == {good}


def test_tags_and_category_are_editable_and_filter(live: Live) -> None:
    with live.service.client(_key(live)) as client:
        job = _generate(client, "tag me", metadata={"tags": ["a"], "team": "x"})
        gid = job["generation_id"]
        edited = client.patch(
            f"/v1/generations/{gid}", json={"add_tags": ["b", "a"], "category": "billing"}
        )
        assert edited.status_code == 200, edited.text
        assert edited.json()["metadata"] == {"tags": ["a", "b"], "team": "x", "category": "billing"}
        # The job shows the same metadata (search and listings read either).
        assert client.get(f"/v1/jobs/{job['id']}").json()["metadata"]["category"] == "billing"
        assert _ids(client.get("/v1/generations", params={"tag": "b"})) == {gid}
        assert _ids(client.get("/v1/generations", params={"category": "billing"})) == {gid}
        removed = client.patch(
            f"/v1/generations/{gid}", json={"remove_tags": ["a"], "category": None}
        )
        assert removed.json()["metadata"] == {"tags": ["b"], "team": "x"}
        assert _ids(client.get("/v1/generations", params={"category": "billing"})) == set()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, None),
        ({"score": "high"}, "score"),
        ({"score": 1000}, "score"),
        ({"label": "has\nnewline"}, "label"),
        ({"score": 1, "extra": 1}, "extra"),
    ],
)
def test_bad_feedback_is_a_400(live: Live, body: dict[str, Any], param: str | None) -> None:
    with live.service.client(live.writer) as client:
        gid = _generate(client, "bad feedback target")["generation_id"]
        answer = client.post(f"/v1/generations/{gid}/feedback", json=body)
        assert answer.status_code == 400, answer.text
        if param:
            assert param in json.dumps(answer.json()["error"])
        missing = client.post("/v1/generations/gen_nope/feedback", json={"score": 1})
        assert missing.status_code == 404
        both = client.patch(f"/v1/generations/{gid}", json={"tags": ["x"], "add_tags": ["y"]})
        assert both.status_code == 400


def test_the_cache_answers_greedy_repeats_with_the_original(live: Live) -> None:
    with live.service.client(_key(live)) as client:
        first = _generate(client, "cache   me please")
        exact = client.post(
            "/v1/jobs",
            json={
                "model": MODEL,
                "input": {"prompt": "cache me please"},  # whitespace folds
                "params": {"max_tokens": 6, "temperature": 0},
                "cache": "exact",
            },
        )
        assert exact.status_code == 200, exact.text
        assert exact.json()["cached"] is True
        assert exact.json()["id"] == first["id"]
        assert exact.json()["generation_id"] == first["generation_id"]
        # Other params are another request; sampling is not cached unless asked.
        other = client.post(
            "/v1/jobs",
            json={
                "model": MODEL,
                "input": {"prompt": "cache me please"},
                "params": {"max_tokens": 5, "temperature": 0},
                "cache": "exact",
            },
        )
        assert other.status_code == 202 and other.json()["cached"] is False
        sampled = client.post(
            "/v1/jobs",
            json={
                "model": MODEL,
                "input": {"prompt": "cache me please"},
                "params": {"max_tokens": 6, "temperature": 0.8},
                "cache": "exact",
            },
        )
        assert sampled.status_code == 202
        wait_for_job(client, other.json()["id"])
        wait_for_job(client, sampled.json()["id"])

        # OpenAI: the same completion, with the original id, marked cached.
        chat = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "cached chat"}],
            "max_tokens": 5,
            "temperature": 0,
        }
        original = client.post("/v1/chat/completions", json=chat).json()
        again = client.post("/v1/chat/completions", json={**chat, "cache": "exact"})
        assert again.status_code == 200, again.text
        assert again.headers["x-genserve-cache"] == "hit"
        assert again.json()["id"] == original["id"]
        assert again.json()["cached"] is True
        assert (
            again.json()["choices"][0]["message"]["content"]
            == original["choices"][0]["message"]["content"]
        )
        with client.stream(
            "POST", "/v1/chat/completions", json={**chat, "cache": "exact", "stream": True}
        ) as streamed:
            frames = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        text = "".join(
            json.loads(f)["choices"][0]["delta"].get("content", "")
            for f in frames[:-1]
            if json.loads(f)["choices"]
        )
        assert text == original["choices"][0]["message"]["content"]

        usage = client.get("/v1/usage", params={"group_by": "model"}).json()
        assert usage["total"]["cache_hits"] == 3
        assert usage["total"]["requests"] == 7  # 4 generated + 3 from the cache
        assert usage["total"]["cache_hit_ratio"] == pytest.approx(3 / 7, abs=1e-3)


def test_a_semantic_cache_hit_needs_a_near_identical_prompt(live: Live) -> None:
    with live.service.client(_key(live)) as client:
        first = _generate(client, "What is the boiling point of water at sea level?")
        body = {
            "model": MODEL,
            "params": {"max_tokens": 6, "temperature": 0},
            "cache": {"mode": "semantic", "threshold": 0.9},
        }
        near = client.post(
            "/v1/jobs",
            json={**body, "input": {"prompt": "what is the boiling point of water at sea level"}},
        )
        assert near.status_code == 200, near.text
        assert near.json()["generation_id"] == first["generation_id"]
        far = client.post(
            "/v1/jobs", json={**body, "input": {"prompt": "Name three rivers in Europe."}}
        )
        assert far.status_code == 202, far.text
        wait_for_job(client, far.json()["id"])
        bad = client.post(
            "/v1/jobs", json={**body, "cache": {"mode": "fuzzy"}, "input": {"prompt": "x"}}
        )
        assert bad.status_code == 400


def test_usage_and_trends_count_requests_errors_and_feedback(live: Live) -> None:
    with live.service.client(_key(live)) as client:
        done = [_generate(client, f"usage {i}") for i in range(3)]
        failed = client.post(
            "/v1/jobs",
            json={"model": MODEL, "input": {"prompt": "word " * 5000}, "params": {"max_tokens": 4}},
        )
        assert wait_for_job(client, failed.json()["id"])["status"] == "failed"
        client.post(f"/v1/generations/{done[0]['generation_id']}/feedback", json={"score": 4})
        client.post(f"/v1/generations/{done[1]['generation_id']}/feedback", json={"score": 2})

        report = client.get("/v1/usage", params={"group_by": "day,model"})
        assert report.status_code == 200, report.text
        total = report.json()["total"]
        assert (total["requests"], total["succeeded"], total["errors"]) == (4, 3, 1)
        assert total["error_rate"] == pytest.approx(0.25)
        assert total["completion_tokens"] == sum(
            client.get(f"/v1/generations/{job['generation_id']}").json()["usage"][
                "completion_tokens"
            ]
            for job in done
        )
        latency = total["latency_ms"]
        assert latency["p50"] is not None and latency["p50"] <= latency["p99"]
        [row] = report.json()["data"]
        assert row["model"] == MODEL and row["requests"] == 4

        trends = client.get(f"/v1/models/{MODEL}/trends")
        assert trends.status_code == 200, trends.text
        [day] = trends.json()["data"]
        assert day["feedback_score"] == pytest.approx(3.0) and day["feedback_count"] == 2
        assert day["mean_completion_tokens"] is not None

        assert client.get("/v1/usage", params={"group_by": "week"}).status_code == 400
        assert (
            client.get("/v1/usage", params={"start": "2026-02-01", "end": "2026-01-01"}).status_code
            == 400
        )
        assert client.get("/v1/models/no-such-model/trends").status_code == 404
