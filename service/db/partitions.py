"""The generations table partitioned by month on PostgreSQL, for a history too large to
keep in one table (`genserve history partition`; opt-in, and one way).

Generation ids sort by creation time (new_id: "gen_", 12 hex digits of milliseconds, 12
random), so the table is partitioned by RANGE (id), with bounds "gen_" and the
milliseconds of a month's first instant (UTC). The primary key is the partition key, so
every foreign key that references generations(id) (embeddings, feedback, sources, a
generation's parent) keeps working against the partitioned table, and a query bounded by
id (the listings' keyset pages, an export's snapshot) reads only the partitions it needs.

Converting is one transaction, under an ACCESS EXCLUSIVE lock:

1. the table and its indexes are renamed, its self-reference and unique job_id dropped;
2. a partitioned table of the same columns takes its name, with the same primary key and
   foreign keys;
3. either (the default, which copies no rows) the old table becomes the partition
   generations_until_YYYY_MM of every row up to the end of this month, and PostgreSQL
   attaches its indexes to the new table's rather than building them again; or
   (split_history) a partition is made for each month of the history, the rows are
   copied into them, the indexes built, and the old table dropped;
4. the foreign keys that referenced the old table are made again against the new one,
   and ensure_partitions adds a partition per coming month and a DEFAULT partition, so
   that no generation is ever refused for want of one.

What changes: PostgreSQL enforces a unique index on a partitioned table only when it holds
the partition key, so job_id is indexed, no longer unique. One generation per job never
rested on that index alone: a worker stores a generation only in the transaction that
moves its job from running to succeeded (crud.finish_job's conditional UPDATE), and a
second attempt finds the job no longer running.

ensure_partitions runs with the API's sweeper (once an hour) to keep MONTHS_AHEAD months
ready. A month whose rows already went to the DEFAULT partition is left there, logged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, text

logger = logging.getLogger("genserve.partitions")

TABLE = "generations"
ID_PREFIX = "gen_"
MONTHS_AHEAD = 3
DEFAULT_PARTITION = f"{TABLE}_default"
# The bounds in pg_get_expr(relpartbound): FROM ('gen_...') TO ('gen_...'), MINVALUE or DEFAULT.
_LOWER = re.compile(r"FROM \('([^']*)'\)")
_UPPER = re.compile(r"TO \('([^']*)'\)")


@dataclass(frozen=True)
class Partition:
    name: str
    lower: str | None  # None: MINVALUE, or the DEFAULT partition
    upper: str | None  # None: the DEFAULT partition
    rows: int  # PostgreSQL's estimate (pg_class.reltuples), 0 before ANALYZE


def month_start(moment: datetime, months: int = 0) -> datetime:
    """The first instant (UTC) of moment's month, months later."""
    utc = moment.astimezone(UTC)
    index = utc.year * 12 + utc.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def bound(moment: datetime) -> str:
    """The lowest generation id made at or after moment: a partition bound."""
    return f"{ID_PREFIX}{int(moment.timestamp() * 1000):012x}"


def is_partitioned(connection: Connection) -> bool:
    if connection.dialect.name != "postgresql":
        return False
    kind = connection.scalar(
        text("SELECT relkind FROM pg_class WHERE oid = 'generations'::regclass")
    )
    return kind == "p"


def partitions(connection: Connection) -> list[Partition]:
    """The partitions of the generations table, by bound; [] while it is not partitioned."""
    if not is_partitioned(connection):
        return []
    rows = connection.execute(
        text(
            """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples
               FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
               WHERE i.inhparent = 'generations'::regclass"""
        )
    ).all()
    found = []
    for name, spec, tuples in rows:
        lower, upper = _LOWER.search(spec), _UPPER.search(spec)
        found.append(
            Partition(
                name,
                lower.group(1) if lower else None,
                upper.group(1) if upper else None,
                max(int(tuples), 0),
            )
        )
    return sorted(found, key=lambda p: (p.upper is None, p.upper or ""))


