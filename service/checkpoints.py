"""Where trained weights live, and the checkpoints that ship with genserve.

A checkpoint is one safetensors file (models.backends.classic.save) whose header holds the
family, the resolved config and the metrics. This module reads that header with the
standard library, so the API registers and lists models without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

import models
from service.db import training
from service.db.tables import ModelVersion

logger = logging.getLogger("genserve.checkpoints")

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(models.__file__).parent / "checkpoints"
BUILTIN_OWNER = "genserve"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Header:
    arch: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    extra: dict[str, str]


def read_header(path: Path) -> Header:
    """The metadata of a safetensors checkpoint; ValueError if it is not one of ours."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path} has a header of {size} bytes")
        header = json.loads(handle.read(size))
    meta = header.get("__metadata__") or {}
    if "arch" not in meta or "config" not in meta:
        raise ValueError(f"{path} is not a genserve checkpoint")
    extra = {k: v for k, v in meta.items() if k not in ("arch", "config", "metrics", "format")}
    return Header(
        arch=meta["arch"],
        config=json.loads(meta["config"]),
        metrics=json.loads(meta.get("metrics", "{}")),
        extra=extra,
    )


def sha256_of(path: Path) -> str:
    """The file's sha256, as registered for a model version."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def resolve(artifact_path: str, artifacts_dir: Path) -> Path:
    """The file an artifact_path names: a built-in checkpoint or one under artifacts_dir."""
    if artifact_path.startswith(BUILTIN_PREFIX):
        return BUILTIN_DIR / artifact_path.removeprefix(BUILTIN_PREFIX)
    path = (artifacts_dir / artifact_path).resolve()
    if not path.is_relative_to(artifacts_dir.resolve()):
        raise ValueError(f"artifact path {artifact_path!r} leaves the artifacts folder")
    return path


def register_builtins(session: Session, directory: Path = BUILTIN_DIR) -> list[ModelVersion]:
    """Register each shipped checkpoint once (a changed file becomes the next version).

    The model's name is the file's stem; the caller commits.
    """
    added = []
    for path in sorted(directory.glob("*.safetensors")):
        digest = sha256_of(path)
        if training.get_builtin(session, name=path.stem, artifact_sha256=digest) is not None:
            continue
        header = read_header(path)
        row = training.register_version(
            session,
            tenant_id=None,
            name=path.stem,
            family=header.arch,
            config=header.config,
            dataset_file_id=None,
            dataset_sha256=header.extra.get("dataset_sha256", ""),
            metrics=header.metrics,
            artifact_path=BUILTIN_PREFIX + path.name,
            artifact_sha256=digest,
            parent_version=None,
            created_by=BUILTIN_OWNER,
            training_job_id=None,
        )
        logger.info("registered built-in model %s", row.ref)
        added.append(row)
    return added
