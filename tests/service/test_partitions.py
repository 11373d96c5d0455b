"""The generations table partitioned by month on PostgreSQL: no row lost, every key kept,
new rows in their month's partition, the coming months made ahead."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from service.cli import app
from service.db import crud, partitions
from service.db.migrate import upgrade
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Embedding, Feedback, Generation, Job, new_id
from tests.utils.factories import make_generation_row, make_job, make_key, store_turn

NOW = datetime(2026, 12, 4, 12, tzinfo=UTC)
VECTORS = {"prompt": b"\0" * 12, "output": b"\0" * 12}


@pytest.fixture
def pg_session(empty_pg_url: str) -> Iterator[Session]:
    upgrade(empty_pg_url)
    engine = make_engine(empty_pg_url)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def partition_of(session: Session, generation_id: str) -> str:
    return session.scalar(
        text("SELECT tableoid::regclass::text FROM generations WHERE id = :id"),
        {"id": generation_id},
    )


def in_month(year: int, month: int) -> str:
    """A generation id made in that month."""
    start = datetime(year, month, 2, tzinfo=UTC)
    return partitions.bound(start) + "0123456789ab"


def row_made_in(session: Session, tenant_id: int, year: int, month: int) -> str:
    """A stored generation (and job) whose id and created_at are of that month."""
    row = make_generation_row(session, tenant_id)
    made = in_month(year, month)
    session.execute(
        text("UPDATE generations SET id = :new, created_at = :at WHERE id = :old"),
        {"new": made, "at": datetime(year, month, 2, tzinfo=UTC), "old": row.id},
    )
    session.commit()
    return made


def test_bounds_are_ids_of_a_months_first_instant() -> None:
    start = partitions.month_start(NOW, 1)
    assert start == datetime(2027, 1, 1, tzinfo=UTC)
    assert partitions.month_start(NOW, -12) == datetime(2025, 12, 1, tzinfo=UTC)
    assert partitions.bound(start) == "gen_" + f"{int(start.timestamp() * 1000):012x}"
    # An id made in the month sorts at or after its bound, and before the next one.
    made = new_id("gen")
    now = datetime.now(UTC)
    assert partitions.bound(partitions.month_start(now)) <= made
    assert made < partitions.bound(partitions.month_start(now, 1))


def test_partitioning_keeps_every_row_and_key(pg_session: Session) -> None:
    session = pg_session
    tenant_id, _ = make_key(session)
    stored = [
        store_turn(
            session, tenant_id, turn_input={"prompt": f"q{i}"}, output=f"a{i}", vectors=VECTORS
        )
        for i in range(5)
    ]
    session.add(Feedback(tenant_id=tenant_id, generation_id=stored[0].id, score=4))
    session.commit()
    connection = session.connection()
    made = partitions.partition_generations(connection, now=NOW, months_ahead=2)
    session.commit()
    assert made == [
        "generations_until_2027_01",
        "generations_default",
        "generations_2027_01",
        "generations_2027_02",
    ]
    assert partitions.is_partitioned(session.connection())
    assert partitions.partition_generations(session.connection(), now=NOW) == []  # once

    # Every row is there, in the partition the old table became, and listed as before.
    assert session.scalar(select(func.count()).select_from(Generation)) == 5
    assert {partition_of(session, g.id) for g in stored} == {"generations_until_2027_01"}
    page, _ = crud.list_generations(
        session, tenant_id=tenant_id, filters=crud.Filters(), cursor=None, limit=10
    )
    assert [g.id for g in page] == [g.id for g in reversed(stored)]

    # A new row goes to its month's partition; keys into generations still hold.
    row_made_in(session, tenant_id, 2027, 2)
    assert partition_of(session, in_month(2027, 2)) == "generations_2027_02"
    with pytest.raises(Exception, match="foreign key"):
        with session.begin_nested():
            session.add(
                Embedding(
                    tenant_id=tenant_id,
                    generation_id="gen_nothere",
                    kind="prompt",
                    model="m",
                    dimension=3,
                    vector=b"\0" * 12,
                )
            )
            session.flush()

    # Deleting a job deletes its generation, whose embeddings and feedback go with it.
    session.execute(delete(Job).where(Job.id == stored[0].job_id))
    session.commit()
    assert session.scalars(select(Generation.id).where(Generation.id == stored[0].id)).all() == []
    assert not session.scalars(
        select(Embedding.id).where(Embedding.generation_id == stored[0].id)
    ).all()
    assert not session.scalars(
        select(Feedback.id).where(Feedback.generation_id == stored[0].id)
    ).all()


def test_a_job_still_stores_one_generation(pg_session: Session) -> None:
    """job_id is no longer unique once partitioned: the job's own transition keeps one."""
    session = pg_session
    tenant_id, _ = make_key(session)
    partitions.partition_generations(session.connection(), now=datetime.now(UTC))
    session.commit()
    job = make_job(session, tenant_id)
    claimed = crud.claim_job(session, job_id=job.id, lease_s=60)
    assert claimed is not None

    def result() -> Generation:
        return Generation(
            id=new_id("gen"),
            tenant_id=tenant_id,
            job_id=job.id,
            model=job.model,
            model_version="1",
            input=job.input,
            prompt="hello",
            output="once",
            prompt_tokens=1,
            completion_tokens=1,
            finish_reason="stop",
        )

    assert crud.store_generation(
        session, job=claimed, generation=result(), vectors={}, model="m", dimension=3
    )
    session.commit()
    assert not crud.store_generation(
        session, job=claimed, generation=result(), vectors={}, model="m", dimension=3
    )
    session.commit()
    count = select(func.count()).select_from(Generation).where(Generation.job_id == job.id)
    assert session.scalar(count) == 1


