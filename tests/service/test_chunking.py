"""Token-aware chunking: sizes, overlaps, boundaries and coverage, on a word tokenizer and
on the real all-MiniLM-L6-v2 tokenizer."""

from __future__ import annotations

import random
import re
import time

import pytest

from service.rag.chunking import (
    MAX_TITLE_CHARS,
    Chunk,
    ChunkSettings,
    Spans,
    chunk_text,
    title_prefix,
)

WORDS = (
    "the of protein cells expression were and in to a with that is for by gene analysis "
    "patients increased significantly compared mice tumour receptor binding activity"
).split()


def word_spans(text: str) -> list[tuple[int, int]]:
    return [(match.start(), match.end()) for match in re.finditer(r"\w+|[^\w\s]", text)]


def sentence(rng: random.Random, words: tuple[int, int] = (4, 12)) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
    return body.capitalize() + rng.choice(".?!")


def document(
    rng: random.Random,
    paragraphs: int,
    sentences: tuple[int, int] = (1, 5),
    words: tuple[int, int] = (4, 12),
) -> str:
    return "\n\n".join(
        " ".join(sentence(rng, words) for _ in range(rng.randint(*sentences)))
        for _ in range(paragraphs)
    )


def check_invariants(
    text: str, spans: Spans, chunks: list[Chunk], limit: int, overlap: int
) -> None:
    """Sizes, slices, order, overlap, and that every token is in some chunk."""
    offsets = spans(text)
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    covered: set[int] = set()
    for chunk in chunks:
        assert 0 < chunk.tokens <= limit
        assert chunk.text == text[chunk.start : chunk.end]
        assert chunk.text == chunk.text.strip()
        inside = [i for i, (start, end) in enumerate(offsets) if chunk.start <= start < chunk.end]
        assert len(inside) == chunk.tokens  # never splits a token, counts what it holds
        assert offsets[inside[-1]][1] <= chunk.end
        covered.update(inside)
    assert covered == set(range(len(offsets)))
    for previous, chunk in zip(chunks, chunks[1:], strict=False):
        shared = sum(chunk.start <= start < previous.end for start, _ in offsets)
        if overlap:
            assert previous.start < chunk.start < previous.end <= chunk.end
            assert 0 < shared <= overlap
        else:
            assert previous.end < chunk.start and shared == 0


def test_settings_validation() -> None:
    assert ChunkSettings() == ChunkSettings(max_tokens=200, overlap_tokens=40)
    with pytest.raises(ValueError, match=re.escape("max_tokens must be >= 16, got 15")):
        ChunkSettings(max_tokens=15, overlap_tokens=0)
    with pytest.raises(ValueError, match=re.escape("in [0, max_tokens/2) = [0, 100), got 150")):
        ChunkSettings(max_tokens=200, overlap_tokens=150)
    with pytest.raises(ValueError, match=re.escape("[0, 100), got 100")):
        ChunkSettings(max_tokens=200, overlap_tokens=100)
    with pytest.raises(ValueError, match=re.escape("[0, 8.5), got -1")):
        ChunkSettings(max_tokens=17, overlap_tokens=-1)
    ChunkSettings(max_tokens=17, overlap_tokens=8)


def test_empty_and_short_texts() -> None:
    settings = ChunkSettings(max_tokens=16, overlap_tokens=4)
    assert chunk_text("", word_spans, settings) == []
    assert chunk_text(" \n\t\n ", word_spans, settings) == []
    text = "\n  Short text, one chunk.  \n"
    assert chunk_text(text, word_spans, settings) == [
        Chunk(index=0, text="Short text, one chunk.", start=3, end=25, tokens=6)
    ]
    exactly = " ".join(["word"] * 16)
    assert [c.tokens for c in chunk_text(exactly, word_spans, settings)] == [16]
    assert [c.tokens for c in chunk_text(exactly + " more", word_spans, settings)][0] <= 16


