"""Collections, ingestion, passage search and grounded answers with their sources, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Live
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

VOLCANO = """# Volcanoes

Volcanoes form where magma from the mantle reaches the surface. Pressure from gas
dissolved in the magma drives eruptions.

Most volcanoes sit on the boundaries of tectonic plates, where one plate slides under
another or where plates pull apart.
"""
PASTA = [
    {
        "id": "pasta",
        "title": "Tomato sauce",
        "text": "Simmer crushed tomatoes with garlic and olive oil for twenty minutes, "
        "then season with salt and basil.",
        "metadata": {"topic": "cooking"},
    },
    {
        "id": "gears",
        "title": "Bicycle gears",
        "text": "A derailleur moves the chain between sprockets of different sizes, "
        "trading pedalling speed for force.",
        "metadata": {"topic": "cycling"},
    },
]


@dataclass(frozen=True)
class Tenant:
    writer: str
    reader: str


@pytest.fixture(scope="module")
def tenant(live: Live) -> Tenant:
    """A tenant of this module's own: its answers stay out of the other modules' searches."""
    name = f"rag{uuid.uuid4().hex[:8]}"
    return Tenant(
        writer=live.service.create_key(name, "writer"),
        reader=live.service.create_key(name, "reader"),
    )


def _collection(client: httpx.Client, **body: Any) -> dict[str, Any]:
    name = f"c{uuid.uuid4().hex[:10]}"
    answer = client.post("/v1/collections", json={"name": name, **body})
    assert answer.status_code == 201, answer.text
    return answer.json()


def _ingested(client: httpx.Client, answer: httpx.Response, timeout: float = 120) -> dict:
    assert answer.status_code == 202, answer.text
    location = answer.headers["Location"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ingestion = client.get(location).json()
        if ingestion["status"] in ("succeeded", "failed", "cancelled"):
            return ingestion
        time.sleep(0.2)
    raise TimeoutError(f"ingestion {location} did not finish")


def _search(client: httpx.Client, collection: int, query: str, **body: Any) -> list[dict]:
    answer = client.post(f"/v1/collections/{collection}/search", json={"query": query, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


@pytest.fixture(scope="module")
def filled(live: Live, tenant: Tenant) -> dict[str, Any]:
    """A collection of acme's with a Markdown file, a JSONL file and two JSON documents."""
    with live.service.client(tenant.writer) as client:
        collection = _collection(client, chunking={"max_tokens": 32, "overlap_tokens": 4})
        jsonl = "".join(
            json.dumps({"id": f"j{n}", "title": f"Note {n}", "text": text}) + "\n"
            for n, text in enumerate(["Owls hunt at night.", "Penguins cannot fly."])
        )
        files = client.post(
            f"/v1/collections/{collection['id']}/documents",
            files=[
                ("file", ("volcano.md", VOLCANO.encode(), "text/markdown")),
                ("file", ("notes.jsonl", jsonl.encode(), "application/jsonl")),
            ],
        )
        first = _ingested(client, files)
        second = _ingested(
            client,
            client.post(f"/v1/collections/{collection['id']}/documents", json={"documents": PASTA}),
        )
    return {"collection": collection, "files": first, "json": second}


def test_ingestion_reports_progress_and_documents_are_listed(
    live: Live, tenant: Tenant, filled: dict
) -> None:
    files, inline = filled["files"], filled["json"]
    assert files["status"] == "succeeded", files
    assert files["progress"]["stage"] == "done"
    assert files["progress"]["files"] == {"total": 2, "done": 2}
    assert files["progress"]["documents"]["created"] == 3
    assert inline["progress"]["documents"]["created"] == 2
    assert files["progress"]["chunks"] >= 3  # the Markdown file is cut in two or more
    collection = filled["collection"]["id"]
    with live.service.client(tenant.reader) as client:
        listed = client.get(f"/v1/collections/{collection}/documents", params={"limit": 100})
        assert listed.status_code == 200
        by_id = {doc["external_id"]: doc for doc in listed.json()["data"]}
        assert set(by_id) == {"volcano.md", "j0", "j1", "pasta", "gears"}
        assert by_id["volcano.md"]["title"] == "Volcanoes"
        assert by_id["volcano.md"]["format"] == "markdown"
        assert by_id["volcano.md"]["chunk_count"] >= 2
        only = client.get(
            f"/v1/collections/{collection}/documents", params={"metadata": "topic=cycling"}
        ).json()["data"]
        assert [doc["external_id"] for doc in only] == ["gears"]
        one = client.get(f"/v1/collections/{collection}/documents/{by_id['pasta']['id']}").json()
        assert one["text"] == PASTA[0]["text"]
        listing = client.get("/v1/collections").json()["data"]
        mine = next(item for item in listing if item["id"] == collection)
        assert mine["document_count"] == 5


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_search_ranks_the_right_passage_first(
    live: Live, tenant: Tenant, filled: dict, mode: str
) -> None:
    collection = filled["collection"]["id"]
    query = {
        "vector": "how do I make a sauce for spaghetti",
        "keyword": "derailleur sprockets",
        "hybrid": "why do volcanoes erupt magma",
    }[mode]
    expected = {"vector": "pasta", "keyword": "gears", "hybrid": "volcano.md"}[mode]
    with live.service.client(tenant.reader) as client:
        hits = _search(client, collection, query, mode=mode, k=3)
    assert hits and hits[0]["external_id"] == expected, hits
    top = hits[0]
    assert top["rank"] == 1 and top["document_id"].startswith("doc_") and top["chunk_id"]
    parts = top["scores"]
    assert (parts["vector"] is not None) == (mode != "keyword")
    assert (parts["keyword"] is not None) == (mode == "keyword") or mode == "hybrid"


