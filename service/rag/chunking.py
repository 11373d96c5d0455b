"""Documents cut into overlapping chunks of at most a given number of tokens.

The tokenizer comes in as a Spans callable, the character offsets of each token, called
once per document; the cutting works on those offsets alone. So this module needs no
model code, no chunk ever splits a token, and a chunk's text is an exact slice of the
document.

A chunk ends at the best boundary in the last quarter of its window: a paragraph break,
else a sentence end or line break, else a space between words, else between two tokens.
The next chunk starts about overlap_tokens earlier, at the best boundary in the first half
of the overlap, so it too tends to begin with a sentence or at least a word.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The character (start, end) of each token of a text, in order, without special tokens:
# a Hugging Face fast tokenizer's offsets (encode(text, add_special_tokens=False).offsets,
# with truncation and padding turned off).
Spans = Callable[[str], list[tuple[int, int]]]

MIN_MAX_TOKENS = 16
MAX_TITLE_CHARS = 200  # of a title_prefix
LOOKBACK = 4  # a chunk may end up to 1/LOOKBACK of its window early, at a better boundary

# Boundary ranks between two tokens, best last.
_INSIDE = -1  # the tokens share characters (pieces of one character): never cut there
_TOKEN = 0
_WORD = 1
_SENTENCE = 2
_PARAGRAPH = 3

_SENTENCE_ENDS = frozenset(".!?…。！？")
_CLOSERS = frozenset("\"')]}’”»")


@dataclass(frozen=True)
class ChunkSettings:
    """Chunk size and overlap, both in tokens of the embedding model."""

    max_tokens: int = 200
    overlap_tokens: int = 40

    def __post_init__(self) -> None:
        if self.max_tokens < MIN_MAX_TOKENS:
            raise ValueError(f"max_tokens must be >= {MIN_MAX_TOKENS}, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens < self.max_tokens / 2:
            raise ValueError(
                f"overlap_tokens must be in [0, max_tokens/2) = [0, {self.max_tokens / 2:g}), "
                f"got {self.overlap_tokens}"
            )


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: text == document_text[start:end], tokens counted by Spans."""

    index: int
    text: str
    start: int
    end: int
    tokens: int


def title_prefix(title: str) -> str:
    """What to put before each chunk's text when embedding it: the title and a blank line.

    Whitespace is collapsed and a long title is cut at a word to MAX_TITLE_CHARS; a blank
    title gives "". The blank line is whitespace to word-level tokenizers, so the prefix's
    tokens add up with the chunk's: prefix_tokens = len(spans(title_prefix(title))).
    """
    title = " ".join(title.split())
    if len(title) > MAX_TITLE_CHARS:
        title = title[: MAX_TITLE_CHARS - 1].rsplit(" ", 1)[0] + "…"
    return f"{title}\n\n" if title else ""


