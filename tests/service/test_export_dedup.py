"""The duplicate finders of exports: folded text keys, and near duplicates in batches, by
the exact index and, once large, the IVF one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.exports import dedup
from service.exports.dedup import NearDuplicates, fold, text_key
from service.exports.formats import line_of

DIMENSION = 32
THRESHOLD = 0.9


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def at_cosine(vector: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector whose cosine with the unit vector is exactly cosine."""
    other = rng.standard_normal(len(vector)).astype(np.float32)
    other -= (other @ vector) * vector
    other /= np.linalg.norm(other)
    return (cosine * vector + np.sqrt(1 - cosine**2) * other).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_folding_ignores_case_width_and_spacing() -> None:
    assert fold("  Hello\tWORLD \n") == "hello world"
    assert fold("ﬁne Ｔｅｘｔ") == "fine text"  # NFKC: a ligature, full-width letters
    assert text_key(["Hi", "there"]) == text_key([" hi", "THERE "])
    # Parts keep their bounds: moving text between prompt and output is another row.
    assert text_key(["a b", "c"]) != text_key(["a", "b c"])


def test_lines_are_fixed_json_and_skip_what_is_no_text_pair() -> None:
    chat = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    }
    line = line_of("openai_chat", chat, "Hello ✓")
    assert line is not None
    assert (
        line.data
        == (
            '{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},'
            '{"role":"assistant","content":"Hello ✓"}]}\n'
        ).encode()
    )
    completion = line_of("prompt_completion", chat, "Hello ✓")
    assert (
        completion is not None
        and completion.data == '{"prompt":"Hi","completion":"Hello ✓"}\n'.encode()
    )
    assert line_of("openai_chat", {"images": {"n": 2}}, "2 images") is None
    assert line_of("openai_chat", {"prompt": "Hi"}, "   ") is None
    # A prompt is one user turn: the same pair as the chat of one user message.
    alone = line_of("openai_chat", {"prompt": "hi"}, "hello")
    as_chat = line_of("openai_chat", {"messages": [{"role": "user", "content": "Hi"}]}, "HELLO")
    assert alone is not None and as_chat is not None and alone.key == as_chat.key


@pytest.mark.parametrize(
    "text",
    [
        'quote " and backslash \\ and slash /',
        "controls \x00 \x01 \x08 \t \n \x0c \r \x1f \x7f",
        "separators \u2028 \u2029, a BOM \ufeff, NEL \x85",
        "astral 😀 and CJK 中文, é and é",
    ],
)
def test_line_bytes_are_those_of_format_1(text: str) -> None:
    """Format 1's bytes are json.dumps's with ensure_ascii=False and no spaces: a change
    of encoder must not change an export's checksum."""
    line = line_of("prompt_completion", {"prompt": text}, text + "!")
    assert line is not None
    record = {"prompt": text, "completion": text + "!"}
    assert (
        line.data == (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    )


def test_near_copies_in_one_batch_and_across_batches_are_dropped(rng: np.random.Generator) -> None:
    first = unit(rng.standard_normal((6, DIMENSION)))
    first[4] = at_cosine(first[1], 0.97, rng)  # a copy of an earlier row of the batch
    index = NearDuplicates(DIMENSION, THRESHOLD)
    assert index.keep(first).tolist() == [True, True, True, True, False, True]
    second = unit(rng.standard_normal((3, DIMENSION)))
    second[2] = at_cosine(first[5], 0.95, rng)  # of a row kept by the batch before
    assert index.keep(second).tolist() == [True, True, False]
    assert index.kept == 7


def test_the_threshold_is_the_least_cosine_that_drops(rng: np.random.Generator) -> None:
    kept = unit(rng.standard_normal((1, DIMENSION)))[0]
    just_below = at_cosine(kept, THRESHOLD - 2e-3, rng)
    at_it = at_cosine(kept, THRESHOLD + 2e-3, rng)
    index = NearDuplicates(DIMENSION, THRESHOLD)
    assert index.keep(np.stack([kept, just_below, at_it])).tolist() == [True, True, False]


def test_a_row_near_only_a_dropped_row_is_kept() -> None:
    # a ~ b and b ~ c (cosine 0.93), but a and c are apart (0.73): b goes, c stays.
    angle = np.arccos(0.93)
    a, b, c = np.zeros((3, DIMENSION), dtype=np.float32)
    for row, turns in ((a, 0), (b, 1), (c, 2)):
        row[:2] = np.cos(turns * angle), np.sin(turns * angle)
    for batches in ([np.stack([a, b, c])], [a[None], b[None], c[None]]):
        index = NearDuplicates(DIMENSION, 0.92)
        keep = np.concatenate([index.keep(batch) for batch in batches])
        assert keep.tolist() == [True, False, True]


def test_identical_rows_keep_only_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedup, "FLAT_BATCH", 64)
    same = np.tile(unit(np.ones((1, DIMENSION))), (300, 1))
    index = NearDuplicates(DIMENSION, THRESHOLD, ivf_after=64, nlist=16, nprobe=2)
    keep = np.concatenate([index.keep(same[:100]), index.keep(same[100:])])
    assert keep.sum() == 1 and keep[0]