def test_filters_narrow_the_search(live: Live, tenant: Tenant, filled: dict) -> None:
    collection = filled["collection"]["id"]
    with live.service.client(tenant.reader) as client:
        hits = _search(
            client, collection, "tomatoes garlic", filters={"metadata": {"topic": "cycling"}}
        )
    assert {hit["external_id"] for hit in hits} == {"gears"}


def test_same_document_again_is_unchanged_and_a_new_version_replaces_it(
    live: Live, tenant: Tenant
) -> None:
    with live.service.client(tenant.writer) as client:
        collection = _collection(client)["id"]
        url = f"/v1/collections/{collection}/documents"
        doc = {"id": "d", "title": "Moon", "text": "The moon orbits the earth every month."}
        assert (
            _ingested(client, client.post(url, json={"documents": [doc]}))["progress"]["documents"][
                "created"
            ]
            == 1
        )
        again = _ingested(client, client.post(url, json={"documents": [doc]}))
        assert again["progress"]["documents"]["unchanged"] == 1
        assert again["progress"]["chunks"] == 0
        changed = {**doc, "text": "Saturn has rings of ice and rock."}
        replaced = _ingested(client, client.post(url, json={"documents": [changed]}))
        assert replaced["progress"]["documents"]["replaced"] == 1
        docs = client.get(url).json()["data"]
        assert len(docs) == 1 and docs[0]["chunk_count"] == 1
        assert not _search(client, collection, "moon orbits", mode="keyword")
        assert _search(client, collection, "saturn rings", mode="keyword")[0]["external_id"] == "d"
        assert client.delete(f"{url}/{docs[0]['id']}").status_code == 204
        assert not _search(client, collection, "saturn rings", mode="keyword")
        assert not _search(client, collection, "planet with rings", mode="vector")
        assert client.delete(f"/v1/collections/{collection}").status_code == 204
        assert client.get(f"/v1/collections/{collection}").status_code == 404


def test_bad_requests_get_clear_errors(live: Live, tenant: Tenant) -> None:
    with live.service.client(tenant.writer) as client:
        collection = _collection(client)
        url = f"/v1/collections/{collection['id']}/documents"
        cases = [
            (client.post("/v1/collections", json={"name": collection["name"]}), 409, "name"),
            (client.post("/v1/collections", json={"name": "123"}), 400, "name"),
            (
                client.post(
                    "/v1/collections",
                    json={"name": "x1", "chunking": {"max_tokens": 32, "overlap_tokens": 16}},
                ),
                400,
                "chunking",
            ),
            (client.post(url, files={"file": ("a.bin", b"\x00\xff\xfe\x00")}), 400, "file[0]"),
            (
                client.post(url, files={"file": ("a.jsonl", b'{"id": "x"}\n')}),
                400,
                "file[0]",
            ),
            (client.post(url, json={"documents": []}), 400, "documents"),
            (client.post(url, content=b"hello", headers={"content-type": "text/plain"}), 400, None),
            (client.post("/v1/collections/nope/documents", json={"documents": PASTA}), 404, None),
            (
                client.post(f"/v1/collections/{collection['id']}/search", json={"k": 3}),
                400,
                "query",
            ),
        ]
        history = _collection(client, kind="history")
        cases.append(
            (
                client.post(
                    f"/v1/collections/{history['id']}/documents", json={"documents": PASTA}
                ),
                400,
                "collection",
            )
        )
    for answer, code, param in cases:
        assert answer.status_code == code, answer.text
        error = answer.json()["error"]
        assert error["message"]
        if param:
            assert param in (error["param"] or ""), error
    assert "line 1" in cases[4][0].json()["error"]["message"]


