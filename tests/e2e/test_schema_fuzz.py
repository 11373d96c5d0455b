"""Schema fuzzing: schemathesis drives every operation of the live API's OpenAPI schema.

One real API and worker on the production backend (PostgreSQL + Redis), serving only the
tiny random Llama. Before fuzzing, one resource of each kind is made through the API (a
job with its generation and conversation, an image generation, stored chat completions,
files, a batch, a training job, an export). Identifiers in paths, queries and bodies are
drawn from those ids, so cases get past "not found"; every string in a request body, and the string
query parameters, sometimes carry an edge string that breaks storage layers (NUL among
them). schemathesis itself never puts NUL in a path segment.

The schema comes from the running server's /openapi.json and every case carries a writer
key. Each response must not be a 5xx, must carry a status code and a content type the
operation documents, and its body must match the documented schema. Streamed answers
(text/event-stream) declare no body schema, so only their status and content type are
checked. The run is derandomized: a failure reproduces on the next run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import create_pg_database, drop_pg_database
from tests.utils.server import RemoteService, wait_for_job

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

SERVED = "tiny-random-llama"
# Fuzzing cases per operation. The coverage phase is off: its boundary cases (~1500
# requests) add 20-40 s on two cores, and random cases with seeded ids found more.
MAX_EXAMPLES = 15
# A chat answer waits for the worker; a slower answer than this is a hung request.
REQUEST_TIMEOUT_S = 60
# The checks that make the schema a contract: no server errors, and every answer documented.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
# Strings that commonly break storage and parsing layers: NUL (PostgreSQL text refuses
# it), a bidi override, an astral-plane emoji, quotes, blank and empty. None changes which
# route a path reaches (schemathesis drops the empty one from paths itself), so a response
# is always judged against the operation that was called.
EDGE_STRINGS = ["\x00", "nul\x00inside", "\u202e", "\U0001f4a5", "'\"", " ", ""]
EDGE_PROBABILITY = 0.1
# Identifiers, by the dictionary of seeded ids they draw from.
ID_BINDINGS = {
    "path.job_id": "job-ids",
    "path.generation_id": "generation-ids",
    "path.conversation_id": "conversation-ids",
    "path.completion_id": "completion-ids",
    "path.file_id": "file-ids",
    "path.batch_id": "batch-ids",
    "path.export_id": "export-ids",
    "path.model": "model-names",
    "path.name": "model-names",
    "path.version": "model-versions",
    "query.model": "model-names",
    "query.conversation_id": "conversation-ids",
    "body.model": "model-names",
    "body.conversation_id": "conversation-ids",
    "body.parent_generation_id": "generation-ids",
    "body.input_file_id": "file-ids",
    "body.dataset_file_id": "file-ids",
    "body.filters.model": "model-names",
    "body.filters.conversation_id": "conversation-ids",
    "body.snapshot": "generation-ids",
}
# DELETE operations get resources of their own, so reads keep theirs for the whole run.
DELETE_BINDINGS = {
    "path.generation_id": "doomed-generation-ids",
    "path.completion_id": "doomed-completion-ids",
    "path.file_id": "doomed-file-ids",
}
ID_PROBABILITY = 0.6
# String query parameters whose schema is `anyOf: [string, null]`, which schemathesis's
# type-wide string dictionary does not reach.
EDGE_QUERY_PARAMETERS = ("query.after", "query.cursor", "query.purpose")


@dataclass
class FuzzTarget:
    service: RemoteService
    writer: str
    # Dictionary name -> values: the seeded ids of one kind.
    seeded: dict[str, list[Any]]


def _env(database_url: str, broker_url: str, cache: Path) -> dict[str, str]:
    return {
        "GENSERVE_CHAT_MODELS": SERVED,
        "GENSERVE_MODEL_CACHE_DIR": str(cache),
        "GENSERVE_DEVICE": "cpu",
        "GENSERVE_DATABASE_URL": database_url,
        "GENSERVE_BROKER_URL": broker_url,
        # No train queue: training jobs the fuzzer creates stay queued instead of taking
        # the CPU; the API's side of them (create, read, cancel) is what is under test.
        "GENSERVE_WORKER_QUEUES": "interactive,embed,batch",
        # Quick sweeps, as in the other e2e fixtures: a job published before the worker
        # bound its queue is sent again instead of staying queued.
        "GENSERVE_SWEEP_INTERVAL_S": "0.5",
        "GENSERVE_REQUEUE_AFTER_S": "2",
        "GENSERVE_MAX_BODY_BYTES": "65536",
    }


def _created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code in (200, 202), response.text
    return dict(response.json())


def _finished(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    job = wait_for_job(client, job["id"])
    assert job["status"] == "succeeded", job
    return job


def _chat(client: httpx.Client) -> str:
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "store": True,
        "metadata": {"seeded": "yes"},
    }
    return str(_created(client.post("/v1/chat/completions", json=body))["id"])


def _upload(client: httpx.Client, purpose: str, name: str, content: str) -> str:
    files = {"file": (name, content.encode(), "application/octet-stream")}
    return str(_created(client.post("/v1/files", data={"purpose": purpose}, files=files))["id"])


def seed(client: httpx.Client) -> dict[str, list[Any]]:
    """One resource of each kind, made through the API; their ids by dictionary name."""
    text = {"model": SERVED, "input": {"prompt": "hello"}, "params": {"max_tokens": 4}}
    image = {"model": "digits-diffusion", "input": {"images": {"steps": 2}}}
    jobs = [_created(client.post("/v1/jobs", json=body)) for body in (text, image, text)]
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]},
    }
    batch_file = _upload(client, "batch", "requests.jsonl", json.dumps(line) + "\n")
    batch = {
        "input_file_id": batch_file,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    dataset = _upload(client, "fine-tune", "corpus.txt", "hello world\n" * 20)
    training = {"name": "fuzz-char-rnn", "arch": "char_rnn", "dataset_file_id": dataset}
    text_job, image_job, doomed_job = (_finished(client, job) for job in jobs)
    training_job = _created(client.post("/v1/training-jobs", json=training))
    # Cancelled, its event stream ends at once; a queued one's waits for a worker forever.
    _created(client.post(f"/v1/training-jobs/{training_job['id']}/cancel"))
    return {
        "job-ids": [text_job["id"], training_job["id"]],
        "generation-ids": [text_job["generation_id"], image_job["generation_id"]],
        "doomed-generation-ids": [doomed_job["generation_id"]],
        "conversation-ids": [text_job["conversation_id"]],
        "completion-ids": [_chat(client)],
        "doomed-completion-ids": [_chat(client)],
        "file-ids": [batch_file, dataset],
        "doomed-file-ids": [_upload(client, "user_data", "scratch.txt", "scratch\n")],
        "batch-ids": [_created(client.post("/v1/batches", json=batch))["id"]],
        "export-ids": [_created(client.post("/v1/exports", json={"limit": 2}))["id"]],
        "model-names": [SERVED, "all-minilm-l6-v2", "digits-diffusion", "pydoc-char-rnn"],
        "model-versions": [1],
    }


@pytest.fixture(scope="module")
def fuzz_target(
    tmp_path_factory: pytest.TempPathFactory,
    model_cache_dir: Path,
    postgres_available: None,
    redis_url: str,
) -> Iterator[FuzzTarget]:
    data_dir = tmp_path_factory.mktemp("fuzz-postgres")
    database_url = create_pg_database()
    service = RemoteService(
        data_dir=data_dir, env=_env(database_url, redis_url, model_cache_dir), log_dir=data_dir
    )
    try:
        service.start()
        writer = service.create_key("acme", "writer")
        with service.client(writer) as client:
            seeded = seed(client)
        yield FuzzTarget(service=service, writer=writer, seeded=seeded)
    finally:
        service.close()
        drop_pg_database(database_url)


def string_leaves(
    schema: Any, components: dict[str, Any], path: str = "body", seen: frozenset[str] = frozenset()
) -> set[str]:
    """Binding keys (`body.a.b`, `body.a[*]`) of every string a request body can hold."""
    if not isinstance(schema, dict):
        return set()
    ref = schema.get("$ref")
    if isinstance(ref, str):
        # A schema that contains itself is walked once along each path.
        name = ref.rsplit("/", 1)[-1]
        if name in seen:
            return set()
        return string_leaves(components[name], components, path, seen | {name})
    leaves = {path} if schema.get("type") == "string" and path != "body" else set()
    for keyword in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(keyword, []):
            leaves |= string_leaves(branch, components, path, seen)
    for name, sub in (schema.get("properties") or {}).items():
        # A binding key's segments are letters, digits, `_` and `-`.
        if name.replace("_", "").replace("-", "").isalnum():
            leaves |= string_leaves(sub, components, f"{path}.{name}", seen)
    # One `[*]` per segment: the items of nested arrays have no key.
    if "items" in schema and not path.endswith("[*]"):
        leaves |= string_leaves(schema["items"], components, f"{path}[*]", seen)
    return leaves


def _bindings(keys: dict[str, str], probability: float) -> dict[str, dict[str, Any]]:
    return {key: {"dictionary": name, "probability": probability} for key, name in keys.items()}


def edge_bindings(raw_schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every string in a request body, and the string query parameters, draw edge strings."""
    components = raw_schema.get("components", {}).get("schemas", {})
    keys = set(EDGE_QUERY_PARAMETERS)
    for operations in raw_schema["paths"].values():
        for operation in operations.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                keys |= string_leaves(media.get("schema"), components)
    edges = {key: "edge-strings" for key in sorted(keys) if key not in ID_BINDINGS}
    return _bindings(edges, EDGE_PROBABILITY)


