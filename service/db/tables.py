"""ORM tables. The schema itself is made only by the Alembic migrations."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonDoc = JSON().with_variant(JSONB(), "postgresql")

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
# Which API made a job; its results are served back in that API's shapes.
JOB_APIS = ("jobs", "chat.completions", "completions", "embeddings", "ingest", "export")
BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
# Uploaded data is real; what a model made is synthetic. Exports select either.
FILE_KINDS = ("real", "synthetic")
ROLES = ("admin", "writer", "reader")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """A public id that sorts by creation time: prefix, 12 hex digits of ms, 12 random."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Prompts and outputs are redacted (service/redact.py) before they are stored.
    redact_pii: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # Limits set by the operator (`genserve tenants set`); NULL is the server's default
    # for the rate and no quota for the day.
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    requests_per_day: Mapped[int | None] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128), default="")
    # The first characters of the key, shown in listings; the key itself is never stored.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    expires_at: Mapped[datetime | None] = mapped_column()
    # At most the tenant's rate; NULL takes the tenant's.
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class TenantUsage(Base):
    """A tenant's requests and tokens of one UTC day, counted as jobs are made and stored."""

    __tablename__ = "tenant_usage"

    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class AuditEvent(Base):
    """Who changed a key, a role, a setting, or deleted something, and when.

    No foreign keys: the record of a deletion outlives what it deleted.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_tenant_id", "tenant_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int | None] = mapped_column(BigInteger)
    # "key:<id>" for an API key, "cli" for the operator's command line.
    actor: Mapped[str] = mapped_column(String(64))
    actor_key_id: Mapped[int | None] = mapped_column(BigInteger)
    actor_role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    request_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "id"),
        # One API's jobs of a tenant, newest first: exports, stored chat completions.
        Index("ix_jobs_tenant_api", "tenant_id", "api", "id"),
        Index("ix_jobs_status_published", "status", "published_at"),
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        Index("ix_jobs_batch_status", "batch_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    input: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    params: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    conversation_id: Mapped[str | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )
    parent_generation_id: Mapped[str | None] = mapped_column(String(40))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    api: Mapped[str] = mapped_column(String(32), default="jobs", server_default="jobs")
    # A chat completion sent with store=true is listed by GET /v1/chat/completions.
    store: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # What a job that makes no generation returns (embeddings), or a batch line's error.
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    # What the service adds to the input: a grounded job's retrieval and its passages.
    context: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    # A line of a batch (indexed with status: "is any line still pending" is one seek).
    batch_id: Mapped[str | None] = mapped_column(String(40))
    custom_id: Mapped[str | None] = mapped_column(String(512))
    # The key that asked for it (usage per key); None from the operator's command line.
    api_key_id: Mapped[int | None] = mapped_column(BigInteger)
    # The response cache's keys of a cacheable request (service/cache.py), carried to its
    # generation.
    cache_key: Mapped[str | None] = mapped_column(String(64))
    cache_scope: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    generation: Mapped[Generation | None] = relationship(
        back_populates="job", uselist=False, lazy="selectin"
    )


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (
        Index("ix_generations_tenant_created", "tenant_id", "id"),
        Index("ix_generations_conversation", "conversation_id", "id"),
        Index("ix_generations_cache_key", "tenant_id", "cache_key"),
        Index("ix_generations_tenant_model", "tenant_id", "model", "id"),
        Index("ix_generations_tenant_feedback", "tenant_id", "feedback_score", "id"),
        # PostgreSQL also has a GIN index on metadata -> 'tags' (migration 0007).
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # Unique: a redelivered job writes its result once.
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    conversation_id: Mapped[str | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("generations.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    # The new turn as sent (prompt, or messages), and its text for search and display.
    input: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    prompt: Mapped[str] = mapped_column(Text)
    output: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(16))
    # queue_s, generate_s, tokens_per_s, device
    timings: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    # The mean score of the feedback given on this generation, and how many gave it.
    feedback_score: Mapped[float | None] = mapped_column(Float)
    feedback_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set when the request could be answered from the cache (service/cache.py): the hash
    # of model version, params and prompt, and of all but the prompt.
    cache_key: Mapped[str | None] = mapped_column(String(64))
    cache_scope: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Keyword search columns live outside the ORM, per dialect (migration 0002).

    job: Mapped[Job] = relationship(back_populates="generation")
    # The files it made (images, tables); ordered by their metadata's index.
    content_files: Mapped[list[File]] = relationship(
        primaryjoin="Generation.id == foreign(File.generation_id)", viewonly=True, lazy="selectin"
    )
    # The passages a grounded generation was given (RAG), by their citation number.
    sources: Mapped[list[GenerationSource]] = relationship(
        viewonly=True, lazy="selectin", order_by="GenerationSource.number"
    )


class Embedding(Base):
    """A float32 vector of a generation's prompt or output. The FAISS id is this row's id."""

    __tablename__ = "embeddings"
    # AUTOINCREMENT: SQLite must never reuse a deleted id, or an index could confuse rows.
    __table_args__ = (
        Index("ix_embeddings_model_id", "model", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    generation_id: Mapped[str] = mapped_column(
        ForeignKey("generations.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))  # "prompt" | "output"
    model: Mapped[str] = mapped_column(String(128))
    dimension: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EmbeddingDeletion(Base):
    """A log of removed embedding ids, so every index can drop them in order (rule 3)."""

    __tablename__ = "embedding_deletions"
    __table_args__ = (
        Index("ix_embedding_deletions_model_id", "model", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    embedding_id: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(128))
    # Which tenant's shard holds the vector; None on rows logged before migration 0002.
    tenant_id: Mapped[int | None] = mapped_column(BigInteger)
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow)


class File(Base):
    """An uploaded or produced file; its bytes are in file_chunks, in order."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_tenant_created", "tenant_id", "id"),
        Index("ix_files_tenant_kind", "tenant_id", "kind", "id"),
        Index("ix_files_generation", "generation_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    kind: Mapped[str] = mapped_column(String(16), default="real", server_default="real")
    media_type: Mapped[str | None] = mapped_column(String(64))
    # A synthetic file's generation (its model and version are on that row too).
    generation_id: Mapped[str | None] = mapped_column(String(40))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JsonDoc)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FileChunk(Base):
    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(
        ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(Base):
    """A file of requests run as low-priority jobs; its counts are read from those jobs."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_tenant_created", "tenant_id", "id"),
        Index("ix_batches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="validating")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    # Lines read from the input file so far (each made one job); total once validated.
    total: Mapped[int] = mapped_column(Integer, default=0)
    # Errors of the whole batch (the input file is gone or unreadable), OpenAI's shape.
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    # A worker preparing or finalizing the batch holds it until then.
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    in_progress_at: Mapped[datetime | None] = mapped_column()
    finalizing_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
    failed_at: Mapped[datetime | None] = mapped_column()
    expired_at: Mapped[datetime | None] = mapped_column()
    cancelling_at: Mapped[datetime | None] = mapped_column()
    cancelled_at: Mapped[datetime | None] = mapped_column()


class ModelVersion(Base):
    """A trained model: what made it, how good it is, and where its weights are."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version", name="uq_model_versions_name"),
        Index("ix_model_versions_name", "name", "version"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # None: a model that ships with genserve, served to every tenant.
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    family: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    dataset_file_id: Mapped[str | None] = mapped_column(String(40))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    # Relative to the artifacts folder; "builtin:NAME" for the checkpoints in the package.
    artifact_path: Mapped[str] = mapped_column(String(1024))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    parent_version: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(128))
    training_job_id: Mapped[str | None] = mapped_column(String(40))
    # The served version of a name is the one promoted last, else the newest.
    promoted_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class TrainingJob(Base):
    """Training one family on an uploaded dataset; success registers a model version."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        Index("ix_training_jobs_tenant_created", "tenant_id", "id"),
        Index("ix_training_jobs_status", "status", "published_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(32))
    dataset_file_id: Mapped[str] = mapped_column(String(40))
    config: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    seed: Mapped[int] = mapped_column(BigInteger)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    # The latest report: epoch, step, losses, val_loss.
    progress: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The version registered on success.
    model_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class TrainingEvent(Base):
    """One report of a training run, kept so its curve can be read and streamed."""

    __tablename__ = "training_events"
    __table_args__ = (
        Index("ix_training_events_job", "training_job_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    training_job_id: Mapped[str] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # "progress" | "status"
    data: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


COLLECTION_KINDS = ("documents", "history")


class Collection(Base):
    """A named set of documents searched together; "history" ones search past generations.

    The id is an integer: it keys the collection's shard of the chunk index.
    """

    __tablename__ = "collections"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="uq_collections_name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16), default="documents")
    embedding_model: Mapped[str] = mapped_column(String(128))
    chunk_tokens: Mapped[int] = mapped_column(Integer)
    chunk_overlap: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Document(Base):
    """One document of a collection: its extracted text, and what it was made from.

    external_id is the caller's name for it (its id in a JSONL file, else the filename);
    uploading it again with other content replaces its chunks, with the same content
    changes nothing (sha256 of title, text and metadata).
    """

    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint("collection_id", "external_id", name="uq_documents_external_id"),
        Index("ix_documents_collection_created", "collection_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(512))
    title: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str | None] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    # The ingestion (a job) that wrote this version.
    job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Chunk(Base):
    """A passage of a document, as embedded and searched. Its id is its full-text rowid."""

    __tablename__ = "chunks"
    __table_args__ = (
        Index("ix_chunks_document", "document_id", "seq"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    collection_id: Mapped[int] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), index=True
    )
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    start: Mapped[int] = mapped_column(Integer)  # character offsets in the document's text
    end: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChunkEmbedding(Base):
    """A chunk's float32 vector. The FAISS id in the chunk index is this row's id."""

    __tablename__ = "chunk_embeddings"
    __table_args__ = (
        Index("ix_chunk_embeddings_model_id", "model", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    chunk_id: Mapped[int] = mapped_column(ForeignKey("chunks.id", ondelete="CASCADE"), unique=True)
    model: Mapped[str] = mapped_column(String(128))
    dimension: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChunkEmbeddingDeletion(Base):
    """The chunk index's deletion log, as embedding_deletions is the generation index's."""

    __tablename__ = "chunk_embedding_deletions"
    __table_args__ = (
        Index("ix_chunk_embedding_deletions_model_id", "model", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    embedding_id: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(128))
    collection_id: Mapped[int | None] = mapped_column(BigInteger)
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow)


class GenerationSource(Base):
    """A passage a grounded generation was given: what it was, where from, how it ranked.

    The text is kept as the model saw it, so the lineage survives the document being
    replaced or deleted (then chunk_id and document_id point at nothing).
    """

    __tablename__ = "generation_sources"
    __table_args__ = (Index("ix_generation_sources_generation", "generation_id", "number"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # the [n] the model cites it by
    rank: Mapped[int] = mapped_column(Integer)  # its place in the retrieval, 1-based
    score: Mapped[float] = mapped_column(Float)
    scores: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)  # per ranking
    collection_id: Mapped[int | None] = mapped_column(BigInteger)
    document_id: Mapped[str | None] = mapped_column(String(40))
    chunk_id: Mapped[int | None] = mapped_column(BigInteger)
    # A "history" collection's passage is a past generation.
    source_generation_id: Mapped[str | None] = mapped_column(String(40))
    title: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text)
    cited: Mapped[bool] = mapped_column(Boolean, default=False)


class Feedback(Base):
    """One judgement of a generation; several may be given. The generation keeps their
    mean score and count for filtering."""

    __tablename__ = "generation_feedback"
    __table_args__ = (
        Index("ix_generation_feedback_generation", "generation_id", "id"),
        Index("ix_generation_feedback_label", "tenant_id", "label", "generation_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    score: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    # Who gave it, as the caller names them (an end user of the caller's product).
    user: Mapped[str | None] = mapped_column("user_name", String(128))
    api_key_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# Upper bounds (ms) of the latency buckets of usage_rollups; the last is open.
LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 300_000)
NO_LATENCY = -1  # the bucket of counts that are not a request's (feedback)


class UsageRollup(Base):
    """What a tenant's key did with a model on one UTC day, in one latency bucket.

    Counted when a request finishes (its latency is then known) and when feedback is given
    (bucket NO_LATENCY, on the day the generation was made, so trends show the quality of
    each day's outputs).
    """

    __tablename__ = "usage_rollups"
    __table_args__ = (PrimaryKeyConstraint("tenant_id", "day", "api_key_id", "model", "bucket"),)

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    api_key_id: Mapped[int] = mapped_column(BigInteger)  # 0: the operator's command line
    model: Mapped[str] = mapped_column(String(128))
    bucket: Mapped[int] = mapped_column(SmallInteger)
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    succeeded: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cancelled: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cache_hits: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    latency_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    time_saved_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    refusals: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    feedback_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    feedback_sum: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class EvalSet(Base):
    """A named dataset of {input, reference, metadata} items to evaluate models on."""

    __tablename__ = "eval_sets"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_eval_sets_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalItem(Base):
    __tablename__ = "eval_items"
    __table_args__ = (UniqueConstraint("set_id", "seq", name="uq_eval_items_seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    set_id: Mapped[str] = mapped_column(ForeignKey("eval_sets.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    input: Mapped[dict[str, Any]] = mapped_column(JsonDoc)  # {prompt} or {messages}
    reference: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)


class EvalRun(Base):
    """One model version run over an evaluation set; aggregates are set when it ends."""

    __tablename__ = "eval_runs"
    __table_args__ = (Index("ix_eval_runs_tenant_created", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    set_id: Mapped[str] = mapped_column(ForeignKey("eval_sets.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    total: Mapped[int] = mapped_column(Integer, default=0)
    aggregates: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    error: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class EvalResult(Base):
    """An item's output in a run and its scores against the reference."""

    __tablename__ = "eval_results"
    __table_args__ = (UniqueConstraint("run_id", "item_id", name="uq_eval_results_item"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(40))
    generation_id: Mapped[str | None] = mapped_column(String(40))
    output: Mapped[str | None] = mapped_column(Text)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkerHeartbeat(Base):
    """A worker process's last sign of life: what it serves, and its metrics at that beat.

    Each process writes its own row every few seconds (workers/telemetry.py); /readyz
    reads which models have a live worker, /metrics republishes the metrics.
    """

    __tablename__ = "worker_heartbeats"

    # The Celery node name and the process id: one row per process that runs jobs.
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JsonDoc, default=list)
    models: Mapped[list[str]] = mapped_column(JsonDoc, default=list)
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # Metric families as prometheus_client collects them (workers/telemetry.py).
    metrics: Mapped[list[Any]] = mapped_column(JsonDoc, default=list)
