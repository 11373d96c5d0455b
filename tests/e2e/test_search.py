"""Search, tenancy and the real models end to end."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Live
from tests.e2e.test_jobs import submit
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

PROMPTS = [
    "How do volcanoes form and why do they erupt?",
    "Give me a recipe for a simple tomato pasta sauce.",
    "Explain how a bicycle gear system works.",
    "What is the best way to train a puppy to sit?",
]


@pytest.fixture(scope="module")
def indexed(live: Live) -> dict[str, str]:
    """PROMPTS answered by the tiny model for tenant acme: prompt -> generation id."""
    with live.service.client(live.writer) as client:
        jobs = {
            p: submit(client, input={"prompt": p}, metadata={"tags": ["search"]}) for p in PROMPTS
        }
        return {p: wait_for_job(client, job["id"])["generation_id"] for p, job in jobs.items()}


def search_page(client, query: str, **kwargs) -> dict:  # noqa: ANN001
    response = client.post("/v1/search", json={"query": query, **kwargs})
    assert response.status_code == 200, response.text
    return response.json()


def search(client, query: str, **kwargs) -> list[dict]:  # noqa: ANN001
    return search_page(client, query, **kwargs)["data"]


def test_search_finds_a_paraphrase(live: Live, indexed: dict[str, str]) -> None:
    with live.service.client(live.reader) as client:
        hits = search(
            client, "why does a volcano erupt", k=3, target="prompt", filters={"tags": ["search"]}
        )
    assert hits[0]["generation"]["id"] == indexed[PROMPTS[0]]
    assert hits[0]["matched"] == "prompt"
    assert hits[0]["score"] > hits[-1]["score"]


def test_other_tenant_sees_nothing(live: Live, indexed: dict[str, str]) -> None:
    generation_id = indexed[PROMPTS[1]]
    with live.service.client(live.other) as client:
        assert search(client, "tomato pasta sauce recipe", k=10) == []
        assert client.get(f"/v1/generations/{generation_id}").status_code == 404
        assert client.get("/v1/generations").json()["data"] == []
        assert client.get("/v1/jobs").json()["data"] == []
        assert client.delete(f"/v1/generations/{generation_id}").status_code == 404


def test_filters_apply_inside_search(live: Live, indexed: dict[str, str]) -> None:
    with live.service.client(live.reader) as client:
        none = search(client, "volcano", filters={"tags": ["no-such-tag"]})
        some = search(client, "volcano", k=100, filters={"tags": ["search"]})
    assert none == []
    assert {h["generation"]["id"] for h in some} >= set(indexed.values())


def test_keyword_mode_ranks_by_words_and_highlights_them(
    live: Live, indexed: dict[str, str]
) -> None:
    with live.service.client(live.reader) as client:
        page = search_page(client, "tomato sauce", mode="keyword", target="prompt")
        nothing = search(client, "xylophone", mode="keyword")
    assert page["mode"] == "keyword" and page["model"] is None
    top = page["data"][0]
    assert top["generation"]["id"] == indexed[PROMPTS[1]]
    assert top["scores"]["keyword"]["rank"] == 1 and top["scores"]["vector"] is None
    snippet = top["snippets"]["prompt"]
    marked = [snippet["text"][start:end].lower() for start, end in snippet["highlights"]]
    assert marked == ["tomato", "sauce"]
    assert nothing == []


def test_hybrid_hits_carry_both_parts_and_a_cursor_pages_through(
    live: Live, indexed: dict[str, str]
) -> None:
    body = {"query": "volcano pasta bicycle puppy", "k": 3, "filters": {"tags": ["search"]}}
    with live.service.client(live.reader) as client:
        first = search_page(client, **body)
        assert first["mode"] == "hybrid" and first["next_cursor"]
        second = search_page(client, **body, cursor=first["next_cursor"])
        changed = client.post(
            "/v1/search", json={**body, "query": "other words", "cursor": first["next_cursor"]}
        )
        garbled = client.post("/v1/search", json={**body, "cursor": "not-a-cursor"})
    assert second["next_cursor"] is None
    pages = [hit["generation"]["id"] for hit in first["data"] + second["data"]]
    assert sorted(pages) == sorted(indexed.values())  # each once, across the two pages
    assert first["data"][0]["scores"]["vector"] and first["data"][0]["scores"]["keyword"]
    for response in (changed, garbled):
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "cursor"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "x", "mode": "fuzzy"}, "mode"),
        ({"query": "x", "weights": {"vector": 0, "keyword": 0}}, "weights"),
        ({"query": "x", "weights": {"vector": -1}}, "weights.vector"),
        ({"query": "x", "filters": {"min_feedback_score": "high"}}, "filters.min_feedback_score"),
    ],
)
def test_bad_search_requests_name_the_field(live: Live, body: dict, param: str) -> None:
    with live.service.client(live.reader) as client:
        response = client.post("/v1/search", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_deleted_generation_is_not_found(live: Live) -> None:
    with live.service.client(live.writer) as client:
        job = wait_for_job(
            client, submit(client, input={"prompt": "A note about migrating geese in autumn"})["id"]
        )
        generation_id = job["generation_id"]
        assert search(client, "geese migration", k=1)[0]["generation"]["id"] == generation_id
        assert client.delete(f"/v1/generations/{generation_id}").status_code == 204
        assert client.get(f"/v1/generations/{generation_id}").status_code == 404
        hits = search(client, "geese migration", k=50)
    assert generation_id not in {h["generation"]["id"] for h in hits}


@pytest.mark.real_models
def test_smollm2_answers_and_is_found_by_meaning(live: Live) -> None:
    prompt = "Write one short sentence about the ocean."
    with live.service.client(live.writer) as client:
        job = submit(
            client,
            model="smollm2-135m-instruct",
            input={"prompt": prompt},
            params={"max_tokens": 48, "temperature": 0},
            metadata={"tags": ["smol"]},
        )
        done = wait_for_job(client, job["id"], timeout=300)
        assert done["status"] == "succeeded", done
        generation = client.get(f"/v1/generations/{done['generation_id']}").json()
        hits = search(
            client,
            "a sentence describing the sea",
            k=1,
            target="prompt",
            filters={"tags": ["smol"]},
        )
    assert len(generation["output"].split()) >= 3
    assert generation["model_version"]
    assert hits[0]["generation"]["id"] == generation["id"]
