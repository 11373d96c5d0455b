"""Packing passages into a token budget, the grounded turn, and reading citations."""

from __future__ import annotations

import pytest

from service.rag import grounding


def _passage(rank: int, text: str, title: str = "") -> dict:
    return {"rank": rank, "title": title, "text": text}


def words(text: str) -> int:
    return len(text.split())


def test_pack_keeps_rank_order_within_the_budget_and_skips_what_does_not_fit() -> None:
    passages = [
        _passage(1, "one two three", "A"),  # block "[1] A\none two three": 5 words + 2
        _passage(2, " ".join(["long"] * 50), "B"),
        _passage(3, "four five", "C"),
    ]
    packed = grounding.pack(passages, count_tokens=words, budget=14)
    assert [item.passage["rank"] for item in packed] == [1, 3]
    assert [item.number for item in packed] == [1, 2]  # numbered as the model sees them
    assert packed[1].block() == "[2] C\nfour five"


def test_pack_with_no_room_gives_nothing() -> None:
    assert grounding.pack([_passage(1, "text")], count_tokens=words, budget=0) == []


def test_grounded_question_numbers_sources_then_asks_to_cite_them() -> None:
    packed = grounding.pack(
        [_passage(1, "Magma rises.", "Volcanoes"), _passage(2, "Untitled text.")],
        count_tokens=words,
        budget=100,
    )
    turn = grounding.grounded_question("Why do volcanoes erupt?", packed)
    assert turn.startswith("Sources:\n\n[1] Volcanoes\nMagma rises.\n\n[2]\nUntitled text.")
    assert "Question: Why do volcanoes erupt?" in turn
    assert turn.endswith(grounding.INSTRUCTIONS.format(numbers="[1] or [2]"))
    one = grounding.grounded_question("q", packed[:1])
    assert "as [1]." in one
    assert "No sources were found" in grounding.grounded_question("q", [])


@pytest.mark.parametrize(
    ("answer", "cited"),
    [
        ("Magma rises [1]. Gas drives it [2][3].", [1, 2, 3]),
        ("See [2, 1] and again [2].", [2, 1]),
        ("No citation here, only [a] and [] and [1234].", []),
        ("[0] is read as a citation; no source has that number.", [0]),
    ],
)
def test_cited_numbers(answer: str, cited: list[int]) -> None:
    assert grounding.cited_numbers(answer) == cited
