"""Request and response shapes of the HTTP API. Rows never cross this boundary."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models import configs
from service.rag.chunking import ChunkSettings

MAX_METADATA_BYTES = 16_384
T = TypeVar("T")
MAX_STOP_SEQUENCES = 4

Role = Literal["system", "user", "assistant"]
Target = Literal["prompt", "output", "both"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(Strict):
    role: Role
    content: str = Field(min_length=1)


class Interpolation(Strict):
    """Images decoded along the line between the latents of two seeds (VAE)."""

    from_seed: int = Field(ge=0, lt=2**63)
    to_seed: int = Field(ge=0, lt=2**63)
    steps: int = Field(default=8, ge=2, le=64)


class ImagesInput(Strict):
    n: int = Field(default=1, ge=1, le=64)
    # DDIM sampling steps (diffusion models only); the model's default when absent.
    steps: int | None = Field(default=None, ge=1, le=1000)
    interpolate: Interpolation | None = None

    @model_validator(mode="after")
    def _n_or_interpolate(self) -> ImagesInput:
        if self.interpolate is not None and "n" in self.model_fields_set:
            raise ValueError("give 'n' or 'interpolate', not both")
        return self


class RowsInput(Strict):
    n: int = Field(default=100, ge=1, le=10_000)
    # Values of the model's condition columns that every row must have.
    conditions: dict[str, str | int | float] = Field(default_factory=dict, max_length=64)


class AnomalyInput(Strict):
    """Samples to score: an uploaded .npz array or .zip of PNGs like the training images."""

    file_id: str = Field(min_length=1, max_length=40)


# What each kind of input asks for, by the model's task (models.backends.classic tasks).
INPUT_KINDS = ("prompt", "messages", "images", "rows", "anomaly")


class JobInput(Strict):
    """Exactly one of: a prompt, chat messages (language models; a character-level RNN
    takes a prompt as its prefix), images, rows or anomaly (the trained families)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # A raw prompt goes to the model as is; otherwise it is one user turn of a chat.
    raw: bool = False
    images: ImagesInput | None = None
    rows: RowsInput | None = None
    anomaly: AnomalyInput | None = None

    @model_validator(mode="after")
    def _one_of(self) -> JobInput:
        given = [kind for kind in INPUT_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(INPUT_KINDS)}, got {given or 'none'}")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            if self.messages[-1].role != "user":
                raise ValueError("the last message must have role 'user'")
        if self.raw and self.prompt is None:
            raise ValueError("'raw' applies to a prompt only")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in INPUT_KINDS if getattr(self, kind) is not None)

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
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    # Character-level RNN models only: sample among the k likeliest characters.
    top_k: int | None = Field(default=None, ge=1, le=1000)

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


def _check_query(value: str) -> str:
    if not value.strip():
        raise ValueError("query must not be blank")
    return value


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    encoded = json.dumps(value)
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
    rag: RagOptions | None = None
    cache: CacheOptions | None = Field(
        default=None, description='"exact" or "semantic": answer from a stored generation'
    )

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
    # Files the generation made (images, tables); empty for text.
    content: list[ContentPart] = Field(default_factory=list)
    # A grounded answer's sources that it cites; all its sources: /v1/generations/{id}/sources
    citations: list[Citation] = Field(default_factory=list)
    # The mean score of its feedback, and how many gave a score.
    feedback_score: float | None = None
    feedback_count: int = 0
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
            content=[ContentPart.from_row(f) for f in content_files(row)],
            citations=[Citation.from_source(source) for source in row.sources if source.cited],
            feedback_score=row.feedback_score,
            feedback_count=row.feedback_count,
            created_at=row.created_at,
        )


