"""The lines of an export: one JSON object per line, keys in a fixed order, so the same
rows always make the same bytes: compact UTF-8 JSON, characters unescaped but for the
quote, the backslash and controls (orjson; byte for byte what json.dumps writes with
ensure_ascii=False and no spaces, so format 1 is unchanged).

openai_chat is OpenAI's chat fine-tuning format: the messages the generation answered (a
prompt is one user turn), then its output as the assistant's. prompt_completion is
{"prompt", "completion"}: the turn's text (a prompt, or the last message) and the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from service.exports.dedup import text_key
from service.turns import is_text_turn, turn_messages, turn_text

# Bumped when the same rows would make other bytes; the manifest records it.
FORMAT_VERSION = 1
Format = Literal["openai_chat", "prompt_completion"]


@dataclass(frozen=True)
class Line:
    data: bytes  # the JSON object and its newline
    key: bytes  # its text folded and hashed: equal keys are exact duplicates


def line_of(fmt: Format, turn_input: dict[str, Any], output: str) -> Line | None:
    """A generation's line, or None when it is no text pair: not a language model's turn
    (images, rows), or an empty output."""
    if not output.strip() or not is_text_turn(turn_input):
        return None
    record: dict[str, Any]
    if fmt == "openai_chat":
        messages = [*turn_messages(turn_input), {"role": "assistant", "content": output}]
        record = {"messages": messages}
        parts = [text for m in messages for text in (m["role"], m["content"])]
    else:
        text = turn_text(turn_input)
        record = {"prompt": text, "completion": output}
        parts = [text, output]
    data = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    return Line(data=data, key=text_key(parts))
