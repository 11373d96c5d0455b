"""What a job for a trained model does: sample on the engine thread, store the generation
with the files it made (images as PNG, rows as CSV), marked synthetic."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from models.backends import classic
from models.registry import get_spec
from service import checkpoints, files
from service.db import crud, tenants, training
from service.db.tables import Generation, Job, new_id
from workers.engine.runtime import ModelRuntime
from workers.privacy import redact_generation


def describe(job: Job) -> str:
    """The request as a line of text, shown and searched like a prompt."""
    data = job.input
    if "prompt" in data:
        return str(data["prompt"])
    kind = next(k for k in ("images", "rows", "anomaly") if k in data)
    details = ", ".join(f"{k}={json.dumps(v)}" for k, v in data[kind].items())
    return f"{kind}: {details}; seed={job.params['seed']}"


def _request(session: Session, job: Job) -> dict[str, Any]:
    """The family's sampling request (models.backends.classic.Family.sample)."""
    data, params = job.input, job.params
    if "prompt" in data:
        return {
            "task": "text",
            "prefix": data["prompt"],
            "max_length": params["max_tokens"],
            "temperature": params["temperature"],
            "top_k": params["top_k"],
        }
    if "images" in data:
        images = {k: v for k, v in data["images"].items() if v is not None}
        if "interpolate" in images:
            images.pop("n", None)  # the path's steps say how many
        return {"task": "images", **images}
    if "rows" in data:
        return {"task": "rows", **data["rows"]}
    file_id = data["anomaly"]["file_id"]
    sample = files.get_file(session, tenant_id=job.tenant_id, file_id=file_id)
    if sample is None:
        raise ValueError(f"file {file_id!r} is gone")
    raw = b"".join(files.iter_chunks(session, file_id))
    return {"task": "anomaly", "samples": classic.parse_dataset("images", sample.filename, raw)}


def _csv(table: classic.Table) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buffer.getvalue().encode()


def _contents(sampled: classic.Sampled) -> list[tuple[str, str, bytes, dict[str, Any]]]:
    """(filename, media type, bytes, metadata) of each file the sample makes."""
    if sampled.images is not None:
        return [
            (
                f"image-{i}.png",
                "image/png",
                classic.encode_png(image),
                {"width": image.shape[1], "height": image.shape[0]},
            )
            for i, image in enumerate(sampled.images)
        ]
    if sampled.table is not None:
        return [("rows.csv", "text/csv", _csv(sampled.table), {"rows": len(sampled.table.rows)})]
    return []


def _output(sampled: classic.Sampled, contents: list[Any]) -> str:
    if sampled.text is not None:
        return sampled.text
    if sampled.scores is not None:
        return json.dumps({"scores": sampled.scores, **sampled.meta})
    if sampled.table is not None:
        return f"{len(sampled.table.rows)} rows of {', '.join(sampled.table.columns)}"
    return f"{len(contents)} images"


def run_trained_job(
    factory: sessionmaker[Session],
    runtime: ModelRuntime,
    job: Job,
    *,
    artifacts_dir: Path,
    embedding_model: str,
    embed: Callable[[dict[str, str]], dict[str, bytes]],
) -> tuple[str, str | None]:
    """Sample the job's model version and store the result; (status, generation id).

    Args:
        embed: Texts by kind -> float32 vector bytes by kind (the generation's embeddings).
    """
    with factory() as session:
        row = training.get_version(
            session, tenant_id=job.tenant_id, name=job.model, version=job.params["model_version"]
        )
        if row is None:
            return _fail(session, job, f"model {job.model}:{job.params['model_version']} is gone")
        try:
            request = _request(session, job)
        except ValueError as exc:
            return _fail(session, job, f"input.anomaly: {exc}")
        path = checkpoints.resolve(row.artifact_path, artifacts_dir)
        sha256, model_version = row.artifact_sha256, str(row.version)
        redacts = tenants.redacts_pii(session, tenant_id=job.tenant_id)
    trained = runtime.trained_model(path, sha256)
    started = time.perf_counter()
    try:
        sampled = runtime.engine.call(
            lambda: classic.sample(trained, request, device=runtime.device, seed=job.params["seed"])
        )
    except ValueError as exc:
        with factory() as session:
            return _fail(session, job, f"the model refused the request: {exc}")
    sample_s = time.perf_counter() - started
    contents = _contents(sampled)
    assert job.started_at is not None
    generation = Generation(
        id=new_id("gen"),
        tenant_id=job.tenant_id,
        job_id=job.id,
        model=job.model,
        model_version=model_version,
        input=job.input,
        prompt=describe(job),
        output=_output(sampled, contents),
        params=job.params,
        meta={**job.meta, "synthetic": True, "family": row.family, **sampled.meta},
        prompt_tokens=0,
        completion_tokens=len(sampled.text) if sampled.text is not None else len(contents),
        finish_reason="length" if sampled.text is not None else "stop",
        timings={
            "queue_s": round((job.started_at - job.created_at).total_seconds(), 4),
            "generate_s": round(sample_s, 4),
            "device": runtime.device,
        },
    )
    if redacts:
        redact_generation(generation)
    vectors = embed({"prompt": generation.prompt, "output": generation.output})
    with factory() as session:
        stored = crud.store_generation(
            session,
            job=job,
            generation=generation,
            vectors=vectors,
            model=embedding_model,
            dimension=get_spec(embedding_model).dimension or 0,
        )
        if not stored:
            return "skipped", None
        for index, (filename, media_type, data, meta) in enumerate(contents):
            writer = files.FileWriter(
                session=session,
                tenant_id=job.tenant_id,
                purpose="generation",
                filename=filename,
                max_bytes=None,
                max_lines=None,
                kind="synthetic",
                media_type=media_type,
                generation_id=generation.id,
                meta={
                    "index": index,
                    "model": job.model,
                    "model_version": model_version,
                    "seed": job.params["seed"],
                    **meta,
                },
            )
            writer.write(data)
            writer.close()
        session.commit()
    return "succeeded", generation.id


def _fail(session: Session, job: Job, message: str) -> tuple[str, None]:
    crud.reject_job(session, job_id=job.id, message=message, param="input", code=None)
    session.commit()
    return "failed", None
