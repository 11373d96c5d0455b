"""The jobs API end to end: HTTP -> SQL -> broker -> worker -> model -> SQL."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import tenants
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Job
from tests.e2e.conftest import Live
from tests.utils.factories import make_job
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

TINY = "tiny-random-llama"


def submit(client, **body):  # noqa: ANN001, ANN201
    body.setdefault("model", TINY)
    body.setdefault("params", {"max_tokens": 8, "temperature": 0})
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_job_runs_and_is_stored(live: Live) -> None:
    with live.service.client(live.writer) as client:
        job = submit(
            client,
            input={"prompt": "Tell me about tides."},
            metadata={"tags": ["e2e", "tides"], "user": "ann", "tier": 2},
        )
        assert job["status"] in ("queued", "running", "succeeded")
        done = wait_for_job(client, job["id"])
        assert done["status"] == "succeeded", done
        generation = client.get(f"/v1/generations/{done['generation_id']}").json()
    assert generation["job_id"] == job["id"]
    assert generation["model"] == TINY and generation["model_version"]
    assert generation["prompt"] == "Tell me about tides."
    assert generation["usage"]["completion_tokens"] >= 1
    assert generation["usage"]["total_tokens"] == (
        generation["usage"]["prompt_tokens"] + generation["usage"]["completion_tokens"]
    )
    assert generation["finish_reason"] in ("stop", "length")
    assert generation["timings"]["generate_s"] > 0
    assert generation["metadata"]["user"] == "ann"


def test_same_seed_same_output(live: Live) -> None:
    body = {
        "input": {"prompt": "Count: one two"},
        "params": {"max_tokens": 12, "temperature": 1.0, "seed": 7},
    }
    with live.service.client(live.writer) as client:
        first = wait_for_job(client, submit(client, **body)["id"])
        second = wait_for_job(client, submit(client, **body)["id"])
        outputs = [
            client.get(f"/v1/generations/{j['generation_id']}").json()["output"]
            for j in (first, second)
        ]
    assert outputs[0] == outputs[1]


def test_filters_and_pagination(live: Live) -> None:
    with live.service.client(live.writer) as client:
        jobs = [
            submit(
                client,
                input={"prompt": f"filter test {i}"},
                metadata={"tags": ["page", f"n{i % 2}"], "user": f"u{i % 2}"},
            )
            for i in range(5)
        ]
        for job in jobs:
            wait_for_job(client, job["id"])
        tagged = client.get("/v1/generations", params={"tag": "page", "limit": 2}).json()
        assert len(tagged["data"]) == 2 and tagged["has_more"]
        seen = [g["id"] for g in tagged["data"]]
        cursor = tagged["next_cursor"]
        while cursor:
            page = client.get(
                "/v1/generations", params={"tag": "page", "limit": 2, "cursor": cursor}
            ).json()
            seen += [g["id"] for g in page["data"]]
            cursor = page["next_cursor"]
        assert len(seen) == len(set(seen)) == 5
        assert seen == sorted(seen, reverse=True)  # newest first
        both = client.get("/v1/generations", params=[("tag", "page"), ("tag", "n0")]).json()["data"]
        assert len(both) == 3
        by_user = client.get("/v1/jobs", params={"metadata": "user=u1", "tag": "page"}).json()
        assert {j["id"] for j in by_user["data"]} == {jobs[1]["id"], jobs[3]["id"]}
        succeeded = client.get("/v1/jobs", params={"status": "succeeded", "model": TINY}).json()
        assert all(j["status"] == "succeeded" for j in succeeded["data"])
        first_created = client.get(f"/v1/generations/{seen[-1]}").json()["created_at"]
        after = client.get(
            "/v1/generations", params={"tag": "page", "created_after": first_created}
        ).json()["data"]
        assert 1 <= len(after) <= 5 and seen[-1] in {g["id"] for g in after}


def test_conversation_turns(live: Live) -> None:
    with live.service.client(live.writer) as client:
        first = wait_for_job(client, submit(client, input={"prompt": "Hi, I am Ann."})["id"])
        second = wait_for_job(
            client,
            submit(
                client,
                input={"messages": [{"role": "user", "content": "Who am I?"}]},
                parent_generation_id=first["generation_id"],
            )["id"],
        )
        third = wait_for_job(
            client,
            submit(
                client,
                input={"prompt": "And again?"},
                conversation_id=first["conversation_id"],
            )["id"],
        )
        conversation = client.get(f"/v1/conversations/{first['conversation_id']}").json()
        second_gen = client.get(f"/v1/generations/{second['generation_id']}").json()
        third_gen = client.get(f"/v1/generations/{third['generation_id']}").json()
    assert [t["id"] for t in conversation["turns"]] == [
        first["generation_id"],
        second["generation_id"],
        third["generation_id"],
    ]
    assert second_gen["parent_id"] == first["generation_id"]
    assert third_gen["parent_id"] == second["generation_id"]
    # The earlier turns were given to the model: the prompt grew with the conversation.
    assert third_gen["usage"]["prompt_tokens"] > second_gen["usage"]["prompt_tokens"]


def test_idempotency_key_gives_one_job(live: Live) -> None:
    body = {"model": TINY, "input": {"prompt": "once"}, "params": {"max_tokens": 4}}
    headers = {"Idempotency-Key": f"key-{live.backend}-{time.time()}"}
    with live.service.client(live.writer) as client:
        first = client.post("/v1/jobs", json=body, headers=headers)
        second = client.post("/v1/jobs", json=body, headers=headers)
        changed = client.post(
            "/v1/jobs", json={**body, "input": {"prompt": "twice"}}, headers=headers
        )
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert changed.status_code == 409
    assert changed.json()["error"]["param"] == "Idempotency-Key"


def test_failed_generation_leaves_reason_and_worker_serves_on(live: Live) -> None:
    too_long = "word " * 700  # more tokens than the tiny model's 512-token context
    with live.service.client(live.writer) as client:
        failed = wait_for_job(client, submit(client, input={"prompt": too_long})["id"])
        after = wait_for_job(client, submit(client, input={"prompt": "still there?"})["id"])
    assert failed["status"] == "failed"
    assert "does not fit" in failed["error"] and "512" in failed["error"]
    assert after["status"] == "succeeded"


def test_jobs_share_the_batch_and_a_running_one_can_be_cancelled(live: Live) -> None:
    long = {
        "model": "smollm2-135m-instruct",
        "input": {"prompt": "Count from 1 to 1000.", "raw": True},
        "params": {"max_tokens": 1500, "temperature": 0},
    }
    with live.service.client(live.writer) as client:
        running = submit(client, **long)
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{running['id']}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Submitted while the long job decodes: it joins that job's batch.
        beside = submit(client, **{**long, "params": {"max_tokens": 8, "temperature": 0}})
        beside_done = wait_for_job(client, beside["id"], timeout=120)
        still_running = client.get(f"/v1/jobs/{running['id']}").json()["status"]
        generation = client.get(f"/v1/generations/{beside_done['generation_id']}").json()
        client.post(f"/v1/jobs/{running['id']}/cancel")
        running_done = wait_for_job(client, running["id"], timeout=60)
    assert beside_done["status"] == "succeeded" and still_running == "running"
    assert generation["timings"]["batch_peak"] >= 2
    assert running_done["status"] == "cancelled" and running_done["generation_id"] is None


def test_a_queued_job_cancelled_never_runs(live: Live) -> None:
    engine = make_engine(live.database_url)
    with make_sessionmaker(engine)() as session:
        key = tenants.get_api_key(session, plaintext=live.writer)
        assert key is not None
        job = _unpublished_job(session, key.tenant_id, "cancelled before it is published")
    engine.dispose()
    with live.service.client(live.writer) as client:
        cancelled = client.post(f"/v1/jobs/{job.id}/cancel").json()
        time.sleep(3)  # past GENSERVE_REQUEUE_AFTER_S: the sweeper must leave it alone
        done = client.get(f"/v1/jobs/{job.id}").json()
        again = client.post(f"/v1/jobs/{job.id}/cancel")
    assert cancelled["status"] == "cancelled"
    assert done["status"] == "cancelled" and done["attempts"] == 0
    assert again.status_code == 200


def _unpublished_job(session: Session, tenant_id: int, prompt: str) -> Job:
    """A job committed but not published, as if the API died between the two steps."""
    job = make_job(session, tenant_id, model=TINY, prompt=prompt, max_tokens=4)
    assert session.scalar(select(Job.published_at).where(Job.id == job.id)) is None
    return job


def test_lost_publish_is_recovered_by_the_sweeper(live: Live) -> None:
    """A job committed but never published (the API died in between) still completes."""
    engine = make_engine(live.database_url)
    with make_sessionmaker(engine)() as session:
        key = tenants.get_api_key(session, plaintext=live.writer)
        assert key is not None
        job = _unpublished_job(session, key.tenant_id, "never published")
    engine.dispose()
    with live.service.client(live.writer) as client:
        done = wait_for_job(client, job.id, timeout=60)
    assert done["status"] == "succeeded"
