"""VectorIndex against real databases built by the migrations (SQLite, and PostgreSQL)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.migrate import upgrade
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Embedding, EmbeddingDeletion, Generation, Tenant
from service.search import index as index_module
from service.search.index import IndexNotReady, Manifest, VectorIndex
from service.search.shards import FLAT, IVF, ShardPolicy
from tests.utils.factories import make_generation_row

DIM = 64
MODEL = "org/mini-lm:v1"  # characters that are unsafe in a file name, on purpose
OTHER_MODEL = "other-model"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"

Hits = list[tuple[int, float]]


# --- databases -------------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    name = f"genserve_search_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("GENSERVE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"PostgreSQL is required but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable at 127.0.0.1:5432: {exc}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        admin.execute(drop.format(sql.Identifier(name)))


def _migrated(url: str) -> Iterator[sessionmaker[Session]]:
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    yield from _migrated(f"sqlite:///{tmp_path / 'genserve.db'}")


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    yield from _migrated(postgres_url)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def any_db(request: pytest.FixtureRequest) -> sessionmaker[Session]:
    return request.getfixturevalue(f"{request.param.replace('postgresql', 'postgres')}_db")


# --- rows ------------------------------------------------------------------------------


def make_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def make_generation(session: Session, tenant: Tenant) -> Generation:
    return make_generation_row(session, tenant.id)


def add_embeddings(
    session: Session,
    generation: Generation,
    vectors: np.ndarray,
    *,
    model: str = MODEL,
    ids: Sequence[int] | None = None,
) -> list[int]:
    rows = [
        Embedding(
            tenant_id=generation.tenant_id,
            generation_id=generation.id,
            kind="output",
            model=model,
            dimension=vectors.shape[1],
            vector=np.asarray(vector, dtype=np.float32).tobytes(),
        )
        for vector in vectors
    ]
    for row, row_id in zip(rows, ids or [], strict=False):
        row.id = row_id
    session.add_all(rows)
    session.flush()
    return [row.id for row in rows]


def delete_embeddings(session: Session, ids: Sequence[int]) -> None:
    """What the writers do: delete the rows and log each deletion."""
    for row in session.scalars(select(Embedding).where(Embedding.id.in_(ids))):
        session.add(EmbeddingDeletion(embedding_id=row.id, model=row.model))
        session.delete(row)
    session.flush()


def unit_vectors(rng: np.random.Generator, count: int, dim: int = DIM) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# --- the corpus and the truth ----------------------------------------------------------


@dataclass
class Corpus:
    factory: sessionmaker[Session]
    big: Generation
    small: Generation
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # MODEL rows only
    tenant_of: dict[int, int] = field(default_factory=dict)

    def add(self, session: Session, generation: Generation, vectors: np.ndarray) -> list[int]:
        ids = add_embeddings(session, generation, vectors)
        self.vectors.update(zip(ids, vectors, strict=True))
        self.tenant_of.update(dict.fromkeys(ids, generation.tenant_id))
        return ids

    def forget(self, ids: Sequence[int]) -> None:
        for row_id in ids:
            del self.vectors[row_id]
            del self.tenant_of[row_id]

    def ids_of(self, generation: Generation) -> set[int]:
        return {i for i, tenant in self.tenant_of.items() if tenant == generation.tenant_id}


def build_corpus(factory: sessionmaker[Session], seed: int = 0) -> Corpus:
    """1500 rows of a big tenant, 4 of a small one, and another model's rows between them."""
    rng = np.random.default_rng(seed)
    with factory() as session:
        big = make_generation(session, make_tenant(session, "big"))
        small = make_generation(session, make_tenant(session, "small"))
        corpus = Corpus(factory, big, small)
        corpus.add(session, big, unit_vectors(rng, 700))
        add_embeddings(session, big, unit_vectors(rng, 50, 32), model=OTHER_MODEL)
        corpus.add(session, small, unit_vectors(rng, 4))
        corpus.add(session, big, unit_vectors(rng, 800))
        session.commit()
    return corpus


def brute_force(
    vectors: dict[int, np.ndarray], query: np.ndarray, k: int, allowed: set[int] | None = None
) -> Hits:
    ids = sorted(i for i in vectors if allowed is None or i in allowed)
    scores = np.stack([vectors[i] for i in ids]) @ query
    order = sorted(range(len(ids)), key=lambda j: (-scores[j], ids[j]))[:k]
    return [(ids[j], float(scores[j])) for j in order]


def assert_same_hits(got: Hits, expected: Hits) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


def accept_all(ids: Sequence[int]) -> set[int]:
    return set(ids)


