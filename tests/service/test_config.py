from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_embedded_defaults(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, _env_file=None)
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'genserve.sqlite'}"
    assert settings.celery_broker_url.startswith("gsqla+sqlite:///")
    assert settings.uses_embedded_broker
    assert settings.models_dir == tmp_path.resolve() / "models"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_DATABASE_URL", "postgresql://u@db:5432/gs")
    monkeypatch.setenv("GENSERVE_BROKER_URL", "redis://cache:6379/0")
    monkeypatch.setenv("GENSERVE_CHAT_MODELS", "a, b")
    monkeypatch.setenv("GENSERVE_WORKER_QUEUES", "interactive,batch")
    settings = Settings(_env_file=None)
    assert settings.sqlalchemy_url == "postgresql+psycopg://u@db:5432/gs"
    assert settings.chat_models == ["a", "b"]
    assert settings.worker_queues == ["interactive", "batch"]
    assert not settings.uses_embedded_broker


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown queues"):
        Settings(worker_queues="interactive,nope", _env_file=None)
    with pytest.raises(ValidationError, match="must be set in production"):
        Settings(environment="production", _env_file=None)
