"""The `genserve` commands over HTTP against the live API and worker: batch runs that
resume, the listings, search, export, models, training with its loss, usage, errors."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.batch_run import BatchRunner, Tally, read_lines, run_id
from service.cli import app
from service.client import Client
from tests.e2e.conftest import Live

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"


def _one_backend(live: Live) -> None:
    """The commands are HTTP clients: what the server does is tested on both backends
    elsewhere; resuming a batch (idempotency in SQL) runs on both here."""
    if live.backend != "sqlite":
        pytest.skip("the command is a client of the API; one backend is enough")


@pytest.fixture
def runner(live: Live, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setenv("GENSERVE_URL", live.service.base_url)
    monkeypatch.setenv("GENSERVE_API_KEY", live.writer)
    monkeypatch.setenv("GENSERVE_CONFIG", str(tmp_path / "absent.toml"))
    return CliRunner()


def _ok(runner: CliRunner, *args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.stdout


def _batch_file(path: Path, tag: str, count: int) -> Path:
    lines: list[dict[str, Any]] = [
        {"id": f"q{n}", "prompt": f"line {n} of the batch", "metadata": {"tags": [tag]}}
        for n in range(count - 1)
    ]
    lines.append(  # OpenAI's batch format
        {
            "custom_id": "openai-line",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": "and one more"}],
                "max_tokens": 3,
                "metadata": {"tags": [tag]},
            },
        }
    )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_batch_run_stopped_midway_resumes_without_running_a_line_twice(
    live: Live, runner: CliRunner, tmp_path: Path
) -> None:
    tag = f"batch-{uuid.uuid4().hex[:8]}"
    source = _batch_file(tmp_path / "prompts.jsonl", tag, count=8)
    output = tmp_path / "prompts.results.jsonl"
    lines = read_lines(source, model=MODEL, params={"max_tokens": 4, "temperature": 0.0})

    class Stop(KeyboardInterrupt):
        pass

    def stop_after_three(tally: Tally) -> None:
        if tally.done >= 3:
            raise Stop

    with Client(live.service.base_url, live.writer) as client:
        first = BatchRunner(
            client, lines, output, concurrency=4, run=run_id(source, lines), poll_s=0.2
        )
        with pytest.raises(Stop):
            first.run(stop_after_three)
    before = _results(output)
    assert len(before) == 3
    # A torn last line, as a run killed while writing leaves it, is cut off on resume.
    with output.open("a") as handle:
        handle.write('{"line": 99, "trunc')

    run = ["batch", "run", str(source), "--model", MODEL, "--max-tokens", "4", "--temperature"]
    summary = _ok(runner, *run, "0", "--concurrency", "4", "--json")
    assert summary["total"] == 8 and summary["done"] == 8 and summary["failed"] == 0
    after = _results(output)
    assert sorted(r["line"] for r in after) == list(range(1, 9))
    assert after[:3] == before  # the lines done before were not run again
    assert all(r["status"] == "succeeded" and r["output"] is not None for r in after)
    assert {r["id"] for r in after} == {f"q{n}" for n in range(7)} | {"openai-line"}
    assert all(r["usage"]["completion_tokens"] >= 1 for r in after)
    with Client(live.service.base_url, live.writer) as client:
        submitted = client.jobs(tag=tag, limit=100).data
    assert len(submitted) == 8  # one job a line, however often the run was started
    assert {job.id for job in submitted} == {r["job_id"] for r in after}

    again = _ok(runner, *run, "0", "--json")
    assert again["done"] == 8 and len(_results(output)) == 8  # nothing left to do


def test_a_batch_line_the_server_refuses_fails_alone(
    live: Live, runner: CliRunner, tmp_path: Path
) -> None:
    _one_backend(live)
    source = tmp_path / "mixed.jsonl"
    source.write_text(
        json.dumps({"prompt": "fine", "params": {"max_tokens": 2}})
        + "\n"
        + json.dumps({"model": "no-such-model", "prompt": "refused"})
        + "\n"
    )
    result = runner.invoke(app, ["batch", "run", str(source), "--model", MODEL, "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["failed"] == 1
    by_line = {r["line"]: r for r in _results(tmp_path / "mixed.results.jsonl")}
    assert by_line[1]["status"] == "succeeded"
    assert by_line[2]["status"] == "failed" and "no-such-model" in by_line[2]["error"]
    assert by_line[2]["job_id"] is None


def test_a_batch_file_with_a_bad_line_submits_nothing(
    live: Live, runner: CliRunner, tmp_path: Path
) -> None:
    _one_backend(live)
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "fine"}\n{"prompt": \n')
    result = runner.invoke(app, ["batch", "run", str(source), "--model", MODEL])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: line 2: not JSON: Expecting value at column 12"
    ]
    assert not (tmp_path / "bad.results.jsonl").exists()
    source.write_text('{"prompt": "fine", "params": {"max_tokens": 0}}\n')
    refused = runner.invoke(app, ["batch", "run", str(source), "--model", MODEL])
    assert refused.exit_code == 1 and "line 1: params.max_tokens" in refused.stderr


def test_listings_search_models_and_usage(live: Live, runner: CliRunner) -> None:
    _one_backend(live)
    tag = f"cli-{uuid.uuid4().hex[:8]}"
    with Client(live.service.base_url, live.writer) as client:
        job = client.submit(
            MODEL,
            prompt="the lighthouse keeper counts ships",
            params={"max_tokens": 4},
            metadata={"tags": [tag]},
        )
        done = client.wait(job.id, timeout_s=180)
    assert done.status == "succeeded" and done.generation_id

    listed = _ok(runner, "jobs", "--tag", tag, "--json")
    assert [j["id"] for j in listed["data"]] == [job.id]
    table = _ok(runner, "jobs", "--tag", tag)
    assert job.id in table and "succeeded" in table
    generations = _ok(runner, "generations", "--tag", tag, "--json")
    assert [g["id"] for g in generations["data"]] == [done.generation_id]
    shown = _ok(runner, "generations", done.generation_id)
    assert "the lighthouse keeper counts ships" in shown
    found = _ok(runner, "search", "lighthouse keeper", "--mode", "keyword", "--tag", tag, "--json")
    assert [hit["generation"]["id"] for hit in found["data"]] == [done.generation_id]
    printed = _ok(runner, "search", "lighthouse keeper", "--mode", "keyword", "--tag", tag)
    assert done.generation_id in printed and "lighthouse" in printed
    models = _ok(runner, "models", "--json")
    assert MODEL in {card["id"] for card in models["data"]}
    assert MODEL in _ok(runner, "models")
    usage = _ok(runner, "usage", "--json")
    assert usage["total"]["requests"] >= 1
    assert "total" in _ok(runner, "usage", "--group-by", "model")


def test_export_writes_the_file(live: Live, runner: CliRunner, tmp_path: Path) -> None:
    _one_backend(live)
    tag = f"export-{uuid.uuid4().hex[:8]}"
    with Client(live.service.base_url, live.writer) as client:
        for prompt in ("first question", "second question"):
            job = client.submit(
                MODEL, prompt=prompt, params={"max_tokens": 4}, metadata={"tags": [tag]}
            )
            assert client.wait(job.id, timeout_s=180).status == "succeeded"
    target = tmp_path / "export.jsonl"
    answer = _ok(runner, "export", "--output", str(target), "--tag", tag, "--no-dedup", "--json")
    assert answer["status"] == "succeeded"
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 2 and all(row["messages"][0]["role"] == "user" for row in rows)


def test_train_follows_the_loss_until_registered(
    live: Live, runner: CliRunner, tmp_path: Path
) -> None:
    _one_backend(live)
    dataset = tmp_path / "tides.txt"
    dataset.write_text("the tide comes in and the tide goes out. " * 60)
    name = f"cli-{uuid.uuid4().hex[:6]}"
    config = {
        "hidden_size": 16,
        "embedding_size": 8,
        "seq_len": 16,
        "batch_size": 8,
        "epochs": 2,
        "steps_per_epoch": 3,
    }
    result = runner.invoke(
        app,
        [
            "train",
            name,
            "--arch",
            "char_rnn",
            "--dataset",
            str(dataset),
            "--config",
            json.dumps(config),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "epoch 1 step" in result.stderr and "epoch 2 step" in result.stderr
    assert "loss" in result.stderr and f"registered {name}:1" in result.stderr


def test_errors_are_one_line_and_exit_1(live: Live, runner: CliRunner, tmp_path: Path) -> None:
    _one_backend(live)
    for args in (
        ["jobs", "--url", "http://127.0.0.1:9"],
        ["jobs", "--key", "gs-wrong"],
        ["generations", "gen_nothere"],
        ["search", "x", "--mode", "nonsense"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    config = tmp_path / "config.toml"
    config.write_text(f'url = "{live.service.base_url}"\napi_key = "{live.writer}"\n')
    from_config = runner.invoke(
        app,
        ["models", "--json"],
        env={"GENSERVE_URL": None, "GENSERVE_API_KEY": None, "GENSERVE_CONFIG": str(config)},
    )
    assert from_config.exit_code == 0, from_config.output
    assert MODEL in {card["id"] for card in json.loads(from_config.stdout)["data"]}
