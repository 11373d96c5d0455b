from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from service.redact import KINDS, Redaction, redact, redact_value

EMAILS = [
    "user@example.com",
    "user.name+tag@sub.example.co.uk",
    "first_last-99@mail-server.example.org",
    "o'brien@example.ie",
    "User@Example.COM",
]
CARDS = [
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "4111111111111111",
    "5500-0000-0000-0004",
    "378282246310005",
    "3782 822463 10005",
    "6011111111111117",
    "4222222222222",
    "30569309025904",
    "4111111111111111110",
]
IPS = [
    "192.168.0.1",
    "10.0.0.1",
    "255.255.255.255",
    "0.0.0.0",
    "::1",
    "2001:db8::1",
    "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
    "fe80::1ff:fe23:4567:890a",
    "FE80::",
    "::ffff:192.0.2.128",
    "1:2:3:4:5:6:7::",
]
PHONES = [
    "(555) 123-4567",
    "(555)123-4567",
    "555-123-4567",
    "555.123.4567",
    "555 123 4567",
    "1-800-555-0199",
    "+44 20 7946 0958",
    "+1-202-555-0143",
    "+1 (555) 123-4567",
    "+44 (0)20 7946 0958",
    "+33 1 23 45 67 89",
    "+7 (495) 123-45-67",
    "+49 30 1234567",
    "+15551234567",
    "+1.202.555.0143",
]
POSITIVES = (
    [(text, "email") for text in EMAILS]
    + [(text, "card") for text in CARDS]
    + [(text, "ip") for text in IPS]
    + [(text, "phone") for text in PHONES]
)

NEGATIVES = [
    # e-mail
    "@handle",
    "ping @alice and @bob",
    "foo@bar",
    "a@b.c",
    "user@123.456",
    "user@example.c0m",
    "user at example dot com",
    # card
    "4111111111111112",
    "4111 1111 1111 1112",
    "4111 1111-1111 1111",
    "4111  1111  1111  1111",
    "41111111111111111115",
    "A4111111111111111",
    "0.4111111111111111",
    "4111111111111111.5",
    "ref-4111111111111111",
    # IPv4
    "1.2.3.4.5",
    "10.0.1",
    "256.1.1.1",
    "1.2.3.999",
    "01.02.03.04",
    "v1.2.3.4",
    # IPv6
    "12:30:45",
    "12:30",
    "a:b",
    "std::vector<int>",
    "f :: Int -> Int",
    "00:1A:2B:3C:4D:5E",
    "1:2:3:4:5:6:7:8:9",
    "2001:db8:::1",
    # phone
    "2024",
    "in 2024 and 2025",
    "2024-01-15",
    "2024-01-15T12:30:45Z",
    "2024-01-15T12:30:45.123+01:00",
    "2024-01-15 12:30:45",
    "1.2.3",
    "version 10.4.1",
    "3.14159",
    "3.14159265358979",
    "42",
    "12345",
    "5551234567",
    "ORD5551234567",
    "A555-123-4567",
    "ORD-555-123-4567",
    "555-123-45678",
    "555-123-4567-89",
    "555.123-4567",
    "555-1234",
    "+40.7127753",
    "+12.345678",
    "+1.5",
    "+123456",
    "+1234567890123456",
    "10+1234567",
    "12 345 678 9012 3456",
    "1 2 3 4 5 6 7 8",
    "UTC+05:30",
]

MIXED = (
    "Hi, I'm Ana (ana.lopez+work@mail.example.com), call +1-202-555-0143 or "
    "(555) 123-4567. Card 4111 1111 1111 1111 exp 12/29, server 10.0.0.12 and "
    "2001:db8::7; release 1.2.3 shipped 2024-01-15 at 12:30:45."
)
MIXED_REDACTED = (
    "Hi, I'm Ana ([EMAIL]), call [PHONE] or [PHONE]. Card [CARD] exp 12/29, server [IP] "
    "and [IP]; release 1.2.3 shipped 2024-01-15 at 12:30:45."
)


def only(kind: str, count: int = 1) -> dict[str, int]:
    return {name: count if name == kind else 0 for name in KINDS}


@pytest.mark.parametrize(("text", "kind"), POSITIVES)
def test_redacts_alone(text: str, kind: str) -> None:
    result = redact(text)
    assert result.text == f"[{kind.upper()}]"
    assert result.counts == only(kind)


@pytest.mark.parametrize(("text", "kind"), POSITIVES)
def test_redacts_in_a_sentence(text: str, kind: str) -> None:
    result = redact(f"Reach me at {text}, please.")
    assert result.text == f"Reach me at [{kind.upper()}], please."
    assert result.counts == only(kind)


@pytest.mark.parametrize("text", NEGATIVES)
def test_leaves_alone(text: str) -> None:
    result = redact(text)
    assert result.text == text
    assert result.total == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<user@example.com>", "<[EMAIL]>"),
        ("mailto:user@example.com.", "mailto:[EMAIL]."),
        ("user@192.168.0.1", "user@[IP]"),
        ("8.8.8.8:53", "[IP]:53"),
        ("10.0.0.0/8", "[IP]/8"),
        ("[2001:db8::1]:443", "[[IP]]:443"),
        ("tel:+1-202-555-0143", "tel:[PHONE]"),
        ("Call 555-123-4567.", "Call [PHONE]."),
        ("card: 4111 1111 1111 1111 2024", "card: [CARD] 2024"),
        ("+44 20 7946 0958 4111 1111 1111 1111", "[PHONE] [CARD]"),
        ("+44 20 7946 0958 2024 2025", "[PHONE] 2024 2025"),
        ("192.168.100.200", "[IP]"),
    ],
)
def test_boundaries(text: str, expected: str) -> None:
    assert redact(text).text == expected