def test_coming_months_are_made_and_a_month_in_default_is_left(
    pg_session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    session = pg_session
    tenant_id, _ = make_key(session)
    assert partitions.ensure_partitions(session.connection(), now=NOW) == []  # not partitioned
    partitions.partition_generations(session.connection(), now=NOW, months_ahead=1)
    session.commit()
    # A row past every partition goes to DEFAULT rather than being refused.
    row_made_in(session, tenant_id, 2027, 5)
    assert partition_of(session, in_month(2027, 5)) == "generations_default"

    # Four months on: February to April are made; May holds a row in DEFAULT, so it and
    # the months after it wait, logged.
    with caplog.at_level(logging.WARNING, logger="genserve.partitions"):
        made = partitions.ensure_partitions(
            session.connection(), now=datetime(2027, 4, 10, tzinfo=UTC), months_ahead=2
        )
    session.commit()
    assert made == ["generations_2027_02", "generations_2027_03", "generations_2027_04"]
    assert "generations_2027_05 not made" in caplog.text
    assert partition_of(session, in_month(2027, 5)) == "generations_default"
    names = [p.name for p in partitions.partitions(session.connection())]
    assert names == [
        "generations_until_2027_01",
        "generations_2027_01",
        "generations_2027_02",
        "generations_2027_03",
        "generations_2027_04",
        "generations_default",
    ]


def test_sqlite_is_not_partitioned(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/genserve.sqlite"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        assert not partitions.is_partitioned(connection)
        assert partitions.partitions(connection) == []
        assert partitions.ensure_partitions(connection, now=NOW) == []
        with pytest.raises(ValueError, match="PostgreSQL"):
            partitions.partition_generations(connection, now=NOW)
    engine.dispose()


def test_the_cli_partitions_and_lists(
    empty_pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade(empty_pg_url)
    monkeypatch.setenv("GENSERVE_DATABASE_URL", empty_pg_url)
    runner = CliRunner()
    listed = runner.invoke(app, ["history", "partitions"])
    assert listed.exit_code == 0 and "not partitioned" in listed.output
    made = runner.invoke(app, ["history", "partition", "--months-ahead", "2"])
    assert made.exit_code == 0, made.output
    assert "generations_until_" in made.output and "generations_default" in made.output
    again = runner.invoke(app, ["history", "partition"])
    assert again.exit_code == 0 and "already partitioned" in again.output
    listed = runner.invoke(app, ["history", "partitions"])
    lines = listed.output.splitlines()
    assert len(lines) == 4 and "MINVALUE" in lines[0] and "DEFAULT" in lines[-1]

    url = f"sqlite:///{tmp_path}/genserve.sqlite"
    upgrade(url)
    monkeypatch.setenv("GENSERVE_DATABASE_URL", url)
    refused = runner.invoke(app, ["history", "partition"])
    assert refused.exit_code == 1 and "only a PostgreSQL history" in refused.output


def test_split_history_puts_each_row_in_its_months_partition(pg_session: Session) -> None:
    session = pg_session
    tenant_id, _ = make_key(session)
    months = [(2026, 9), (2026, 10), (2026, 12)]
    ids = []
    for year, month in months:
        generation = store_turn(
            session, tenant_id, turn_input={"prompt": f"{month}"}, output="a", vectors=VECTORS
        )
        # Embeddings follow the id (ON UPDATE is not set): move them with it.
        new = in_month(year, month)
        session.execute(
            text("ALTER TABLE embeddings DROP CONSTRAINT embeddings_generation_id_fkey")
        )
        session.execute(
            text("UPDATE embeddings SET generation_id = :new WHERE generation_id = :old"),
            {"new": new, "old": generation.id},
        )
        session.execute(
            text("UPDATE generations SET id = :new WHERE id = :old"),
            {"new": new, "old": generation.id},
        )
        session.execute(
            text(
                "ALTER TABLE embeddings ADD CONSTRAINT embeddings_generation_id_fkey "
                "FOREIGN KEY (generation_id) REFERENCES generations(id) ON DELETE CASCADE"
            )
        )
        ids.append(new)
    session.commit()
    made = partitions.partition_generations(
        session.connection(), now=NOW, months_ahead=1, split_history=True
    )
    session.commit()
    assert made == [
        "generations_2026_09",
        "generations_default",
        "generations_2026_10",
        "generations_2026_11",
        "generations_2026_12",
        "generations_2027_01",
    ]
    assert [partition_of(session, i) for i in ids] == [
        "generations_2026_09",
        "generations_2026_10",
        "generations_2026_12",
    ]
    assert session.scalar(text("SELECT to_regclass('generations_until_2027_01')")) is None
    # The keyword search's generated columns were made again for the copied rows.
    found = session.scalar(
        text("SELECT count(*) FROM generations WHERE prompt_tsv @@ to_tsquery('english', '10')")
    )
    assert found == 1
    session.execute(delete(Generation).where(Generation.id == ids[1]))
    session.commit()
    remaining = select(func.count()).select_from(Embedding)
    assert session.scalar(remaining) == 4  # the deleted row's two went with it


def test_a_time_filter_reads_only_the_partitions_of_that_time(pg_session: Session) -> None:
    session = pg_session
    tenant_id, _ = make_key(session)
    for year, month in [(2026, 9), (2026, 12)]:
        row_made_in(session, tenant_id, year, month)
    partitions.partition_generations(
        session.connection(), now=NOW, months_ahead=1, split_history=True
    )
    session.commit()
    filters = crud.Filters(created_after=datetime(2026, 11, 20, tzinfo=UTC))
    query = (
        select(Generation)
        .where(
            Generation.tenant_id == tenant_id,
            *crud.filter_clauses(Generation, filters, "postgresql"),
        )
        .order_by(Generation.id.desc())
        .limit(21)
    )
    compiled = query.compile(session.get_bind())
    plan = "\n".join(
        row[0]
        for row in session.connection().exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
    )
    assert "generations_2026_12" in plan
    assert "generations_2026_09" not in plan and "generations_2026_10" not in plan
    page, _ = crud.list_generations(
        session, tenant_id=tenant_id, filters=filters, cursor=None, limit=10
    )
    assert [g.id for g in page] == [in_month(2026, 12)]
