"""Search past generations by meaning, by words, or by both."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from fastapi import APIRouter

from service.api.deps import CallerDep, EmbedderDep, IndexDep, SessionDep
from service.api.errors import ERROR_RESPONSES, InvalidRequest, ServiceUnavailable
from service.api.schemas import (
    MAX_SEARCH_DEPTH,
    GenerationPublic,
    ScorePart,
    SearchHit,
    SearchRequest,
    SearchResponse,
    SearchScores,
    SnippetPublic,
)
from service.db.crud import Filters
from service.search.generations import Fusion, Part, search_generations
from service.search.index import IndexNotReady
from service.search.keyword import query_terms
from service.search.snippets import snippet

router = APIRouter(prefix="/v1/search", tags=["search"], responses=ERROR_RESPONSES)


def _fingerprint(request: SearchRequest) -> str:
    """What a cursor is bound to: everything that decides the ranking."""
    ranking = request.model_dump(mode="json", exclude={"cursor", "k"})
    return hashlib.sha256(json.dumps(ranking, sort_keys=True).encode()).hexdigest()[:16]


def encode_cursor(request: SearchRequest, offset: int) -> str:
    data = json.dumps({"offset": offset, "query": _fingerprint(request)}).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def decode_cursor(request: SearchRequest) -> int:
    """The offset a cursor points at; 0 without one."""
    if request.cursor is None:
        return 0
    try:
        padded = request.cursor + "=" * (-len(request.cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded))
        offset, bound_to = data["offset"], data["query"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise InvalidRequest("cursor is not one this API returned", param="cursor") from exc
    if not isinstance(offset, int) or not 0 <= offset < MAX_SEARCH_DEPTH:
        raise InvalidRequest("cursor is not one this API returned", param="cursor")
    if bound_to != _fingerprint(request):
        raise InvalidRequest(
            "cursor belongs to another query: send the same query, mode, target, filters "
            "and weights as the request that returned it",
            param="cursor",
        )
    return offset


def _part(part: Part | None) -> ScorePart | None:
    return ScorePart(score=part.score, rank=part.rank) if part else None


@router.post("", response_model=SearchResponse)
def search(
    request: SearchRequest,
    caller: CallerDep,
    session: SessionDep,
    index: IndexDep,
    embedder: EmbedderDep,
) -> SearchResponse:
    """The caller's past generations ranked for the query.

    mode: vector (by meaning), keyword (by words) or hybrid (both, fused by reciprocal
    rank). Page on with next_cursor, up to the first 1000 results.
    """
    offset = decode_cursor(request)
    limit = min(request.k, MAX_SEARCH_DEPTH - offset)
    weights = request.weights
    try:
        results = search_generations(
            session,
            tenant_id=caller.tenant_id,
            query=request.query,
            mode=request.mode,
            target=request.target,
            filters=Filters(**request.filters.model_dump()),
            offset=offset,
            limit=limit,
            index=index,
            embed=embedder.encode_one,
            fusion=Fusion(vector=weights.vector, keyword=weights.keyword, rrf_k=weights.rrf_k),
        )
    except IndexNotReady as exc:
        raise ServiceUnavailable(
            f"{exc}; keyword search works meanwhile", code="index_not_ready"
        ) from exc
    terms = query_terms(request.query)
    texts = ("prompt", "output") if request.target == "both" else (request.target,)
    more = results.has_more and offset + limit < MAX_SEARCH_DEPTH
    return SearchResponse(
        model=embedder.model if request.mode != "keyword" else None,
        mode=request.mode,
        next_cursor=encode_cursor(request, offset + limit) if more else None,
        data=[
            SearchHit(
                score=hit.score,
                scores=SearchScores(vector=_part(hit.vector), keyword=_part(hit.keyword)),
                matched=hit.matched,  # type: ignore[arg-type]
                snippets={
                    name: SnippetPublic(**vars(snippet(getattr(hit.generation, name), terms)))
                    for name in texts
                },
                generation=GenerationPublic.from_row(hit.generation),
            )
            for hit in results.hits
        ],
    )
