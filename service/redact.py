"""PII redaction for prompts and outputs before they are stored in SQL or embedded.

`redact` replaces e-mail addresses, payment card numbers, IP addresses (v4 and v6) and
phone numbers with `[EMAIL]`, `[CARD]`, `[IP]` and `[PHONE]`, and counts each kind;
`redact_value` does the same to every string inside a JSON-like value. Only the standard
library is used, and each kind is one pass of one compiled regex over the text.

Precision matters as much as recall, so every kind needs a distinctive shape:

- e-mail: an RFC 5322 dot-atom local part, `@`, and a domain whose last label is 2-63
  letters (`user.name+tag@sub.example.co.uk`); never `@handle` or `foo@bar`.
- card: 13-19 digits, either unbroken or grouped 4-4-4-4, 4-4-4-4-3, 4-4-4-1..4, 4-6-5
  or 4-6-4 with one kind of single separator (space or hyphen), that pass the Luhn check.
- IP: four dotted octets 0-255 that are not part of a longer dotted number, or any
  IPv6 form (`::` compression, embedded IPv4) that `ipaddress` accepts; never a time
  such as `12:30:45` or a bare `::`.
- phone: `+CC` and 7-15 digits in all, unbroken (`+15551234567`) or in groups split by
  single spaces, hyphens or dots, with an optional parenthesised group
  (`+44 (0)20 7946 0958`); dots count only when there are at least three, so signed
  decimals and coordinates (`+40.7127753`) are left alone, and trailing groups past 15
  digits are left out of the match. Without `+`, only the North American shapes
  `(555) 123-4567`, `555-123-4567`, `555.123.4567` and `555 123 4567`, optionally after
  `1-`; the spaced one not next to other space-separated digits. Bare digit runs
  without `+` (`5551234567`), 7-digit locals (`555-1234`), other national layouts, dates,
  times, versions, decimals, and numbers glued to ASCII letters or to further dotted or
  hyphenated digits are not phones.

E-mail goes first, cards before phones and IPv6 before IPv4, so no kind takes part of
another. Digit kinds treat the brackets of a token next to them as they would a letter,
which keeps `redact` idempotent: redacting its own output changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

KINDS = ("email", "card", "ip", "phone")
TOKENS = {"email": "[EMAIL]", "card": "[CARD]", "ip": "[IP]", "phone": "[PHONE]"}

_T = TypeVar("_T")

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.\]-])"
    rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
    r"(?![A-Za-z0-9-])",
    re.ASCII,
)

# Not preceded by `+`, not next to an ASCII word character or a token's bracket, nor
# to a dot or hyphen joining it to one: the number would be part of a longer
# identifier. Letters outside ASCII do not count, as CJK text puts numbers right
# against words.
_START = r"(?<![\w\]+])(?<![\w\]][.-])"
_END = r"(?![\w\[])(?![.-][\w\[])"

_CARD = re.compile(
    _START + r"(?:[0-9]{13,19}"
    r"|[0-9]{4}(?P<sep>[ -])(?:"
    r"[0-9]{4}(?P=sep)[0-9]{4}(?P=sep)(?:[0-9]{4}(?P=sep)[0-9]{3}|[0-9]{1,4})"
    r"|[0-9]{6}(?P=sep)[0-9]{4,5}))" + _END,
    re.ASCII,
)

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![\w.\]]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w\[])(?!\.[\w\[])", re.ASCII)
# Permissive on purpose: `ipaddress` decides which candidates are addresses.
_IPV6 = re.compile(
    r"(?<![\w:.\]])(?:[0-9A-Fa-f]{0,4}:){2,8}"
    r"(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{1,4})?"
    r"(?![\w:\[])(?!\.[\w\[])",
    re.ASCII,
)

_PHONE_SEPARATORS = " .-"
_PHONE = re.compile(
    r"(?<![\w\]+])"
    r"(?:\+[1-9][0-9]{0,2}(?:[ .-]?\([0-9]{1,4}\))?[ .-]?[0-9]{1,12}(?:[ .-][0-9]{2,10}){0,5}+"
    r"|(?<![.-])(?:1[.-])?(?:\([0-9]{3}\)[ .-]?[0-9]{3}[ .-]?[0-9]{4}"
    r"|[0-9]{3}(?P<sep>[.-])[0-9]{3}(?P=sep)[0-9]{4})"
    r"|(?<![.-])(?<![0-9\]] )(?:1 )?[0-9]{3} [0-9]{3} [0-9]{4}(?! [0-9\[]))" + _END,
    re.ASCII,
)
_MIN_PHONE_DIGITS = 7
_MAX_PHONE_DIGITS = 15  # E.164


@dataclass(frozen=True)
class Redaction:
    """Redacted text and how many of each kind were replaced."""

    text: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _whole(candidate: str) -> int:
    return len(candidate)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _card(candidate: str) -> int:
    digits = candidate.replace(" ", "").replace("-", "")
    return len(candidate) if 13 <= len(digits) <= 19 and _luhn_ok(digits) else 0


def _ipv6(candidate: str) -> int:
    if candidate == "::":
        return 0
    # Only `::` shortens an address; this skips times and MACs without raising.
    if "::" not in candidate and candidate.count(":") != (6 if "." in candidate else 7):
        return 0
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return 0
    return len(candidate)


def _phone(candidate: str) -> int:
    """Length of the phone number at the start of `candidate`, or 0 if there is none.

    Trailing groups past the E.164 limit are dropped rather than rejecting the number.
    """
    if candidate.startswith("+") and 0 < candidate.count(".") < 3:
        return 0
    end = len(candidate)
    while sum(char.isdigit() for char in candidate[:end]) > _MAX_PHONE_DIGITS:
        end = max(candidate.rfind(sep, 0, end) for sep in _PHONE_SEPARATORS)
        if end <= 0:
            return 0
    if sum(char.isdigit() for char in candidate[:end]) < _MIN_PHONE_DIGITS:
        return 0
    return end


_RULES: tuple[tuple[str, re.Pattern[str], Callable[[str], int]], ...] = (
    ("email", _EMAIL, _whole),
    ("card", _CARD, _card),
    ("ip", _IPV6, _ipv6),
    ("ip", _IPV4, _whole),
    ("phone", _PHONE, _phone),
)


def _apply(
    pattern: re.Pattern[str], measure: Callable[[str], int], token: str, text: str
) -> tuple[str, int]:
    """Replace the candidates `measure` accepts, retrying one character on after a reject.

    Retrying instead of skipping the rejected span finds a number that starts inside
    it, such as the card in `+44 20 7946 0958 4111 1111 1111 1111`; a second run then finds nothing
    the first one missed.
    """
    parts: list[str] = []
    replaced = 0
    done = 0
    match = pattern.search(text)
    while match is not None:
        length = measure(match.group())
        if length:
            parts += (text[done : match.start()], token)
            replaced += 1
            done = match.start() + length
            match = pattern.search(text, done)
        else:
            match = pattern.search(text, match.start() + 1)
    if not replaced:
        return text, 0
    parts.append(text[done:])
    return "".join(parts), replaced


def redact(text: str) -> Redaction:
    """Replace the e-mail addresses, card numbers, IPs and phone numbers in `text`."""
    counts = dict.fromkeys(KINDS, 0)
    for kind, pattern, measure in _RULES:
        text, replaced = _apply(pattern, measure, TOKENS[kind], text)
        counts[kind] += replaced
    return Redaction(text=text, counts=counts)


def _redact_into(value: object, counts: dict[str, int]) -> object:
    if isinstance(value, str):
        result = redact(value)
        for kind, count in result.counts.items():
            counts[kind] += count
        return result.text
    if isinstance(value, dict):
        return {key: _redact_into(item, counts) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_into(item, counts) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact_into(item, counts) for item in value)
    return value


def redact_value(value: _T) -> tuple[_T, dict[str, int]]:
    """Redact every string inside a JSON-like value, returning a copy and the counts.

    Dicts, lists and tuples are rebuilt with their strings redacted; dict keys and
    values that are not strings are kept as they are. `value` itself is not modified.
    """
    counts = dict.fromkeys(KINDS, 0)
    return cast(_T, _redact_into(value, counts)), counts