def planted(rng: np.random.Generator, count: int, copies: int) -> tuple[np.ndarray, set[int]]:
    """count unit vectors in clusters (as embeddings are), copies of them near copies
    (cosine 0.97) of earlier originals at random later places."""
    centres = unit(rng.standard_normal((40, DIMENSION)))
    rows = unit(centres[rng.integers(0, 40, count)] + 0.9 * rng.standard_normal((count, DIMENSION)))
    places = rng.choice(np.arange(count // 4, count), size=copies, replace=False)
    originals = sorted(set(range(count)) - set(places.tolist()))
    for place in places:
        source = rng.choice(originals[: np.searchsorted(originals, place)])
        rows[place] = at_cosine(rows[source], 0.97, rng)
    return rows, set(places.tolist())


def test_the_index_turns_ivf_past_its_size_and_still_finds_the_copies(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dedup, "FLAT_BATCH", 128)
    rows, copies = planted(rng, 4000, 200)
    exact = NearDuplicates(DIMENSION, THRESHOLD, ivf_after=10**6)
    truth = np.concatenate([exact.keep(rows[start : start + 500]) for start in range(0, 4000, 500)])
    assert exact.describe()["kind"] == "flat"
    assert set(np.flatnonzero(~truth).tolist()) >= copies

    index = NearDuplicates(DIMENSION, THRESHOLD, ivf_after=512, nlist=32, nprobe=4)
    keep = np.concatenate([index.keep(rows[start : start + 500]) for start in range(0, 4000, 500)])
    described = index.describe()
    assert described["kind"] == "ivf" and (described["nlist"], described["nprobe"]) == (32, 4)
    assert 512 <= described["trained_on"] < 512 + 128  # the kept rows when it switched
    found, missed = ~keep & ~truth, ~truth & keep
    assert not (~keep & truth).any(), "IVF drops only what the exact index drops"
    assert found.sum() >= 0.9 * (~truth).sum(), (int(found.sum()), int(missed.sum()))
    # Rerun on the same rows: the same rows kept.
    again = NearDuplicates(DIMENSION, THRESHOLD, ivf_after=512, nlist=32, nprobe=4)
    rerun = np.concatenate([again.keep(rows[start : start + 500]) for start in range(0, 4000, 500)])
    assert (rerun == keep).all()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="nprobe"):
        NearDuplicates(DIMENSION, THRESHOLD, nlist=8, nprobe=9, ivf_after=64)
    with pytest.raises(ValueError, match="ivf_after"):
        NearDuplicates(DIMENSION, THRESHOLD, nlist=64, ivf_after=32)


def test_comparing_lists_on_their_head_first_drops_the_same_rows(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head-first comparison only skips products its bound shows cannot reach the
    threshold: it drops exactly what comparing in full drops, here with copies that differ
    from their originals in the head alone, in the tail alone, and evenly."""
    monkeypatch.setattr(dedup, "FLAT_BATCH", 128)
    rows, _ = planted(rng, 3000, 150)
    head = DIMENSION // 4
    for place in rng.choice(np.arange(1000, 3000), size=60, replace=False):
        source = rows[rng.integers(0, 1000)].copy()
        noise = np.zeros(DIMENSION, dtype=np.float32)
        side = slice(0, head) if place % 2 else slice(head, None)
        noise[side] = rng.standard_normal(noise[side].shape)
        rows[place] = unit((source + 0.3 * noise / np.linalg.norm(noise))[None])[0]

    def run() -> tuple[np.ndarray, int]:
        index = NearDuplicates(DIMENSION, THRESHOLD, ivf_after=512, nlist=32, nprobe=4)
        kept = np.concatenate([index.keep(rows[s : s + 500]) for s in range(0, 3000, 500)])
        return kept, index._head

    with_head, head_used = run()
    monkeypatch.setattr(dedup, "HEAD_FROM_THRESHOLD", 2.0)  # never: compare in full
    in_full, no_head = run()
    assert head_used == head and no_head == 0
    assert (~in_full).sum() >= 180  # most of the 60 made here, beside the 150 planted
    assert (with_head == in_full).all()
