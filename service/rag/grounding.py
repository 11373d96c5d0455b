"""Grounded generation: the passages a job is given, how they reach the model, what it cites.

The API retrieves when it accepts the job and stores the ranked passages in the job's
context (so a redelivered job answers from the same passages). The worker packs the best
of them into the model's context within a token budget, numbered [1], [2], ... in rank
order, and asks the model to cite them by number; the generation is stored with every
passage it was given and whether its answer cites it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.rag.retrieval import Passage

# The instruction comes after the sources, next to the question: a small model follows
# what it read last (SmolLM2-135M cited in 2 of 12 SciFact answers with it first, 10 last).
INSTRUCTIONS = (
    "Answer the question in one or two sentences using only the sources above, and cite "
    "the sources you use by number, as {numbers}. If the sources do not answer it, say so."
)
_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


def context_of(passages: Sequence[Passage], options: dict[str, Any]) -> dict[str, Any]:
    """What a grounded job stores as its context: the request and the ranked passages."""
    return {
        "rag": options,
        "passages": [
            {
                "rank": rank,
                "score": passage.score,
                "scores": passage.scores(),
                "collection_id": passage.collection_id,
                "document_id": passage.document_id,
                "chunk_id": passage.chunk_id,
                "generation_id": passage.generation_id,
                "title": passage.title,
                "text": passage.text,
            }
            for rank, passage in enumerate(passages, 1)
        ],
    }


@dataclass(frozen=True)
class Packed:
    """A passage as the model is given it."""

    number: int
    passage: dict[str, Any]  # one of context_of's passages

    def block(self) -> str:
        title = self.passage["title"].strip()
        heading = f"[{self.number}] {title}" if title else f"[{self.number}]"
        return f"{heading}\n{self.passage['text'].strip()}"


def pack(
    passages: Sequence[dict[str, Any]], *, count_tokens: Callable[[str], int], budget: int
) -> list[Packed]:
    """The passages, best first, that fit budget tokens together; numbered from 1.

    A passage too long for what is left is skipped and a shorter one after it may fit.
    """
    packed: list[Packed] = []
    used = 0
    for passage in passages:
        candidate = Packed(len(packed) + 1, passage)
        cost = count_tokens(candidate.block()) + 2  # the blank line between blocks
        if used + cost <= budget:
            packed.append(candidate)
            used += cost
    return packed


def grounded_question(question: str, packed: Sequence[Packed]) -> str:
    """The user turn the model answers: the numbered sources, the question, then how to
    answer and cite."""
    if not packed:
        return f"Question: {question}\n\nNo sources were found for this question; say so."
    sources = "\n\n".join(item.block() for item in packed)
    numbers = [f"[{item.number}]" for item in packed]
    listed = numbers[0] if len(numbers) == 1 else ", ".join(numbers[:-1]) + " or " + numbers[-1]
    instructions = INSTRUCTIONS.format(numbers=listed)
    return f"Sources:\n\n{sources}\n\nQuestion: {question}\n\n{instructions}"


def frame(question: str) -> str:
    """The grounded turn without its sources: what the passages must leave room for."""
    return f"Sources:\n\nQuestion: {question}\n\n" + INSTRUCTIONS.format(
        numbers="[1], [2], [3], [4], [5], [6], [7], [8], [9] or [10]"
    )


def cited_numbers(answer: str) -> list[int]:
    """The source numbers an answer cites, in order of first citation: [1], [2, 3], [4][5]."""
    seen: dict[int, None] = {}
    for match in _CITATION.finditer(answer):
        for number in match.group(1).split(","):
            seen.setdefault(int(number), None)
    return list(seen)