def test_kinds_do_not_take_parts_of_each_other() -> None:
    assert redact("4111-1111-1111-1111").counts == only("card")
    assert redact("4111-1111-1111-1112").text == "4111-1111-1111-1112"
    assert redact("+1 4111 1111 1111 1111").text == "+1 [CARD]"
    assert redact("555-123-4567@example.com").text == "[EMAIL]"
    assert redact("::ffff:192.0.2.128").counts == only("ip")


def test_mixed_text() -> None:
    result = redact(MIXED)
    assert result.text == MIXED_REDACTED
    assert result.counts == {"email": 1, "card": 1, "ip": 2, "phone": 2}
    assert result.total == 6


def test_counts_repeats() -> None:
    result = redact("a@b.co, c@d.io and 555-123-4567; 4111111111111111 twice: 4111111111111111")
    assert result.counts == {"email": 2, "card": 2, "ip": 0, "phone": 1}
    assert result.total == 5


def test_nothing_to_redact() -> None:
    result = redact("Nothing to see here.")
    assert result == Redaction(text="Nothing to see here.", counts=dict.fromkeys(KINDS, 0))
    assert result.total == 0


def test_redaction_is_frozen() -> None:
    result = redact("a@b.co")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.text = "changed"  # type: ignore[misc]


def test_redact_value_chat_shapes() -> None:
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Mail ana@example.com or call 555-123-4567."},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Server 10.0.0.12 is up."},
                    {"type": "image_url", "image_url": {"url": "https://example.com/1.png"}},
                ],
            },
        ],
        "temperature": 0.7,
        "n": 1,
        "stop": None,
        "stream": True,
        "seed": 4111111111111111,
    }
    original = copy.deepcopy(body)

    redacted, counts = redact_value(body)

    assert redacted == {
        **original,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Mail [EMAIL] or call [PHONE]."},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Server [IP] is up."},
                    {"type": "image_url", "image_url": {"url": "https://example.com/1.png"}},
                ],
            },
        ],
    }
    assert counts == {"email": 1, "card": 0, "ip": 1, "phone": 1}
    assert body == original


def test_redact_value_keeps_keys_and_non_strings() -> None:
    value = {"a@b.co": ("a@b.co", 5551234567, 1.5, False, None), "n": [["555-123-4567"]]}
    redacted, counts = redact_value(value)
    assert redacted == {"a@b.co": ("[EMAIL]", 5551234567, 1.5, False, None), "n": [["[PHONE]"]]}
    assert counts == {"email": 1, "card": 0, "ip": 0, "phone": 1}


def test_redact_value_of_a_plain_string_and_scalar() -> None:
    assert redact_value("ip 1.2.3.4") == ("ip [IP]", only("ip"))
    assert redact_value(42) == (42, dict.fromkeys(KINDS, 0))


def soup(rng: random.Random) -> str:
    pieces = [*EMAILS, *CARDS, *IPS, *PHONES, *NEGATIVES, "[IP]", "[PHONE]", "[CARD]", "[EMAIL]"]
    pieces += [*"0123456789 .-+:()@[]ax", "1 ", "1-", "1.", "::", "\u00e9", "\u6f22"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))


def test_idempotent() -> None:
    rng = random.Random(0)
    samples = [text for text, _ in POSITIVES] + NEGATIVES + [MIXED]
    samples += [
        "1.2.3.4-4111111111111111",
        "555-123-4567-4111111111111111",
        "(555) 123-4567 555 123 4567",
        "555 123 4567 555-123-4567",
        "+44 20 7946 0958 555 123 4567",
        "fe80::4111111111111111",
    ]
    samples += [soup(rng) for _ in range(3000)]
    for text in samples:
        once = redact(text).text
        again = redact(once)
        assert again.text == once, text
        assert again.total == 0, text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("電話555-123-4567です", "電話[PHONE]です"),
        ("IP是192.168.1.1。", "IP是[IP]。"),
        ("メールuser@example.comまで", "メール[EMAIL]まで"),
        ("😀 a@b.co 😀", "😀 [EMAIL] 😀"),
        ("\x00555-123-4567\x00", "\x00[PHONE]\x00"),
        ("\ud800 ::1 \udfff", "\ud800 [IP] \udfff"),
        ("١٢٣-٤٥٦-٧٨٩٠", "١٢٣-٤٥٦-٧٨٩٠"),
        ("", ""),
    ],
)
def test_unicode(text: str, expected: str) -> None:
    assert redact(text).text == expected


def test_megabyte() -> None:
    filler = " 漢字 😀 v2.0.1 3.14159 order A-1234" * 3 + "\n"
    text = (MIXED + filler) * (1_000_000 // len(MIXED + filler) + 1)
    repeats = text.count(MIXED)
    assert len(text) > 1_000_000
    result = redact(text)
    assert result.text == (MIXED_REDACTED + filler) * repeats
    per_copy = {"email": 1, "card": 1, "ip": 2, "phone": 2}
    assert result.counts == {kind: count * repeats for kind, count in per_copy.items()}
