"""Text that SQL can store: no NUL character and no unpaired UTF-16 surrogate.

JSON can carry both ("\\u0000", a lone "\\ud800"); Python decodes them into str, and
then PostgreSQL refuses the first and every UTF-8 encoder the second. Requests and batch
lines are checked once, at the edge, so nothing accepted fails later on them.
"""

from __future__ import annotations

import re
from typing import Any

# In raw JSON bytes: an escape that may decode into either (a surrogate escape may be
# half of a valid pair; the decoded text is what decides).
SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def problem(text: str) -> str | None:
    """Why text cannot be stored, or None when it can."""
    if "\x00" in text:
        return "contains a NUL character (U+0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains an unpaired surrogate (U+{ord(text[exc.start]):04X}); "
            "text must be valid Unicode"
        )
    return None


def find_unstorable(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(dotted path, reason) of the first string in a JSON value that cannot be stored."""
    if isinstance(value, str):
        reason = problem(value)
        return None if reason is None else (".".join(path), reason)
    if isinstance(value, dict):
        for key, item in value.items():
            reason = problem(key)
            if reason is not None:
                shown = key.encode("unicode_escape").decode("ascii")
                return ".".join((*path, shown)), "a key " + reason
            found = find_unstorable(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_unstorable(item, (*path, str(index)))
            if found is not None:
                return found
    return None