def tenant_filter(session: Session, tenant_id: int) -> Callable[[Sequence[int]], set[int]]:
    """An accept callable as the API writes one: SQL says which ids the tenant may see."""

    def accept(ids: Sequence[int]) -> set[int]:
        stmt = select(Embedding.id).where(Embedding.id.in_(ids), Embedding.tenant_id == tenant_id)
        return set(session.scalars(stmt))

    return accept


def opened(
    corpus: Corpus,
    directory: Path,
    persist_every: int = 1000,
    policy: ShardPolicy | None = None,
) -> VectorIndex:
    index = VectorIndex(
        model=MODEL,
        dimension=DIM,
        directory=directory,
        persist_every=persist_every,
        policy=policy,
    )
    index.open(corpus.factory)
    return index


def assert_matches_table(index: VectorIndex, corpus: Corpus, seed: int = 1) -> None:
    assert index.ntotal == len(corpus.vectors)
    for query in unit_vectors(np.random.default_rng(seed), 3):
        assert_same_hits(
            index.search(query, 10, accept_all), brute_force(corpus.vectors, query, 10)
        )


# --- tests -----------------------------------------------------------------------------


def test_open_builds_from_sql(sqlite_db: sessionmaker[Session], tmp_path: Path) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path / "index")
    assert index.rebuilt and index.rebuild_reason == "missing"
    assert_matches_table(index, corpus)
    manifest = Manifest.from_json(index.manifest_path.read_text())
    assert (manifest.model, manifest.dimension, manifest.count) == (MODEL, DIM, 1504)
    assert manifest.last_id == index.last_id == max(corpus.vectors)


def test_catch_up_adds_new_rows_and_removes_deleted(
    any_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(any_db)
    index = opened(corpus, tmp_path)
    rng = np.random.default_rng(7)
    with any_db() as session:
        new_ids = corpus.add(session, corpus.small, unit_vectors(rng, 30))
        add_embeddings(session, corpus.big, unit_vectors(rng, 5, 32), model=OTHER_MODEL)
        session.commit()
    with any_db() as session:
        assert index.catch_up(session) == 30
        assert index.catch_up(session) == 0
    assert_matches_table(index, corpus)
    doomed = [new_ids[0], min(corpus.vectors), *sorted(corpus.ids_of(corpus.big))[100:110]]
    with any_db() as session:
        delete_embeddings(session, doomed)
        session.commit()
    with any_db() as session:
        assert index.catch_up(session) == len(doomed)
    for row_id in doomed:
        query = corpus.vectors[row_id]
        assert row_id not in {i for i, _ in index.search(query, 50, accept_all)}
    corpus.forget(doomed)
    assert_matches_table(index, corpus)


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_filtered_search_is_the_true_top_k_of_the_subset(
    sqlite_db: sessionmaker[Session], tmp_path: Path, k: int
) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path)
    asked: list[int] = []
    with sqlite_db() as session:
        for generation in (corpus.big, corpus.small):
            accept = tenant_filter(session, generation.tenant_id)

            def counting(ids: Sequence[int], accept: Callable = accept) -> set[int]:
                asked.extend(ids)
                return accept(ids)

            allowed = corpus.ids_of(generation)
            for query in unit_vectors(np.random.default_rng(k), 5):
                expected = brute_force(corpus.vectors, query, k, allowed)
                assert_same_hits(index.search(query, k, counting), expected)
    # Each search asks about every candidate once, however often it widens.
    assert len(asked) <= 10 * index.ntotal


def test_tiny_subset_widens_to_every_match(
    sqlite_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path)
    small_ids = corpus.ids_of(corpus.small)
    query = unit_vectors(np.random.default_rng(3), 1)[0]
    with sqlite_db() as session:
        hits = index.search(query, 100, tenant_filter(session, corpus.small.tenant_id))
    assert_same_hits(hits, brute_force(corpus.vectors, query, 100, small_ids))
    assert {i for i, _ in hits} == small_ids  # k larger than the matches: all of them
    assert index.search(query[np.newaxis, :], 5, lambda ids: set()) == []


