"""The Celery instance of the workers (`celery -A workers.app worker`)."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from service import logs
from service.config import get_settings
from service.queue import make_celery, prepare_embedded_broker

_settings = get_settings()
if _settings.uses_embedded_broker:
    prepare_embedded_broker(_settings.embedded_broker_path)

app = make_celery("genserve-worker", _settings.celery_broker_url)
app.conf.include = ["workers.tasks"]


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    # Connected, so Celery leaves logging to this: every process writes one format.
    logs.configure(_settings.resolved_log_format, _settings.log_level)
