"""Usage over time: daily rollups per tenant, key, model and latency bucket.

A request is counted once, when it finishes (succeeded, failed or cancelled), on the UTC
day it finished, in the bucket of its latency from acceptance to end; an answer from the
cache is counted as it is served. Feedback is counted on the day its generation was made,
so a model's trend shows how good each day's outputs were judged. Percentiles are read
from the bucket counts, interpolated within a bucket as Prometheus' histogram_quantile
does. Callers commit.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import BigInteger, Float, cast, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.db.tables import LATENCY_BUCKETS_MS, NO_LATENCY, UsageRollup, utcnow

COUNTERS = (
    "requests",
    "succeeded",
    "failed",
    "cancelled",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "time_saved_ms",
    "refusals",
    "feedback_count",
    "feedback_sum",
)
GROUPS = ("day", "api_key_id", "model")
PERCENTILES = (50, 95, 99)
OPERATOR_KEY = 0  # the key id of requests made from the operator's command line

# An answer that declines the request: counted per model as its refusal rate. A plain
# heuristic on the answer's opening, as the English refusals of instruction-tuned models
# are phrased; it is a trend signal, not a classifier.
REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry, (but )?i|i (cannot|can'?t|won'?t|am unable|'m unable|"
    r"am not able)|as an ai\b|i do not feel comfortable|i must decline)",
    re.IGNORECASE,
)


def is_refusal(output: str) -> bool:
    return REFUSAL.match(output[:200].replace("\u2019", "'")) is not None


def bucket_of(latency_ms: float) -> int:
    """The index of the first bucket whose upper bound holds latency_ms."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)


def record(
    session: Session,
    *,
    tenant_id: int,
    model: str,
    api_key_id: int | None,
    day: date | None = None,
    bucket: int = NO_LATENCY,
    **counts: float,
) -> None:
    """Add counts to the rollup row of (tenant, day, key, model, bucket), in the caller's
    transaction. Requests counted go in their latency's bucket (bucket_of); what is not a
    request (feedback) in NO_LATENCY."""
    unknown = set(counts) - set(COUNTERS)
    if unknown:
        raise ValueError(f"unknown usage counters: {sorted(unknown)}")
    values = {name: value for name, value in counts.items() if value}
    if not values:
        return
    dialect = session.get_bind().dialect.name
    make = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = make(UsageRollup).values(
        tenant_id=tenant_id,
        day=day or utcnow().date(),
        api_key_id=api_key_id or OPERATOR_KEY,
        model=model,
        bucket=bucket,
        **values,
    )
    table = UsageRollup.__table__
    statement = statement.on_conflict_do_update(
        index_elements=["tenant_id", "day", "api_key_id", "model", "bucket"],
        set_={name: table.c[name] + statement.excluded[name] for name in values},
    )
    session.execute(statement)


# Jobs of these APIs ask no model for anything: their ends are not counted as requests.
NOT_REQUESTS = ("export",)


@dataclass(frozen=True)
class Ended:
    """A job that reached its final status: who made it, for which model, when, and which
    API made it."""

    tenant_id: int
    model: str
    api_key_id: int | None
    created_at: datetime
    api: str = "jobs"


def record_ended(
    session: Session,
    requests: Iterable[Ended],
    *,
    status: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    refusal: bool = False,
) -> None:
    """Count requests that reached status now: one upsert per (tenant, key, model, latency
    bucket), however many requests (a batch cancelled at once). Jobs of NOT_REQUESTS are
    left out."""
    now = utcnow()
    groups: dict[tuple[int, str, int | None, int], list[float]] = {}
    for request in requests:
        if request.api in NOT_REQUESTS:
            continue
        latency_ms = max(0.0, (now - request.created_at).total_seconds() * 1000)
        key = (request.tenant_id, request.model, request.api_key_id, bucket_of(latency_ms))
        groups.setdefault(key, []).append(latency_ms)
    for (tenant_id, model, api_key_id, bucket), latencies in groups.items():
        record(
            session,
            tenant_id=tenant_id,
            model=model,
            api_key_id=api_key_id,
            day=now.date(),
            bucket=bucket,
            requests=len(latencies),
            latency_ms=round(sum(latencies)),
            **{status: len(latencies)},
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            refusals=int(refusal),
        )


# --- reading -------------------------------------------------------------------------------