def content_files(row: Any) -> list[Any]:
    """A generation's files in the order the model made them."""
    return sorted(row.content_files, key=lambda f: (f.meta or {}).get("index", 0))


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
    # Answered from the response cache: this is the original request, with its generation.
    cached: bool = False

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
    max_feedback_score: float | None = None
    label: str | None = Field(default=None, max_length=64)
    category: str | None = Field(default=None, max_length=64)


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
    query: str = Field(min_length=1, max_length=8192)
    mode: SearchMode = "hybrid"
    k: int = Field(default=10, ge=1, le=100)
    target: Target = "both"
    filters: SearchFilters = Field(default_factory=SearchFilters)
    weights: SearchWeights = Field(default_factory=SearchWeights)
    cursor: str | None = Field(default=None, max_length=512)

    _query = field_validator("query")(_check_query)


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


class Readiness(BaseModel):
    """Each check: ok, and an error naming what is wrong when not."""

    status: Literal["ready", "not ready"]
    checks: dict[str, dict[str, Any]]


# --- trained models ------------------------------------------------------------------------

Arch = Literal["char_rnn", "vae", "gan", "diffusion", "tabular", "autoencoder"]
ModelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
TrainingStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MAX_CONFIG_KEYS = 64


class TrainingJobCreate(Strict):
    name: ModelName = Field(description="The model name the trained version registers under")
    arch: Arch
    dataset_file_id: str = Field(min_length=1, max_length=40)
    # Overrides of the family's config dataclass (models/configs.py).
    config: dict[str, Any] = Field(default_factory=dict, max_length=MAX_CONFIG_KEYS)
    seed: int = Field(default=0, ge=0, lt=2**63)
    # The version this one is trained from (lineage), if any.
    parent_version: int | None = Field(default=None, ge=1)
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(_check_metadata)

    @field_validator("config")
    @classmethod
    def _checked_config(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"config is larger than {MAX_METADATA_BYTES} bytes")
        # Each key and value as the family takes it (arch is validated first); what
        # depends on the data (image sides, table columns) is checked when the job reads
        # its dataset.
        if "arch" in info.data:
            configs.check(info.data["arch"], value)
        return value


class TrainingJobPublic(BaseModel):
    id: str
    object: Literal["training_job"] = "training_job"
    name: str
    arch: str
    dataset_file_id: str
    config: dict[str, Any]
    seed: int
    parent_version: int | None
    status: TrainingStatus
    # The latest report: epoch, step, losses, val_loss.
    progress: dict[str, Any]
    error: str | None
    attempts: int
    # "name:version" once the job succeeded.
    model: str | None
    created_by: str
    metadata: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> TrainingJobPublic:
        return cls(
            id=row.id,
            name=row.name,
            arch=row.arch,
            dataset_file_id=row.dataset_file_id,
            config=row.config,
            seed=row.seed,
            parent_version=row.parent_version,
            status=row.status,
            progress=row.progress,
            error=row.error,
            attempts=row.attempts,
            model=f"{row.name}:{row.model_version}" if row.model_version else None,
            created_by=row.created_by,
            metadata=row.meta,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class TrainingEventPublic(BaseModel):
    id: int
    attempt: int
    kind: str
    data: dict[str, Any]
    created_at: datetime


class TrainingEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TrainingEventPublic]


