"""Search past generations by meaning."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CallerDep, EmbedderDep, IndexDep, SessionDep
from service.api.errors import ERROR_RESPONSES
from service.api.schemas import GenerationPublic, SearchHit, SearchRequest, SearchResponse
from service.db.crud import Filters
from service.search.generations import search_generations

router = APIRouter(prefix="/v1/search", tags=["search"], responses=ERROR_RESPONSES)


@router.post("", response_model=SearchResponse)
def search(
    request: SearchRequest,
    caller: CallerDep,
    session: SessionDep,
    index: IndexDep,
    embedder: EmbedderDep,
) -> SearchResponse:
    """The caller's past generations closest in meaning to the query."""
    filters = Filters(**request.filters.model_dump())
    hits = search_generations(
        session,
        index=index,
        query_vector=embedder.encode_one(request.query),
        tenant_id=caller.tenant_id,
        k=request.k,
        target=request.target,
        filters=filters,
    )
    return SearchResponse(
        model=embedder.model,
        data=[
            SearchHit(
                score=hit.score,
                matched=hit.matched,  # type: ignore[arg-type]
                generation=GenerationPublic.from_row(hit.generation),
            )
            for hit in hits
        ],
    )
