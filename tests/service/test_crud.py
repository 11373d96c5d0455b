"""Job state transitions that keep a job from running twice, on both backends."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql

from service.db import crud, tenants
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Generation, Job, new_id, utcnow
from tests.utils.factories import make_generation_row, make_job, make_key


def _session(url: str):  # noqa: ANN202
    return make_sessionmaker(make_engine(url))()


def _generation(job: Job) -> Generation:
    return Generation(
        id=new_id("gen"),
        tenant_id=job.tenant_id,
        job_id=job.id,
        model=job.model,
        model_version="1",
        input=job.input,
        prompt="p",
        output="o",
        params={},
        meta={},
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason="stop",
        timings={},
        conversation_id=job.conversation_id,
    )


def test_keys_are_hashed_and_scoped(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, key = make_key(session, "acme", "reader")
        row = tenants.get_api_key(session, plaintext=key)
        assert row is not None and row.tenant_id == tenant_id and row.role == "reader"
        assert row.key_hash == tenants.hash_key(key) and row.key_hash != key
        assert key.startswith(row.prefix) and len(row.prefix) < len(key)
        assert tenants.get_api_key(session, plaintext=key + "x") is None


def test_json_columns_read_back_what_was_written(db_url: str) -> None:
    """JSON columns are read with orjson where it reads them as json would: integers past
    64 bits stay exact, long digit strings stay strings."""
    meta = {
        "big": 2**70 + 1,
        "small": -(2**65),
        "u64": 2**64 - 1,
        "float": 0.1,
        "digits": "1" * 25,
        "text": "é 😀 \u2028",
        "nested": [1, {"a": None, "b": False}],
    }
    with _session(db_url) as session:
        tenant_id, _ = make_key(session)
        job = make_job(session, tenant_id, metadata=meta)
        session.commit()
    with _session(db_url) as session:
        stored = session.get(Job, job.id)
        assert stored is not None and stored.meta == meta
        assert type(stored.meta["big"]) is int


def test_a_job_is_claimed_once(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, _ = make_key(session)
        job = make_job(session, tenant_id)
        first = crud.claim_job(session, job_id=job.id, lease_s=60)
        second = crud.claim_job(session, job_id=job.id, lease_s=60)
        assert first is not None and first.status == "running" and first.attempts == 1
        assert second is None


def test_an_expired_lease_can_be_claimed_again(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, _ = make_key(session)
        job = make_job(session, tenant_id)
        assert crud.claim_job(session, job_id=job.id, lease_s=60) is not None
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
        again = crud.claim_job(session, job_id=job.id, lease_s=60)
        assert again is not None and again.attempts == 2


def test_result_is_stored_once(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, _ = make_key(session)
        job = make_job(session, tenant_id)
        claimed = crud.claim_job(session, job_id=job.id, lease_s=60)
        assert claimed is not None
        vectors = {"prompt": b"\x00" * 16}

        def store() -> bool:
            assert claimed is not None
            stored = crud.store_generation(
                session,
                job=claimed,
                generation=_generation(claimed),
                vectors=vectors,
                model="m",
                dimension=4,
            )
            session.commit()
            return stored

        assert store()
        assert not store()
        count = session.scalars(select(Generation).where(Generation.job_id == job.id)).all()
        assert len(count) == 1


def test_cancelled_job_is_never_claimed(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, _ = make_key(session)
        job = make_job(session, tenant_id)
        crud.cancel_job(session, job=job)
        session.commit()
        assert job.status == "cancelled"
        assert crud.claim_job(session, job_id=job.id, lease_s=60) is None


def test_metadata_filters(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, _ = make_key(session)
        a = make_job(session, tenant_id, metadata={"tags": ["x", "y"], "user": "ann", "n": 3})
        b = make_job(session, tenant_id, metadata={"tags": ["y"], "user": "bob", "n": 4})
        other, _ = make_key(session, "globex")
        make_job(session, other, metadata={"tags": ["x"], "user": "ann"})

        def ids(**kwargs: object) -> set[str]:
            rows, _ = crud.list_jobs(
                session, tenant_id=tenant_id, cursor=None, limit=50, filters=crud.Filters(**kwargs)
            )  # type: ignore[arg-type]
            return {row.id for row in rows}

        assert ids(tags=("x",)) == {a.id}
        assert ids(tags=("y",)) == {a.id, b.id}
        assert ids(tags=("x", "y")) == {a.id}
        assert ids(metadata={"user": "bob"}) == {b.id}
        assert ids(metadata={"n": "3"}) == {a.id}
        assert ids(metadata={"user": "nobody"}) == set()


def test_metadata_filters_compare_typed_values_and_origin(db_url: str) -> None:
    with _session(db_url) as session:
        tenant_id, _ = make_key(session)
        rows = {
            name: make_generation_row(session, tenant_id, meta=meta).id
            for name, meta in {
                "text": {"k": "abc"},
                "number": {"k": 3},
                "numeric text": {"k": "3"},
                "flag": {"k": True, "synthetic": True},
                "not synthetic": {"synthetic": False},
            }.items()
        }
        session.commit()

        def found(**filters: object) -> set[str]:
            page, _ = crud.list_generations(
                session, tenant_id=tenant_id, filters=crud.Filters(**filters), cursor=None, limit=20
            )
            return {name for name, gid in rows.items() if gid in {row.id for row in page}}

        # A row whose value has another type is no match and no error (PostgreSQL casts fail).
        assert found(metadata={"k": 3}) == {"number"}
        assert found(metadata={"k": "3"}) == {"number", "numeric text"}  # a query string
        assert found(metadata={"k": "abc"}) == {"text"}
        assert found(metadata={"k": True}) == {"flag"}
        assert found(synthetic=True) == {"flag"}
        assert found(synthetic=False) == set(rows) - {"flag"}


def test_a_tag_filter_is_written_as_the_gin_index_on_postgresql() -> None:
    # PostgreSQL uses an expression index only for the expression as written in the index
    # (migration 0007: metadata -> 'tags'); metadata['tags'] would never use it.
    query = select(Generation.id).where(
        *crud.filter_clauses(Generation, crud.Filters(tags=("a", "b")), "postgresql")
    )
    sql = str(query.compile(dialect=postgresql.dialect()))
    assert "(generations.metadata -> 'tags') @>" in sql