def percentile(buckets: dict[int, int], q: float) -> float | None:
    """The q-th percentile (0-100) of latencies counted per bucket, in ms; None if empty.

    Linear within the bucket it falls in; the open last bucket answers its lower bound.
    """
    total = sum(buckets.values())
    if total == 0:
        return None
    rank = q / 100 * total
    seen = 0
    for index in sorted(buckets):
        count = buckets[index]
        if count and seen + count >= rank:
            lower = LATENCY_BUCKETS_MS[index - 1] if index > 0 else 0
            if index >= len(LATENCY_BUCKETS_MS):
                return float(lower)
            upper = LATENCY_BUCKETS_MS[index]
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return float(LATENCY_BUCKETS_MS[-1])


@dataclass
class Totals:
    """The counters of a group of rollup rows, and its latency histogram."""

    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    buckets: dict[int, int] = field(default_factory=dict)

    def merge(self, other: Totals) -> None:
        for name, value in other.counts.items():
            self.counts[name] += value
        for bucket, count in other.buckets.items():
            self.buckets[bucket] = self.buckets.get(bucket, 0) + count

    def summary(self) -> dict[str, Any]:
        c = self.counts
        requests = int(c["requests"])
        answered = int(c["succeeded"])
        return {
            "requests": requests,
            "succeeded": answered,
            "errors": int(c["failed"]),
            "cancelled": int(c["cancelled"]),
            "prompt_tokens": int(c["prompt_tokens"]),
            "completion_tokens": int(c["completion_tokens"]),
            "latency_ms": {f"p{q}": _rounded(percentile(self.buckets, q)) for q in PERCENTILES}
            | {"mean": _rounded(c["latency_ms"] / requests if requests else None)},
            "cache_hits": int(c["cache_hits"]),
            "cache_hit_ratio": _ratio(c["cache_hits"], requests),
            "time_saved_s": round(c["time_saved_ms"] / 1000, 3),
            "error_rate": _ratio(c["failed"], requests),
            "refusal_rate": _ratio(c["refusals"], answered),
            "mean_completion_tokens": _rounded(
                c["completion_tokens"] / answered if answered else None
            ),
            "feedback_count": int(c["feedback_count"]),
            "feedback_score": _rounded(
                c["feedback_sum"] / c["feedback_count"] if c["feedback_count"] else None, 4
            ),
        }


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


@dataclass
class Report:
    total: dict[str, Any]
    groups: list[dict[str, Any]]  # one per distinct value of the grouping columns


def report(
    session: Session,
    *,
    tenant_id: int,
    start: date,
    end: date,
    by: Sequence[str],
    model: str | None = None,
    api_key_id: int | None = None,
) -> Report:
    """The tenant's usage of days start..end inclusive, summed per distinct value of the
    `by` columns. Two grouped queries over one index range: the counters, and the
    requests per latency bucket for the percentiles; a few rows come back per group."""
    unknown = set(by) - set(GROUPS)
    if unknown:
        raise ValueError(f"cannot group usage by {sorted(unknown)}; by one of {GROUPS}")
    table = UsageRollup.__table__
    where = [table.c.tenant_id == tenant_id, table.c.day >= start, table.c.day <= end]
    if model is not None:
        where.append(table.c.model == model)
    if api_key_id is not None:
        where.append(table.c.api_key_id == api_key_id)
    keys = [table.c[name] for name in by]
    sums = [
        cast(func.sum(table.c[name]), Float if name == "feedback_sum" else BigInteger)
        for name in COUNTERS
    ]
    groups: dict[tuple[Any, ...], Totals] = {}
    for row in session.execute(select(*keys, *sums).where(*where).group_by(*keys)):
        totals = groups.setdefault(tuple(row[: len(by)]), Totals())
        totals.counts = dict(zip(COUNTERS, row[len(by) :], strict=True))
    per_bucket = (
        select(*keys, table.c.bucket, cast(func.sum(table.c.requests), BigInteger))
        .where(*where, table.c.bucket != NO_LATENCY)
        .group_by(*keys, table.c.bucket)
    )
    for *key, bucket, count in session.execute(per_bucket):
        groups[tuple(key)].buckets[bucket] = count
    overall = Totals()
    for totals in groups.values():
        overall.merge(totals)
    ordered = sorted(groups, key=lambda k: tuple(str(part) for part in k))
    return Report(
        total=overall.summary(),
        groups=[dict(zip(by, key, strict=True)) | groups[key].summary() for key in ordered],
    )
