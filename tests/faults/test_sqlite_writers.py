"""Eight processes write to the embedded SQLite database at once, through the real API:
no client ever sees a server error or 'database is locked', and nothing accepted is lost.

CI runs it for GENSERVE_SQLITE_SOAK_S seconds (10 by default); docs/reliability.md has a
60 s run (`python -m tests.faults.sqlite_writers --seconds 60`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.sqlite_writers import soak

pytestmark = pytest.mark.e2e


def test_eight_writers_never_see_the_database_locked(model_cache_dir: Path) -> None:
    seconds = float(os.environ.get("GENSERVE_SQLITE_SOAK_S", "10"))
    result = soak(processes=8, seconds=seconds, threads=16, cache_dir=model_cache_dir)
    assert result.requests > 100, result
    assert result.server_errors == 0 and result.locked == 0, result.examples
    assert result.accepted > 0 and result.stored == result.accepted, result
    assert result.unfinished == 0, result