class ContentPart(BaseModel):
    """A file a generation made (an image, a table), served at .../content?index=N."""

    index: int
    file_id: str
    media_type: str
    bytes: int
    metadata: dict[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> ContentPart:
        meta = row.meta or {}
        return cls(
            index=meta.get("index", 0),
            file_id=row.id,
            media_type=row.media_type or "application/octet-stream",
            bytes=row.bytes,
            metadata=meta,
        )


# --- retrieval-augmented generation ------------------------------------------------------

# A collection is named by its id or its name, so a name must not look like an id.
COLLECTION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Scalar = str | int | float | bool


class ChunkingOptions(Strict):
    """How documents are cut: tokens of the embedding model per chunk, and shared by
    neighbours."""

    # The embedding model reads 256 tokens, two of them its own markers.
    max_tokens: int = Field(default=200, ge=16, le=254)
    overlap_tokens: int = Field(default=40, ge=0, le=127)

    @model_validator(mode="after")
    def _chunker_takes_them(self) -> ChunkingOptions:
        # The chunker's own bounds (overlap below half a chunk), checked where they live.
        ChunkSettings(max_tokens=self.max_tokens, overlap_tokens=self.overlap_tokens)
        return self


class CollectionCreate(Strict):
    name: str = Field(
        pattern=COLLECTION_NAME_PATTERN, description="unique per tenant; not all digits"
    )
    kind: Literal["documents", "history"] = Field(
        default="documents", description="history: the tenant's past generations"
    )
    embedding_model: str | None = Field(default=None, max_length=128)
    chunking: ChunkingOptions = Field(default_factory=ChunkingOptions)
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(_check_metadata)

    @field_validator("name")
    @classmethod
    def _not_an_id(cls, value: str) -> str:
        if value.isdigit():
            raise ValueError("name must not be all digits: collections are named by id or name")
        return value


class CollectionPublic(BaseModel):
    id: int
    object: Literal["collection"] = "collection"
    name: str
    kind: str
    embedding_model: str
    chunking: ChunkingOptions
    metadata: dict[str, Any]
    document_count: int
    chunk_count: int
    created_at: datetime


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionPublic]


class DocumentIn(Strict):
    id: str = Field(min_length=1, max_length=512, description="your id; the same id replaces")
    title: str = Field(default="", max_length=2000)
    text: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(_check_metadata)


class DocumentsCreate(Strict):
    documents: list[DocumentIn] = Field(min_length=1, max_length=1000)


class DocumentPublic(BaseModel):
    id: str
    object: Literal["document"] = "document"
    collection_id: int
    external_id: str
    title: str
    format: str
    filename: str | None
    sha256: str
    metadata: dict[str, Any]
    chunk_count: int
    characters: int
    ingestion_id: str | None
    created_at: datetime
    updated_at: datetime
    text: str | None = None  # GET of one document only

    @classmethod
    def from_row(cls, row: Any, *, with_text: bool = False) -> DocumentPublic:
        return cls(
            id=row.id,
            collection_id=row.collection_id,
            external_id=row.external_id,
            title=row.title,
            format=row.format,
            filename=row.filename,
            sha256=row.sha256,
            metadata=row.meta,
            chunk_count=row.chunk_count,
            characters=len(row.text),
            ingestion_id=row.job_id,
            created_at=row.created_at,
            updated_at=row.updated_at,
            text=row.text if with_text else None,
        )


