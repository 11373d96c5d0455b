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

from sqlalchemy import select
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


@dataclass(frozen=True)
class Ended:
    """A request that reached its final status: who made it, for which model, and when."""

    tenant_id: int
    model: str
    api_key_id: int | None
    created_at: datetime


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
    bucket), however many requests (a batch cancelled at once)."""
    now = utcnow()
    groups: dict[tuple[int, str, int | None, int], list[float]] = {}
    for request in requests:
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

    def add(self, row: Any) -> None:
        for name in COUNTERS:
            self.counts[name] += getattr(row, name)
        if row.bucket != NO_LATENCY:
            self.buckets[row.bucket] = self.buckets.get(row.bucket, 0) + row.requests

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


def rollup_rows(
    session: Session,
    *,
    tenant_id: int,
    start: date,
    end: date,
    model: str | None = None,
    api_key_id: int | None = None,
) -> Sequence[UsageRollup]:
    """The tenant's rollup rows of days start..end inclusive (one index range)."""
    query = select(UsageRollup).where(
        UsageRollup.tenant_id == tenant_id, UsageRollup.day >= start, UsageRollup.day <= end
    )
    if model is not None:
        query = query.where(UsageRollup.model == model)
    if api_key_id is not None:
        query = query.where(UsageRollup.api_key_id == api_key_id)
    return session.scalars(query).all()


def grouped(rows: Iterable[UsageRollup], by: Sequence[str]) -> list[dict[str, Any]]:
    """One summary per distinct value of the `by` columns, ordered by them."""
    unknown = set(by) - set(GROUPS)
    if unknown:
        raise ValueError(f"cannot group usage by {sorted(unknown)}; by one of {GROUPS}")
    groups: dict[tuple[Any, ...], Totals] = {}
    for row in rows:
        key = tuple(getattr(row, name) for name in by)
        groups.setdefault(key, Totals()).add(row)
    out = []
    for key in sorted(groups, key=lambda k: tuple(str(part) for part in k)):
        summary = groups[key].summary()
        out.append(dict(zip(by, key, strict=True)) | summary)
    return out


def total(rows: Iterable[UsageRollup]) -> dict[str, Any]:
    totals = Totals()
    for row in rows:
        totals.add(row)
    return totals.summary()
