"""The one settings object. Only entry points read it; they pass plain values down."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# In priority order: a worker serves the first non-empty one first (on Redis; kombu's
# SQLAlchemy transport takes its queues in turn), so batch lines never starve requests.
QUEUES = ("interactive", "embed", "batch", "train")


def _csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """genserve configuration, from GENSERVE_* environment variables or a .env file."""

    model_config = SettingsConfigDict(env_prefix="GENSERVE_", env_file=".env", extra="ignore")

    environment: Literal["development", "production", "test"] = "development"
    data_dir: Path = Path("var")

    # Empty means the embedded default: a SQLite file under data_dir.
    database_url: str = ""
    # Empty means the embedded broker: kombu's SQLAlchemy transport on its own SQLite file.
    broker_url: str = ""

    # Where workers publish each job's tokens for the API to stream. Empty means the
    # broker's Redis when the broker is Redis, else a SQLite file under data_dir.
    events_url: str = ""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1_000_000
    # The Files API streams uploads to SQL; these bound a file and a batch's input.
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    max_batch_lines: int = Field(default=50_000, ge=1)
    # Jobs a tenant may have queued at once; past it, submissions get 429.
    max_queued_jobs_per_tenant: int = Field(default=100_000, ge=1)
    # Requests a minute per API key, unless the key or its tenant sets a stricter one
    # (`genserve keys create --rate-limit`, `genserve tenants set`); 0 is no limit.
    rate_limit_per_minute: int = Field(default=0, ge=0)

    chat_models: Annotated[list[str], NoDecode] = ["smollm2-135m-instruct"]
    embedding_model: str = "all-minilm-l6-v2"
    # How the embedding model runs on a CPU: "onnx-int8" (ONNX Runtime, int8 weights and
    # activations; 1.6x to 2x faster, nDCG@10 on SciFact 0.003 lower), "onnx" (float32)
    # or "torch". On a GPU it is torch. The API (queries) and workers (documents) use it.
    embedding_runtime: Literal["torch", "onnx", "onnx-int8"] = "onnx-int8"
    # Where dequantized / converted weights are cached; empty means data_dir/models.
    model_cache_dir: Path | None = None
    device: str = "auto"
    # Trained weights (safetensors) are written here; every worker that samples a trained
    # model must see this folder (a shared volume when workers run on several machines).
    artifacts_dir: Path | None = None
    # `genserve migrate` registers the small checkpoints that ship in models/checkpoints.
    builtin_models: bool = True

    worker_queues: Annotated[list[str], NoDecode] = list(QUEUES)
    # The engine (workers/engine) decodes up to max_batch sequences of a model together;
    # the worker's thread pool must hold that many jobs, plus room for embeddings and
    # batch-file jobs beside a full batch. Empty concurrency means max_batch + 4.
    max_batch: int = Field(default=32, ge=1)
    max_prefill_tokens: int = Field(default=4096, ge=1)
    worker_concurrency: int | None = Field(default=None, ge=1)
    worker_pool: Literal["solo", "prefork", "threads"] = "threads"
    # Training jobs one worker runs at once (the others wait for a slot, still queued).
    training_concurrency: int = Field(default=1, ge=1)

    # Rule 2: a job still queued this long after its last publish is published again;
    # the wait doubles with each re-publish, up to 32x.
    requeue_after_s: float = Field(default=30.0, gt=0)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    # A running job whose worker stopped renewing its lease this long ago is re-run. Leases
    # are renewed every 0.5 s from their own thread, so a minute means a dead worker, and
    # its jobs run again within a minute and a half (the sweep and the requeue delay).
    job_lease_s: float = Field(default=60.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    # A job that runs longer than this (from its claim) is stopped and fails, naming the
    # limit; a generation's max_tokens keeps it far below the limit on any working device.
    job_time_limit_s: float = Field(default=600.0, gt=0)
    training_time_limit_s: float = Field(default=6 * 3600.0, gt=0)
    # An ingestion (documents into a collection) is stopped past this; what it stored stays.
    ingestion_time_limit_s: float = Field(default=6 * 3600.0, gt=0)
    # An export (the history into a JSONL file) is stopped past this; it then writes nothing.
    export_time_limit_s: float = Field(default=3600.0, gt=0)

    # The search index (service/search): written after this many changes (or 5% of it),
    # one shard per tenant, exact below the IVF threshold, IVF above it.
    index_persist_every: int = Field(default=1000, ge=1)
    index_ivf_threshold: int = Field(default=50_000, ge=1)
    index_ivf_encoding: Literal["flat", "sq8"] = "flat"
    index_nprobe: int | None = Field(default=None, ge=1)
    index_maintain_interval_s: float = Field(default=1.0, gt=0)

    # Log lines as JSON or text; unset means JSON in production, text elsewhere.
    log_format: Literal["json", "text"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # How often a worker writes its heartbeat and metrics to the database; a worker not
    # heard from for 3 beats counts as gone (/readyz, /metrics).
    heartbeat_interval_s: float = Field(default=5.0, gt=0)

    @property
    def resolved_log_format(self) -> Literal["json", "text"]:
        return self.log_format or ("json" if self.environment == "production" else "text")

    @property
    def worker_slots(self) -> int:
        """Jobs one worker process holds at once (Celery's concurrency)."""
        return self.worker_concurrency or self.max_batch + 4

    @field_validator("chat_models", "worker_queues", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        return _csv(value)

    @field_validator("worker_queues")
    @classmethod
    def _known_queues(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(QUEUES))
        if unknown:
            raise ValueError(f"unknown queues {unknown}; known: {list(QUEUES)}")
        return value

    @model_validator(mode="after")
    def _production_needs_servers(self) -> Settings:
        if self.environment == "production" and not (self.database_url and self.broker_url):
            raise ValueError(
                "GENSERVE_DATABASE_URL and GENSERVE_BROKER_URL must be set in production; "
                "the embedded SQLite database and broker are for one machine only"
            )
        if self.environment == "production" and self.events_backend_url.startswith("sqlite"):
            raise ValueError(
                "token streams need Redis in production: use a Redis broker or set "
                "GENSERVE_EVENTS_URL; the SQLite events file is for one machine only"
            )
        return self

    @cached_property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # psycopg 3 is the driver we ship; accept the plain scheme people paste.
            for prefix in ("postgresql://", "postgres://"):
                if url.startswith(prefix):
                    return "postgresql+psycopg://" + url[len(prefix) :]
            return url
        return f"sqlite:///{self.resolved_data_dir / 'genserve.sqlite'}"

    @property
    def celery_broker_url(self) -> str:
        # The scheme names service.queue's EmbeddedTransport (kombu's SQLAlchemy transport).
        return self.broker_url or f"gsqla+sqlite:///{self.embedded_broker_path}"

    @property
    def embedded_broker_path(self) -> Path:
        return self.resolved_data_dir / "broker.sqlite"

    @property
    def events_backend_url(self) -> str:
        """redis://... or sqlite:///path, per the rule on events_url above."""
        if self.events_url:
            return self.events_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return f"sqlite:///{self.resolved_data_dir / 'events.sqlite'}"

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def models_dir(self) -> Path:
        return (self.model_cache_dir or self.resolved_data_dir / "models").expanduser().resolve()

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.resolved_data_dir / "artifacts").expanduser().resolve()

    @property
    def index_dir(self) -> Path:
        return self.resolved_data_dir / "index"


def get_settings() -> Settings:
    return Settings()
