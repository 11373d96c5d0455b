"""Evaluation sets and runs end to end: sets from items, JSONL and history; runs on the
real worker, their per-item scores and aggregates; two runs compared item by item."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.evals import metrics
from tests.e2e.conftest import Live
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"
SCORES = ("exact_match", "token_f1", "rouge_l", "cosine")


@dataclass(frozen=True)
class Tenant:
    writer: str
    reader: str


@pytest.fixture(scope="module")
def tenant(live: Live) -> Tenant:
    """A tenant of this module's own: its history is only what these tests made."""
    name = f"evals{uuid.uuid4().hex[:8]}"
    return Tenant(
        writer=live.service.create_key(name, "writer"),
        reader=live.service.create_key(name, "reader"),
    )


def _name() -> str:
    return f"set-{uuid.uuid4().hex[:10]}"


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return dict(response.json()["error"])


def _create_set(client: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = client.post("/v1/evals/sets", json={"name": _name(), **body})
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"] == f"/v1/evals/sets/{answer.json()['id']}"
    return dict(answer.json())


def _start_run(client: httpx.Client, set_id: str, **params: Any) -> dict[str, Any]:
    body = {"set_id": set_id, "model": MODEL, "params": params, "metadata": {"why": "test"}}
    answer = client.post("/v1/evals/runs", json=body)
    assert answer.status_code == 202, answer.text
    assert answer.headers["Location"] == f"/v1/evals/runs/{answer.json()['id']}"
    return dict(answer.json())


def _finished(client: httpx.Client, run_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/v1/evals/runs/{run_id}").json()
        if run["status"] != "running":
            return dict(run)
        time.sleep(0.3)
    raise TimeoutError(f"evaluation run {run_id} did not finish: {run}")


def _all(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every row of a paged listing, following next_cursor."""
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        rows += body["data"]
        if not body["has_more"]:
            return rows
        cursor = body["next_cursor"]


def _check_scores(result: dict[str, Any]) -> None:
    """The stored scores are the metrics of the stored output, and agree with each other."""
    scores = result["scores"]
    assert result["status"] == "scored" and result["error"] is None, result
    assert scores.keys() == set(SCORES)
    expected = metrics.text_scores(result["output"], result["reference"])
    assert {name: scores[name] for name in expected} == pytest.approx(expected)
    assert scores["exact_match"] in (0.0, 1.0)
    assert all(0.0 <= scores[name] <= 1.0 for name in ("token_f1", "rouge_l"))
    assert -1.0 <= scores["cosine"] <= 1.0
    if scores["exact_match"] == 1.0:
        assert scores["token_f1"] == scores["rouge_l"] == 1.0
        assert scores["cosine"] == pytest.approx(1.0, abs=1e-5)
    # The longest common subsequence is no longer than the shared bag of tokens.
    assert scores["rouge_l"] <= scores["token_f1"] + 1e-9


ITEMS = [
    {"input": "Name a colour.", "reference": "Blue."},
    {"input": {"prompt": "Count to three:"}, "reference": "one two three", "metadata": {"k": 1}},
    {
        "input": {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"},
            ]
        },
        "reference": "Paris",
    },
]


def test_sets_from_items_and_from_jsonl_read_back_in_order(live: Live, tenant: Tenant) -> None:
    with live.service.client(tenant.writer) as client:
        made = _create_set(client, description="three kinds of input", items=ITEMS)
        lines = [json.dumps(item) for item in ITEMS]
        upload = client.post(
            "/v1/evals/sets",
            data={"name": _name(), "metadata": json.dumps({"source": "file"})},
            files={"file": ("set.jsonl", ("\n".join([lines[0], "", *lines[1:]]) + "\n").encode())},
        )
    assert upload.status_code == 201, upload.text
    uploaded = upload.json()
    assert (made["item_count"], uploaded["item_count"]) == (3, 3)
    assert uploaded["metadata"] == {"source": "file"}
    with live.service.client(tenant.reader) as client:
        assert client.get(f"/v1/evals/sets/{made['name']}").json() == made
        assert client.get(f"/v1/evals/sets/{made['id']}").json() == made
        first = client.get(f"/v1/evals/sets/{made['id']}/items", params={"limit": 2}).json()
        items = _all(client, f"/v1/evals/sets/{made['id']}/items", limit=2)
        from_file = _all(client, f"/v1/evals/sets/{uploaded['id']}/items")
        listed = {row["id"] for row in _all(client, "/v1/evals/sets", limit=1)}
    assert first["has_more"] and first["next_cursor"] == "2"
    assert [item["seq"] for item in items] == [1, 2, 3]
    assert [item["input"] for item in items] == [
        {"prompt": "Name a colour.", "raw": False},
        {"prompt": "Count to three:", "raw": False},
        {
            "messages": ITEMS[2]["input"]["messages"],  # type: ignore[index]
            "raw": False,
        },
    ]
    assert [item["reference"] for item in items] == ["Blue.", "one two three", "Paris"]
    assert items[1]["metadata"] == {"k": 1}
    assert [(i["input"], i["reference"]) for i in from_file] == [
        (i["input"], i["reference"]) for i in items
    ]
    assert {made["id"], uploaded["id"]} <= listed


def test_bad_requests_get_4xx_with_the_field_at_fault(live: Live, tenant: Tenant) -> None:
    good = json.dumps(ITEMS[0])
    with live.service.client(tenant.writer) as client:

        def upload(content: str) -> httpx.Response:
            files = {"file": ("set.jsonl", content.encode())}
            return client.post("/v1/evals/sets", data={"name": _name()}, files=files)

        not_json = _error(upload(f"{good}\n{{oops\n"), 400)
        no_reference = _error(upload(f"{good}\n\n{json.dumps({'input': 'x'})}\n"), 400)
        blank_input = _error(upload(json.dumps({"input": " ", "reference": "r"})), 400)
        empty_file = _error(upload("\n\n"), 400)
        made = _create_set(client, items=ITEMS[:1])
        extra = _error(client.post("/v1/evals/sets", json={**made, "items": ITEMS[:1]}), 400)
        duplicate = _error(
            client.post("/v1/evals/sets", json={"name": made["name"], "items": ITEMS}), 409
        )
        both = client.post(
            "/v1/evals/sets",
            json={"name": _name(), "items": ITEMS, "from_history": {"tags": ["x"]}},
        )
        id_like = client.post("/v1/evals/sets", json={"name": "evalset_x", "items": ITEMS})
        nothing = client.post(
            "/v1/evals/sets",
            json={"name": _name(), "from_history": {"tags": [f"none-{uuid.uuid4().hex}"]}},
        )
        unknown_model = client.post(
            "/v1/evals/runs", json={"set_id": made["id"], "model": "no-such-model"}
        )
        not_a_chat_model = client.post(
            "/v1/evals/runs", json={"set_id": made["id"], "model": "all-minilm-l6-v2"}
        )
        too_long = client.post(
            "/v1/evals/runs",
            json={"set_id": made["id"], "model": MODEL, "params": {"max_tokens": 100_000}},
        )
        unknown_set = client.post("/v1/evals/runs", json={"set_id": "evalset_none", "model": MODEL})
        unknown_run = client.get("/v1/evals/runs/evalrun_none")
        bad_cursor = client.get(f"/v1/evals/sets/{made['id']}/items", params={"cursor": "x"})
        nan = client.post(
            "/v1/evals/sets",
            content=b'{"name": "n", "metadata": {"x": NaN}, "items": [{"input": "q"}]}',
            headers={"content-type": "application/json"},
        )
        nul_field = client.post(
            "/v1/evals/sets",
            data={"name": _name(), "description": "a\x00b"},
            files={"file": ("set.jsonl", good.encode())},
        )
        nul_line = upload(json.dumps({"input": "q", "reference": "a\u0000b"}))
        wrong_type = client.post(
            "/v1/evals/sets", content=b"name=x", headers={"content-type": "text/plain"}
        )
    with live.service.client(tenant.reader) as reader:
        forbidden = reader.post("/v1/evals/sets", json={"name": _name(), "items": ITEMS})
    assert not_json["code"] == "invalid_line" and not_json["message"].startswith("line 2")
    assert no_reference["message"].startswith("line 3") and "reference" in no_reference["message"]
    assert blank_input["message"].startswith("line 1") and "input" in blank_input["message"]
    assert empty_file["code"] == "empty_file"
    assert extra["param"] in ("id", "object", "item_count", "created_at")  # refused by name
    assert duplicate["code"] == "name_taken" and duplicate["param"] == "name"
    assert _error(both, 400)["message"].endswith("give exactly one of 'items' or 'from_history'")
    assert _error(id_like, 400)["param"] == "name"
    assert _error(nothing, 400)["code"] == "no_generations"
    assert _error(unknown_model, 404)["code"] == "model_not_found"
    assert _error(not_a_chat_model, 404)["code"] == "model_not_found"
    assert _error(too_long, 400)["code"] == "max_tokens_too_large"
    assert _error(unknown_set, 404)["param"] == "set_id"
    assert _error(unknown_run, 404)["param"] == "run_id"
    assert _error(bad_cursor, 400)["param"] == "cursor"
    assert _error(nan, 400)["code"] == "invalid_json"
    assert _error(nul_field, 400)["code"] == "invalid_text"
    nul_error = _error(nul_line, 400)
    assert nul_error["message"].startswith("line 1: reference") and "NUL" in nul_error["message"]
    assert _error(wrong_type, 400)["code"] == "unsupported_media_type"
    assert _error(forbidden, 403)["code"] == "insufficient_role"


@pytest.fixture(scope="module")
def two_runs(live: Live, tenant: Tenant) -> dict[str, Any]:
    """One set of four items, run twice with different budgets, both finished."""
    prompts = ["Say hello.", "Name a fruit.", "What is two plus two?", "Describe the sea."]
    items = [{"input": p, "reference": f"reference {n}"} for n, p in enumerate(prompts)]
    items[0]["reference"] = ""  # a blank reference scores against the output as any other
    with live.service.client(tenant.writer) as client:
        eval_set = _create_set(client, items=items)
        started = [_start_run(client, eval_set["id"], max_tokens=n) for n in (3, 8)]
        first, second = (_finished(client, run["id"]) for run in started)
    return {"set": eval_set, "started": started, "a": first, "b": second}


def test_a_run_scores_every_item_and_aggregates_them(
    live: Live, tenant: Tenant, two_runs: dict[str, Any]
) -> None:
    started, run = two_runs["started"][0], two_runs["a"]
    assert started["status"] == "running" and started["progress"]["total"] == 4
    assert run["status"] == "succeeded", run
    assert run["model_version"] == "random-seed0-1" and run["params"]["temperature"] == 0.0
    assert run["params"]["max_tokens"] == 3 and run["metadata"] == {"why": "test"}
    assert run["progress"] == {"total": 4, "done": 4, "scored": 4, "failed": 0}
    with live.service.client(tenant.reader) as client:
        results = _all(client, f"/v1/evals/runs/{run['id']}/results", limit=3)
        generation = client.get(f"/v1/generations/{results[1]['generation_id']}").json()
        job = client.get(f"/v1/jobs/{results[1]['job_id']}").json()
        listed = _all(client, "/v1/evals/runs", set_id=two_runs["set"]["name"])
    assert [result["seq"] for result in results] == [1, 2, 3, 4]
    for result in results:
        _check_scores(result)
    assert generation["output"] == results[1]["output"] and generation["params"]["max_tokens"] == 3
    assert job["queue"] == "batch" and job["metadata"] == {"eval_run": run["id"], "eval_item": 2}
    aggregates = run["aggregates"]
    assert (aggregates["items"], aggregates["scored"], aggregates["failed"]) == (4, 4, 0)
    for name in SCORES:
        mean = sum(result["scores"][name] for result in results) / 4
        assert aggregates["means"][name] == pytest.approx(mean)
    assert {row["id"] for row in listed} == {two_runs["b"]["id"], run["id"]}


def test_two_runs_compare_item_by_item(
    live: Live, tenant: Tenant, two_runs: dict[str, Any]
) -> None:
    a, b = two_runs["a"], two_runs["b"]
    with live.service.client(tenant.reader) as client:
        pages = [
            client.get("/v1/evals/compare", params={"a": a["id"], "b": b["id"], "limit": 3}).json()
        ]
        pages.append(
            client.get(
                "/v1/evals/compare",
                params={"a": a["id"], "b": b["id"], "cursor": pages[0]["next_cursor"]},
            ).json()
        )
        results = {run["id"]: _all(client, f"/v1/evals/runs/{run['id']}/results") for run in (a, b)}
    compared = pages[0]["data"] + pages[1]["data"]
    assert pages[0]["has_more"] and not pages[1]["has_more"]
    assert pages[0]["a"]["id"] == a["id"] and pages[0]["b"]["id"] == b["id"]
    assert [row["seq"] for row in compared] == [1, 2, 3, 4]
    for row, first, second in zip(compared, results[a["id"]], results[b["id"]], strict=True):
        assert row["a"]["output"] == first["output"] and row["b"]["output"] == second["output"]
        for name in SCORES:
            expected = second["scores"][name] - first["scores"][name]
            assert row["delta"][name] == pytest.approx(expected)
    for name in SCORES:
        expected = b["aggregates"]["means"][name] - a["aggregates"]["means"][name]
        assert pages[0]["delta"][name] == pytest.approx(expected)


def test_a_greedy_rerun_of_history_matches_its_references_exactly(
    live: Live, tenant: Tenant
) -> None:
    tag = f"greedy-{uuid.uuid4().hex[:8]}"
    params = {"max_tokens": 6, "temperature": 0.0}
    prompts = ["The tide", "A lighthouse keeper", "Seven owls"]
    with live.service.client(tenant.writer) as client:
        jobs = [
            client.post(
                "/v1/jobs",
                json={
                    "model": MODEL,
                    "input": {"prompt": prompt},
                    "params": params,
                    "metadata": {"tags": [tag]},
                },
            ).json()
            for prompt in prompts
        ]
        done = [wait_for_job(client, job["id"]) for job in jobs]
        outputs = {
            job["generation_id"]: client.get(f"/v1/generations/{job['generation_id']}").json()
            for job in done
        }
        eval_set = _create_set(client, from_history={"tags": [tag], "model": MODEL})
        items = _all(client, f"/v1/evals/sets/{eval_set['id']}/items")
        run = _finished(client, _start_run(client, eval_set["id"], **params)["id"])
        results = _all(client, f"/v1/evals/runs/{run['id']}/results")
    assert all(job["status"] == "succeeded" for job in done)
    assert eval_set["item_count"] == 3
    for item in items:  # newest first: the generation's input, its output the reference
        generation = outputs[item["metadata"]["generation_id"]]
        assert item["input"] == generation["input"]
        assert item["reference"] == generation["output"]
    assert sorted(item["input"]["prompt"] for item in items) == sorted(prompts)
    assert run["status"] == "succeeded"
    for result in results:
        _check_scores(result)
        assert result["output"] == result["reference"]
        assert result["scores"]["exact_match"] == 1.0
    means = run["aggregates"]["means"]
    assert means["exact_match"] == means["token_f1"] == means["rouge_l"] == 1.0
    assert means["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_items_that_fail_or_are_cancelled_still_end_the_run(live: Live, tenant: Tenant) -> None:
    # The tiny model's context is 512 tokens (bytes): this item's job fails at the worker.
    items = [{"input": "x" * 600, "reference": "never"}] + [
        {"input": f"item {n}", "reference": "r"} for n in range(8)
    ]
    with live.service.client(tenant.writer) as client:
        eval_set = _create_set(client, items=items)
        run = _start_run(client, eval_set["id"], max_tokens=16)
        pending = _all(client, f"/v1/evals/runs/{run['id']}/results")
        # Cancelled while queued, a job never reaches the worker's scoring; running, it
        # stops there; done, the cancel is refused. Whichever, the run must end.
        cancels = [client.post(f"/v1/jobs/{row['job_id']}/cancel") for row in pending[-4:]]
        finished = _finished(client, run["id"])
        results = _all(client, f"/v1/evals/runs/{run['id']}/results")
        jobs = {row["job_id"]: client.get(f"/v1/jobs/{row['job_id']}").json() for row in results}
    assert all(answer.status_code in (200, 409) for answer in cancels)
    assert finished["status"] == "succeeded"
    progress = finished["progress"]
    assert progress["done"] == progress["total"] == 9 and progress["failed"] >= 1
    assert finished["aggregates"]["failed"] == progress["failed"]
    too_long = results[0]
    assert too_long["status"] == "failed" and too_long["scores"] is None
    assert too_long["error"] == jobs[too_long["job_id"]]["error"] and "context" in too_long["error"]
    for result in results[1:]:
        job = jobs[result["job_id"]]
        if job["status"] == "succeeded":
            _check_scores(result)
        else:
            assert job["status"] == "cancelled" and result["status"] == "failed", (job, result)
            assert result["error"]


def test_another_tenant_gets_404_for_sets_and_runs(
    live: Live, tenant: Tenant, two_runs: dict[str, Any]
) -> None:
    eval_set, run = two_runs["set"], two_runs["a"]
    with live.service.client(live.other) as stranger:
        for path in (
            f"/v1/evals/sets/{eval_set['id']}",
            f"/v1/evals/sets/{eval_set['name']}",
            f"/v1/evals/sets/{eval_set['id']}/items",
            f"/v1/evals/runs/{run['id']}",
            f"/v1/evals/runs/{run['id']}/results",
        ):
            assert _error(stranger.get(path), 404)["type"] == "not_found_error"
        _error(stranger.delete(f"/v1/evals/sets/{eval_set['id']}"), 404)
        _error(stranger.get("/v1/evals/compare", params={"a": run["id"], "b": run["id"]}), 404)
        _error(
            stranger.post("/v1/evals/runs", json={"set_id": eval_set["id"], "model": MODEL}), 404
        )
        lists = stranger.get("/v1/evals/sets").text + stranger.get("/v1/evals/runs").text
    assert eval_set["id"] not in lists and run["id"] not in lists
    with live.service.client(tenant.reader) as client:
        assert client.get(f"/v1/evals/sets/{eval_set['id']}").status_code == 200


def test_compare_needs_runs_of_one_set_and_deleting_a_set_takes_its_runs(
    live: Live, tenant: Tenant, two_runs: dict[str, Any]
) -> None:
    with live.service.client(tenant.writer) as client:
        other_set = _create_set(client, items=ITEMS[:1])
        other_run = _start_run(client, other_set["id"], max_tokens=2)
        across = client.get(
            "/v1/evals/compare", params={"a": two_runs["a"]["id"], "b": other_run["id"]}
        )
        deleted = client.delete(f"/v1/evals/sets/{other_set['id']}")
        gone_set = client.get(f"/v1/evals/sets/{other_set['id']}")
        gone_run = client.get(f"/v1/evals/runs/{other_run['id']}")
    error = _error(across, 400)
    assert error["code"] == "different_sets" and error["param"] == "b"
    assert deleted.status_code == 204
    _error(gone_set, 404)
    _error(gone_run, 404)