class IngestionPublic(BaseModel):
    """An ingestion job: extract, chunk, embed, store, index; progress as it goes."""

    id: str
    object: Literal["ingestion"] = "ingestion"
    collection_id: int
    status: JobStatus
    # stage, files, documents (total, done, created, replaced, unchanged), chunks, errors
    progress: dict[str, Any]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> IngestionPublic:
        return cls(
            id=row.id,
            collection_id=row.input["collection_id"],
            status=row.status,
            progress=row.result or {"stage": "queued"},
            error=row.error,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class DocumentFiltersIn(Strict):
    document_ids: list[str] = Field(default_factory=list, max_length=1000)
    external_ids: list[str] = Field(default_factory=list, max_length=1000)
    metadata: dict[str, Scalar] = Field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None


class CollectionSearchRequest(Strict):
    query: str = Field(min_length=1, max_length=8192)
    mode: SearchMode = "hybrid"
    k: int = Field(default=10, ge=1, le=100)
    filters: DocumentFiltersIn = Field(default_factory=DocumentFiltersIn)
    weights: SearchWeights = Field(default_factory=SearchWeights)

    _query = field_validator("query")(_check_query)


class PassagePublic(BaseModel):
    rank: int
    score: float
    scores: SearchScores
    collection_id: int
    document_id: str | None
    external_id: str | None
    chunk_id: int | None
    generation_id: str | None  # a history collection's passage
    title: str
    text: str
    metadata: dict[str, Any]


class PassageList(BaseModel):
    object: Literal["list"] = "list"
    model: str | None
    mode: SearchMode
    data: list[PassagePublic]


class RagOptions(Strict):
    """Ground a generation in passages retrieved from collections."""

    collections: list[int | str] = Field(min_length=1, max_length=16, description="ids or names")
    k: int = Field(default=5, ge=1, le=50, description="passages retrieved")
    mode: SearchMode = "hybrid"
    filters: DocumentFiltersIn = Field(default_factory=DocumentFiltersIn)
    max_context_tokens: int | None = Field(
        default=None, ge=64, description="tokens of passages at most; default: what fits"
    )


class SourcePublic(BaseModel):
    number: int  # the [n] the answer cites it by
    rank: int
    score: float
    scores: dict[str, Any]
    cited: bool
    collection_id: int | None
    document_id: str | None
    chunk_id: int | None
    source_generation_id: str | None
    title: str
    text: str


class SourceList(BaseModel):
    object: Literal["list"] = "list"
    generation_id: str
    data: list[SourcePublic]


class Citation(BaseModel):
    number: int
    title: str
    collection_id: int | None
    document_id: str | None
    chunk_id: int | None
    source_generation_id: str | None

    @classmethod
    def from_source(cls, row: Any) -> Citation:
        return cls(
            number=row.number,
            title=row.title,
            collection_id=row.collection_id,
            document_id=row.document_id,
            chunk_id=row.chunk_id,
            source_generation_id=row.source_generation_id,
        )


# --- the data of generation: the response cache, feedback, usage, exports ------------------


class CacheOptions(Strict):
    """Answer from a stored generation of the same request, at once (service/cache.py).

    A string is the mode alone: "exact" or "semantic" (or "off")."""

    mode: Literal["off", "exact", "semantic"] = "exact"
    threshold: float = Field(
        default=0.95, ge=0.5, le=1.0, description="semantic: least cosine of the two prompts"
    )
    include_sampled: bool = Field(
        default=False, description="also answer requests with temperature > 0 from the cache"
    )

    @model_validator(mode="before")
    @classmethod
    def _mode_alone(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value


Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.:/+-]{0,63}$")]
Tag = Annotated[str, Field(min_length=1, max_length=128)]
MAX_TAGS = 64


class FeedbackCreate(Strict):
    score: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False)
    label: Label | None = None
    comment: str | None = Field(default=None, min_length=1, max_length=8192)
    user: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackCreate:
        if self.score is None and self.label is None and self.comment is None:
            raise ValueError("give at least one of 'score', 'label' or 'comment'")
        return self


