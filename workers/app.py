"""The Celery instance of the workers (`celery -A workers.app worker`)."""

from __future__ import annotations

from service.config import get_settings
from service.queue import make_celery, prepare_embedded_broker

_settings = get_settings()
if _settings.uses_embedded_broker:
    prepare_embedded_broker(_settings.embedded_broker_path)

app = make_celery("genserve-worker", _settings.celery_broker_url)
app.conf.include = ["workers.tasks"]