def test_persist_and_reopen_loads_the_file(
    sqlite_db: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = build_corpus(sqlite_db)
    opened(corpus, tmp_path)
    with sqlite_db() as session:
        corpus.add(session, corpus.big, unit_vectors(np.random.default_rng(9), 20))
        session.commit()
    with caplog.at_level(logging.INFO, logger="service.search.index"):
        reopened = opened(corpus, tmp_path)
    assert not reopened.rebuilt and reopened.rebuild_reason is None
    assert "loaded index" in caplog.text and "built index" not in caplog.text
    assert_matches_table(reopened, corpus)


def test_maintain_persists_once_enough_changed(
    sqlite_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path, persist_every=10)
    before = Manifest.from_json(index.manifest_path.read_text())
    rng = np.random.default_rng(5)
    # A large index is written once 5% of it changed (75 of 1504 rows here), not every 10.
    for count, written in ((40, False), (40, True)):
        with sqlite_db() as session:
            corpus.add(session, corpus.big, unit_vectors(rng, count))
            session.commit()
        index.maintain(sqlite_db)
        after = Manifest.from_json(index.manifest_path.read_text())
        assert (after != before) is written
    assert before.last_id < after.last_id == index.last_id
    assert after.count == before.count + 80 == index.ntotal


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _garble_manifest(path: Path) -> None:
    (path.parent / "manifest.json").write_text("{not json")


def _largest_shard_file(index: VectorIndex) -> Path:
    return max(index.directory.glob("*.faiss"), key=lambda path: path.stat().st_size)


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate, _garble_manifest, Path.unlink])
def test_damaged_or_missing_file_is_rebuilt(
    sqlite_db: sessionmaker[Session], tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    corpus = build_corpus(sqlite_db)
    first = opened(corpus, tmp_path)
    first.close()
    damage(_largest_shard_file(first))
    with sqlite_db() as session:
        corpus.add(session, corpus.small, unit_vectors(np.random.default_rng(11), 3))
        session.commit()
    reopened = opened(corpus, tmp_path)
    assert reopened.rebuilt
    assert_matches_table(reopened, corpus)
    reopened.close()
    assert not opened(corpus, tmp_path).rebuilt  # the rebuild was persisted


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model", "another-model"),
        ("dimension", 32),
        ("index_type", "HNSW32"),
        ("format_version", 3),
    ],
)
def test_manifest_for_another_index_is_rebuilt(
    sqlite_db: sessionmaker[Session], tmp_path: Path, key: str, value: object
) -> None:
    corpus = build_corpus(sqlite_db)
    first = opened(corpus, tmp_path)
    first.close()
    manifest = json.loads(first.manifest_path.read_text())
    first.manifest_path.write_text(json.dumps({**manifest, key: value}))
    reopened = opened(corpus, tmp_path)
    assert reopened.rebuilt and "manifest is for" in (reopened.rebuild_reason or "")
    assert_matches_table(reopened, corpus)


def test_index_of_another_dimension_is_rebuilt(
    sqlite_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(sqlite_db)
    opened(corpus, tmp_path).close()
    index = VectorIndex(model=MODEL, dimension=32, directory=tmp_path)
    index.open(sqlite_db)
    # The rows are 64-dimensional: none fits, and each is skipped rather than mis-read.
    assert index.rebuilt and index.ntotal == 0


def test_search_rejects_bad_arguments(sqlite_db: sessionmaker[Session], tmp_path: Path) -> None:
    index = opened(build_corpus(sqlite_db), tmp_path)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones(DIM + 1, dtype=np.float32), 3, accept_all)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((2, DIM), dtype=np.float32), 3, accept_all)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones(DIM, dtype=np.float32), 0, accept_all)


def test_model_name_gives_safe_file_names(sqlite_db: sessionmaker[Session], tmp_path: Path) -> None:
    index = opened(build_corpus(sqlite_db), tmp_path)
    assert index.directory.parent == tmp_path
    names = [index.directory.name, *(path.name for path in index.directory.iterdir())]
    assert "manifest.json" in names and any(name.endswith(".faiss") for name in names)
    assert all("/" not in name and ":" not in name for name in names)


def test_row_committed_below_last_id_is_indexed(
    sqlite_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path)
    rng = np.random.default_rng(13)
    top = index.last_id
    with sqlite_db() as session:  # as if id top + 1 were taken by a transaction still open
        add_embeddings(session, corpus.big, unit_vectors(rng, 1), ids=[top + 2])
        session.commit()
        index.catch_up(session)
    index.persist()
    assert Manifest.from_json(index.manifest_path.read_text()).last_id == top
    late = unit_vectors(rng, 1)
    with sqlite_db() as session:
        add_embeddings(session, corpus.big, late, ids=[top + 1])
        session.commit()
        assert index.catch_up(session) == 1
    assert index.search(late[0], 1, accept_all)[0][0] == top + 1
    # A process started after the persist finds the late row too, and nothing twice.
    reloaded = opened(corpus, tmp_path)
    assert not reloaded.rebuilt and reloaded.ntotal == index.ntotal
    assert reloaded.search(late[0], 1, accept_all)[0][0] == top + 1