def _with_edges(values: list[Any]) -> list[Any]:
    """String ids, with the edge strings after the first: a derandomized run draws the
    front of a dictionary far more often than its tail. Integers stay as they are."""
    if not isinstance(values[0], str):
        return values
    return [values[0], *EDGE_STRINGS, *values[1:]]


def fuzz_config(target: FuzzTarget, raw_schema: dict[str, Any]) -> dict[str, Any]:
    """The run's schemathesis configuration, as a schemathesis.toml would hold it."""
    dictionaries = {name: {"values": _with_edges(values)} for name, values in target.seeded.items()}
    dictionaries["edge-strings"] = {"values": EDGE_STRINGS}
    return {
        "seed": 0,
        "base-url": target.service.base_url,
        "request-timeout": REQUEST_TIMEOUT_S,
        "headers": {"Authorization": f"Bearer {target.writer}"},
        "generation": {
            "max-examples": MAX_EXAMPLES,
            # Without this, the bearer credential is itself fuzzed and most cases end at 401.
            "with-security-parameters": False,
            # Other string parameters (typed `string` outright) sometimes get one too.
            "dictionaries": {
                "string": {"dictionary": "edge-strings", "probability": EDGE_PROBABILITY}
            },
        },
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        "dictionaries": dictionaries,
        "parameters": {**edge_bindings(raw_schema), **_bindings(ID_BINDINGS, ID_PROBABILITY)},
        "operations": [
            {"include-method": "DELETE", "parameters": _bindings(DELETE_BINDINGS, ID_PROBABILITY)},
            {
                # Training jobs the fuzzer creates stay queued (no train queue), and the
                # stream of a queued job never ends: follow seeded (cancelled) ones only.
                "include-path": "/v1/training-jobs/{job_id}/events",
                "phases": {"fuzzing": {"extra-data-sources": {"responses": False}}},
            },
        ],
    }


@pytest.fixture(scope="module")
def api_schema(fuzz_target: FuzzTarget) -> schemathesis.BaseSchema:
    # The bindings name the served schema's fields, so it is read here and handed over.
    url = f"{fuzz_target.service.base_url}/openapi.json"
    raw_schema = httpx.get(url, timeout=30).raise_for_status().json()
    config = schemathesis.Config.from_dict(fuzz_config(fuzz_target, raw_schema))
    return schemathesis.openapi.from_dict(raw_schema, config=config)


@pytest.fixture(autouse=True)
def legacy_node_id(request: pytest.FixtureRequest) -> None:
    """Give the test item the `_nodeid` attribute schemathesis's fixture loader reads.

    pytest 9.2 keeps node ids in a structured `_id` (pytest-dev/pytest#14758); schemathesis
    4.32 still reads and rewrites `_nodeid` to label each operation's subtest.
    """
    request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    deadline=None,
    derandomize=True,
    database=None,
    # A real server over HTTP is slow next to in-process data generation.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_operation_honours_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate()
