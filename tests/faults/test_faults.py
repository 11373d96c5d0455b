"""Faults injected into real processes; every accepted job completes exactly once.

Each test submits a known set of jobs, injects one fault, waits for every job to end,
and counts from SQL what became of them (tests/faults/tally.py): submitted = completed +
failed with a reason, nothing lost, nothing duplicated. Rows go to the results file that
`python -m tests.faults.report` prints.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from tests.faults.conftest import Faulty
from tests.faults.tally import Row, count_jobs, deliveries, generation_ids, record, tally
from tests.utils.server import TERMINAL, RemoteService, free_port

MODEL = "tiny-random-llama"


def body(index: int, fault: str) -> dict:
    return {
        "model": MODEL,
        "input": {"prompt": f"{fault} job {index}: the tide comes in"},
        "params": {"max_tokens": 200, "temperature": 0.0},
        "metadata": {"fault": fault},
    }


def submit(client: httpx.Client, count: int, fault: str) -> list[str]:
    ids = []
    for index in range(count):
        response = client.post("/v1/jobs", json=body(index, fault))
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def statuses(client: httpx.Client, ids: list[str]) -> list[str]:
    return [client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def settle(faulty: Faulty, fault: str, ids: list[str], timeout: float = 120) -> Row:
    """Wait for every job to end, then count and record what became of them."""
    with faulty.service.client(faulty.key) as client:
        wait_until(
            lambda: all(s in TERMINAL for s in statuses(client, ids)),
            timeout,
            f"{fault}: jobs still open: {statuses(client, ids)}",
        )
    row = tally(fault, faulty.database_url, ids)
    record(row)
    return row


def test_worker_sigkilled_mid_generation(faulty: Faulty) -> None:
    with faulty.service.client(faulty.key) as client:
        ids = submit(client, 12, "worker_sigkill")
        wait_until(lambda: "running" in statuses(client, ids), 60, "no job started")
        # SIGKILL: no warm shutdown, no acknowledgement, leases stop being renewed.
        faulty.service.stop_process("worker", signal.SIGKILL)
        unfinished = [s for s in statuses(client, ids) if s != "succeeded"]
    assert "running" in unfinished  # the kill landed mid-generation
    faulty.service.start_process("worker", "worker")
    row = settle(faulty, "worker_sigkill", ids)
    assert row == Row("worker_sigkill", 12, 12, 0, 0, 0), faulty.service.logs("worker")
    # The jobs the dead worker held were claimed again (attempts counted in SQL).
    attempts = [claimed for claimed, _ in deliveries(faulty.database_url, ids).values()]
    assert max(attempts) >= 2


def test_broker_restart_forgets_the_queued_messages(faulty: Faulty) -> None:
    faulty.service.stop_process("worker")
    with faulty.service.client(faulty.key) as client:
        ids = submit(client, 12, "broker_restart")
    # What a Redis without persistence looks like after a restart: no messages, and
    # every client's connection dropped.
    broker = redis.Redis.from_url(faulty.redis_url)
    assert broker.dbsize() > 0  # the messages were there
    broker.flushdb()
    broker.client_kill_filter(_type="normal", skipme=True)
    faulty.service.start_process("worker", "worker")
    row = settle(faulty, "broker_restart", ids)
    assert row == Row("broker_restart", 12, 12, 0, 0, 0), faulty.service.logs("worker")
    # Every job ran from a second publish: the sweeper's, from SQL.
    assert all(published >= 2 for _, published in deliveries(faulty.database_url, ids).values())


def test_api_killed_between_commit_and_publish(faulty: Faulty) -> None:
    """The client retries with its Idempotency-Key against another API process: it gets
    the job the dead one committed, and the sweeper publishes it."""
    ids = []
    for index in range(3):
        crashing = start_api(
            faulty.service, f"api-crash-{index}", failpoints="submit.before_publish"
        )
        key = f"crash-{uuid.uuid4()}"
        payload = body(index, "api_crash")
        with httpx.Client(base_url=crashing, timeout=30) as client:
            try:
                response = client.post(
                    "/v1/jobs",
                    json=payload,
                    headers={"Authorization": f"Bearer {faulty.key}", "Idempotency-Key": key},
                )
                raise AssertionError(f"the API answered instead of dying: {response.text}")
            except httpx.TransportError:
                pass
        with faulty.service.client(faulty.key) as client:
            retried = client.post("/v1/jobs", json=payload, headers={"Idempotency-Key": key})
            assert retried.status_code == 202, retried.text
            ids.append(retried.json()["id"])
    row = settle(faulty, "api_killed_before_publish", ids)
    assert row == Row("api_killed_before_publish", 3, 3, 0, 0, 0)


def test_database_unreachable_for_30_s(faulty: Faulty) -> None:
    """The API refuses what it cannot store (503, Retry-After); workers retry with backoff
    and finish their jobs when the database returns."""
    with faulty.service.client(faulty.key) as client:
        ids = submit(client, 8, "database_outage")
        wait_until(lambda: "running" in statuses(client, ids), 60, "no job started")
        faulty.proxy.down()
        gone = time.monotonic()
        try:
            refused = client.post("/v1/jobs", json=body(99, "database_outage"))
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == (
                "database_unavailable"
            )
            assert client.get(f"/v1/jobs/{ids[0]}").status_code == 503
            time.sleep(max(0.0, 30 - (time.monotonic() - gone)))
        finally:
            faulty.proxy.up()
    row = settle(faulty, "database_outage", ids, timeout=240)
    assert row == Row("database_outage", 8, 8, 0, 0, 0), faulty.service.logs("worker")
    # The refused submission left nothing behind, and the worker's stores were retried.
    assert count_jobs(faulty.database_url, fault="database_outage") == 8
    worker_log = (faulty.service.log_dir / "worker.log").read_text(errors="replace")
    assert "retry: Retry in" in worker_log and "OperationalError" in worker_log


def test_same_idempotency_key_sent_twice_at_once(faulty: Faulty) -> None:
    keys = [f"twice-{uuid.uuid4()}" for _ in range(8)]

    def send(index: int) -> str:
        with faulty.service.client(faulty.key) as client:
            response = client.post(
                "/v1/jobs",
                json=body(index % 8, "duplicate_request"),
                headers={"Idempotency-Key": keys[index % 8]},
            )
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(16)))
    assert answers[:8] == answers[8:]  # both sends of a key got the same job
    row = settle(faulty, "duplicate_request", answers[:8])
    assert row == Row("duplicate_request", 8, 8, 0, 0, 0)


def start_api(service: RemoteService, name: str, *, failpoints: str) -> str:
    """Another API process on the same database and broker, with failpoints armed."""
    port = free_port()
    saved = service.env
    service.env = {**saved, "GENSERVE_FAILPOINTS": failpoints}
    try:
        service.start_process(name, "api", "--port", str(port))
    finally:
        service.env = saved
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _healthy(url), 60, f"{name} did not start")
    return url


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def search_all(client: httpx.Client) -> httpx.Response:
    """A vector search whose page holds every generation of these tests."""
    query = {"query": "the tide comes in", "mode": "vector", "target": "output", "k": 100}
    return client.post("/v1/search", json=query)


def index_row(fault: str, expected: set[str], found: list[str]) -> Row:
    """What a search found against the table: missing ids are lost, extra ones duplicated."""
    assert len(expected) < 100  # every generation fits in one page of hits
    return Row(
        fault,
        submitted=len(expected),
        completed=len(set(found) & expected),
        failed=0,
        lost=len(expected - set(found)),
        duplicated=len(found) - len(set(found)) + len(set(found) - expected),
    )


def test_index_writer_killed_while_another_api_shares_the_directory(faulty: Faulty) -> None:
    """Two API processes share one index directory; the one that persists it is killed.
    The other takes over persisting, and the index it leaves loads sound and holds exactly
    the table's generations."""
    service = faulty.service
    other = start_api(service, "api-b", failpoints="")
    with httpx.Client(
        base_url=other, headers={"Authorization": f"Bearer {faulty.key}"}, timeout=30
    ) as client:
        ids = submit(client, 8, "index_writer_killed")
        wait_until(
            lambda: all(s in TERMINAL for s in statuses(client, ids)), 120, "jobs still open"
        )
        assert tally("index_writer_killed", faulty.database_url, ids).completed == 8
        service.stop_process("api", signal.SIGKILL)  # the first process: the writer
        wait_until(
            lambda: "this process persists it" in service.logs("api-b"),
            30,
            "the surviving API did not take over the index",
        )
        expected = generation_ids(faulty.database_url, tenant="acme")
        survivor = [hit["generation"]["id"] for hit in search_all(client).json()["data"]]
    assert index_row("index_writer_killed", expected, survivor).lost == 0
    service.stop_process("api-b")  # SIGTERM: the new writer persists on the way out
    service.start_process("api", "api", "--port", str(service.port))
    service.wait_healthy()
    with service.client(faulty.key) as client:
        answer = search_all(client)  # at once: a sound index loads, nothing is rebuilt
        assert answer.status_code == 200, answer.text
        found = [hit["generation"]["id"] for hit in answer.json()["data"]]
    row = index_row("index_writer_killed", expected, found)
    record(row)
    assert row == Row("index_writer_killed", len(expected), len(expected), 0, 0, 0)


def test_index_file_corrupted(faulty: Faulty) -> None:
    """A truncated index file is caught by its checksum and rebuilt from SQL; the rebuilt
    index holds exactly the generations the table holds. (Last: it searches them all.)"""
    service = faulty.service
    service.stop_process("api")  # SIGTERM: the index is persisted on the way out
    manifest_path = next((Path(service.env["GENSERVE_DATA_DIR"]) / "index").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest["count"] > 0
    for shard in manifest["shards"]:
        path = manifest_path.parent / shard["file"]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    service.start_process("api", "api", "--port", str(service.port))
    service.wait_healthy()
    expected = generation_ids(faulty.database_url, tenant="acme")
    with service.client(faulty.key) as client:
        wait_until(lambda: search_all(client).status_code == 200, 120, "the index was not rebuilt")
        found = [hit["generation"]["id"] for hit in search_all(client).json()["data"]]
    row = index_row("index_corrupted", expected, found)
    record(row)
    assert row == Row("index_corrupted", len(expected), len(expected), 0, 0, 0)
    api_log = (service.log_dir / "api.log").read_text(errors="replace")
    assert "checksum does not match the manifest" in api_log  # caught, not just reloaded
