"""OpenAI request shapes: what is refused by name, and what a request becomes as a job."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from models.registry import get_spec
from service.api.errors import InvalidRequest
from service.batches import Models, parse_line
from service.openai_compat.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from service.openai_compat.responses import job_id_of, public_id
from service.submit import JobRequest

TINY = get_spec("tiny-random-llama")
MINILM = get_spec("all-minilm-l6-v2")
MESSAGES = [{"role": "user", "content": "hi"}]


def refused_param(schema: type, **body: object) -> str:
    with pytest.raises(ValidationError) as caught:
        schema.model_validate(body)
    return ".".join(str(part) for part in caught.value.errors()[0]["loc"])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"temperature": 2.5}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"mystery_argument": 1}, "mystery_argument"),
    ],
)
def test_chat_refuses_what_it_cannot_honour_by_name(extra: dict, param: str) -> None:
    assert refused_param(ChatCompletionRequest, model="m", messages=MESSAGES, **extra) == param


def test_chat_accepts_the_defaults_clients_send() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "tiny-random-llama",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "hi", "name": "ann"},
            ],
            "n": 1,
            "frequency_penalty": 0,
            "logprobs": False,
            "response_format": {"type": "text"},
            "tool_choice": "none",
            "stop": "END",
            "max_completion_tokens": 7,
            "max_tokens": 100,
            "top_p": 0,
            "store": True,
            "metadata": {"k": "v"},
        }
    )
    job = request.to_job(TINY, queue="interactive")
    assert job.input == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    }
    # max_completion_tokens wins; top_p 0 means greedy.
    assert job.params == {
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
        "stop": ["END"],
    }
    assert (job.api, job.store, job.metadata) == ("chat.completions", True, {"k": "v"})


def test_chat_needs_a_last_user_message_and_text_parts() -> None:
    assistant_last = [*MESSAGES, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValidationError, match="last message"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": assistant_last})
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert refused_param(ChatCompletionRequest, model="m", messages=image) == "messages.0.content"
    tool = [{"role": "tool", "content": "42", "tool_call_id": "c1"}, *MESSAGES]
    assert refused_param(ChatCompletionRequest, model="m", messages=tool) == "messages.0.role"


def test_max_tokens_above_the_model_limit_is_refused() -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "max_tokens": TINY.max_output_tokens + 1}
    )
    with pytest.raises(InvalidRequest) as caught:
        request.to_job(TINY, queue="interactive")
    assert caught.value.param == "max_tokens"


def test_completion_is_a_raw_prompt_with_openai_defaults() -> None:
    job = CompletionRequest.model_validate({"model": "m", "prompt": ["Once"]}).to_job(
        TINY, queue="interactive"
    )
    assert job.input == {"prompt": "Once", "raw": True}
    assert job.params["max_tokens"] == 16 and job.params["temperature"] == 1.0
    assert refused_param(CompletionRequest, model="m", prompt=["a", "b"]) == "prompt"
    assert refused_param(CompletionRequest, model="m", prompt="a", echo=True) == "echo"
    assert refused_param(CompletionRequest, model="m", prompt="a", suffix="z") == "suffix"


def test_embedding_request() -> None:
    job = EmbeddingRequest.model_validate(
        {"model": "m", "input": "a", "encoding_format": "base64"}
    ).to_job(MINILM, queue="embed")
    assert job.input == {"texts": ["a"]} and job.params == {"encoding_format": "base64"}
    assert refused_param(EmbeddingRequest, model="m", input=[[1, 2, 3]]) == "input"
    assert refused_param(EmbeddingRequest, model="m", input=["a", ""]) == "input"
    wrong_width = EmbeddingRequest.model_validate({"model": "m", "input": "a", "dimensions": 64})
    with pytest.raises(InvalidRequest) as caught:
        wrong_width.to_job(MINILM, queue="embed")
    assert caught.value.param == "dimensions"


def test_public_ids_lead_back_to_their_job() -> None:
    assert public_id("chat.completions", "job_abc") == "chatcmpl-abc"
    assert job_id_of("chat.completions", "chatcmpl-abc") == "job_abc"
    assert job_id_of("chat.completions", "cmpl-abc") is None


MODELS = Models(chat=("tiny-random-llama",), embedding="all-minilm-l6-v2")


def line(custom_id: object = "a", url: str = "/v1/chat/completions", **body: object) -> bytes:
    body = {"model": "tiny-random-llama", "messages": MESSAGES, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


@pytest.mark.parametrize(
    ("raw", "code", "custom_id"),
    [
        (b"{oops", "invalid_json", None),
        (b"[1, 2]", "invalid_request", None),
        (line(custom_id=7), "invalid_request", None),
        (line(url="/v1/embeddings"), "invalid_url", "a"),
        (line(model="gpt-9"), "model_not_found", "a"),
        (line(n=4), "invalid_value", "a"),
        (line(stream=True), "invalid_value", "a"),
        (line(max_tokens=10**6), "max_tokens_too_large", "a"),
    ],
)
def test_a_bad_batch_line_becomes_its_error(raw: bytes, code: str, custom_id: str | None) -> None:
    parsed_id, parsed = parse_line(raw, endpoint="/v1/chat/completions", models=MODELS, seen=set())
    assert parsed_id == custom_id
    assert isinstance(parsed, dict) and parsed["code"] == code and parsed["message"]


def test_batch_lines_become_batch_jobs_once_per_custom_id() -> None:
    seen: set[str] = set()
    custom_id, job = parse_line(line(), endpoint="/v1/chat/completions", models=MODELS, seen=seen)
    assert custom_id == "a" and isinstance(job, JobRequest) and job.queue == "batch"
    _, again = parse_line(line(), endpoint="/v1/chat/completions", models=MODELS, seen=seen)
    assert isinstance(again, dict) and again["code"] == "duplicate_custom_id"