def test_grounded_answer_keeps_its_sources(live: Live, tenant: Tenant, filled: dict) -> None:
    """A native job and an OpenAI chat completion, grounded: the passages are stored with
    the generation, numbered and ranked, and can be read back and found by search."""
    collection = filled["collection"]
    question = "What drives volcanic eruptions?"
    with live.service.client(tenant.writer) as client:
        job = client.post(
            "/v1/jobs",
            json={
                "model": "tiny-random-llama",
                "input": {"prompt": question},
                "params": {"max_tokens": 8},
                "rag": {"collections": [collection["name"]], "k": 3},
            },
        )
        assert job.status_code == 202, job.text
        done = wait_for_job(client, job.json()["id"])
        assert done["status"] == "succeeded", done
        generation = client.get(f"/v1/generations/{done['generation_id']}").json()
        assert generation["prompt"] == question  # the question, not the packed passages
        sources = client.get(f"/v1/generations/{generation['id']}/sources").json()["data"]
        # The tiny model reads bytes in a context of 512: what fits of the three, in rank
        # order, numbered from 1.
        assert sources, "no passage was packed"
        assert [source["number"] for source in sources] == list(range(1, len(sources) + 1))
        ranks = [source["rank"] for source in sources]
        assert ranks == sorted(ranks) and set(ranks) <= {1, 2, 3}
        documents = client.get(
            f"/v1/collections/{collection['id']}/documents", params={"limit": 100}
        ).json()["data"]
        assert {s["document_id"] for s in sources} <= {d["id"] for d in documents}
        cited = {c["number"] for c in generation["citations"]}
        assert cited == {s["number"] for s in sources if s["cited"]}

        chat = client.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-random-llama",
                "messages": [{"role": "user", "content": "How do I cook tomato sauce?"}],
                "max_tokens": 8,
                "rag": {"collections": [collection["id"]], "k": 2, "mode": "vector"},
            },
        )
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert isinstance(body["citations"], list)
        sources = client.get(f"/v1/generations/{body['generation_id']}/sources").json()["data"]
        assert sources and all(source["document_id"] for source in sources)

        streamed_body = {
            "model": "tiny-random-llama",
            "messages": [{"role": "user", "content": "Which birds hunt at night?"}],
            "max_tokens": 4,
            "stream": True,
            "rag": {"collections": [collection["id"]], "k": 2},
        }
        with client.stream("POST", "/v1/chat/completions", json=streamed_body) as streamed:
            chunks = [
                json.loads(line.removeprefix("data: "))
                for line in streamed.iter_lines()
                if line.startswith("data: {")
            ]
        last = chunks[-1]  # the finishing chunk carries the grounding
        assert last["choices"][0]["finish_reason"] and isinstance(last["citations"], list)
        assert client.get(f"/v1/generations/{last['generation_id']}/sources").json()["data"]

        found = client.post("/v1/search", json={"query": question, "mode": "keyword"}).json()
        assert generation["id"] in [hit["generation"]["id"] for hit in found["data"]]

        missing = client.post(
            "/v1/jobs",
            json={
                "model": "tiny-random-llama",
                "input": {"prompt": "x"},
                "rag": {"collections": ["no-such-collection"]},
            },
        )
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "rag.collections[0]"


def test_history_collection_retrieves_past_answers(live: Live, tenant: Tenant) -> None:
    with live.service.client(tenant.writer) as client:
        past = client.post(
            "/v1/jobs",
            json={
                "model": "tiny-random-llama",
                "input": {"prompt": "Which bird builds the largest nest of all?"},
                "params": {"max_tokens": 4},
            },
        ).json()
        earlier = wait_for_job(client, past["id"])["generation_id"]
        history = _collection(client, kind="history")
        hits = _search(client, history["id"], "largest bird nest", mode="keyword", k=3)
        assert hits[0]["generation_id"] == earlier and hits[0]["document_id"] is None


def test_smollm2_answers_from_the_passages(live: Live, tenant: Tenant, filled: dict) -> None:
    if live.backend != "sqlite":
        pytest.skip("the real model runs once, on the embedded backend")
    with live.service.client(tenant.writer) as client:
        job = client.post(
            "/v1/jobs",
            json={
                "model": "smollm2-135m-instruct",
                "input": {"prompt": "What do penguins not do?"},
                "params": {"max_tokens": 24, "temperature": 0},
                "rag": {"collections": [filled["collection"]["id"]], "k": 3},
            },
        ).json()
        done = wait_for_job(client, job["id"], timeout=300)
        assert done["status"] == "succeeded", done
        sources = client.get(f"/v1/generations/{done['generation_id']}/sources").json()["data"]
        assert "Penguins cannot fly." in [source["text"] for source in sources]
        generation = client.get(f"/v1/generations/{done['generation_id']}").json()
        assert generation["output"].strip()


def test_cli_ingests_a_folder(live: Live, tenant: Tenant, tmp_path) -> None:  # noqa: ANN001
    if live.backend != "sqlite":
        pytest.skip("one backend is enough for the client command")
    (tmp_path / "a.md").write_text("# Tides\n\nThe moon pulls the sea into tides.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Comets have tails of gas and dust.\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    name = f"cli{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "ingest", str(tmp_path), "--collection", name],
        env={
            **os.environ,
            "GENSERVE_URL": live.service.base_url,
            "GENSERVE_API_KEY": tenant.writer,
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "uploaded 2 files" in done.stdout
    with live.service.client(tenant.reader) as client:
        listed = client.get(f"/v1/collections/{name}/documents").json()["data"]
        assert sorted(doc["external_id"] for doc in listed) == ["a.md", "b.txt"]
        assert _search(client, name, "comet tails", mode="keyword")[0]["external_id"] == "b.txt"
