"""Print the fault-injection suite's results: a table, then (last) one JSON line.

    .venv/bin/python -m pytest tests/faults && .venv/bin/python -m tests.faults.report --json

Each test of tests/faults writes its row to GENSERVE_FAULTS_RESULTS (default
var/faults/results.json): the fault, the jobs submitted, completed, failed with a reason,
lost and duplicated.
"""

from __future__ import annotations

import argparse
import json
import sys

from tests.faults.tally import RESULTS

COLUMNS = ("fault", "submitted", "completed", "failed", "lost", "duplicated")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if not RESULTS.exists():
        print(f"no results at {RESULTS}: run `pytest tests/faults` first", file=sys.stderr)
        return 1
    rows = json.loads(RESULTS.read_text())
    if not args.json:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + " --- |" * len(COLUMNS))
        for row in rows:
            print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    print(json.dumps([{c: row[c] for c in COLUMNS} for row in rows]))
    return 0 if all(row["lost"] == row["duplicated"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