def partition_generations(
    connection: Connection,
    *,
    now: datetime,
    months_ahead: int = MONTHS_AHEAD,
    split_history: bool = False,
) -> list[str]:
    """Partition the generations table by month (see the module's doc), in the caller's
    transaction; returns the partitions made. Nothing to do when it already is.

    Args:
        split_history: Copy the rows into a partition per month of their ids, rather than
            keep the table as the partition of everything up to this month's end. The
            lock is held while every row is written again and indexed.

    Raises:
        ValueError: not PostgreSQL.
    """
    if connection.dialect.name != "postgresql":
        raise ValueError("only a PostgreSQL history can be partitioned")
    if is_partitioned(connection):
        return []
    connection.execute(text("LOCK TABLE generations IN ACCESS EXCLUSIVE MODE"))
    until = month_start(now, 1)
    old = f"{TABLE}_until_{until:%Y_%m}"

    indexes = list(
        connection.execute(
            text(
                """SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisprimary,
                      con.contype IS NOT NULL AS is_constraint
               FROM pg_index AS i
               JOIN pg_class AS c ON c.oid = i.indexrelid
               LEFT JOIN pg_constraint AS con ON con.conindid = i.indexrelid
                                            AND con.conrelid = i.indrelid
                                            AND con.contype IN ('p', 'u')
               WHERE i.indrelid = 'generations'::regclass"""
            )
        )
    )
    own_keys = connection.execute(
        text(
            """SELECT conname, pg_get_constraintdef(oid), confrelid = conrelid
               FROM pg_constraint WHERE conrelid = 'generations'::regclass AND contype = 'f'"""
        )
    ).all()
    references = connection.execute(
        text(
            """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
               FROM pg_constraint
               WHERE confrelid = 'generations'::regclass AND contype = 'f'
                 AND conrelid <> 'generations'::regclass"""
        )
    ).all()

    # 1. The old table steps aside; its self-reference would point at itself alone, and
    # its unique job_id could not be the partitioned table's.
    for name, _, primary, is_constraint in indexes:
        if is_constraint and not primary:
            connection.execute(text(f'ALTER TABLE generations DROP CONSTRAINT "{name}"'))
            continue
        connection.execute(text(f'ALTER INDEX "{name}" RENAME TO "{_renamed(name, old)}"'))
    for name, _, self_reference in own_keys:
        if self_reference:
            connection.execute(text(f'ALTER TABLE generations DROP CONSTRAINT "{name}"'))
    connection.execute(text(f'ALTER TABLE generations RENAME TO "{old}"'))

    # 2. The partitioned table, with the old one's keys and indexes.
    connection.execute(
        text(
            f"""CREATE TABLE generations (LIKE "{old}" INCLUDING ALL EXCLUDING INDEXES)
                PARTITION BY RANGE (id)"""
        )
    )
    connection.execute(
        text("ALTER TABLE generations ADD CONSTRAINT generations_pkey PRIMARY KEY (id)")
    )
    for name, definition, _ in own_keys:
        connection.execute(text(f'ALTER TABLE generations ADD CONSTRAINT "{name}" {definition}'))
    definitions = [
        _parent_index(definition, unique)
        for _, definition, primary, unique in indexes
        if not primary
    ]
    if split_history:
        # 3. A partition per month of the history, the rows copied in, then indexed.
        first = connection.scalar(text(f'SELECT min(id) FROM "{old}"'))
        start = month_start(_moment(first) if first else now)
        connection.execute(
            text(
                f"""CREATE TABLE "{TABLE}_{start:%Y_%m}" PARTITION OF generations
                    FOR VALUES FROM (MINVALUE) TO ('{bound(month_start(start, 1))}')"""
            )
        )
        made = [f"{TABLE}_{start:%Y_%m}"]
        made += ensure_partitions(connection, now=now, months_ahead=months_ahead)
        columns = ", ".join(
            f'"{name}"'
            for name in connection.scalars(
                text(
                    """SELECT attname FROM pg_attribute
                       WHERE attrelid = CAST(:table AS regclass) AND attnum > 0
                         AND NOT attisdropped AND attgenerated = ''
                       ORDER BY attnum"""
                ),
                {"table": f'"{old}"'},
            )
        )
        connection.execute(
            text(f'INSERT INTO generations ({columns}) SELECT {columns} FROM "{old}" ORDER BY id')
        )
        for definition in definitions:
            connection.execute(text(definition))
    else:
        # 3. The old table becomes the partition of everything up to this month's end.
        for definition in definitions:
            connection.execute(text(definition))
        connection.execute(
            text(
                f"""ALTER TABLE generations ATTACH PARTITION "{old}"
                    FOR VALUES FROM (MINVALUE) TO ('{bound(until)}')"""
            )
        )
        made = [old, *ensure_partitions(connection, now=now, months_ahead=months_ahead)]

    # 4. What referenced the old table references the new one.
    for table, name, definition in references:
        connection.execute(text(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"'))
        connection.execute(
            text(f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition} NOT VALID')
        )
        connection.execute(text(f'ALTER TABLE "{table}" VALIDATE CONSTRAINT "{name}"'))
    if split_history:
        connection.execute(text(f'DROP TABLE "{old}"'))
    logger.info("generations partitioned by month: %s", ", ".join(made))
    return made


def ensure_partitions(
    connection: Connection, *, now: datetime, months_ahead: int = MONTHS_AHEAD
) -> list[str]:
    """Add a partition for each month from the last partition's end to the end of the
    month months_ahead after now's, and the DEFAULT partition; returns those made.
    Nothing while the table is not partitioned."""
    existing = partitions(connection)
    if not existing:
        return []
    made = []
    if not any(p.upper is None for p in existing):
        connection.execute(
            text(f'CREATE TABLE "{DEFAULT_PARTITION}" PARTITION OF generations DEFAULT')
        )
        made.append(DEFAULT_PARTITION)
    last = max(p.upper for p in existing if p.upper is not None)
    until = bound(month_start(now, months_ahead + 1))
    while last < until:
        start = month_start(_moment(last))
        end = bound(month_start(start, 1))
        name = f"{TABLE}_{start:%Y_%m}"
        try:
            with connection.begin_nested():
                connection.execute(
                    text(
                        f"""CREATE TABLE "{name}" PARTITION OF generations
                            FOR VALUES FROM ('{last}') TO ('{end}')"""
                    )
                )
        except Exception as exc:  # noqa: BLE001 - rows of that month went to DEFAULT
            logger.warning("partition %s not made: %s", name, exc)
            break
        made.append(name)
        last = end
    return made


def _parent_index(definition: str, unique: bool) -> str:
    """The partitioned table's form of an old index: UNIQUE (job_id) becomes a plain
    index, which PostgreSQL can have on a partitioned table without the partition key."""
    if not unique:
        return definition
    column = re.search(r"\((\w+)\)\s*$", definition)
    assert column is not None, definition
    return f"CREATE INDEX ix_generations_{column.group(1)} ON generations ({column.group(1)})"


def _moment(key: str) -> datetime:
    """The time a partition bound or a generation id stands for (its first 12 hex
    digits of milliseconds)."""
    return datetime.fromtimestamp(int(key.removeprefix(ID_PREFIX)[:12], 16) / 1000, UTC)


def _renamed(index: str, table: str) -> str:
    """An index of the old table, renamed after it (63 characters at most)."""
    suffix = index.removeprefix("ix_").removeprefix(TABLE).strip("_") or "index"
    return f"{table}_{suffix}"[:63]
