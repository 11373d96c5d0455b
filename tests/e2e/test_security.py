"""Keys an admin manages, per-key rates and per-tenant quotas, PII redaction, the audit
log, text SQL cannot hold, and deletion that forgets, against the real service."""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import text

from service.db.session import make_engine
from tests.e2e.conftest import Live
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

JOB = {"model": "tiny-random-llama", "params": {"max_tokens": 4}}


def submit(client: httpx.Client, prompt: str) -> httpx.Response:
    return client.post("/v1/jobs", json={**JOB, "input": {"prompt": prompt}})


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def rows(live: Live, sql: str, **params: object) -> list[tuple]:
    engine = make_engine(live.database_url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]
    finally:
        engine.dispose()


def fresh_tenant(live: Live, role: str = "admin") -> tuple[str, str]:
    tenant = f"t{secrets.token_hex(4)}"
    return tenant, live.service.create_key(tenant, role)


def test_an_admin_creates_lists_and_revokes_keys_and_the_audit_log_has_it(live: Live) -> None:
    tenant, admin = fresh_tenant(live)
    _, other_admin = fresh_tenant(live)
    with live.service.client(admin) as client:
        expires = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        created = client.post(
            "/v1/keys", json={"role": "reader", "name": "ci", "expires_at": expires}
        )
        assert created.status_code == 201, created.text
        new = created.json()
        assert new["key"].startswith(new["prefix"]) and new["role"] == "reader"
        listed = client.get("/v1/keys").json()["data"]
        assert {k["id"] for k in listed} >= {new["id"]}
        assert all("key" not in k for k in listed)
        with live.service.client(new["key"]) as reader:
            assert reader.get("/v1/jobs").status_code == 200
            error_of(reader.post("/v1/keys", json={}), 403)
            revoked = client.delete(f"/v1/keys/{new['id']}")
            assert revoked.status_code == 200 and revoked.json()["revoked_at"]
            assert error_of(reader.get("/v1/jobs"), 401)["code"] == "invalid_api_key"
        error_of(client.post("/v1/keys", json={"role": "root"}), 400)
        error_of(client.post("/v1/keys", json={"expires_at": "2001-01-01T00:00:00Z"}), 400)
        error_of(client.post("/v1/keys", json={"tenant_id": 1}), 400)
        events = client.get("/v1/audit").json()["data"]
    assert [e["action"] for e in events[:2]] == ["key.revoke", "key.create"]
    assert events[0]["target"] == f"key:{new['id']}" and events[0]["actor_role"] == "admin"
    assert events[-1]["actor"] == "cli"  # the admin key itself, made by `genserve keys create`
    with live.service.client(other_admin) as stranger:
        error_of(stranger.get(f"/v1/keys/{new['id']}"), 404)
        error_of(stranger.delete(f"/v1/keys/{new['id']}"), 404)
        assert stranger.get("/v1/audit").json()["data"][0]["target"] != f"key:{new['id']}"
    with live.service.client(live.writer) as writer:
        error_of(writer.get("/v1/audit"), 403)
        error_of(writer.patch("/v1/tenant", json={"redact_pii": True}), 403)
    # The operator's side: list and revoke from the command line, audited as "cli".
    with live.service.client(admin) as client:
        spare = client.post("/v1/keys", json={"name": "spare"}).json()
    live.service.cli("keys", "revoke", "--tenant", tenant, str(spare["id"]))
    listed = live.service.cli("keys", "list", "--tenant", tenant)
    assert f"{spare['id']}\t{spare['prefix']}…\treader\trevoked\tspare" in listed
    with live.service.client(spare["key"]) as revoked_key:
        error_of(revoked_key.get("/v1/jobs"), 401)
    with live.service.client(admin) as client:
        latest = client.get("/v1/audit").json()["data"][0]
    assert (latest["action"], latest["actor"]) == ("key.revoke", "cli")


