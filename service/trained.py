"""Jobs for the trained families: a request checked against its model version, turned into
the job's params (the version is fixed at submission, so a later promotion changes nothing
for a job already accepted)."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy.orm import Session

from models.registry import TRAINED_FAMILIES
from service import files
from service.api.errors import InvalidRequest, NotFound
from service.api.schemas import JobCreate
from service.db import training
from service.db.tables import ModelVersion

# Characters a character-level RNN writes when a request gives no max_tokens, and at most.
DEFAULT_TEXT_CHARS = 200
MAX_TEXT_CHARS = 10_000
SAMPLE_SUFFIXES = (".npz", ".zip")


def parse_ref(model: str) -> tuple[str, int | None]:
    """ "name" or "name:VERSION"; None for a malformed version (no such model)."""
    name, sep, version = model.partition(":")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise NotFound(f"model {model!r} is not served here", param="model", code="model_not_found")
    return name, int(version)


def resolve_version(session: Session, *, tenant_id: int, model: str) -> ModelVersion | None:
    name, version = parse_ref(model)
    return training.get_version(session, tenant_id=tenant_id, name=name, version=version)


def _task_of(kind: str) -> str:
    return "text" if kind == "prompt" else kind


def _check_input(job_in: JobCreate, row: ModelVersion) -> None:
    tasks = TRAINED_FAMILIES[row.family][1]
    kind = job_in.input.kind
    if kind == "messages" or _task_of(kind) not in tasks:
        accepted = ", ".join(f"input.{'prompt' if t == 'text' else t}" for t in sorted(tasks))
        raise InvalidRequest(
            f"model {row.ref} is a {row.family} model; it takes {accepted}, not input.{kind}",
            param=f"input.{kind}",
            code="unsupported_input",
        )
    images = job_in.input.images
    if images is not None and images.steps is not None and row.family != "diffusion":
        raise InvalidRequest(
            f"input.images.steps applies to diffusion models; {row.ref} is a {row.family}",
            param="input.images.steps",
        )
    if images is not None and images.interpolate is not None and row.family != "vae":
        raise InvalidRequest(
            f"input.images.interpolate applies to VAE models; {row.ref} is a {row.family}",
            param="input.images.interpolate",
        )
    if job_in.input.raw:
        raise InvalidRequest("'raw' applies to language models", param="input.raw")
    if job_in.conversation_id or job_in.parent_generation_id:
        raise InvalidRequest(f"{row.family} models keep no conversation", param="conversation_id")


def _check_samples(session: Session, tenant_id: int, file_id: str) -> None:
    sample = files.get_file(session, tenant_id=tenant_id, file_id=file_id)
    if sample is None:
        raise NotFound(f"file {file_id!r} not found", param="input.anomaly.file_id")
    if not sample.filename.lower().endswith(SAMPLE_SUFFIXES):
        raise InvalidRequest(
            f"samples to score must be a .npz array or a .zip of PNGs; {file_id!r} is "
            f"{sample.filename!r}",
            param="input.anomaly.file_id",
        )


def _text_params(job_in: JobCreate) -> dict[str, Any]:
    params = job_in.params
    if params.stop:
        raise InvalidRequest("stop sequences apply to language models", param="params.stop")
    if params.top_p != 1.0:
        raise InvalidRequest(
            "character-level models sample with top_k, not top_p", param="params.top_p"
        )
    max_tokens = DEFAULT_TEXT_CHARS if params.max_tokens is None else params.max_tokens
    if max_tokens > MAX_TEXT_CHARS:
        raise InvalidRequest(
            f"params.max_tokens {max_tokens} is above the limit of {MAX_TEXT_CHARS} characters",
            param="params.max_tokens",
            code="max_tokens_too_large",
        )
    return {"max_tokens": max_tokens, "temperature": params.temperature, "top_k": params.top_k}


def trained_job_params(
    session: Session, *, tenant_id: int, job_in: JobCreate, row: ModelVersion
) -> dict[str, Any]:
    """The params of a job for a trained model version; 4xx errors name the field at fault.

    The seed is drawn now when the request gives none, so every output can be made again.
    """
    _check_input(job_in, row)
    if job_in.input.anomaly is not None:
        _check_samples(session, tenant_id, job_in.input.anomaly.file_id)
    params: dict[str, Any] = {
        "family": row.family,
        "model_version": row.version,
        "seed": job_in.params.seed if job_in.params.seed is not None else secrets.randbelow(2**31),
    }
    if job_in.input.prompt is not None:
        params |= _text_params(job_in)
    elif job_in.params.top_k is not None:
        raise InvalidRequest("top_k applies to character-level RNN models", param="params.top_k")
    return params