def test_deletion_logged_below_last_deletion_id_is_applied(
    sqlite_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path)
    first, second = sorted(corpus.ids_of(corpus.small))[:2]
    with sqlite_db() as session:  # as if log id 1 were taken by a transaction still open
        session.add(EmbeddingDeletion(id=2, embedding_id=second, model=MODEL))
        session.delete(session.get(Embedding, second))
        session.commit()
        assert index.catch_up(session) == 1
        session.add(EmbeddingDeletion(id=1, embedding_id=first, model=MODEL))
        session.delete(session.get(Embedding, first))
        session.commit()
        assert index.catch_up(session) == 1
    corpus.forget([first, second])
    assert_matches_table(index, corpus)


@pytest.mark.postgres
def test_out_of_order_commits_are_indexed(
    postgres_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(postgres_db)
    index = opened(corpus, tmp_path)
    rng = np.random.default_rng(17)
    slow_vectors, fast_vectors = unit_vectors(rng, 3), unit_vectors(rng, 3)
    with postgres_db() as slow, postgres_db() as fast:
        slow_ids = add_embeddings(slow, corpus.big, slow_vectors)  # ids taken, not committed
        fast_ids = add_embeddings(fast, corpus.big, fast_vectors)
        fast.commit()
        assert max(slow_ids) < min(fast_ids)
        with postgres_db() as reader:
            assert index.catch_up(reader) == 3
        slow.commit()
    with postgres_db() as reader:
        assert index.catch_up(reader) == 3
    for row_id, vector in zip(slow_ids + fast_ids, [*slow_vectors, *fast_vectors], strict=True):
        assert index.search(vector, 1, accept_all)[0][0] == row_id


def test_deleted_id_is_never_reused(sqlite_db: sessionmaker[Session], tmp_path: Path) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path)
    top = max(corpus.vectors)
    replacement = unit_vectors(np.random.default_rng(19), 1)
    with sqlite_db() as session:
        delete_embeddings(session, [top])
        session.commit()
        # AUTOINCREMENT: the next row gets a new id, not the one just deleted.
        (new_id,) = add_embeddings(session, corpus.small, replacement)
        session.commit()
        assert new_id > top
        index.catch_up(session)
    corpus.forget([top])
    corpus.vectors[new_id] = replacement[0]
    corpus.tenant_of[new_id] = corpus.small.tenant_id
    assert_matches_table(index, corpus)


def test_searches_run_alongside_catch_up(sqlite_db: sessionmaker[Session], tmp_path: Path) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path)
    query = unit_vectors(np.random.default_rng(23), 1)[0]
    errors: list[BaseException] = []
    stop = threading.Event()

    def search_until_stopped() -> None:
        try:
            while not stop.is_set():
                hits = index.search(query, 5, accept_all)
                assert len(hits) == 5 and hits == sorted(hits, key=lambda h: (-h[1], h[0]))
        except BaseException as exc:  # handed to the main thread below
            errors.append(exc)

    searcher = threading.Thread(target=search_until_stopped)
    searcher.start()
    rng = np.random.default_rng(29)
    try:
        for _ in range(10):
            with sqlite_db() as session:
                corpus.add(session, corpus.big, unit_vectors(rng, 50))
                session.commit()
                index.catch_up(session)
    finally:
        stop.set()
        searcher.join()
    assert not errors
    assert_matches_table(index, corpus)


# --- shards, IVF and maintenance ---------------------------------------------------------

SMALL_IVF = ShardPolicy(ivf_threshold=500)  # the big tenant (1500 rows) is IVF, small flat


def test_each_tenant_searches_its_own_shard_only(
    sqlite_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path)
    assert set(index.shard_kinds()) == {corpus.big.tenant_id, corpus.small.tenant_id}
    for query in unit_vectors(np.random.default_rng(31), 3):
        # accept_all: the shard alone keeps the other tenant's rows out.
        hits = index.search(query, 10, accept_all, shard=corpus.small.tenant_id)
        small = corpus.ids_of(corpus.small)
        assert_same_hits(hits, brute_force(corpus.vectors, query, 10, small))
    assert index.search(query, 5, accept_all, shard=999_999) == []


