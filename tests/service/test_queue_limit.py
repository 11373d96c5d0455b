"""The queue's bound: past it, submissions get 429 with Retry-After, on every API.

The real app runs in-process with no worker, so what is submitted stays queued.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.db.session import make_engine, make_sessionmaker
from tests.utils.factories import make_key


def test_a_full_queue_answers_429(sqlite_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database_url=sqlite_url,
        data_dir=tmp_path,
        environment="test",
        chat_models=["tiny-random-llama"],
        max_queued_jobs_per_tenant=2,
    )
    with make_sessionmaker(make_engine(sqlite_url))() as session:
        _, key = make_key(session)
        _, other_key = make_key(session, tenant="globex")
    job = {"model": "tiny-random-llama", "input": {"prompt": "hi"}}
    with TestClient(create_app(settings)) as http:
        http.headers["Authorization"] = f"Bearer {key}"
        assert [http.post("/v1/jobs", json=job).status_code for _ in range(2)] == [202, 202]
        refused = http.post("/v1/jobs", json=job)
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        assert refused.json()["error"]["code"] == "queue_full"
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
        )
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="tiny-random-llama", messages=[{"role": "user", "content": "hi"}]
            )
        # The bound is per tenant.
        other = http.post("/v1/jobs", json=job, headers={"Authorization": f"Bearer {other_key}"})
        assert other.status_code == 202
