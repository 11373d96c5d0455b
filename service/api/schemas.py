"""Request and response shapes of the HTTP API. Rows never cross this boundary."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_METADATA_BYTES = 16_384
T = TypeVar("T")
MAX_STOP_SEQUENCES = 4

Role = Literal["system", "user", "assistant"]
Target = Literal["prompt", "output", "both"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _no_nul(value: str) -> str:
    # PostgreSQL text and JSONB cannot hold U+0000; refuse it here rather than fail later.
    if "\x00" in value:
        raise ValueError("must not contain NUL (U+0000) characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


class ChatMessage(Strict):
    role: Role
    content: Text = Field(min_length=1)


class JobInput(Strict):
    """Exactly one of a prompt or a list of chat messages."""

    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    # A raw prompt goes to the model as is; otherwise it is one user turn of a chat.
    raw: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> JobInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            if self.messages[-1].role != "user":
                raise ValueError("the last message must have role 'user'")
            if self.raw:
                raise ValueError("'raw' applies to a prompt, not to messages")
        return self

    def text(self) -> str:
        """The text this turn adds, as searched and shown."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return self.messages[-1].content


class SamplingParams(Strict):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[Text] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty strings")
        return value


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    encoded = json.dumps(value)
    if "\\u0000" in encoded:
        raise ValueError("metadata must not contain NUL (U+0000) characters")
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    tags = value.get("tags")
    if tags is not None and not (
        isinstance(tags, list) and all(isinstance(t, str) and t for t in tags)
    ):
        raise ValueError("metadata.tags must be a list of non-empty strings")
    return value


class JobCreate(Strict):
    model: str = Field(min_length=1, max_length=128)
    input: JobInput
    params: SamplingParams = Field(default_factory=SamplingParams)
    metadata: dict[str, Any] = Field(default_factory=dict)
    queue: Literal["interactive", "batch"] = "interactive"
    conversation_id: str | None = Field(default=None, max_length=40)
    parent_generation_id: str | None = Field(default=None, max_length=40)

    _metadata = field_validator("metadata")(_check_metadata)

    @model_validator(mode="after")
    def _one_thread(self) -> JobCreate:
        if self.conversation_id and self.parent_generation_id:
            raise ValueError("give at most one of 'conversation_id' or 'parent_generation_id'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerationPublic(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    job_id: str
    model: str
    model_version: str
    conversation_id: str | None
    parent_id: str | None
    input: dict[str, Any]
    prompt: str
    output: str
    params: dict[str, Any]
    metadata: dict[str, Any]
    usage: Usage
    finish_reason: str
    timings: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> GenerationPublic:
        return cls(
            id=row.id,
            job_id=row.job_id,
            model=row.model,
            model_version=row.model_version,
            conversation_id=row.conversation_id,
            parent_id=row.parent_id,
            input=row.input,
            prompt=row.prompt,
            output=row.output,
            params=row.params,
            metadata=row.meta,
            usage=Usage(
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                total_tokens=row.prompt_tokens + row.completion_tokens,
            ),
            finish_reason=row.finish_reason,
            timings=row.timings,
            created_at=row.created_at,
        )


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    queue: str
    input: dict[str, Any]
    params: dict[str, Any]
    metadata: dict[str, Any]
    conversation_id: str | None
    parent_generation_id: str | None
    generation_id: str | None
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> JobPublic:
        return cls(
            id=row.id,
            status=row.status,
            model=row.model,
            queue=row.queue,
            input=row.input,
            params=row.params,
            metadata=row.meta,
            conversation_id=row.conversation_id,
            parent_generation_id=row.parent_generation_id,
            generation_id=row.generation.id if row.generation is not None else None,
            error=row.error,
            attempts=row.attempts,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None

    @classmethod
    def of(cls, rows: list[Any], has_more: bool, convert: Callable[[Any], T]) -> Page[T]:
        """A page of rows, newest first; the cursor is the last id when more follow."""
        return cls(
            data=[convert(row) for row in rows],
            has_more=has_more,
            next_cursor=rows[-1].id if has_more else None,
        )


class ConversationPublic(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: datetime
    metadata: dict[str, Any]
    turns: list[GenerationPublic]


class SearchFilters(Strict):
    model: str | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None
    conversation_id: str | None = None
    min_feedback_score: float | None = None


class SearchWeights(Strict):
    """Hybrid search: each ranking adds weight / (rrf_k + rank) to a generation's score."""

    vector: float = Field(default=1.0, ge=0, le=100)
    keyword: float = Field(default=1.0, ge=0, le=100)
    rrf_k: int = Field(default=60, ge=1, le=10_000)

    @model_validator(mode="after")
    def _some_weight(self) -> SearchWeights:
        if self.vector == 0 and self.keyword == 0:
            raise ValueError("at least one of the vector and keyword weights must be above 0")
        return self


SearchMode = Literal["vector", "keyword", "hybrid"]
MAX_SEARCH_DEPTH = 1000  # a cursor pages through at most this many results


class SearchRequest(Strict):
    query: Text = Field(min_length=1, max_length=8192)
    mode: SearchMode = "hybrid"
    k: int = Field(default=10, ge=1, le=100)
    target: Target = "both"
    filters: SearchFilters = Field(default_factory=SearchFilters)
    weights: SearchWeights = Field(default_factory=SearchWeights)
    cursor: str | None = Field(default=None, max_length=512)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must not be blank")
        return value


class ScorePart(BaseModel):
    score: float
    rank: int


class SearchScores(BaseModel):
    vector: ScorePart | None = None  # cosine similarity of the embeddings
    keyword: ScorePart | None = None  # BM25 (SQLite) or ts_rank (PostgreSQL)


class SnippetPublic(BaseModel):
    text: str
    highlights: list[tuple[int, int]]  # [start, end) character ranges into text


class SearchHit(BaseModel):
    score: float
    scores: SearchScores
    matched: Literal["prompt", "output"] | None
    snippets: dict[str, SnippetPublic]
    generation: GenerationPublic


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str | None  # the embedding model, in vector and hybrid modes
    mode: SearchMode
    data: list[SearchHit]
    next_cursor: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
