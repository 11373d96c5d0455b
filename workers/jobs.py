"""What a generation job does, as plain functions the thin Celery task calls."""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from models.backends.causal_lm import CausalLM
from models.backends.decoding import GenerationOutput, SamplingParams
from models.registry import REGISTRY, get_spec
from service.db import crud, tenants
from service.db.tables import Generation, GenerationSource, Job, new_id
from service.events import EventSink
from service.rag import grounding
from service.turns import turn_messages, turn_text
from workers import evals, exports, ingest, sampling, telemetry
from workers.engine.engine import GenerationHandle
from workers.engine.runtime import ModelRuntime
from workers.leases import LeaseKeeper
from workers.privacy import redact_generation
from workers.streaming import TokenPublisher, storable

logger = logging.getLogger("genserve.worker")

# How long a job thread waits for its generation's next delta before it looks at its
# cancellation flag again.
FOLLOW_POLL_S = 0.25


def encode_job(
    model: CausalLM, job: Job, history: list[Generation]
) -> tuple[list[int], list[grounding.Packed]]:
    """Token ids of the job's input after the earlier turns of its conversation, and the
    passages packed into its last turn when it is grounded (job.context)."""
    if job.input.get("raw"):
        earlier = "".join(turn.prompt + turn.output for turn in history)
        return model.encode_prompt(earlier + job.input["prompt"]), []
    messages: list[dict[str, str]] = []
    for turn in history:
        messages += turn_messages(turn.input)
        messages.append({"role": "assistant", "content": turn.output})
    messages += turn_messages(job.input)
    if not job.context:
        return model.encode_chat(messages), []
    # Grounded: the passages that fit beside the conversation, the instructions and the
    # answer's room, in this model's tokens.
    question = messages[-1]["content"]
    room = model.context_length - job.params["max_tokens"]
    framed = [*messages[:-1], {"role": "user", "content": grounding.frame(question)}]
    budget = room - len(model.encode_chat(framed))
    limit = job.context["rag"].get("max_context_tokens")
    packed = grounding.pack(
        job.context["passages"],
        count_tokens=model.count_tokens,
        budget=min(budget, limit) if limit else budget,
    )
    while True:  # the blocks' tokens may not add up exactly to the whole turn's
        messages[-1] = {"role": "user", "content": grounding.grounded_question(question, packed)}
        ids = model.encode_chat(messages)
        if len(ids) <= room or not packed:
            return ids, packed
        packed = packed[:-1]


def _sources(generation: Generation, packed: list[grounding.Packed]) -> list[GenerationSource]:
    """The rows that keep a grounded generation's passages, marked when its answer cites them."""
    cited = set(grounding.cited_numbers(generation.output))
    return [
        GenerationSource(
            generation_id=generation.id,
            number=item.number,
            rank=item.passage["rank"],
            score=item.passage["score"],
            scores=item.passage["scores"],
            collection_id=item.passage["collection_id"],
            document_id=item.passage["document_id"],
            chunk_id=item.passage["chunk_id"],
            source_generation_id=item.passage["generation_id"],
            title=item.passage["title"],
            text=item.passage["text"],
            cited=item.number in cited,
        )
        for item in packed
    ]


@dataclass(frozen=True)
class Outcome:
    status: str  # "succeeded" | "failed" | "cancelled" | "skipped"
    generation_id: str | None = None
    batch_id: str | None = None  # the batch the job is a line of


def _embed(runtime: ModelRuntime, model_name: str, texts: dict[str, str]) -> dict[str, bytes]:
    kinds = [kind for kind, text in texts.items() if text.strip()]
    vectors = runtime.embed(model_name, [texts[k] for k in kinds])
    return {
        kind: np.asarray(v, dtype=np.float32).tobytes()
        for kind, v in zip(kinds, vectors, strict=True)
    }


