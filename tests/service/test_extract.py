"""Document extraction: each format, each error with its message, and hostile input."""

from __future__ import annotations

import json
import re
import time
from io import BytesIO

import pytest
from pypdf import PdfReader, PdfWriter

from service.rag.extract import (
    MAX_DOCUMENTS_PER_FILE,
    MAX_PDF_PAGES,
    MAX_TEXT_CHARS,
    Extracted,
    ExtractionError,
    detect_format,
    extract,
    validate,
)


def make_pdf(pages: list[str], *, title: str | None = None) -> bytes:
    """A minimal PDF by hand: one content stream per page in the standard Helvetica font.

    Each line of a page's text is one Tj.
    """
    kids = " ".join(f"{5 + 2 * number} 0 R" for number in range(len(pages)))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Title ({title}) >>".encode() if title else b"<< >>",
    ]
    for number, text in enumerate(pages):
        lines = " ".join(f"({line}) Tj T*" for line in text.split("\n"))
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {lines} ET".encode()
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> "
            + f"/Contents {6 + 2 * number} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 4 0 R >>\n" % (len(objects) + 1)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def encrypted(pdf: bytes, *, user_password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(BytesIO(pdf)))
    # RC4 needs no optional dependency (AES would need the cryptography package).
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def jsonl(*records: object) -> bytes:
    return "\n".join(json.dumps(record) for record in records).encode()


def error(data: bytes, filename: str, **kwargs: str) -> str:
    with pytest.raises(ExtractionError) as info:
        extract(data, filename=filename, **kwargs)
    return str(info.value)


# Format detection
@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("notes.txt", "text"),
        ("notes.TEXT", "text"),
        ("README.md", "markdown"),
        ("guide.markdown", "markdown"),
        ("page.HTML", "html"),
        ("page.htm", "html"),
        ("paper.pdf", "pdf"),
        ("corpus.jsonl", "jsonl"),
        ("corpus.ndjson", "jsonl"),
        ("dir\\sub/archive.v2.jsonl", "jsonl"),
    ],
)
def test_detect_format_by_extension(filename: str, expected: str) -> None:
    # The extension wins over a contradicting media type and content.
    assert detect_format(filename, "application/pdf", b"hello") == expected


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("text/plain", "text"),
        ("text/markdown; charset=utf-8", "markdown"),
        ("Text/HTML", "html"),
        ("application/pdf", "pdf"),
        ("application/jsonl", "jsonl"),
        ("application/x-ndjson", "jsonl"),
    ],
)
def test_detect_format_by_media_type(media_type: str, expected: str) -> None:
    assert detect_format("upload", media_type, b"\xff\xfe") == expected


def test_detect_format_by_content() -> None:
    assert detect_format("upload.bin", None, b"%PDF-1.7\n...") == "pdf"
    assert detect_format("upload", "application/octet-stream", "héllo".encode()) == "text"
    assert detect_format("upload", None, b"") == "text"


def test_detect_format_refuses_binary_of_unknown_type() -> None:
    with pytest.raises(ExtractionError) as info:
        detect_format("photo.png", "image/png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff")
    message = str(info.value)
    assert "cannot tell the format of 'photo.png' (media type image/png)" in message
    for listed in ("text (.txt, .text)", "markdown (.md, .markdown)", "html (.html, .htm)"):
        assert listed in message
    assert "pdf (.pdf)" in message and "jsonl (.jsonl, .ndjson)" in message


# Plain text
def test_text_is_one_normalised_document() -> None:
    data = "\ufeffFirst line  \r\nsecond\x00 line\t\r\n\r\n\r\n\r\n\r\nthird\n\n  \n".encode()
    assert extract(data, filename="docs/Report 2024.txt") == [
        Extracted(
            external_id="docs/Report 2024.txt",
            title="Report 2024",
            text="First line\nsecond line\n\nthird",
            metadata={},
        )
    ]


def test_text_errors_and_odd_input() -> None:
    assert error(b"caf\xc3\xa9 \xe9t\xe9", "notes.txt") == "file is not UTF-8 text at byte 6"
    garbage = bytes(range(256)) * 4  # binary named .txt
    assert error(garbage, "garbage.txt") == "file is not UTF-8 text at byte 128"
    # UTF-8 does not encode surrogates; a CESU-style one is invalid.
    assert error(b"ok \xed\xa0\x80", "s.txt") == "file is not UTF-8 text at byte 3"
    assert extract(b"", filename="empty.txt") == []
    assert extract(b" \n\x00\t\r\n", filename="blank.txt") == []
    assert extract(b"a\x00b\x00", filename="nul.txt")[0].text == "ab"


def test_text_limit() -> None:
    data = b"x" * (MAX_TEXT_CHARS + 1)
    assert error(data, "big.txt") == (
        f"the document's text has {MAX_TEXT_CHARS + 1} characters, "
        f"more than the limit of {MAX_TEXT_CHARS}"
    )