def test_a_key_over_its_rate_gets_429_with_retry_after(live: Live) -> None:
    _, admin = fresh_tenant(live)
    with live.service.client(admin) as client:
        limited = client.post("/v1/keys", json={"role": "reader", "rate_limit_per_minute": 2})
        limited_key = limited.json()["key"]
    with live.service.client(limited_key) as client:
        answers = [client.get("/v1/generations") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert error_of(answers[2], 429)["code"] == "rate_limit_exceeded"
    assert 1 <= int(answers[2].headers["Retry-After"]) <= 30
    with live.service.client(admin) as client:  # another key of the tenant is not limited
        assert all(client.get("/v1/generations").status_code == 200 for _ in range(3))


def test_quotas_of_the_day_refuse_with_429_until_midnight(live: Live) -> None:
    tenant, writer = fresh_tenant(live, "writer")
    live.service.cli("tenants", "set", tenant, "--requests-per-day", "2")
    with live.service.client(writer) as client:
        answers = [submit(client, f"quota {i}") for i in range(3)]
        usage = client.get("/v1/tenant").json()
    assert [a.status_code for a in answers] == [202, 202, 429]
    assert error_of(answers[2], 429)["code"] == "quota_exceeded"
    assert 0 < int(answers[2].headers["Retry-After"]) <= 86_400
    assert usage["requests_per_day"] == 2 and usage["usage_today"]["requests"] == 2

    with live.service.client(writer) as client:
        for answer in answers[:2]:
            wait_for_job(client, answer.json()["id"])
        used = client.get("/v1/tenant").json()["usage_today"]
    tokens = used["prompt_tokens"] + used["completion_tokens"]
    assert tokens > 0
    live.service.cli(
        "tenants", "set", tenant, "--requests-per-day", "0", "--tokens-per-day", str(tokens + 1)
    )
    with live.service.client(writer) as client:
        first = submit(client, "tokens")
        assert first.status_code == 202, first.text
        wait_for_job(client, first.json()["id"])
        refused = submit(client, "more tokens")
    assert error_of(refused, 429)["code"] == "quota_exceeded"


def test_a_tenant_that_redacts_never_stores_or_indexes_the_pii(live: Live) -> None:
    tenant, admin = fresh_tenant(live)
    with live.service.client(admin) as client:
        updated = client.patch("/v1/tenant", json={"redact_pii": True})
        assert updated.status_code == 200 and updated.json()["redact_pii"] is True
        error_of(client.patch("/v1/tenant", json={"tokens_per_day": 10**9}), 400)
        secret_mail = f"jane.{secrets.token_hex(3)}@example.com"
        prompt = f"Mail {secret_mail} or call +1 202 555 0143 from 10.1.2.3"
        job = wait_for_job(client, submit(client, prompt).json()["id"])
        generation = client.get(f"/v1/generations/{job['generation_id']}").json()
        found = client.post("/v1/search", json={"query": secret_mail, "mode": "keyword"})
        audit = client.get("/v1/audit", params={"action": "tenant.update"}).json()["data"]
    assert job["input"]["prompt"] == "Mail [EMAIL] or call [PHONE] from [IP]"
    assert generation["prompt"] == job["input"]["prompt"]
    assert found.status_code == 200 and found.json()["data"] == []
    assert audit[0]["detail"] == {"redact_pii": {"from": False, "to": True}}
    stored = rows(live, "SELECT input FROM jobs WHERE id = :id", id=job["id"])
    assert secret_mail not in str(stored) and "[EMAIL]" in str(stored)
    assert tenant


def test_text_sql_cannot_hold_is_refused_and_emoji_round_trip(live: Live) -> None:
    with live.service.client(live.writer) as client:
        # A lone surrogate, escaped as JSON allows; httpx would refuse to encode it.
        lone = client.post(
            "/v1/jobs",
            content=b'{"model": "tiny-random-llama", "input": {"prompt": "a\\ud800b"}}',
            headers={"content-type": "application/json"},
        )
        nul_path = client.get("/v1/jobs/job%00x")
        nul_query = client.get("/v1/generations", params={"model": "a\x00b"})
        nul_chat = client.post(
            "/v1/chat/completions",
            json={"model": "tiny-random-llama", "messages": [{"role": "user", "content": "\x00"}]},
        )
        emoji = "🦜🌊" * 4000  # 32 kB of four-byte characters
        stored = submit(client, emoji)
        # The same as surrogate pairs ("\\ud83e\\udd9c"), as json.dumps writes by default.
        escaped = json.dumps({**JOB, "input": {"prompt": emoji[:1000]}}).encode()
        paired = client.post(
            "/v1/jobs", content=escaped, headers={"content-type": "application/json"}
        )
        job = wait_for_job(client, stored.json()["id"])
        oversized = submit(client, "😀" * 250_000)  # a megabyte
    assert error_of(lone, 400) == {
        "message": "input.prompt contains an unpaired surrogate (U+D800); "
        "text must be valid Unicode",
        "type": "invalid_request_error",
        "param": "input.prompt",
        "code": "invalid_text",
    }
    assert error_of(nul_path, 400)["param"] == "path"
    assert error_of(nul_query, 400)["param"] == "model"
    assert error_of(nul_chat, 400)["param"] == "messages.0.content"
    assert paired.status_code == 202 and paired.json()["input"]["prompt"] == emoji[:1000]
    assert job["input"]["prompt"] == emoji  # stored and returned exactly, whatever the job did
    assert error_of(oversized, 413)["code"] == "payload_too_large"


def test_deleting_a_generation_or_a_tenant_forgets_its_text(live: Live) -> None:
    word = f"zyx{secrets.token_hex(4)}"
    with live.service.client(live.writer) as client:
        job = wait_for_job(client, submit(client, f"remember {word} please").json()["id"])
        generation_id = job["generation_id"]
        hits = client.post("/v1/search", json={"query": word, "mode": "keyword"}).json()["data"]
        assert [h["generation"]["id"] for h in hits] == [generation_id]
        assert client.delete(f"/v1/generations/{generation_id}").status_code == 204
        error_of(client.get(f"/v1/generations/{generation_id}"), 404)
        error_of(client.get(f"/v1/jobs/{job['id']}"), 404)
        for mode in ("keyword", "vector", "hybrid"):
            found = client.post("/v1/search", json={"query": f"remember {word}", "mode": mode})
            assert generation_id not in {h["generation"]["id"] for h in found.json()["data"]}
    for table, column in (("jobs", "input"), ("generations", "prompt")):
        assert (
            rows(
                live, f"SELECT id FROM {table} WHERE CAST({column} AS TEXT) LIKE :w", w=f"%{word}%"
            )
            == []
        )
    assert rows(live, "SELECT id FROM embeddings WHERE generation_id = :g", g=generation_id) == []

    tenant, writer = fresh_tenant(live, "writer")
    with live.service.client(writer) as client:
        doomed = wait_for_job(client, submit(client, f"doomed {word}").json()["id"])
    (tenant_id,) = rows(live, "SELECT id FROM tenants WHERE name = :n", n=tenant)[0]
    live.service.cli("tenants", "delete", tenant, "--yes")
    with live.service.client(writer) as client:
        error_of(client.get(f"/v1/jobs/{doomed['id']}"), 401)
    for table in ("jobs", "generations", "embeddings", "api_keys", "conversations"):
        assert rows(live, f"SELECT 1 FROM {table} WHERE tenant_id = :t", t=tenant_id) == []
    logged = rows(
        live, "SELECT count(*) FROM embedding_deletions WHERE tenant_id = :t", t=tenant_id
    )
    assert logged == [(2,)]  # the index drops both vectors of the generation
    audit = rows(live, "SELECT action FROM audit_events WHERE tenant_id = :t", t=tenant_id)
    assert ("tenant.delete",) in audit


# Which of tenant A's objects fills each path parameter; the prefix tells the two kinds of
# job apart. Every templated route of the OpenAPI schema must be here, so a new route is
# walked (or this test fails) from the day it is added.
PATH_OBJECTS = {
    ("/v1/training-jobs/", "job_id"): "training_job",
    ("/v1/jobs/", "job_id"): "job",
    ("/v1/generations/", "generation_id"): "generation",
    ("/v1/conversations/", "conversation_id"): "conversation",
    ("/v1/chat/completions/", "completion_id"): "completion",
    ("/v1/files/", "file_id"): "file",
    ("/v1/batches/", "batch_id"): "batch",
    ("/v1/keys/", "key_id"): "key",
    ("/v1/models/", "model"): "model",
    ("/v1/models/", "name"): "model",
    ("/v1/models/", "version"): "version",
    ("/v1/collections/", "collection"): "collection",
    ("/v1/collections/", "document_id"): "document",
    ("/v1/collections/", "ingestion_id"): "ingestion",
    ("/v1/evals/sets/", "set_id"): "eval_set",
    ("/v1/evals/runs/", "run_id"): "eval_run",
    ("/v1/exports/", "export_id"): "export",
}
BODIES = {
    ("POST", "/v1/chat/completions/{completion_id}"): {"metadata": {"k": "v"}},
    ("POST", "/v1/collections/{collection}/documents"): {
        "documents": [{"id": "b", "text": "tenant B's document"}]
    },
    ("POST", "/v1/collections/{collection}/search"): {"query": "isolation probe"},
    ("PATCH", "/v1/generations/{generation_id}"): {"tags": ["from-b"]},
    ("POST", "/v1/generations/{generation_id}/feedback"): {"score": 1},
}


def _objects_of_a_tenant(client: httpx.Client) -> dict[str, str]:
    """One of everything a tenant can own, made through the API."""
    job = wait_for_job(client, submit(client, "isolation probe").json()["id"])
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny-random-llama",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "store": True,
        },
    )
    line = {
        "custom_id": "c1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "x"}]},
    }
    batch_file = client.post(
        "/v1/files",
        files={"file": ("b.jsonl", json.dumps(line).encode() + b"\n")},
        data={"purpose": "batch"},
    ).json()
    batch = client.post(
        "/v1/batches",
        json={
            "input_file_id": batch_file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    ).json()
    dataset = client.post(
        "/v1/files",
        files={"file": ("t.txt", b"the tide comes in and goes out. " * 40)},
        data={"purpose": "fine-tune"},
    ).json()
    config = {"hidden_size": 8, "embedding_size": 4, "seq_len": 16, "batch_size": 4}
    training = client.post(
        "/v1/training-jobs",
        json={
            "name": "iso-rnn",
            "arch": "char_rnn",
            "dataset_file_id": dataset["id"],
            "config": {**config, "epochs": 1, "steps_per_epoch": 2},
        },
    ).json()
    key = client.post("/v1/keys", json={"role": "reader"}).json()
    collection = client.post("/v1/collections", json={"name": "iso-docs"}).json()
    ingestion = client.post(
        f"/v1/collections/{collection['id']}/documents",
        json={"documents": [{"id": "iso", "text": "isolation probe document"}]},
    ).json()
    eval_set = client.post(
        "/v1/evals/sets", json={"name": "iso-set", "items": [{"input": "hi", "reference": "x"}]}
    ).json()
    eval_run = client.post(
        "/v1/evals/runs",
        json={"set_id": eval_set["id"], "model": "tiny-random-llama", "params": {"max_tokens": 2}},
    ).json()
    export = client.post("/v1/exports", json={"filters": {"tags": ["isolation"]}}).json()
    deadline = time.monotonic() + 120
    while client.get(f"/v1/training-jobs/{training['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the training job did not succeed"
        time.sleep(0.3)
    documents = f"/v1/collections/{collection['id']}/documents"
    while not (listed := client.get(documents).json()["data"]):
        assert time.monotonic() < deadline, "the document was not ingested"
        time.sleep(0.3)
    return {
        "job": job["id"],
        "generation": job["generation_id"],
        "conversation": job["conversation_id"],
        "completion": chat.json()["id"],
        "file": batch_file["id"],
        "batch": batch["id"],
        "training_job": training["id"],
        "model": "iso-rnn",
        "version": "1",
        "key": str(key["id"]),
        "collection": str(collection["id"]),
        "document": listed[0]["id"],
        "ingestion": ingestion["id"],
        "eval_set": eval_set["id"],
        "eval_run": eval_run["id"],
        "export": export["id"],
    }


def _fill(path: str, objects: dict[str, str]) -> str:
    for (prefix, param), kind in PATH_OBJECTS.items():
        if path.startswith(prefix) and "{" + param + "}" in path:
            path = path.replace("{" + param + "}", objects[kind])
    assert "{" not in path, f"no object of tenant A for the parameters of {path}"
    return path


def test_another_tenant_gets_404_on_every_route_and_sees_nothing_in_lists(live: Live) -> None:
    _, admin_a = fresh_tenant(live)
    _, admin_b = fresh_tenant(live)
    with live.service.client(admin_a) as a:
        objects = _objects_of_a_tenant(a)
        before = {
            "job": a.get(f"/v1/jobs/{objects['job']}").json()["status"],
            "batch": a.get(f"/v1/batches/{objects['batch']}").json()["status"],
        }
        paths = a.get("/openapi.json").json()["paths"]
    walked = []
    with live.service.client(admin_b) as b:
        for template, operations in paths.items():
            for method in operations:
                if "{" not in template:
                    continue
                url = _fill(template, objects)
                body = BODIES.get((method.upper(), template))
                answer = b.request(method.upper(), url, json=body)
                assert answer.status_code == 404, (method, url, answer.text)
                assert answer.json()["error"]["type"] == "not_found_error"
                walked.append((method, template))
        lists = [
            b.get(path).text
            for path, operations in paths.items()
            if "{" not in path and "get" in operations and path.startswith("/v1/")
        ]
        lists.append(b.post("/v1/search", json={"query": "isolation probe"}).text)
    assert len(walked) >= 20
    for text_ in lists:
        leaked = [kind for kind, value in objects.items() if len(value) > 2 and value in text_]
        assert not leaked, (leaked, text_[:300])
    with live.service.client(admin_a) as a:  # nothing of A's was changed by B
        assert a.get(f"/v1/generations/{objects['generation']}").status_code == 200
        assert a.get(f"/v1/keys/{objects['key']}").json()["revoked_at"] is None
        document = f"/v1/collections/{objects['collection']}/documents/{objects['document']}"
        assert a.get(document).status_code == 200
        assert a.get(f"/v1/files/{objects['file']}").status_code == 200
        assert a.get(f"/v1/jobs/{objects['job']}").json()["status"] == before["job"]
        assert a.get(f"/v1/chat/completions/{objects['completion']}").json()["metadata"] != {
            "k": "v"
        }
        assert a.get(f"/v1/batches/{objects['batch']}").json()["status"] in (
            before["batch"],
            "in_progress",
            "finalizing",
            "completed",
        )
