"""The FastAPI application factory."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry

from models.registry import get_spec
from service.api.deps import ApiLimits
from service.api.errors import register_error_handlers
from service.api.middleware import RequestContext, RequestLimits
from service.api.routes import (
    admin,
    batches,
    chat,
    collections,
    completions,
    conversations,
    evals,
    exports,
    files,
    generations,
    health,
    jobs,
    models,
    search,
    training,
    usage,
)
from service.cache import ResponseCache
from service.config import Settings, get_settings
from service.console import routes as console
from service.db.session import make_engine, make_sessionmaker
from service.events import make_source
from service.files import FileLimits
from service.metrics import StateCollector
from service.queue import JobPublisher, make_celery, prepare_embedded_broker
from service.rag.retrieval import Retriever
from service.ratelimit import make_rate_limiter
from service.search.embedder import LazyEmbedder
from service.search.index import CHUNKS, GENERATIONS, VectorIndex
from service.search.shards import ShardPolicy
from service.sweeper import Sweeper

logger = logging.getLogger("genserve.api")


def _lifespan(settings: Settings):  # noqa: ANN202 - returns FastAPI's lifespan callable
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.sqlalchemy_url)
        factory = make_sessionmaker(engine)
        if settings.uses_embedded_broker:
            prepare_embedded_broker(settings.embedded_broker_path)
        publisher = JobPublisher(make_celery("genserve-api", settings.celery_broker_url))
        spec = get_spec(settings.embedding_model)
        assert spec.dimension is not None
        policy = ShardPolicy(
            ivf_threshold=settings.index_ivf_threshold,
            encoding=settings.index_ivf_encoding,
            nprobe=settings.index_nprobe,
        )
        # Past generations (a shard per tenant) and documents' chunks (per collection).
        index, chunk_index = (
            VectorIndex(
                model=spec.name,
                dimension=spec.dimension,
                directory=settings.index_dir,
                persist_every=settings.index_persist_every,
                policy=policy,
                source=source,
            )
            for source in (GENERATIONS, CHUNKS)
        )
        # A sound index file loads here; a rebuild from SQL runs in the index's thread
        # while the API serves (vector search answers 503 until it is done).
        for each in (index, chunk_index):
            each.open(factory, build=False)
            each.start(factory, interval_s=settings.index_maintain_interval_s)
        sweeper = Sweeper(
            factory,
            publisher,
            interval_s=settings.sweep_interval_s,
            requeue_after_s=settings.requeue_after_s,
            max_attempts=settings.job_max_attempts,
        )
        app.state.sessionmaker = factory
        app.state.publisher = publisher
        app.state.index = index
        app.state.embedder = LazyEmbedder(
            model=spec.name,
            cache_dir=settings.models_dir,
            device="cpu",
            runtime=settings.embedding_runtime,
        )
        app.state.retriever = Retriever(
            chunk_index=chunk_index,
            generation_index=index,
            embed=app.state.embedder.encode_one,
            embedding_model=spec.name,
        )
        app.state.response_cache = ResponseCache(index, app.state.embedder.encode_one)
        app.state.heartbeat_interval_s = settings.heartbeat_interval_s
        app.state.metrics_registry = CollectorRegistry(auto_describe=False)
        app.state.metrics_registry.register(
            StateCollector(
                factory,
                {"generations": index, "chunks": chunk_index},
                heartbeat_interval_s=settings.heartbeat_interval_s,
            )
        )
        app.state.served_models = tuple(settings.chat_models)
        app.state.events = make_source(settings.events_backend_url)
        app.state.rate_limiter = make_rate_limiter(settings.events_backend_url)
        app.state.default_rate_limit = settings.rate_limit_per_minute
        app.state.limits = ApiLimits(max_queued_jobs_per_tenant=settings.max_queued_jobs_per_tenant)
        app.state.file_limits = FileLimits(
            max_bytes=settings.max_file_bytes, max_lines=settings.max_batch_lines
        )
        sweeper.start()
        try:
            yield
        finally:
            sweeper.stop()
            app.state.rate_limiter.close()
            await app.state.events.close()
            chunk_index.close()
            index.close()
            publisher.close()
            engine.dispose()

    return lifespan


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="genserve",
        version="0.1.0",
        summary="Self-hosted generation: jobs, history and search.",
        lifespan=_lifespan(settings),
    )
    register_error_handlers(app)
    upload_bound = settings.max_file_bytes + files.MULTIPART_OVERHEAD_BYTES
    app.add_middleware(
        RequestLimits,
        max_bytes=settings.max_body_bytes,
        # Uploads stream to SQL as they arrive, bounded by the file limit, never buffered.
        stream_paths={
            re.compile(re.escape(files.UPLOAD_PATH)): upload_bound,
            collections.UPLOAD_PATH: upload_bound,
        },
    )
    app.add_middleware(RequestContext)  # added last: outermost, it sees every answer
    routers = (
        health,
        jobs,
        generations,
        conversations,
        search,
        collections,
        models,
        training,
        chat,
        completions,
        admin,
        usage,
        evals,
        exports,
    )
    for module in (*routers, files, batches):
        app.include_router(module.router)
    app.include_router(console.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The schema as the API answers: a request that fails validation gets 400 with the
    error body every route documents, never FastAPI's default 422."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        # Bodies a route reads itself (several content types) are referenced by name.
        for model in (*collections.BODY_MODELS, *evals.BODY_MODELS):
            found = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(found.pop("$defs", {}))
            components[model.__name__] = found
        app.openapi_schema = schema
    return app.openapi_schema
