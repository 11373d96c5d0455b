"""What a stored turn says: the chat messages its input adds, and its text."""

from __future__ import annotations

from typing import Any


def turn_messages(turn_input: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages a stored input adds: a prompt is one user turn."""
    if "messages" in turn_input:
        return [{"role": m["role"], "content": m["content"]} for m in turn_input["messages"]]
    return [{"role": "user", "content": turn_input["prompt"]}]


def turn_text(turn_input: dict[str, Any]) -> str:
    """The text the turn adds, as searched and shown: the prompt, or the last message."""
    if "messages" in turn_input:
        return str(turn_input["messages"][-1]["content"])
    return str(turn_input["prompt"])


def is_text_turn(turn_input: dict[str, Any]) -> bool:
    """Whether a stored input is a language model's: a prompt or chat messages (not images,
    rows or samples to score)."""
    return "prompt" in turn_input or "messages" in turn_input