def test_fmt_overrides_detection() -> None:
    [document] = extract(b"# Heading\n\nbody", filename="x.txt", fmt="markdown")
    assert document.title == "Heading"
    assert error(b"x", "x.txt", fmt="docx").startswith("unknown format 'docx'; supported formats:")


# Markdown
def test_markdown_keeps_the_source_without_markup_noise() -> None:
    source = """\
```bash
# install it
pip install thing
```
<!-- a comment
over lines -->
## Overview

# The *Real* Title #

See ![a diagram](img/d.png "Diagram") and [the docs](https://example.com/a_(b)) or
[![build badge](https://ci/badge.svg)](https://ci). **Bold** stays.
"""
    [document] = extract(source.encode(), filename="README.md")
    assert document.title == "The *Real* Title"
    assert document.text == (
        "```bash\n# install it\npip install thing\n```\n\n## Overview\n\n"
        "# The *Real* Title #\n\n"
        "See a diagram and the docs or\nbuild badge. **Bold** stays."
    )


def test_markdown_without_a_title_heading_uses_the_filename() -> None:
    [document] = extract(b"## Only a section\n\ntext", filename="notes/setup.markdown")
    assert (document.title, document.external_id) == ("setup", "notes/setup.markdown")


# HTML
PAGE = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title> Caf&eacute; &amp; Co </title>
<style>p { color: red }</style><script>var s = "<p>not text</p>";</script></head>
<body>
<nav><a href="/">Home</a></nav>
<h1>Menu   of the day</h1>
<p>Fresh
   <b>bread</b>&nbsp;and <i>coffee</i>.</p>
<div>line one<br>line two<br/>line three</div>
<ul><li>first</li><li>second</li></ul>
<table><tr><th>item</th><th>price</th></tr><tr><td>tea</td><td>&euro;2</td></tr></table>
<pre>  indented
    code</pre>