def test_long_text_ends_chunks_at_sentences() -> None:
    rng = random.Random(0)
    text = " ".join(sentence(rng) for _ in range(200))
    settings = ChunkSettings(max_tokens=64, overlap_tokens=12)
    chunks = chunk_text(text, word_spans, settings)
    check_invariants(text, word_spans, chunks, 64, 12)
    # Sentences run at most 13 tokens: the last quarter of a window (16) always holds an end.
    assert all(chunk.text[-1] in ".?!" for chunk in chunks)
    assert min(chunk.tokens for chunk in chunks[:-1]) >= 48
    # The overlap starts at a word at least, here mostly at a sentence.
    assert all(text[chunk.start - 1] == " " for chunk in chunks[1:])


def test_paragraph_breaks_are_preferred() -> None:
    # Paragraphs of at most 18 tokens: the last quarter of a window (25) always holds a
    # break, and sentence ends that come later in the window lose to it.
    rng = random.Random(1)
    text = document(rng, 60, sentences=(1, 2), words=(4, 8))
    chunks = chunk_text(text, word_spans, ChunkSettings(max_tokens=100, overlap_tokens=20))
    check_invariants(text, word_spans, chunks, 100, 20)
    assert len(chunks) > 5
    assert all(text.startswith("\n\n", chunk.end) for chunk in chunks[:-1])


def test_paragraph_break_wins_over_later_sentence_end() -> None:
    first = " ".join(["alpha"] * 52) + "."  # 53 tokens, then a paragraph break
    second = "Beta beta. " * 5  # sentence ends at tokens 56, 59, ..., all within 64
    text = first + "\n\n" + second + "gamma " * 60
    chunks = chunk_text(text, word_spans, ChunkSettings(max_tokens=64, overlap_tokens=0))
    assert chunks[0].text == first
    assert chunks[1].text.startswith("Beta beta.")


def test_word_boundaries_without_punctuation() -> None:
    text = " ".join(f"w{number}" for number in range(1000))
    chunks = chunk_text(text, word_spans, ChunkSettings(max_tokens=50, overlap_tokens=10))
    check_invariants(text, word_spans, chunks, 50, 10)
    assert [chunk.tokens for chunk in chunks[:-1]] == [50] * (len(chunks) - 1)
    assert [chunk.text.split()[0] for chunk in chunks[:3]] == ["w0", "w40", "w80"]


def test_no_overlap_partitions_tokens() -> None:
    text = " ".join(f"w{number}" for number in range(333))
    chunks = chunk_text(text, word_spans, ChunkSettings(max_tokens=32, overlap_tokens=0))
    check_invariants(text, word_spans, chunks, 32, 0)
    assert sum(chunk.tokens for chunk in chunks) == 333


def test_never_cuts_inside_a_token_or_a_character() -> None:
    # No spaces at all: cuts fall between tokens (three letters each here).
    text = "abcdefghi" * 100

    def pieces(text: str) -> list[tuple[int, int]]:
        return [(start, min(start + 3, len(text))) for start in range(0, len(text), 3)]

    chunks = chunk_text(text, pieces, ChunkSettings(max_tokens=20, overlap_tokens=5))
    check_invariants(text, pieces, chunks, 20, 5)
    assert all(chunk.start % 3 == 0 and chunk.end % 3 == 0 for chunk in chunks)

    # Byte-level tokenizers give each piece of a multi-byte character the character's span:
    # a cut between two such pieces would split the character.
    accents = "é" * 300

    def bytes_of(text: str) -> list[tuple[int, int]]:
        return [(index, index + 1) for index in range(len(text)) for _ in range(2)]

    chunks = chunk_text(accents, bytes_of, ChunkSettings(max_tokens=17, overlap_tokens=3))
    assert all(chunk.tokens % 2 == 0 for chunk in chunks)
    assert all(chunk.text == accents[chunk.start : chunk.end] for chunk in chunks)
    assert chunks[-1].end == len(accents)


def test_whitespace_only_chunks_are_dropped() -> None:
    # A tokenizer that gives whitespace its own tokens.
    def with_spaces(text: str) -> list[tuple[int, int]]:
        return [(match.start(), match.end()) for match in re.finditer(r"\S+|\s", text)]

    text = "word " + " " * 100 + "end"
    chunks = chunk_text(text, with_spaces, ChunkSettings(max_tokens=16, overlap_tokens=0))
    assert [chunk.text for chunk in chunks] == ["word", "end"]
    assert [chunk.index for chunk in chunks] == [0, 1]


