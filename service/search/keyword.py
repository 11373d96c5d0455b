"""Keyword search over generations, one interface on two engines.

PostgreSQL: the stored tsvector columns of migration 0002 with their GIN indexes, ranked
by ts_rank. SQLite: the FTS5 table of migration 0002, ranked by BM25. Both stem English
words, and both treat a query as words any of which may match (as a search box does),
ranking documents that match more and rarer words higher.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, column, func, literal, literal_column, select, table
from sqlalchemy.dialects.postgresql import REGCONFIG
from sqlalchemy.orm import Session

from service.db import crud
from service.db.tables import Chunk, Generation

MAX_TERMS = 64
# Objects migration 0002 makes outside the ORM, per dialect; the schema check skips them.
KEYWORD_COLUMNS = frozenset({"search_rowid", "prompt_tsv", "output_tsv", "text_tsv"})
KEYWORD_INDEXES = frozenset(
    {
        "ix_generations_search_rowid",
        "ix_generations_prompt_tsv",
        "ix_generations_output_tsv",
        "ix_chunks_text_tsv",
    }
)
KEYWORD_TABLE_PREFIX = "generations_fts"
CHUNK_TABLE_PREFIX = "chunks_fts"  # migration 0006
KEYWORD_TABLE_PREFIXES = (KEYWORD_TABLE_PREFIX, CHUNK_TABLE_PREFIX)

_WORD = re.compile(r"\w+")
# Words too common to say anything; PostgreSQL's 'english' configuration drops them too.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into
    is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with you your yours
    yourself yourselves""".split()
)


@dataclass(frozen=True)
class KeywordHit:
    generation_id: str
    score: float  # BM25 on SQLite, ts_rank on PostgreSQL: higher is better


@dataclass(frozen=True)
class ChunkHit:
    chunk_id: int
    score: float  # as KeywordHit's


def query_terms(query: str) -> list[str]:
    """The distinct lowercase words of a query, without stopwords unless nothing else is left."""
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(query)))
    kept = [word for word in words if word not in STOPWORDS] or words
    return kept[:MAX_TERMS]


def keyword_search(
    session: Session,
    *,
    tenant_id: int,
    query: str,
    target: str,
    limit: int,
    filters: crud.Filters,
) -> list[KeywordHit]:
    """The tenant's generations that contain words of the query, best first.

    target is "prompt", "output" or "both" (either text may match).
    """
    terms = query_terms(query)
    if not terms:
        return []
    dialect = session.get_bind().dialect.name
    where = [Generation.tenant_id == tenant_id, *crud.filter_clauses(Generation, filters, dialect)]
    if dialect == "postgresql":
        return _postgres(session, terms, target, limit, where)
    return _sqlite(session, terms, target, limit, where)


def _sqlite(
    session: Session, terms: list[str], target: str, limit: int, where: list[ColumnElement[bool]]
) -> list[KeywordHit]:
    fts = table(KEYWORD_TABLE_PREFIX, column("rowid"))
    columns = {"prompt": "prompt", "output": "output", "both": "prompt output"}[target]
    # Each word is an FTS5 string, so nothing in it is query syntax.
    match = f"{{{columns}}} : (" + " OR ".join(f'"{term}"' for term in terms) + ")"
    rank = func.bm25(literal_column(KEYWORD_TABLE_PREFIX))
    stmt = (
        select(Generation.id, rank)
        .select_from(fts)
        .join(Generation, literal_column("generations.search_rowid") == fts.c.rowid)
        .where(literal_column(KEYWORD_TABLE_PREFIX).op("MATCH")(match), *where)
        .order_by(rank, Generation.id)
        .limit(limit)
    )
    return [KeywordHit(gid, -float(score)) for gid, score in session.execute(stmt)]


def _postgres(
    session: Session, terms: list[str], target: str, limit: int, where: list[ColumnElement[bool]]
) -> list[KeywordHit]:
    # Words are \w+ only, so joining them with | is a well-formed tsquery.
    query = func.to_tsquery(literal("english").cast(REGCONFIG), " | ".join(terms))
    prompt: ColumnElement[Any] = literal_column("generations.prompt_tsv")
    output: ColumnElement[Any] = literal_column("generations.output_tsv")
    vector: ColumnElement[Any]
    matches: ColumnElement[bool]
    if target == "prompt":
        vector, matches = prompt, prompt.op("@@")(query)
    elif target == "output":
        vector, matches = output, output.op("@@")(query)
    else:
        vector = prompt.op("||")(output)
        matches = prompt.op("@@")(query) | output.op("@@")(query)
    rank = func.ts_rank(vector, query, 1)  # 1: divided by 1 + log(length)
    stmt = (
        select(Generation.id, rank)
        .where(matches, *where)
        .order_by(rank.desc(), Generation.id)
        .limit(limit)
    )
    return [KeywordHit(gid, float(score)) for gid, score in session.execute(stmt)]


def keyword_chunks(
    session: Session,
    *,
    collection_ids: Sequence[int],
    query: str,
    limit: int,
    where: Sequence[ColumnElement[bool]] = (),
) -> list[ChunkHit]:
    """The chunks of the collections that contain words of the query, best first.

    where: further conditions on Chunk (and Document, which the caller joins in them).
    """
    terms = query_terms(query)
    if not terms or not collection_ids:
        return []
    conditions = [Chunk.collection_id.in_(list(collection_ids)), *where]
    if session.get_bind().dialect.name == "postgresql":
        tsquery = func.to_tsquery(literal("english").cast(REGCONFIG), " | ".join(terms))
        vector: ColumnElement[Any] = literal_column("chunks.text_tsv")
        rank = func.ts_rank(vector, tsquery, 1)
        stmt = select(Chunk.id, rank).where(vector.op("@@")(tsquery), *conditions)
        stmt = stmt.order_by(rank.desc(), Chunk.id).limit(limit)
        return [ChunkHit(cid, float(score)) for cid, score in session.execute(stmt)]
    fts = table(CHUNK_TABLE_PREFIX, column("rowid"))
    match = " OR ".join(f'"{term}"' for term in terms)
    bm25 = func.bm25(literal_column(CHUNK_TABLE_PREFIX))
    stmt = (
        select(Chunk.id, bm25)
        .select_from(fts)
        .join(Chunk, Chunk.id == fts.c.rowid)
        .where(literal_column(CHUNK_TABLE_PREFIX).op("MATCH")(match), *conditions)
        .order_by(bm25, Chunk.id)
        .limit(limit)
    )
    return [ChunkHit(cid, -float(score)) for cid, score in session.execute(stmt)]
