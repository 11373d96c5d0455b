"""What a training job does: read its dataset from SQL, train, save, register a version.

A version is registered only when training succeeded, in the transaction that marks the
job succeeded; a failed, cancelled or superseded attempt registers nothing and leaves no
artifact behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from models.backends import classic
from models.registry import TRAINED_FAMILIES
from service import files
from service.db import training
from service.db.tables import TrainingJob

logger = logging.getLogger("genserve.worker")

T = TypeVar("T")

# How often a running job renews its lease and looks for a cancel, between reports.
CHECK_EVERY_S = 1.0


class Reporter:
    """Stores each report of one attempt, and tells the training loop when to stop."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        job: TrainingJob,
        *,
        lease_s: float,
        time_limit_s: float = float("inf"),
    ) -> None:
        self._factory = factory
        self._job_id = job.id
        self._attempt = job.attempts
        self._lease_s = lease_s
        self._stop = False
        self._checked = time.monotonic()
        self._deadline = self._checked + time_limit_s
        self.timed_out = False

    def event(self, kind: str, data: dict[str, Any]) -> None:
        with self._factory() as session:
            self._stop |= training.record_training_event(
                session,
                job_id=self._job_id,
                attempt=self._attempt,
                kind=kind,
                data=data,
                lease_s=self._lease_s,
            )
        self._checked = time.monotonic()

    def progress(self, report: classic.Progress) -> None:
        self.event("progress", asdict(report))

    def should_stop(self) -> bool:
        if not self._stop and time.monotonic() - self._checked > CHECK_EVERY_S:
            self.event("heartbeat", {})
        if not self._stop and time.monotonic() > self._deadline:
            self._stop = self.timed_out = True
        return self._stop


def _artifact_path(job: TrainingJob) -> Path:
    """Relative to the artifacts folder: one file per job, so attempts never collide."""
    return Path(str(job.tenant_id)) / job.name / f"{job.id}.safetensors"


def _load_dataset(session: Session, job: TrainingJob) -> tuple[str, bytes, str] | None:
    dataset = files.get_file(session, tenant_id=job.tenant_id, file_id=job.dataset_file_id)
    if dataset is None:
        return None
    return dataset.filename, b"".join(files.iter_chunks(session, dataset.id)), dataset.sha256


def _finish(
    factory: sessionmaker[Session], job: TrainingJob, status: str, error: str | None = None
) -> str:
    with factory() as session:
        finished = training.finish_training_job(
            session, job_id=job.id, attempt=job.attempts, status=status, error=error
        )
        session.commit()
    return status if finished else "skipped"


def _register(
    factory: sessionmaker[Session],
    job: TrainingJob,
    trained: classic.Trained,
    *,
    artifact: Path,
    artifacts_dir: Path,
    dataset_sha256: str,
    artifact_sha256: str,
) -> str:
    """The version and the job's success in one transaction; else the artifact goes."""
    with factory() as session:
        row = training.register_version(
            session,
            tenant_id=job.tenant_id,
            name=job.name,
            family=job.arch,
            config=classic.config_dict(trained.config),
            dataset_file_id=job.dataset_file_id,
            dataset_sha256=dataset_sha256,
            metrics=trained.metrics,
            artifact_path=str(artifact),
            artifact_sha256=artifact_sha256,
            parent_version=job.parent_version,
            created_by=job.created_by,
            training_job_id=job.id,
        )
        if training.finish_training_job(
            session,
            job_id=job.id,
            attempt=job.attempts,
            status="succeeded",
            model_version=row.version,
        ):
            session.commit()
            logger.info("training job %s registered %s", job.id, row.ref)
            return "succeeded"
        session.rollback()
    (artifacts_dir / artifact).unlink(missing_ok=True)
    return "skipped"


def run_training(
    factory: sessionmaker[Session],
    job_id: str,
    *,
    artifacts_dir: Path,
    device: str,
    lease_s: float,
    time_limit_s: float = float("inf"),
) -> str:
    """Claim and run one training job; returns its final status ("skipped" if not ours).

    Training still running time_limit_s after the claim stops, and the job fails naming
    the limit.
    """
    with factory() as session:
        job = training.claim_training_job(session, job_id=job_id, lease_s=lease_s)
        if job is None:
            return "skipped"
        dataset = _load_dataset(session, job)
    if dataset is None:
        return _finish(factory, job, "failed", f"dataset file {job.dataset_file_id!r} is gone")
    filename, data, dataset_sha256 = dataset
    reporter = Reporter(factory, job, lease_s=lease_s, time_limit_s=time_limit_s)
    reporter.event("status", {"status": "running", "attempt": job.attempts, "device": device})
    try:
        parsed = classic.parse_dataset(TRAINED_FAMILIES[job.arch][0], filename, data)
        del data
        started = time.perf_counter()
        trained = _on_a_thread_of_its_own(
            lambda: classic.train(
                job.arch,
                job.config,
                parsed,
                device=device,
                seed=job.seed,
                report=reporter.progress,
                should_stop=reporter.should_stop,
            )
        )
    except classic.Stopped:
        if reporter.timed_out:
            reason = f"training ran past its time limit of {time_limit_s:g} s"
            return _finish(factory, job, "failed", reason)
        return _finish(factory, job, "cancelled")
    except ValueError as exc:
        # A config value or dataset the family refuses: the job fails with that reason.
        return _finish(factory, job, "failed", f"invalid config or dataset: {exc}")
    trained.metrics = {**trained.metrics, "train_s": round(time.perf_counter() - started, 2)}
    artifact = _artifact_path(job)
    artifact_sha256 = classic.save(
        trained,
        artifacts_dir / artifact,
        extra={"name": job.name, "dataset_sha256": dataset_sha256},
    )
    return _register(
        factory,
        job,
        trained,
        artifact=artifact,
        artifacts_dir=artifacts_dir,
        dataset_sha256=dataset_sha256,
        artifact_sha256=artifact_sha256,
    )


def _on_a_thread_of_its_own(function: Callable[[], T]) -> T:
    """Run `function` on a new thread, wait for it and return what it returned.

    On the job's own thread, the OpenMP pool PyTorch starts for training would outlive the
    job; beside the engine thread's it would make every later decoding step pay an OpenMP
    wake-up per parallel region (workers/engine/engine.py). A thread's pool ends with it.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="genserve-training") as pool:
        return pool.submit(function).result()


def fail_training(factory: sessionmaker[Session], job_id: str, error: str) -> None:
    """Record an unexpected failure on a running training job (the task's failure hook)."""
    with factory() as session:
        job = session.get(TrainingJob, job_id)
        if job is not None:
            training.finish_training_job(
                session, job_id=job_id, attempt=job.attempts, status="failed", error=error[:2000]
            )
            session.commit()
