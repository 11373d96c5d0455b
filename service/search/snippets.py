"""Highlighted snippets: the part of a text where the query's words are densest.

The same for every engine and every mode, so a vector hit shows the words it shares with
the query too. Words match when their crude English stems agree (oceans ~ ocean,
walked ~ walking); highlights are character ranges into the snippet's text, so a client
renders them as it likes and nothing in the text needs escaping.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 240  # characters of context in a snippet
ELLIPSIS = "…"
_WORD = re.compile(r"\w+")
_SUFFIXES = ("ingly", "edly", "ing", "ed", "ly")


@dataclass(frozen=True)
class Snippet:
    text: str
    highlights: list[tuple[int, int]]  # [start, end) ranges into text


def stem(word: str) -> str:
    """A crude English stem: plural, -ing/-ed/-ly, doubled consonant and final e go."""
    word = word.lower()
    if word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        word = word[:-1]
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
        word = word[:-1]  # running -> run
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]  # wave, waves, waving -> wav
    return word


def snippet(text: str, terms: Sequence[str], *, width: int = WIDTH) -> Snippet:
    """The width-character stretch of text holding the most query words, highlighted."""
    stems = {stem(term) for term in terms}
    matches = [m.span() for m in _WORD.finditer(text) if stem(m.group()) in stems]
    start = _densest_start(matches, width) if matches else 0
    end = min(len(text), start + width)
    if start > 0:  # begin and end on word boundaries
        start = _word_start(text, start)
    if end < len(text):
        end = max(start + 1, _word_end(text, end))
    prefix = ELLIPSIS if start > 0 else ""
    suffix = ELLIPSIS if end < len(text) else ""
    shift = len(prefix) - start
    highlights = [(s + shift, e + shift) for s, e in matches if s >= start and e <= end]
    return Snippet(prefix + text[start:end] + suffix, highlights)


def _densest_start(matches: list[tuple[int, int]], width: int) -> int:
    best, best_count, first = matches[0][0], 0, 0
    for last, (_, end) in enumerate(matches):
        while end - matches[first][0] > width:
            first += 1
        if last - first + 1 > best_count:
            best, best_count = matches[first][0], last - first + 1
    return max(0, best - width // 6)  # a little context before the first match


def _word_start(text: str, position: int) -> int:
    found = text.rfind(" ", 0, position)
    return found + 1 if found >= 0 and position - found < 20 else position


def _word_end(text: str, position: int) -> int:
    found = text.rfind(" ", 0, position)
    return found if found > position - 20 else position