<noscript>Enable JavaScript</noscript><template><p>hidden</p></template>
<!-- a comment -->
</body></html>"""


def test_html_visible_text_with_block_breaks() -> None:
    [document] = extract(PAGE, filename="menu.html")
    assert document.title == "Café & Co"
    assert document.text == (
        "Home\n\nMenu of the day\n\nFresh bread and coffee.\n\n"
        "line one\nline two\nline three\n\nfirst\nsecond\n\n"
        "item price\ntea €2\n\n  indented\n    code"
    )


def test_html_title_falls_back_to_h1_then_filename() -> None:
    [document] = extract(b"<body><h1>The <em>Heading</em></h1><h1>Other</h1>", filename="a.htm")
    assert (document.title, document.text) == ("The Heading", "The Heading\n\nOther")
    [document] = extract(b"<p>just text</p>", filename="plain.html")
    assert document.title == "plain"


def test_html_hostile_input() -> None:
    deep = b"<div>" * 100_000 + b"deep text" + b"</div>" * 100_000
    started = time.perf_counter()
    [document] = extract(deep, filename="deep.html")
    assert document.text == "deep text"
    assert time.perf_counter() - started < 5
    unclosed = b"<p>kept</p><script>var x = 1; <p>never shown"
    assert extract(unclosed, filename="u.html")[0].text == "kept"
    assert extract(b"<p>a\x00b &#0; &#xd800;</p>", filename="n.html")[0].text == "ab \ufffd \ufffd"
    assert error(b"<p>x</p><![ broken", "b.html").startswith("unreadable HTML: ")
    assert extract(b"<script>only()</script>", filename="s.html") == []


# PDF
def test_pdf_pages_text_title_and_page_count() -> None:
    pdf = make_pdf(["Retrieval augmented\ngeneration works.", "Second page here."], title="On RAG")
    [document] = extract(pdf, filename="paper.pdf")
    assert document.title == "On RAG"
    assert document.external_id == "paper.pdf"
    assert document.metadata == {"pages": 2}
    first, second = document.text.split("\n\n")
    assert first.split() == ["Retrieval", "augmented", "generation", "works."]
    assert second == "Second page here."
    [untitled] = extract(make_pdf(["Hello PDF"]), filename="scan-01.pdf")
    assert (untitled.title, untitled.text) == ("scan-01", "Hello PDF")


def test_pdf_without_text() -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    out = BytesIO()
    writer.write(out)
    assert error(out.getvalue(), "scan.pdf") == "no text could be extracted (scanned PDF?)"


def test_pdf_encryption() -> None:
    pdf = make_pdf(["Secret words"])
    assert error(encrypted(pdf, user_password="hunter2"), "locked.pdf") == (
        "encrypted PDF: a password is needed to read it"
    )
    # Permissions only (empty user password): readable, as in any viewer.
    [document] = extract(encrypted(pdf, user_password=""), filename="open.pdf")
    assert document.text == "Secret words"


def test_pdf_errors() -> None:
    assert error(b"hello, not a pdf", "fake.pdf") == (
        "not a PDF: no %PDF- header in the first 1024 bytes"
    )
    assert error(b"%PDF-1.4\n" + bytes(range(256)) * 8, "garbage.pdf").startswith("unreadable PDF")
    pdf = make_pdf(["Some words on a page"])
    assert error(pdf[: len(pdf) // 2], "truncated.pdf").startswith("unreadable PDF")
    assert error(make_pdf(["x"] * (MAX_PDF_PAGES + 1)), "huge.pdf") == (
        f"PDF has {MAX_PDF_PAGES + 1} pages, more than the limit of {MAX_PDF_PAGES}"
    )


# JSON Lines
def test_jsonl_documents() -> None:
    data = (
        jsonl(
            {"id": "a", "title": "  First\n doc ", "text": "Alpha\r\ntext ", "metadata": {"k": 1}},
            {"id": "b", "text": "Beta", "extra": [1, 2], "title": None, "metadata": None},
        )
        + b"\r\n\n   \n"
        + jsonl({"id": "c", "text": "Gamma\x00"}, {"id": "d", "text": "lone \ud800 half"})
    )
    assert extract(data, filename="corpus.jsonl") == [
        Extracted("a", "First doc", "Alpha\ntext", {"k": 1}),
        Extracted("b", "", "Beta", {}),
        Extracted("c", "", "Gamma", {}),
        Extracted("d", "", "lone \ufffd half", {}),
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([b'{"id": "a", "text": "x"}', b'{"id": "b", text}'], "line 2, column 13: not valid JSON"),
        ([b'["id", "text"]'], "line 1: expected a JSON object, got an array"),
        ([b'{"text": "x"}'], "line 1: 'id' is required"),
        ([b'{"id": 7, "text": "x"}'], "line 1: 'id' must be a string, got a number"),
        ([b'{"id": "  ", "text": "x"}'], "line 1: 'id' must not be empty"),
        ([b'{"id": "a\\u0000", "text": "x"}'], "line 1: 'id' contains a NUL character"),
        ([b'{"id": "a"}'], "line 1: 'text' is required"),
        ([b'{"id": "a", "text": ["x"]}'], "line 1: 'text' must be a string, got an array"),
        ([b'{"id": "a", "text": " \\n\\u0000 "}'], "line 1: 'text' is empty"),
        ([b'{"id": "a", "text": "x", "title": true}'], "line 1: 'title' must be a string"),
        ([b'{"id": "a", "text": "x", "metadata": [1]}'], "line 1: 'metadata' must be an object"),
        (
            [b'{"id": "a", "text": "x", "metadata": {"k": {"v": "\\u0000"}}}'],
            "line 1: 'metadata.k.v' contains a NUL character",
        ),
        ([b'{"id": "a", "text": "x", "metadata": {"n": NaN}}'], "line 1: not valid JSON (NaN"),
        (
            [
                b'{"id": "a", "text": "x"}',
                b"",
                b'{"id": "b", "text": "y"}',
                b'{"id": "a", "text": "z"}',
            ],
            "line 4: duplicate id 'a' (first on line 1)",
        ),
    ],
)
def test_jsonl_errors_name_line_and_field(lines: list[bytes], message: str) -> None:
    data = b"\n".join(lines)
    assert error(data, "corpus.jsonl").startswith(message)
    # The upload-time check finds the same.
    with pytest.raises(ExtractionError, match=re.escape(message)):
        validate(data, filename="corpus.jsonl")


def test_jsonl_hostile_and_limits() -> None:
    nested = b'{"id": "a", "text": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert error(nested, "deep.jsonl") == "line 1: JSON nested too deeply"
    long_number = b'{"id": "a", "text": "x", "metadata": {"n": ' + b"9" * 5000 + b"}}"
    assert error(long_number, "n.jsonl").startswith("line 1: not valid JSON (")
    many = b"\n".join(
        b'{"id":"%d","text":"t"}' % number for number in range(MAX_DOCUMENTS_PER_FILE + 1)
    )
    assert error(many, "many.jsonl") == (
        f"line {MAX_DOCUMENTS_PER_FILE + 1}: "
        f"more than the limit of {MAX_DOCUMENTS_PER_FILE} documents"
    )
    assert extract(b"\n\n", filename="empty.jsonl") == []


# Upload-time validation
def test_validate_does_the_cheap_checks() -> None:
    assert validate(b"plain", filename="a.txt") == "text"
    assert validate(b"<p>x</p>", filename="a", media_type="text/html") == "html"
    assert validate(jsonl({"id": "a", "text": "x"}), filename="a.ndjson") == "jsonl"
    # A PDF has only its header checked; the worker's extract finds the broken body.
    assert validate(b"%PDF-1.4\nbroken", filename="a.pdf") == "pdf"
    for data, filename, message in [
        (b"%PDF", "a.pdf", "not a PDF"),
        (b"<p>\xff</p>", "a.html", "file is not UTF-8 text at byte 3"),
        (b"\xc3", "a.md", "file is not UTF-8 text at byte 0"),
        (b"\x00\xff\xfe", "a.bin", "cannot tell the format"),
    ]:
        with pytest.raises(ExtractionError, match=re.escape(message)):
            validate(data, filename=filename)