def chunk_text(
    text: str, spans: Spans, settings: ChunkSettings, *, prefix_tokens: int = 0
) -> list[Chunk]:
    """Cut a document into chunks of at most max_tokens - prefix_tokens tokens.

    Args:
        text: The document's text.
        spans: The tokenizer, called once, on the whole text.
        settings: Chunk size and overlap.
        prefix_tokens: Tokens the embedder will see besides the chunk (a title prefix,
            special tokens), taken off the size.

    Returns:
        The chunks in order; together they cover every token. A text of at most the size
        is one chunk; a blank text, or one without tokens, gives [].

    Raises:
        ValueError: If prefix_tokens leaves too little room, or spans are not in order,
            run past the text or stop early (a truncating tokenizer).
    """
    overlap = settings.overlap_tokens
    # A chunk keeps more than twice the overlap, so each one moves on by some tokens.
    most = settings.max_tokens - max(2 * overlap + 1, MIN_MAX_TOKENS // 2)
    if not 0 <= prefix_tokens <= most:
        raise ValueError(
            f"prefix_tokens must be in [0, {most}] for max_tokens {settings.max_tokens} "
            f"and overlap_tokens {overlap}, got {prefix_tokens}"
        )
    limit = settings.max_tokens - prefix_tokens
    if not text.strip():
        return []
    offsets = spans(text)
    _check_spans(text, offsets)
    chunks: list[Chunk] = []
    start = 0
    while start < len(offsets):
        if len(offsets) - start <= limit:
            end = len(offsets)
        else:
            end = _chunk_end(text, offsets, start, start + limit, lookback=limit // LOOKBACK)
        chunk = _chunk(text, offsets, start, end, index=len(chunks))
        if chunk is not None:
            chunks.append(chunk)
        if end == len(offsets):
            break
        start = _next_start(text, offsets, start, end, overlap)
    return chunks


def _check_spans(text: str, offsets: list[tuple[int, int]]) -> None:
    """Refuse offsets this module cannot trust: out of order, outside or short of the text."""
    previous = (0, 0)
    for index, (start, end) in enumerate(offsets):
        if not previous[0] <= start <= end <= len(text):
            raise ValueError(
                f"spans must be in order and inside the text of {len(text)} characters: "
                f"span {index} is {(start, end)}, after {previous} (padding or special tokens?)"
            )
        previous = (start, end)
    if any(character.isalnum() for character in text[previous[1] :]):
        raise ValueError(
            f"spans stop at character {previous[1]} of {len(text)} with words left "
            "(a tokenizer with truncation on?)"
        )


def _rank(text: str, offsets: list[tuple[int, int]], index: int) -> int:
    """How good a place to cut between token index - 1 and token index is."""
    left = offsets[index - 1][1]
    right = offsets[index][0]
    if left > right:
        return _INSIDE
    gap = text[left:right]
    if not gap or gap.strip() == gap:
        return _TOKEN
    newlines = gap.count("\n")
    if newlines >= 2:
        return _PARAGRAPH
    if newlines == 1:
        return _SENTENCE
    last = text[left - 1] if left else ""
    if last in _SENTENCE_ENDS or (last in _CLOSERS and text[left - 2 : left - 1] in _SENTENCE_ENDS):
        return _SENTENCE
    return _WORD


def _chunk_end(
    text: str, offsets: list[tuple[int, int]], start: int, window_end: int, *, lookback: int
) -> int:
    """The token index that ends the chunk from start: the best cut near window_end."""
    lowest = max(start + 1, window_end - lookback)
    best, best_rank = window_end, _INSIDE - 1
    for index in range(window_end, lowest - 1, -1):
        rank = _rank(text, offsets, index)
        if rank > best_rank:
            best, best_rank = index, rank
            if rank == _PARAGRAPH:
                break
    if best_rank == _INSIDE:
        # No cut in the lookback: the nearest one further back, else cut the run anyway.
        for index in range(lowest - 1, start, -1):
            if _rank(text, offsets, index) > _INSIDE:
                return index
    return best


def _next_start(
    text: str, offsets: list[tuple[int, int]], start: int, end: int, overlap: int
) -> int:
    """Where the chunk after [start, end) begins: about overlap tokens before end."""
    earliest = max(start + 1, end - overlap)
    latest = max(earliest, end - overlap // 2)
    if overlap == 0 or earliest >= end:
        return end
    best, best_rank = end, _INSIDE
    for index in range(earliest, min(latest, end - 1) + 1):
        rank = _rank(text, offsets, index)
        if rank > best_rank:
            best, best_rank = index, rank
            if rank == _PARAGRAPH:
                break
    return best


def _chunk(
    text: str, offsets: list[tuple[int, int]], start: int, end: int, *, index: int
) -> Chunk | None:
    """Tokens [start, end) as a Chunk, trimmed of whitespace; None when only whitespace."""
    first = offsets[start][0]
    last = offsets[end - 1][1]
    piece = text[first:last]
    if not piece.strip():
        return None
    first += len(piece) - len(piece.lstrip())
    last -= len(piece) - len(piece.rstrip())
    return Chunk(index=index, text=text[first:last], start=first, end=last, tokens=end - start)