def test_large_shard_is_ivf_and_a_subset_search_is_exact(
    sqlite_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path, policy=SMALL_IVF)
    kinds = index.shard_kinds()
    assert kinds == {corpus.big.tenant_id: IVF, corpus.small.tenant_id: FLAT}
    big = sorted(corpus.ids_of(corpus.big))
    rng = np.random.default_rng(37)
    for size in (1, 15, 150):  # 0.1% to 10% of the shard
        subset = set(rng.choice(big, size=size, replace=False).tolist())
        for query in unit_vectors(rng, 3):
            hits = index.search(query, 10, accept_all, shard=corpus.big.tenant_id, allowed=subset)
            assert_same_hits(hits, brute_force(corpus.vectors, query, 10, subset))
    # Unfiltered, IVF is approximate but finds a vector's own row.
    for row_id in big[:20]:
        hits = index.search(corpus.vectors[row_id], 1, accept_all, shard=corpus.big.tenant_id)
        assert hits[0][0] == row_id


def test_ivf_index_persists_and_loads(sqlite_db: sessionmaker[Session], tmp_path: Path) -> None:
    corpus = build_corpus(sqlite_db)
    first = opened(corpus, tmp_path, policy=SMALL_IVF)
    first.close()
    reopened = opened(corpus, tmp_path, policy=SMALL_IVF)
    assert not reopened.rebuilt and reopened.shard_kinds() == first.shard_kinds()
    query = unit_vectors(np.random.default_rng(41), 1)[0]
    tenant = corpus.big.tenant_id
    assert reopened.search(query, 10, accept_all, shard=tenant) == first.search(
        query, 10, accept_all, shard=tenant
    )


def test_shard_grows_into_ivf_and_keeps_changes_made_during_the_rebuild(
    sqlite_db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = build_corpus(sqlite_db)
    index = opened(corpus, tmp_path, policy=ShardPolicy(ivf_threshold=1600))
    assert index.shard_kinds()[corpus.big.tenant_id] == FLAT
    rng = np.random.default_rng(43)
    with sqlite_db() as session:
        corpus.add(session, corpus.big, unit_vectors(rng, 200))  # 1700 rows: over the threshold
        session.commit()
    doomed = sorted(corpus.ids_of(corpus.big))[:5]
    real_build = index_module.build

    def build_while_rows_change(*args: object, **kwargs: object) -> object:
        # Rows arrive and leave while the new shard is built from its copy.
        with sqlite_db() as session:
            corpus.add(session, corpus.big, unit_vectors(rng, 30))
            delete_embeddings(session, doomed)
            session.commit()
            index.catch_up(session)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(index_module, "build", build_while_rows_change)
    index.maintain(sqlite_db)
    corpus.forget(doomed)
    assert index.shard_kinds()[corpus.big.tenant_id] == IVF
    assert index.ntotal == len(corpus.vectors)
    big = corpus.ids_of(corpus.big)
    for query in unit_vectors(rng, 3):  # exhaustive over the subset: exact on IVF too
        hits = index.search(query, 10, accept_all, shard=corpus.big.tenant_id, allowed=big)
        assert_same_hits(hits, brute_force(corpus.vectors, query, 10, big))


def test_one_writer_persists_and_the_others_load(
    sqlite_db: sessionmaker[Session], tmp_path: Path
) -> None:
    corpus = build_corpus(sqlite_db)
    writer = opened(corpus, tmp_path)
    reader = opened(corpus, tmp_path)
    assert writer.is_writer and not reader.is_writer
    assert not reader.rebuilt  # it loaded the writer's files
    with sqlite_db() as session:
        corpus.add(session, corpus.small, unit_vectors(np.random.default_rng(47), 5))
        session.commit()
        reader.catch_up(session)
    assert not reader.persist()  # the reader keeps its copy caught up but writes nothing
    assert_matches_table(reader, corpus)
    writer.close()
    reader.maintain(sqlite_db)  # the writer is gone: the reader takes over
    assert reader.is_writer and reader.persist()


def test_rebuild_runs_in_the_background(sqlite_db: sessionmaker[Session], tmp_path: Path) -> None:
    corpus = build_corpus(sqlite_db)
    index = VectorIndex(model=MODEL, dimension=DIM, directory=tmp_path)
    index.open(sqlite_db, build=False)
    assert index.rebuilt and not index.ready
    with pytest.raises(IndexNotReady, match="being rebuilt"):
        index.search(np.ones(DIM, dtype=np.float32), 3, accept_all)
    index.start(sqlite_db, interval_s=0.05)
    try:
        deadline = time.monotonic() + 30
        while not index.ready and time.monotonic() < deadline:
            time.sleep(0.02)
        assert_matches_table(index, corpus)
    finally:
        index.close()
    assert Manifest.from_json(index.manifest_path.read_text()).count == len(corpus.vectors)