class FeedbackPublic(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    generation_id: str
    score: float | None
    label: str | None
    comment: str | None
    user: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> FeedbackPublic:
        return cls(
            id=row.id,
            generation_id=row.generation_id,
            score=row.score,
            label=row.label,
            comment=row.comment,
            user=row.user,
            created_at=row.created_at,
        )


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    generation_id: str
    score: float | None  # the mean of the scores given
    count: int  # how many gave a score
    data: list[FeedbackPublic]


class GenerationUpdate(Strict):
    """Edit a generation's tags, category and metadata (its job's too)."""

    metadata: dict[str, Any] | None = Field(default=None, description="replaces the metadata")
    tags: list[Tag] | None = Field(default=None, max_length=MAX_TAGS, description="replaces")
    add_tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    remove_tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    category: Label | None = Field(default=None, description="null removes it")

    _metadata = field_validator("metadata")(
        lambda value: value if value is None else _check_metadata(value)
    )

    @model_validator(mode="after")
    def _changes_something(self) -> GenerationUpdate:
        if not self.model_fields_set:
            raise ValueError(
                "give at least one of 'metadata', 'tags', 'add_tags', 'remove_tags', 'category'"
            )
        if self.tags is not None and (self.add_tags or self.remove_tags):
            raise ValueError("give 'tags' (replace) or 'add_tags'/'remove_tags', not both")
        return self

    def applied_to(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """The metadata after this edit."""
        updated = dict(self.metadata if self.metadata is not None else metadata)
        tags = list(self.tags if self.tags is not None else updated.get("tags") or [])
        tags += [tag for tag in self.add_tags if tag not in tags]
        tags = [tag for tag in tags if tag not in self.remove_tags]
        if tags or "tags" in updated or self.tags is not None:
            updated["tags"] = tags
        if "category" in self.model_fields_set:
            updated.pop("category", None)
            if self.category is not None:
                updated["category"] = self.category
        return _check_metadata(updated)


class LatencySummary(BaseModel):
    """Milliseconds from acceptance to the end, over the requests counted; percentiles are
    interpolated within fixed buckets (50, 100, 250, 500 ms, 1, 2.5, 5, 10, 30, 60, 300 s)."""

    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None


class UsageSummary(BaseModel):
    day: date | None = None
    api_key_id: int | None = None  # 0: the operator's command line
    model: str | None = None
    requests: int
    succeeded: int
    errors: int
    cancelled: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: LatencySummary
    cache_hits: int
    cache_hit_ratio: float | None
    time_saved_s: float
    error_rate: float | None
    refusal_rate: float | None
    mean_completion_tokens: float | None
    feedback_count: int
    feedback_score: float | None


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    start: date
    end: date
    group_by: list[str]
    total: UsageSummary
    data: list[UsageSummary]


class ModelTrends(BaseModel):
    object: Literal["model.trends"] = "model.trends"
    model: str
    start: date
    end: date
    data: list[UsageSummary]  # one per day with requests or feedback


ExportFormat = Literal["openai_chat", "prompt_completion"]
GenerationId = Annotated[str, Field(pattern=r"^gen_[0-9a-f]{1,36}$")]
MAX_METADATA_FILTERS = 16


class ExportFilters(Strict):
    """Which generations an export reads; all given must hold."""

    model: str | None = Field(default=None, max_length=128)
    created_after: datetime | None = None
    created_before: datetime | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS, description="all of")
    metadata: dict[
        Annotated[str, Field(min_length=1, max_length=128)],
        str | int | Annotated[float, Field(allow_inf_nan=False)] | bool,
    ] = Field(default_factory=dict, max_length=MAX_METADATA_FILTERS)
    min_feedback_score: float | None = Field(default=None, allow_inf_nan=False)
    label: Label | None = Field(default=None, description="some feedback on it has this label")
    origin: Literal["real", "synthetic", "any"] = Field(
        default="any", description="synthetic: rows marked metadata.synthetic=true"
    )

    @model_validator(mode="after")
    def _time_runs_forward(self) -> ExportFilters:
        if (
            self.created_after is not None
            and self.created_before is not None
            and self.created_after >= self.created_before
        ):
            raise ValueError("created_after must be before created_before")
        return self


class DedupOptions(Strict):
    exact: bool = Field(default=True, description="drop rows whose folded text repeats")
    near: bool = Field(default=True, description="drop rows too close to a kept one")
    threshold: float = Field(
        default=0.95,
        ge=0.5,
        le=1.0,
        description="near: least cosine, of the sums of prompt and output embeddings",
    )


class ExportCreate(Strict):
    format: ExportFormat = "openai_chat"
    filters: ExportFilters = Field(default_factory=ExportFilters)
    dedup: DedupOptions = Field(default_factory=DedupOptions)
    limit: int | None = Field(default=None, ge=1, description="rows written at most")
    snapshot: GenerationId | None = Field(
        default=None,
        description="read generations up to this id (an earlier manifest's "
        "snapshot.max_generation_id, to write that export again); default: the latest",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(_check_metadata)

    def job_params(self) -> dict[str, Any]:
        """The request as the export job keeps it (the worker validates it again)."""
        return self.model_dump(mode="json", exclude={"metadata"})


class ExportPublic(BaseModel):
    id: str
    object: Literal["export"] = "export"
    status: JobStatus
    format: ExportFormat
    filters: dict[str, Any]
    dedup: dict[str, Any]
    limit: int | None
    snapshot: str | None
    metadata: dict[str, Any]
    # The manifest once done: filters, snapshot, counts, the output's sha256.
    manifest: dict[str, Any] | None
    output_file_id: str | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> ExportPublic:
        manifest = (row.result or {}).get("manifest")
        return cls(
            id=row.id,
            status=row.status,
            format=row.params["format"],
            filters=row.params["filters"],
            dedup=row.params["dedup"],
            limit=row.params.get("limit"),
            snapshot=row.params.get("snapshot"),
            metadata=row.meta,
            manifest=manifest,
            output_file_id=(manifest or {}).get("file_id"),
            error=row.error,
            created_at=row.created_at,
            finished_at=row.finished_at,
        )


JobCreate.model_rebuild()
GenerationPublic.model_rebuild()


# --- evaluations ---------------------------------------------------------------------------

MAX_EVAL_ITEMS = 5_000  # a run stores a job per item in one request
EVAL_SET_ID_PREFIX = "evalset_"


class EvalInput(Strict):
    """A language model's input: a prompt, or chat messages ending with the user's turn."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=256)
    raw: bool = Field(default=False, description="send the prompt as is, not as a chat turn")

    @model_validator(mode="after")
    def _one_of(self) -> EvalInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "user"):
            raise ValueError("messages must end with a message of role 'user'")
        if self.raw and self.prompt is None:
            raise ValueError("'raw' applies to a prompt only")
        return self


class EvalItemIn(Strict):
    input: str | EvalInput = Field(description="a prompt, or {prompt} or {messages}")
    reference: str = Field(max_length=100_000, description="the expected output")
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(_check_metadata)

    @field_validator("input")
    @classmethod
    def _prompt_not_blank(cls, value: str | EvalInput) -> str | EvalInput:
        if isinstance(value, str) and not value.strip():
            raise ValueError("input must not be blank")
        return value

    def job_input(self) -> dict[str, Any]:
        """The input as a job stores it."""
        given = EvalInput(prompt=self.input) if isinstance(self.input, str) else self.input
        return given.model_dump(exclude_none=True)


class EvalHistorySource(Strict):
    """Items from the tenant's generations: input as asked, output as the reference."""

    model: str | None = Field(default=None, max_length=128)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None
    min_feedback_score: float | None = Field(default=None, allow_inf_nan=False)
    limit: int = Field(default=100, ge=1, le=MAX_EVAL_ITEMS, description="newest first")


class EvalSetCreate(Strict):
    """A set from items, or from history; a JSONL upload (multipart) gives the items as
    a file of {input, reference, metadata} lines."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="unique")
    description: str = Field(default="", max_length=4000)
    metadata: dict[str, Any] = Field(default_factory=dict)
    items: list[EvalItemIn] | None = Field(default=None, min_length=1, max_length=MAX_EVAL_ITEMS)
    from_history: EvalHistorySource | None = None

    _metadata = field_validator("metadata")(_check_metadata)

    @field_validator("name")
    @classmethod
    def _not_an_id(cls, value: str) -> str:
        if value.startswith(EVAL_SET_ID_PREFIX):
            raise ValueError(
                f"name must not start with {EVAL_SET_ID_PREFIX!r}: sets are named by id or name"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> EvalSetCreate:
        if (self.items is None) == (self.from_history is None):
            raise ValueError("give exactly one of 'items' or 'from_history'")
        return self


class EvalSetPublic(BaseModel):
    id: str
    object: Literal["eval.set"] = "eval.set"
    name: str
    description: str
    metadata: dict[str, Any]
    item_count: int
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> EvalSetPublic:
        return cls(
            id=row.id,
            name=row.name,
            description=row.description,
            metadata=row.meta,
            item_count=row.item_count,
            created_at=row.created_at,
        )


class EvalItemPublic(BaseModel):
    seq: int  # 1, 2, ... in the set's order
    input: dict[str, Any]
    reference: str
    metadata: dict[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> EvalItemPublic:
        return cls(seq=row.seq, input=row.input, reference=row.reference, metadata=row.meta)


class EvalParams(Strict):
    """Sampling of a run; greedy unless a temperature is given."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class EvalRunCreate(Strict):
    set_id: str = Field(min_length=1, max_length=128, description="the set's id or name")
    model: str = Field(min_length=1, max_length=128, description="a language model")
    params: EvalParams = Field(default_factory=EvalParams)
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata = field_validator("metadata")(_check_metadata)


class EvalScores(BaseModel):
    """Each in [0, 1] (cosine in [-1, 1]); null where it is not known."""

    exact_match: float | None = None
    token_f1: float | None = None
    rouge_l: float | None = None
    cosine: float | None = None


class EvalScoreDeltas(BaseModel):
    """Run b's score minus run a's."""

    exact_match: float | None = None
    token_f1: float | None = None
    rouge_l: float | None = None
    cosine: float | None = None


class EvalAggregates(BaseModel):
    items: int
    scored: int
    failed: int  # not in the means
    means: EvalScores  # over the scored items


class EvalProgress(BaseModel):
    total: int
    done: int
    scored: int
    failed: int


class EvalRunPublic(BaseModel):
    id: str
    object: Literal["eval.run"] = "eval.run"
    set_id: str
    model: str
    model_version: str
    params: dict[str, Any]
    status: Literal["running", "succeeded", "failed"]
    progress: EvalProgress
    aggregates: EvalAggregates | None
    error: str | None
    metadata: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any, progress: Any) -> EvalRunPublic:
        return cls(
            id=row.id,
            set_id=row.set_id,
            model=row.model,
            model_version=row.model_version,
            params=row.params,
            status=row.status,
            progress=EvalProgress(
                total=progress.total,
                done=progress.done,
                scored=progress.scored,
                failed=progress.failed,
            ),
            aggregates=row.aggregates,
            error=row.error,
            metadata=row.meta,
            created_at=row.created_at,
            finished_at=row.finished_at,
        )


EvalResultStatus = Literal["pending", "scored", "failed"]


class EvalOutcome(BaseModel):
    """What one run made of one item."""

    status: EvalResultStatus
    output: str | None
    scores: EvalScores | None
    error: str | None
    generation_id: str | None
    job_id: str | None

    @classmethod
    def from_row(cls, row: Any) -> EvalOutcome:
        status: EvalResultStatus = "pending"
        if row.scores is not None or row.error is not None:
            status = "scored" if row.scores is not None else "failed"
        return cls(
            status=status,
            output=row.output,
            scores=row.scores,
            error=row.error,
            generation_id=row.generation_id,
            job_id=row.job_id,
        )


class EvalResultPublic(EvalOutcome):
    seq: int
    input: dict[str, Any]
    reference: str

    @classmethod
    def of(cls, result: Any, item: Any) -> EvalResultPublic:
        outcome = EvalOutcome.from_row(result)
        return cls(seq=item.seq, input=item.input, reference=item.reference, **dict(outcome))


class EvalComparisonItem(BaseModel):
    seq: int
    input: dict[str, Any]
    reference: str
    a: EvalOutcome
    b: EvalOutcome
    delta: EvalScoreDeltas


class EvalComparison(BaseModel):
    object: Literal["eval.comparison"] = "eval.comparison"
    set_id: str
    a: EvalRunPublic
    b: EvalRunPublic
    delta: EvalScoreDeltas  # of the means
    data: list[EvalComparisonItem]
    has_more: bool
    next_cursor: str | None