def _generation_row(
    job: Job, out: GenerationOutput, model: CausalLM, generate_s: float
) -> Generation:
    assert job.started_at is not None
    return Generation(
        id=new_id("gen"),
        tenant_id=job.tenant_id,
        job_id=job.id,
        conversation_id=job.conversation_id,
        parent_id=job.parent_generation_id,
        model=job.model,
        model_version=get_spec(job.model).version,
        input=job.input,
        prompt=turn_text(job.input),
        output=storable(out.text),
        params=job.params,
        meta=job.meta,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        finish_reason=out.finish_reason,
        cache_key=job.cache_key,
        cache_scope=job.cache_scope,
        timings={
            "queue_s": round((job.started_at - job.created_at).total_seconds(), 4),
            "generate_s": round(generate_s, 4),
            "tokens_per_s": round(out.completion_tokens / generate_s, 2) if generate_s else None,
            "device": model.device,
            "batch_peak": out.peak_batch,
        },
    )


def _reject(session: Session, job: Job, message: str, *, param: str, code: str) -> Outcome:
    """Fail a job whose input the model cannot take, with an error the API answers 400 with."""
    crud.reject_job(session, job_id=job.id, message=message, param=param, code=code)
    session.commit()
    return Outcome("failed")


def _follow(
    handle: GenerationHandle,
    tokens: TokenPublisher,
    cancelled: threading.Event,
    deadline: float,
    *,
    job: Job,
) -> tuple[GenerationOutput, bool]:
    """Publish the generation's deltas as they come; pass a cancellation, or the time
    limit's, on to the engine. Returns the output and whether the limit stopped it."""
    timed_out = False
    first = True
    while True:
        if not handle.cancelled and (cancelled.is_set() or time.monotonic() > deadline):
            timed_out = not cancelled.is_set()
            handle.cancel()
        item = handle.next(timeout=FOLLOW_POLL_S)
        if isinstance(item, str):
            if first:
                telemetry.first_token(job.model, job.created_at)
                first = False
            tokens(item)
        elif item is not None:
            telemetry.count_tokens(job.model, item.completion_tokens)
            return item, timed_out


def _generate(
    factory: sessionmaker[Session],
    runtime: ModelRuntime,
    job: Job,
    *,
    embedding_model: str,
    tokens: TokenPublisher,
    leases: LeaseKeeper,
    time_limit_s: float,
) -> Outcome:
    """Generate on the engine, then store the generation with its embeddings.

    No database connection is held while the engine generates. A generation still running
    time_limit_s after it started is stopped, and the job fails naming the limit.
    """
    with factory() as session:
        history = crud.ancestors(session, generation_id=job.parent_generation_id)
        redacts = tenants.redacts_pii(session, tenant_id=job.tenant_id)
    model = runtime.chat_model(job.model)
    params = job.params
    started = time.perf_counter()
    deadline = time.monotonic() + time_limit_s
    prompt_ids, packed = encode_job(model, job, history)
    try:
        handle = runtime.engine.generate(
            model,
            prompt_ids,
            SamplingParams(
                max_new_tokens=params["max_tokens"],
                temperature=params["temperature"],
                top_p=params["top_p"],
                seed=params["seed"],
                stop=tuple(params["stop"]),
            ),
        )
    except ValueError as exc:  # the input does not fit the model (too long, say)
        message = f"the input does not fit {job.model} (context {model.context_length}): {exc}"
        with factory() as session:
            return _reject(session, job, message, param="messages", code="context_length_exceeded")
    try:
        out, timed_out = _follow(handle, tokens, leases.watch(job.id), deadline, job=job)
    finally:
        leases.release(job.id)
    generate_s = time.perf_counter() - started
    if timed_out:
        reason = f"the job ran past its time limit of {time_limit_s:g} s"
        with factory() as session:
            crud.finish_job(session, job_id=job.id, status="failed", error=reason)
            session.commit()
        return Outcome("failed")
    if out.finish_reason == "cancelled":
        with factory() as session:
            crud.finish_job(session, job_id=job.id, status="cancelled")
            session.commit()
        return Outcome("cancelled")
    generation = _generation_row(job, out, model, generate_s)
    if redacts:
        redact_generation(generation)
    vectors = _embed(
        runtime, embedding_model, {"prompt": generation.prompt, "output": generation.output}
    )
    spec = get_spec(embedding_model)
    assert spec.dimension is not None
    with factory() as session:
        stored = crud.store_generation(
            session,
            job=job,
            generation=generation,
            vectors=vectors,
            model=embedding_model,
            dimension=spec.dimension,
        )
        if stored and packed:
            session.add_all(_sources(generation, packed))
        session.commit()
    return Outcome("succeeded", generation.id) if stored else Outcome("skipped")


