"""OpenAI's request and response shapes, as genserve accepts and answers them.

Requests are strict: an argument OpenAI does not know is refused by name, and one that
OpenAI knows but these models cannot honour (tools, logprobs, penalties, n > 1) is
refused by name with the reason, never silently ignored. Each request translates
itself into a job's input and sampling params.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from models.registry import ModelSpec
from service.api.errors import InvalidRequest
from service.api.schemas import (
    MAX_STOP_SEQUENCES,
    CacheOptions,
    Citation,
    RagOptions,
    Strict,
)
from service.submit import JobRequest, resolve_max_tokens

# OpenAI's limits on stored metadata: 16 pairs, keys up to 64 and values up to 512 chars.
MAX_METADATA_PAIRS = 16
MAX_EMBEDDING_INPUTS = 2048
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions


def _refuse_unless(value: Any, allowed: tuple[Any, ...], reason: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{value!r} is not supported: {reason}")
    return value


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs, got {len(value)}")
    for key, item in value.items():
        if len(key) > 64 or len(item) > 512:
            raise ValueError(f"keys are at most 64 and values 512 characters (key {key[:70]!r})")
    return value


class StreamOptions(Strict):
    include_usage: bool = False


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatCompletionMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    # Present on assistant turns of tool-using clients; refused below when not empty.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @field_validator("role")
    @classmethod
    def _no_tool_role(cls, value: str) -> str:
        return _refuse_unless(value, ("system", "developer", "user", "assistant"), "no tools")

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list[dict[str, Any]] | None) -> Any:
        return _refuse_unless(value or None, (None,), "these models do not call tools")

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart]:
        if value is None:
            raise ValueError("content is required")
        if isinstance(value, list):
            for index, part in enumerate(value):
                if part.type != "text" or part.text is None:
                    raise ValueError(f"part {index} is {part.type!r}: only text parts are read")
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content or ())

    def as_turn(self) -> dict[str, str]:
        """The message as genserve stores it (a developer message is a system one)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class _SamplingRequest(Strict):
    """The arguments /v1/chat/completions and /v1/completions share."""

    model: str = Field(min_length=1, max_length=128)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=128)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)
    # genserve's own (an extra body field): answer from a stored generation of the same
    # request, "exact" or "semantic".
    cache: CacheOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        return _refuse_unless(value, (None, 1), "one choice per request; send several")

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, value: float | None) -> float | None:
        return _refuse_unless(value, (None, 0, 0.0), "repetition penalties are not implemented")

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> Any:
        return _refuse_unless(value or None, (None,), "logit bias is not implemented")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"give up to {MAX_STOP_SEQUENCES} non-empty stop sequences")
        return value

    @model_validator(mode="after")
    def _options_need_stream(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None) -> dict[str, Any]:
        """The job's params: OpenAI's defaults (temperature 1, top_p 1), and top_p 0 = greedy."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0.0:
            temperature, top_p = 0.0, 1.0
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": self.seed,
            "stop": stop,
        }
        if self.user:
            params["user"] = self.user
        return params


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    store: bool | None = False
    metadata: dict[str, str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    web_search_options: dict[str, Any] | None = None
    # genserve's own: ground the answer in passages of collections (an extra body field).
    rag: RagOptions | None = None

    _metadata = field_validator("metadata")(_check_metadata)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _refuse_unless(value, (None, False), "log probabilities are not returned")

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        return _refuse_unless(value, (None, 0), "log probabilities are not returned")

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = (value or {}).get("type", "text")
        _refuse_unless(kind, ("text",), "structured output is not implemented")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> Any:
        return _refuse_unless(value or None, (None,), "these models do not call tools")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        return _refuse_unless(value, (None, "none"), "these models do not call tools")

    @field_validator("parallel_tool_calls")
    @classmethod
    def _no_parallel_tools(cls, value: bool | None) -> bool | None:
        return _refuse_unless(value, (None, False), "these models do not call tools")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        _refuse_unless(sorted(set(value or ["text"])), (["text"],), "these models write text only")
        return value

    @field_validator("audio", "prediction", "reasoning_effort", "web_search_options")
    @classmethod
    def _not_offered(cls, value: Any) -> Any:
        return _refuse_unless(value, (None,), "this feature is not offered by genserve")

    @field_validator("service_tier")
    @classmethod
    def _default_tier(cls, value: str | None) -> str | None:
        return _refuse_unless(value, (None, "auto", "default"), "genserve has one tier")

    @model_validator(mode="after")
    def _ends_with_user(self) -> ChatCompletionRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self

    def to_job(self, spec: ModelSpec, *, queue: str) -> JobRequest:
        """The job this request asks for (max_completion_tokens wins over max_tokens)."""
        param = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        requested = self.max_completion_tokens or self.max_tokens
        return JobRequest(
            model=self.model,
            queue=queue,
            input={"messages": [message.as_turn() for message in self.messages]},
            params=self.sampling_params(resolve_max_tokens(spec, requested, param=param)),
            metadata=dict(self.metadata or {}),
            api="chat.completions",
            store=bool(self.store),
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(
                f"one prompt per request, got {len(value)}; send several, or use /v1/batches"
            )
        text = value if isinstance(value, str) else value[0]
        if not text.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        return _refuse_unless(value, (None, False), "the prompt is not echoed")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        return _refuse_unless(value, (None, 0), "log probabilities are not returned")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        return _refuse_unless(value, (None, 1), "one candidate per request")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _refuse_unless(value or None, (None,), "these models do not fill in the middle")

    def to_job(self, spec: ModelSpec, *, queue: str) -> JobRequest:
        """The job this request asks for: the prompt goes to the model as is."""
        text = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return JobRequest(
            model=self.model,
            queue=queue,
            input={"prompt": text, "raw": True},
            params=self.sampling_params(
                resolve_max_tokens(spec, self.max_tokens, param="max_tokens")
            ),
            api="completions",
        )


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1, max_length=128)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("input", mode="before")
    @classmethod
    def _texts_only(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not isinstance(value[0], str):
            raise ValueError("token-id input is not supported: send strings")
        return value

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs, got {len(texts)}")
        if any(not text for text in texts):
            raise ValueError("inputs must not be empty strings")
        return value

    def to_job(self, spec: ModelSpec, *, queue: str) -> JobRequest:
        """The job this request asks for; a width other than the model's is refused."""
        if self.dimensions is not None and self.dimensions != spec.dimension:
            raise InvalidRequest(
                f"{spec.name} makes {spec.dimension}-dimensional embeddings; "
                f"dimensions={self.dimensions} cannot be honoured",
                param="dimensions",
                code="unsupported_value",
            )
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        params: dict[str, Any] = {"encoding_format": self.encoding_format}
        if self.user:
            params["user"] = self.user
        return JobRequest(
            model=self.model, queue=queue, input={"texts": texts}, params=params, api="embeddings"
        )


