"""The trained families end to end: upload a dataset, train as a job, follow its progress,
register a version, promote, and sample through the jobs API (real API, broker, worker)."""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.e2e.conftest import Live
from tests.utils.server import wait_for_job

pytestmark = pytest.mark.e2e

TEXT = ("the tide comes in and the tide goes out. " * 60 + "a moon over the sea. " * 40).encode()
# Tiny budgets: these tests check behaviour; bench/zoo.py measures quality.
RNN_CONFIG = {
    "hidden_size": 32,
    "embedding_size": 8,
    "num_layers": 1,
    "seq_len": 32,
    "batch_size": 8,
    "epochs": 2,
    "steps_per_epoch": 5,
}
VAE_CONFIG = {"epochs": 1, "widths": [8, 16], "latent_dim": 4}
TABULAR_CONFIG = {"epochs": 3, "hidden_size": 16, "condition_columns": ["kind"]}
TERMINAL = ("succeeded", "failed", "cancelled")


def upload(client: httpx.Client, name: str, data: bytes, purpose: str = "fine-tune") -> dict:
    response = client.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})
    assert response.status_code == 200, response.text
    return response.json()


def digits_npz(count: int) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=(load_digits().images[:count] / 16.0).astype(np.float32))
    return buffer.getvalue()


def table_csv() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["kind", "size", "weight"])
    for _ in range(120):
        kind = str(rng.choice(["apple", "melon"]))
        size = rng.normal(8 if kind == "apple" else 20, 1)
        writer.writerow([kind, f"{size:.2f}", int(size * 10 + rng.normal(0, 3))])
    return buffer.getvalue().encode()


