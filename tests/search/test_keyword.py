"""Keyword and hybrid search on both engines (SQLite FTS5, PostgreSQL tsvector), against
databases made by the migrations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import crud
from service.db.migrate import downgrade, upgrade
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Embedding, Generation, Tenant, new_id
from service.search.generations import Fusion, Part, fuse, search_generations
from service.search.index import VectorIndex
from service.search.keyword import keyword_search, query_terms
from service.search.snippets import snippet
from tests.utils.factories import make_generation_row

NO_FILTERS = crud.Filters()
DIM = 16

TEXTS = {
    "volcano": ("How do volcanoes erupt?", "Magma rises through the crust and erupts."),
    "pasta": ("A tomato sauce recipe", "Simmer tomatoes with garlic and basil."),
    "bike": ("How do bicycle gears work?", "Gears trade pedalling speed for force."),
    "puppy": ("Training a puppy to sit", "Reward the puppy each time it sits."),
}


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def add_generation(
    session: Session, tenant_id: int, prompt: str, output: str, **meta: Any
) -> Generation:
    return make_generation_row(session, tenant_id, prompt=prompt, output=output, meta=meta)


def make_tenant(session: Session, name: str) -> int:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant.id


@pytest.fixture
def corpus(factory: sessionmaker[Session]) -> dict[str, Any]:
    with factory() as session:
        acme, other = make_tenant(session, "acme"), make_tenant(session, "other")
        ids = {
            name: add_generation(session, acme, *texts, tags=[name]).id
            for name, texts in TEXTS.items()
        }
        ids["other"] = add_generation(session, other, "Volcano eruptions", "Lava and ash.").id
        session.commit()
    return {"acme": acme, "other": other, "ids": ids}


def found(session: Session, tenant_id: int, query: str, **kwargs: Any) -> list[str]:
    kwargs = {"target": "both", "limit": 10, "filters": NO_FILTERS, **kwargs}
    hits = keyword_search(session, tenant_id=tenant_id, query=query, **kwargs)
    return [hit.generation_id for hit in hits]


def test_keyword_search_stems_ranks_and_keeps_tenants_apart(
    factory: sessionmaker[Session], corpus: dict[str, Any]
) -> None:
    ids, acme = corpus["ids"], corpus["acme"]
    with factory() as session:
        # Stemming: "erupting volcano" matches "volcanoes erupt" and "erupts".
        assert found(session, acme, "erupting volcano") == [ids["volcano"]]
        assert found(session, corpus["other"], "erupting volcano") == [ids["other"]]
        # Any word may match; more matched words rank higher.
        assert found(session, acme, "puppy tomato basil garlic") == [ids["pasta"], ids["puppy"]]
        assert found(session, acme, "quantum chromodynamics") == []


def test_target_and_filters_narrow_keyword_search(
    factory: sessionmaker[Session], corpus: dict[str, Any]
) -> None:
    ids, acme = corpus["ids"], corpus["acme"]
    with factory() as session:
        assert found(session, acme, "magma", target="prompt") == []
        assert found(session, acme, "magma", target="output") == [ids["volcano"]]
        assert found(session, acme, "recipe", target="prompt") == [ids["pasta"]]
        tagged = crud.Filters(tags=["bike"])
        assert found(session, acme, "gears puppy", filters=tagged) == [ids["bike"]]
        session.execute(
            update(Generation).where(Generation.id == ids["puppy"]).values(feedback_score=0.9)
        )
        liked = crud.Filters(min_feedback_score=0.5)
        assert found(session, acme, "gears puppy", filters=liked) == [ids["puppy"]]


def test_keyword_index_follows_updates_and_deletes(
    factory: sessionmaker[Session], corpus: dict[str, Any]
) -> None:
    ids, acme = corpus["ids"], corpus["acme"]
    with factory() as session:
        session.execute(
            update(Generation).where(Generation.id == ids["bike"]).values(output="Chains and cogs.")
        )
        session.delete(session.get(Generation, ids["pasta"]))
        session.commit()
    with factory() as session:
        assert found(session, acme, "cogs") == [ids["bike"]]
        assert found(session, acme, "pedalling") == []
        assert found(session, acme, "tomato") == []
        added = add_generation(session, acme, "Tomato soup", "Blend roasted tomatoes.")
        session.commit()
        assert found(session, acme, "tomato") == [added.id]


def test_rows_written_before_the_migration_are_searchable(db_url: str) -> None:
    downgrade(db_url, "0001")
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            session.execute(
                text("INSERT INTO tenants (name, created_at) VALUES ('early', CURRENT_TIMESTAMP)")
            )
            tenant = session.execute(
                text("SELECT id FROM tenants WHERE name = 'early'")
            ).scalar_one()
            early = new_id("gen")
            # Written as the 0001 schema has it: the ORM already knows later columns.
            rows = {"job": new_id("job"), "gen": early, "tenant": tenant, "empty": "{}"}
            session.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, model, queue, status, input, params,"
                    " metadata, attempts, publish_count, cancel_requested, created_at)"
                    " VALUES (:job, :tenant, 'm', 'batch', 'succeeded', :empty, :empty,"
                    " :empty, 1, 1, false, CURRENT_TIMESTAMP)"
                ),
                rows,
            )
            session.execute(
                text(
                    "INSERT INTO generations (id, tenant_id, job_id, model, model_version,"
                    " input, prompt, output, params, metadata, prompt_tokens,"
                    " completion_tokens, finish_reason, timings, created_at)"
                    " VALUES (:gen, :tenant, :job, 'm', '1', :empty,"
                    " 'Glaciers carve valleys', 'Slowly.', :empty, :empty, 1, 1, 'stop',"
                    " :empty, CURRENT_TIMESTAMP)"
                ),
                rows,
            )
            session.commit()
        upgrade(db_url)
        with make_sessionmaker(engine)() as session:
            assert found(session, tenant, "glacier valley") == [early]
            later = add_generation(session, tenant, "Glacier retreat", "Warming.").id
            session.commit()
            assert set(found(session, tenant, "glacier")) == {early, later}
    finally:
        engine.dispose()


def test_query_terms_and_snippets() -> None:
    assert query_terms("Why do the Volcanoes erupt, why?") == ["volcanoes", "erupt"]
    assert query_terms("the of") == ["the", "of"]
    text = "Intro. " + "filler words here. " * 30 + "The ocean waves crash on oceans of sand."
    cut = snippet(text, ["ocean", "wave"], width=80)
    marked = [cut.text[start:end] for start, end in cut.highlights]
    assert marked == ["ocean", "waves", "oceans"]
    assert cut.text.startswith("…") and not cut.text.endswith("…")
    assert snippet("short text", ["absent"]).highlights == []


def test_reciprocal_rank_fusion_weights_rankings() -> None:
    vector = {"a": Part(0.9, 1), "b": Part(0.8, 2)}
    keyword = {"b": Part(7.0, 1), "c": Part(5.0, 2)}
    assert [gid for gid, _ in fuse(vector, keyword, Fusion())] == ["b", "a", "c"]
    assert [gid for gid, _ in fuse(vector, keyword, Fusion(keyword=0))][:2] == ["a", "b"]
    scores = dict(fuse(vector, keyword, Fusion(rrf_k=60)))
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61)


def test_filtered_hybrid_search_is_exact_and_pages(
    factory: sessionmaker[Session], corpus: dict[str, Any], tmp_path: Any
) -> None:
    """search_generations with a selective filter: vector part equals brute force over
    the rows that pass it, and pages partition the ranking."""
    rng = np.random.default_rng(3)
    acme = corpus["acme"]
    vectors: dict[str, np.ndarray] = {}
    with factory() as session:
        for number in range(60):
            generation = add_generation(
                session, acme, f"note {number}", f"text {number}", shard=number % 3
            )
            vector = rng.standard_normal(DIM).astype(np.float32)
            vector /= np.linalg.norm(vector)
            vectors[generation.id] = vector
            session.add(
                Embedding(
                    tenant_id=acme,
                    generation_id=generation.id,
                    kind="output",
                    model="emb",
                    dimension=DIM,
                    vector=vector.tobytes(),
                )
            )
        session.commit()
        passing = {
            gid for gid, v in vectors.items() if session.get(Generation, gid).meta["shard"] == 1
        }
    index = VectorIndex(model="emb", dimension=DIM, directory=tmp_path)
    index.open(factory)
    query = rng.standard_normal(DIM).astype(np.float32)
    expected = sorted(passing, key=lambda gid: -float(vectors[gid] @ query))
    filters = crud.Filters(metadata={"shard": 1})
    pages: list[str] = []
    with factory() as session:
        for offset in range(0, 25, 7):
            results = search_generations(
                session,
                tenant_id=acme,
                query="note",
                mode="vector",
                target="output",
                filters=filters,
                offset=offset,
                limit=7,
                index=index,
                embed=lambda _: query,
            )
            pages.extend(hit.generation.id for hit in results.hits)
            assert results.has_more == (offset + 7 < len(passing))
        assert pages == expected
        hybrid = search_generations(
            session,
            tenant_id=acme,
            query="note 7 text",
            mode="hybrid",
            target="both",
            filters=NO_FILTERS,
            offset=0,
            limit=5,
            index=index,
            embed=lambda _: query,
        )
    top = hybrid.hits[0]
    assert top.vector is not None and top.keyword is not None
    assert all(hit.generation.tenant_id == acme for hit in hybrid.hits)
    index.close()