# --- responses ---------------------------------------------------------------------------


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = None
    # Stored completions carry their metadata, as OpenAI's do.
    metadata: dict[str, str] | None = None
    # A grounded answer's cited sources (genserve's own; all: /v1/generations/{id}/sources).
    citations: list[Citation] | None = None
    generation_id: str | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genserve"


class TrainedModelCard(ModelCard):
    """A version of a model trained here (or shipped trained), with its lineage."""

    name: str
    version: int
    family: str
    tasks: list[str]
    # The version a request for the bare name gets.
    default: bool
    config: dict[str, Any]
    metrics: dict[str, Any]
    dataset_file_id: str | None
    dataset_sha256: str
    artifact_sha256: str
    parent_version: int | None
    created_by: str
    training_job_id: str | None
    promoted_at: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TrainedModelCard | ModelCard]


class CursorList(BaseModel):
    """OpenAI's list envelope: paged by `after` (an id) and `limit`."""

    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, data: list[Any], has_more: bool) -> CursorList:
        return cls(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )


class StoredMessage(BaseModel):
    id: str
    role: str
    content: str
    name: str | None = None


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


class MetadataUpdate(Strict):
    metadata: dict[str, str] | None

    _metadata = field_validator("metadata")(_check_metadata)


BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


class BatchCreate(Strict):
    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None

    _metadata = field_validator("metadata")(_check_metadata)

    @field_validator("output_expires_after")
    @classmethod
    def _kept(cls, value: dict[str, Any] | None) -> Any:
        return _refuse_unless(value, (None,), "output files are kept until deleted")


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, Any] | None