def train(client: httpx.Client, **body: Any) -> dict:
    response = client.post("/v1/training-jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def wait_for_training(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/training-jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"training job {job_id} did not finish: {job}")


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """The job's Server-Sent Events, read until the stream ends."""
    found = []
    with client.stream("GET", f"/v1/training-jobs/{job_id}/events", timeout=180) as response:
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((name, json.loads(line.removeprefix("data: "))))
    return found


def generate(client: httpx.Client, **body: Any) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    return client.get(f"/v1/generations/{job['generation_id']}").json()


def card(client: httpx.Client, ref: str) -> dict | None:
    cards = client.get("/v1/models").json()["data"]
    return next((c for c in cards if c["id"] == ref), None)


def test_train_stream_register_promote_and_sample_text(live: Live) -> None:
    with live.service.client(live.writer) as client:
        dataset = upload(client, "tides.txt", TEXT)
        first = train(
            client, name="tides", arch="char_rnn", dataset_file_id=dataset["id"], config=RNN_CONFIG
        )
        assert first["status"] in ("queued", "running")
        stream = events(client, first["id"])
        progress = [data for kind, data in stream if kind == "progress"]
        assert [kind for kind, _ in stream][-1] == "end"
        assert {p["data"]["epoch"] for p in progress} >= {1, 2}
        assert all(p["data"]["val_loss"] is None or p["data"]["val_loss"] > 0 for p in progress)
        done = stream[-1][1]
        assert done["status"] == "succeeded" and done["model"] == "tides:1", done
        curve = client.get(f"/v1/training-jobs/{first['id']}/progress").json()["data"]
        assert len(curve) >= len(progress)

        version = card(client, "tides:1")
        assert version is not None and version["family"] == "char_rnn" and version["default"]
        assert version["dataset_sha256"] == dataset["sha256"]
        assert version["metrics"]["val_loss"] > 0 and len(version["artifact_sha256"]) == 64
        assert version["training_job_id"] == first["id"]
        assert version["created_by"].startswith("key:")

        body = {
            "model": "tides",
            "input": {"prompt": "the "},
            "params": {"max_tokens": 40, "temperature": 0.8, "top_k": 5, "seed": 3},
        }
        one, two = generate(client, **body), generate(client, **body)
        assert one["model_version"] == "1" and len(one["output"]) == 40
        assert one["output"] == two["output"]
        assert one["metadata"]["synthetic"] is True
        assert client.get(f"/v1/generations/{one['id']}/content").text == one["output"]

        # A second version from the first: it is served by default until 1 is promoted.
        second = train(
            client,
            name="tides",
            arch="char_rnn",
            dataset_file_id=dataset["id"],
            config=RNN_CONFIG,
            seed=1,
            parent_version=1,
        )
        assert wait_for_training(client, second["id"])["model"] == "tides:2"
        assert card(client, "tides:2")["default"] and card(client, "tides:2")["parent_version"] == 1
        assert generate(client, **body)["model_version"] == "2"
        promoted = client.post("/v1/models/tides/versions/1/promote")
        assert promoted.status_code == 200 and promoted.json()["default"], promoted.text
        assert generate(client, **body)["model_version"] == "1"
        assert generate(client, **{**body, "model": "tides:2"})["model_version"] == "2"
        versions = client.get("/v1/models/tides/versions").json()["data"]
        assert [v["version"] for v in versions] == [1, 2]

    with live.service.client(live.other) as client:
        assert card(client, "tides:1") is None
        assert client.get(f"/v1/training-jobs/{first['id']}").status_code == 404
        assert client.get("/v1/models/tides").status_code == 404
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def test_images_are_stored_as_synthetic_png_files(live: Live) -> None:
    with live.service.client(live.writer) as client:
        dataset = upload(client, "digits.npz", digits_npz(200))
        job = train(
            client, name="digits-test", arch="vae", dataset_file_id=dataset["id"], config=VAE_CONFIG
        )
        assert wait_for_training(client, job["id"])["status"] == "succeeded"

        generation = generate(
            client, model="digits-test", input={"images": {"n": 3}}, params={"seed": 5}
        )
        parts = generation["content"]
        assert [p["index"] for p in parts] == [0, 1, 2]
        assert all(p["media_type"] == "image/png" for p in parts)
        image = client.get(f"/v1/generations/{generation['id']}/content?index=1")
        assert image.headers["content-type"] == "image/png"
        assert image.content.startswith(b"\x89PNG")
        assert client.get(f"/v1/generations/{generation['id']}/content?index=3").status_code == 404
        synthetic = client.get("/v1/files", params={"kind": "synthetic"}).json()["data"]
        mine = [f for f in synthetic if f["generation_id"] == generation["id"]]
        assert len(mine) == 3
        assert all(f["kind"] == "synthetic" and f["metadata"]["model_version"] == "1" for f in mine)
        real = client.get("/v1/files", params={"kind": "real"}).json()["data"]
        assert dataset["id"] in {f["id"] for f in real} and not {f["id"] for f in mine} & {
            f["id"] for f in real
        }

        path = generate(
            client,
            model="digits-test",
            input={"images": {"interpolate": {"from_seed": 1, "to_seed": 2, "steps": 4}}},
        )
        assert len(path["content"]) == 4

        samples = upload(client, "samples.npz", digits_npz(6), purpose="user_data")
        scored = generate(
            client, model="digits-test", input={"anomaly": {"file_id": samples["id"]}}
        )
        assert len(json.loads(scored["output"])["scores"]) == 6

        # A synthetic file never becomes a training set.
        refused = client.post(
            "/v1/training-jobs",
            json={"name": "loop", "arch": "vae", "dataset_file_id": parts[0]["file_id"]},
        )
        assert refused.status_code == 400, refused.text


def test_tabular_rows_honour_their_conditions(live: Live) -> None:
    with live.service.client(live.writer) as client:
        dataset = upload(client, "fruit.csv", table_csv())
        job = train(
            client,
            name="fruit",
            arch="tabular",
            dataset_file_id=dataset["id"],
            config=TABULAR_CONFIG,
        )
        assert wait_for_training(client, job["id"])["status"] == "succeeded"
        generation = generate(
            client,
            model="fruit",
            input={"rows": {"n": 20, "conditions": {"kind": "melon"}}},
            params={"seed": 2},
        )
        content = client.get(f"/v1/generations/{generation['id']}/content")
        assert content.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(content.text)))
        assert len(rows) == 20 and {row["kind"] for row in rows} == {"melon"}
        assert all(row["weight"].lstrip("-").isdigit() for row in rows)