def test_prefix_tokens_shrink_the_chunks() -> None:
    text = " ".join(f"w{number}" for number in range(500))
    settings = ChunkSettings(max_tokens=64, overlap_tokens=8)
    chunks = chunk_text(text, word_spans, settings, prefix_tokens=14)
    check_invariants(text, word_spans, chunks, 50, 8)
    assert max(chunk.tokens for chunk in chunks) == 50
    chunk_text(text, word_spans, settings, prefix_tokens=47)  # leaves 17 > 2 * 8
    for prefix_tokens in (-1, 48):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"prefix_tokens must be in [0, 47] for max_tokens 64 and overlap_tokens 8, "
                f"got {prefix_tokens}"
            ),
        ):
            chunk_text(text, word_spans, settings, prefix_tokens=prefix_tokens)


def test_bad_spans_are_refused() -> None:
    settings = ChunkSettings()
    text = "Some words here and more words after them."
    with pytest.raises(ValueError, match=r"span 2 is \(0, 0\), after \(5, 10\)"):
        chunk_text(text, lambda text: [(0, 4), (5, 10), (0, 0)], settings)
    with pytest.raises(ValueError, match="inside the text of 42 characters: span 0 is"):
        chunk_text(text, lambda text: [(0, 99)], settings)
    with pytest.raises(ValueError, match="spans stop at character 10 of 42 with words left"):
        chunk_text(text, lambda text: word_spans(text)[:2], settings)
    with pytest.raises(ValueError, match="spans stop at character 0 of 42 with words left"):
        chunk_text(text, lambda text: [], settings)


def test_title_prefix() -> None:
    assert title_prefix("") == title_prefix(" \n ") == ""
    assert title_prefix("  A\n  study of   cells ") == "A study of cells\n\n"
    prefix = title_prefix("word " * 100)
    assert len(prefix) <= MAX_TITLE_CHARS + 2
    assert prefix.endswith("word…\n\n")


def test_scifact_sized_corpus_is_fast() -> None:
    # SciFact: 5,183 abstracts of about 250 tokens; spans are computed once, outside the timing.
    rng = random.Random(2)
    texts = [
        " ".join(sentence(rng, (10, 30)) for _ in range(rng.randint(6, 14))) for _ in range(5183)
    ]
    offsets = {text: word_spans(text) for text in texts}
    started = time.perf_counter()
    chunks = [chunk_text(text, offsets.__getitem__, ChunkSettings()) for text in texts]
    elapsed = time.perf_counter() - started
    assert sum(map(len, chunks)) > len(texts)
    assert elapsed < 1.0, f"chunking took {elapsed:.2f} s"


def test_real_minilm_tokenizer() -> None:
    from tokenizers import Tokenizer

    from models.backends.sentence import model_path

    tokenizer = Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    # The file turns on truncation at 128 and padding; chunking needs every token, unpadded.
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def spans(text: str) -> list[tuple[int, int]]:
        return tokenizer.encode(text, add_special_tokens=False).offsets

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    rng = random.Random(3)
    text = document(rng, 25) + "\n\nNaïve café résumé — 東京 “quoted.” Done."
    title = "Expression of receptor binding in tumour cells"
    settings = ChunkSettings(max_tokens=128, overlap_tokens=24)
    prefix = title_prefix(title)
    special = 2  # [CLS] and [SEP]
    chunks = chunk_text(text, spans, settings, prefix_tokens=count(prefix) + special)
    limit = 128 - count(prefix) - special
    assert len(chunks) > 3
    check_invariants(text, spans, chunks, limit, 24)
    for chunk in chunks:
        # Cut at words, a chunk tokenizes alone as it did inside the document, and the
        # prefix adds up: the embedder's input fits max_tokens.
        assert count(chunk.text) == chunk.tokens
        assert count(prefix + chunk.text) + special <= 128
        assert chunk.text[-1] in ".?!”"