def _embed_texts(factory: sessionmaker[Session], runtime: ModelRuntime, job: Job) -> Outcome:
    """An embeddings request: the vectors go to job.result as base64 of float32."""
    embedder = runtime.embedder(job.model)
    texts: list[str] = job.input["texts"]
    counts = embedder.count_tokens(texts)
    for index, count in enumerate(counts):
        if count > embedder.max_tokens:
            message = (
                f"input[{index}] is {count} tokens; {job.model} embeds at most "
                f"{embedder.max_tokens}"
            )
            with factory() as session:
                return _reject(session, job, message, param="input", code="context_length_exceeded")
    vectors = runtime.embed(job.model, texts, alone=True).astype("<f4")
    result = {
        "embeddings": [base64.b64encode(vector.tobytes()).decode() for vector in vectors],
        "prompt_tokens": sum(counts),
    }
    with factory() as session:
        finished = crud.finish_job(session, job_id=job.id, status="succeeded", result=result)
        session.commit()
    return Outcome("succeeded") if finished else Outcome("skipped")


def run_job(
    factory: sessionmaker[Session],
    runtime: ModelRuntime,
    job_id: str,
    *,
    leases: LeaseKeeper,
    embedding_model: str,
    artifacts_dir: Path,
    events: EventSink | None = None,
    time_limit_s: float,
    ingestion_time_limit_s: float | None = None,
    export_time_limit_s: float | None = None,
) -> Outcome:
    """Claim the job and run it: chat models generate, embedding models embed, trained
    models sample (workers.sampling), ingestions fill a collection (workers.ingest),
    exports write the history's pairs to a file (workers.exports).

    A generation and its embeddings are stored in one transaction. An interactive job's
    tokens are published to events as they come, and its end after the commit (batch jobs
    have no reader). Many jobs run at once in one worker (its thread pool); their
    generations share the engine's batch.
    """
    with factory() as session:
        job = crud.claim_job(session, job_id=job_id, lease_s=leases.lease_s)
    if job is None:
        return Outcome("skipped")  # done, cancelled, or running elsewhere
    if job.api == "ingest":
        limit = ingestion_time_limit_s or time_limit_s
        return Outcome(
            ingest.run_ingestion(factory, runtime, job, leases=leases, time_limit_s=limit)
        )
    if job.api == "export":
        limit = export_time_limit_s or time_limit_s
        return Outcome(exports.run_export_job(factory, job, leases=leases, time_limit_s=limit))
    # Every waiting request wakes on the stream's end, embeddings requests too.
    tokens = TokenPublisher(events if job.queue != "batch" else None, job.id, job.attempts)
    tokens.start()
    if job.model not in REGISTRY:
        status, generation_id = sampling.run_trained_job(
            factory,
            runtime,
            job,
            artifacts_dir=artifacts_dir,
            embedding_model=embedding_model,
            embed=lambda texts: _embed(runtime, embedding_model, texts),
        )
        outcome = Outcome(status, generation_id)
    elif get_spec(job.model).task == "embedding":
        outcome = _embed_texts(factory, runtime, job)
    else:
        outcome = _generate(
            factory,
            runtime,
            job,
            embedding_model=embedding_model,
            tokens=tokens,
            leases=leases,
            time_limit_s=time_limit_s,
        )
    evals.score_job(
        factory,
        runtime,
        job,
        status=outcome.status,
        generation_id=outcome.generation_id,
        embedding_model=embedding_model,
    )
    tokens.end(outcome.status)
    if outcome.status != "skipped":
        telemetry.JOBS_FINISHED.labels(job.queue, job.model, outcome.status).inc()
    return replace(outcome, batch_id=job.batch_id)


def fail_job(factory: sessionmaker[Session], job_id: str, error: str) -> None:
    """Record an unexpected failure on a running job (the task's failure hook)."""
    with factory() as session:
        crud.finish_job(session, job_id=job_id, status="failed", error=error[:2000])
        session.commit()
