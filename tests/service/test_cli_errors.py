"""The command line's mistakes are one line on stderr with a status: 2 for wrong usage,
1 for settings or a database it cannot use; help is not a mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import run


@pytest.fixture(autouse=True)
def _empty_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("GENSERVE_DATABASE_URL", raising=False)
    monkeypatch.delenv("GENSERVE_ENVIRONMENT", raising=False)


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["submit"], 2, "error: Missing argument 'model'. (see genserve submit --help)"),
        (["submit", "m", "p", "--max-tokens", "0"], 2, "Invalid value for '--max-tokens'"),
        (["no-such-command"], 2, "error: No such command 'no-such-command'."),
        (["keys", "create", "--tenant", "t", "--role", "boss"], 2, "'boss' is not a role"),
        # Not migrated: the database has no tables yet.
        (["keys", "list", "--tenant", "t"], 1, "run: genserve migrate"),
    ],
)
def test_a_mistake_is_one_line(
    args: list[str], status: int, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(args) == status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]
    assert "Traceback" not in captured.out + captured.err


def test_settings_that_cannot_work_are_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GENSERVE_ENVIRONMENT", "production")
    assert run(["migrate"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: GENSERVE_DATABASE_URL and GENSERVE_BROKER_URL must be set")
    monkeypatch.setenv("GENSERVE_ENVIRONMENT", "development")
    monkeypatch.setenv("GENSERVE_MAX_BATCH", "0")
    assert run(["migrate"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: GENSERVE_MAX_BATCH: ")


def test_help_and_success_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    assert "Usage: genserve" in capsys.readouterr().out
    assert run(["migrate"]) == 0
    assert "database is up to date" in capsys.readouterr().out
    assert run(["keys", "list", "--tenant", "nobody"]) == 2  # migrated, no such tenant
    assert "no tenant 'nobody'" in capsys.readouterr().err
