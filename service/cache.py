"""The response cache: a request answered by a stored generation of the same request.

Every standalone language-model turn (no conversation before it, no retrieval) is stored
with two hashes: its scope (API, model and version, sampling params, and every message
but the last) and its key (the scope and the last message's text, whitespace folded).
A request asking `cache: exact` is answered by the newest generation of the tenant with
its key; `cache: semantic` also by one whose scope is the same and whose prompt embedding
is at least `threshold` cosine-similar to the request's (found in the tenant's shard of
the generation index). By default only greedy requests are answered from the cache:
sampling is asked for to get a new sample. The answer is the stored generation itself,
with its original ids, marked cached.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.registry import REGISTRY
from service.db import crud, tenants, usage
from service.db.tables import Generation, Job
from service.metrics import CACHE_LOOKUPS
from service.search.generations import vector_candidates
from service.search.index import IndexNotReady, VectorIndex

CacheMode = Literal["off", "exact", "semantic"]
DEFAULT_THRESHOLD = 0.95
SEMANTIC_CANDIDATES = 8  # nearest prompts looked at for one with the request's scope
# What a request's answer depends on besides its text; nothing else of params is kept.
PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop")
APIS = ("jobs", "chat.completions", "completions")


@dataclass(frozen=True)
class CachePolicy:
    mode: CacheMode = "off"
    threshold: float = DEFAULT_THRESHOLD
    include_sampled: bool = False  # answer sampled requests from the cache too


@dataclass(frozen=True)
class CacheKeys:
    scope: str
    key: str
    text: str  # the last message's text, as embedded for semantic lookups


def fold(text: str) -> str:
    """Text as the cache compares it: NFC, whitespace runs as one space, trimmed."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _sha256(value: Any) -> str:
    encoded = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


def keys_for(
    *,
    tenant_id: int,
    api: str,
    model: str,
    input: dict[str, Any],
    params: dict[str, Any],
    threaded: bool,
    grounded: bool,
) -> CacheKeys | None:
    """The cache keys of a request, or None when no stored answer can stand for it (a
    turn of a conversation, a grounded one, a model that is not a language model)."""
    spec = REGISTRY.get(model)
    if threaded or grounded or api not in APIS or spec is None or spec.task != "chat":
        return None
    if "messages" in input:
        messages = [(m["role"], fold(m["content"])) for m in input["messages"]]
        (_, text), before = messages[-1], messages[:-1]
    elif isinstance(input.get("prompt"), str):
        text, before = fold(input["prompt"]), []
    else:
        return None
    scope = _sha256(
        {
            # The tenant is hashed in, so equal prompts of two tenants never share a key.
            "tenant": tenant_id,
            "api": api,
            "model": model,
            "version": spec.version,
            "params": {name: params.get(name) for name in PARAMS},
            "raw": bool(input.get("raw")),
            "before": before,
        }
    )
    return CacheKeys(scope=scope, key=_sha256([scope, text]), text=text)


def answerable(policy: CachePolicy, params: dict[str, Any]) -> bool:
    return policy.mode != "off" and (params.get("temperature") == 0 or policy.include_sampled)


@dataclass(frozen=True)
class CacheHit:
    job: Job  # the original request, whose generation answers this one
    generation: Generation
    similarity: float  # 1.0 for an exact hit


class ResponseCache:
    """Looks up stored answers; one per API process (it shares the search index)."""

    def __init__(self, index: VectorIndex | None, embed: Callable[[str], np.ndarray] | None):
        self._index = index
        self._embed = embed

    def lookup(
        self,
        session: Session,
        *,
        tenant_id: int,
        keys: CacheKeys | None,
        policy: CachePolicy,
        params: dict[str, Any],
    ) -> CacheHit | None:
        if keys is None or not answerable(policy, params):
            return None
        generation = session.scalar(
            select(Generation)
            .where(Generation.tenant_id == tenant_id, Generation.cache_key == keys.key)
            .order_by(Generation.id.desc())
            .limit(1)
        )
        if generation is not None:
            CACHE_LOOKUPS.labels("exact").inc()
            return CacheHit(generation.job, generation, 1.0)
        hit = None
        if policy.mode == "semantic":
            hit = self._nearest(session, tenant_id=tenant_id, keys=keys, policy=policy)
        CACHE_LOOKUPS.labels("miss" if hit is None else "semantic").inc()
        return hit

    def answer(
        self,
        session: Session,
        *,
        tenant_id: int,
        api_key_id: int | None,
        keys: CacheKeys | None,
        policy: CachePolicy,
        params: dict[str, Any],
    ) -> CacheHit | None:
        """lookup, and a hit counted in the usage (the caller commits)."""
        started = time.perf_counter()
        hit = self.lookup(session, tenant_id=tenant_id, keys=keys, policy=policy, params=params)
        if hit is not None:
            count_hit(session, hit=hit, api_key_id=api_key_id, started=started)
        return hit

    def _nearest(
        self, session: Session, *, tenant_id: int, keys: CacheKeys, policy: CachePolicy
    ) -> CacheHit | None:
        if self._index is None or self._embed is None or not keys.text:
            return None
        try:
            candidates = vector_candidates(
                session,
                index=self._index,
                query_vector=self._embed(keys.text),
                tenant_id=tenant_id,
                k=SEMANTIC_CANDIDATES,
                target="prompt",
                filters=crud.Filters(),
            )
        except IndexNotReady:
            return None  # no semantic answer while the index is being built: generate
        near = [(gid, score) for gid, score, _ in candidates if score >= policy.threshold]
        if not near:
            return None
        rows = crud.get_generations(session, ids=[gid for gid, _ in near])
        for gid, score in near:  # best first
            row = rows.get(gid)
            if row is not None and row.cache_scope == keys.scope:
                return CacheHit(row.job, row, min(1.0, score))
        return None


def count_hit(session: Session, *, hit: CacheHit, api_key_id: int | None, started: float) -> None:
    """Count an answer served from the cache: a request (for the quotas too) that took
    the lookup's time and saved the original's."""
    original = hit.job
    saved_ms = 0.0
    if original.finished_at is not None:
        saved_ms = (original.finished_at - original.created_at).total_seconds() * 1000
    latency_ms = (time.perf_counter() - started) * 1000
    tenants.count_usage(session, tenant_id=original.tenant_id, requests=1)
    usage.record(
        session,
        tenant_id=original.tenant_id,
        model=original.model,
        api_key_id=api_key_id,
        bucket=usage.bucket_of(latency_ms),
        requests=1,
        succeeded=1,
        cache_hits=1,
        latency_ms=round(latency_ms),
        time_saved_ms=round(max(0.0, saved_ms - latency_ms)),
    )