def test_training_mistakes_are_clear_and_register_nothing(live: Live) -> None:
    with live.service.client(live.writer) as client:
        text = upload(client, "tides.txt", TEXT)

        def refused(body: dict, status: int, param: str) -> None:
            response = client.post("/v1/training-jobs", json=body)
            assert response.status_code == status, response.text
            assert response.json()["error"]["param"] == param, response.text

        base = {"name": "oops", "arch": "char_rnn", "dataset_file_id": text["id"]}
        refused({**base, "arch": "transformer-xl"}, 400, "arch")
        refused({**base, "dataset_file_id": "file_missing"}, 404, "dataset_file_id")
        refused({**base, "arch": "vae"}, 400, "dataset_file_id")
        refused({**base, "name": "tiny-random-llama"}, 409, "name")
        refused({**base, "name": "Bad Name!"}, 400, "name")

        refused({**base, "config": {"hidden_sizes": 3}}, 400, "config")
        refused({**base, "config": {"cell": "transformer"}}, 400, "config")
        refused({**base, "config": {"epochs": 2.5}}, 400, "config")

        # What only the data can tell fails the job, with the reason, and registers nothing.
        short = upload(client, "short.txt", b"ebb, flow")
        bad = train(client, **{**base, "dataset_file_id": short["id"]}, config=RNN_CONFIG)
        failed = wait_for_training(client, bad["id"])
        assert failed["status"] == "failed" and "at least 20 characters" in failed["error"], failed

        long = train(client, **base, config={**RNN_CONFIG, "epochs": 10_000})
        deadline = time.monotonic() + 120
        while client.get(f"/v1/training-jobs/{long['id']}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert client.post(f"/v1/training-jobs/{long['id']}/cancel").status_code == 200
        assert wait_for_training(client, long["id"])["status"] == "cancelled"
        assert card(client, "oops:1") is None

        # Inputs a model cannot take are refused before anything is queued.
        for body, param in (
            ({"model": "tiny-random-llama", "input": {"images": {"n": 1}}}, "input.images"),
            (
                {"model": "tiny-random-llama", "input": {"prompt": "hi"}, "params": {"top_k": 3}},
                "params.top_k",
            ),
            ({"model": "nope:1", "input": {"prompt": "hi"}}, "model"),
        ):
            response = client.post("/v1/jobs", json=body)
            assert response.status_code in (400, 404), response.text
            assert response.json()["error"]["param"] == param, response.text


def test_the_shipped_models_serve_at_once(live: Live) -> None:
    with live.service.client(live.writer) as client:
        shipped = {"digits-vae", "digits-gan", "digits-diffusion", "pydoc-char-rnn"}
        for name in sorted(shipped | {"digits-autoencoder", "diabetes-tabular"}):
            listed = card(client, f"{name}:1")
            assert listed is not None, name
            assert listed["metrics"]["meets_target"] is True, listed
        diffusion = generate(
            client,
            model="digits-diffusion",
            input={"images": {"n": 2, "steps": 10}},
            params={"seed": 3},
        )
        gan = generate(client, model="digits-gan", input={"images": {"n": 2}})
        for generation in (diffusion, gan):
            image = client.get(f"/v1/generations/{generation['id']}/content?index=1")
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        text = generate(
            client,
            model="pydoc-char-rnn",
            input={"prompt": "The "},
            params={"max_tokens": 30, "seed": 1},
        )
        assert len(text["output"]) == 30
