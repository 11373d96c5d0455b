"""Documents out of uploaded files: plain text, Markdown, HTML, PDF and JSON Lines.

Every format ends in the same shape, a list of Extracted documents whose text is ready to
chunk: "\\n" newlines, no NUL, no lone surrogate, no trailing whitespace on a line, at most
one blank line in a row, no blank lines at either end. Documents whose text comes out
empty are left out. Any problem with the file, a parser's own exception on a malformed PDF
included, comes out as an ExtractionError whose message says what is wrong and where, fit
to show to the uploader.

Text-like formats must be UTF-8: a byte-order mark is dropped, and HTML's <meta charset>
is not honoured.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from io import BytesIO
from pathlib import PurePosixPath
from typing import Any

from service import storable

FORMATS = ("text", "markdown", "html", "pdf", "jsonl")
EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
MEDIA_TYPES = {
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/html": "html",
    "application/pdf": "pdf",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
}

MAX_DOCUMENTS_PER_FILE = 100_000
MAX_TEXT_CHARS = 10_000_000  # per document
MAX_PDF_PAGES = 5_000
MAX_TITLE_CHARS = 1_000  # a jsonl title past this is an error; derived titles are cut
MAX_ID_CHARS = 1_000  # a jsonl id

PDF_MAGIC = b"%PDF-"
# Readers accept a header anywhere in the first KiB (junk before it is common).
PDF_HEADER_WINDOW = 1024

_SUPPORTED = ", ".join(
    f"{fmt} ({', '.join(ext for ext, name in EXTENSIONS.items() if name == fmt)})"
    for fmt in FORMATS
)


@dataclass(frozen=True)
class Extracted:
    """One document of a file; external_id is unique within the file."""

    external_id: str
    title: str
    text: str
    metadata: dict[str, Any]


class ExtractionError(ValueError):
    """The file cannot be read as the format it claims or appears to be."""


def detect_format(filename: str, media_type: str | None, data: bytes) -> str:
    """The file's format: by extension, else by media type, else by its first bytes."""
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if media_type:
        essence = media_type.split(";", 1)[0].strip().lower()
        if essence in MEDIA_TYPES:
            return MEDIA_TYPES[essence]
    if data.startswith(PDF_MAGIC):
        return "pdf"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise ExtractionError(
            f"cannot tell the format of {filename!r} (media type {media_type or 'none'}): "
            f"it is neither a PDF nor UTF-8 text; supported formats: {_SUPPORTED}"
        ) from None
    return "text"


def validate(data: bytes, *, filename: str, media_type: str | None = None) -> str:
    """The checks an upload can afford; returns the detected format.

    Text, Markdown and JSON Lines are extracted in full (that is cheap), HTML is only
    decoded, and a PDF only has its header checked: the worker's extract finds the rest.
    """
    fmt = detect_format(filename, media_type, data)
    if fmt == "pdf":
        _check_pdf_header(data)
    elif fmt == "html":
        _decode(data)
    else:
        extract(data, filename=filename, fmt=fmt)
    return fmt


def extract(
    data: bytes, *, filename: str, media_type: str | None = None, fmt: str | None = None
) -> list[Extracted]:
    """The documents of a file; fmt, when given, overrides detection.

    jsonl gives one document per line, every other format one document whose external_id
    is the filename.
    """
    if fmt is None:
        fmt = detect_format(filename, media_type, data)
    elif fmt not in FORMATS:
        raise ExtractionError(f"unknown format {fmt!r}; supported formats: {_SUPPORTED}")
    if fmt == "pdf":
        return _extract_pdf(data, filename)
    text = _decode(data)
    if fmt == "jsonl":
        return _extract_jsonl(text)
    if fmt == "html":
        title, text = _html_text(text)
    elif fmt == "markdown":
        title, text = _markdown_text(text)
    else:
        title = ""
    document = _document(filename, title or _stem(filename), text, {})
    return [] if document is None else [document]


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExtractionError(f"file is not UTF-8 text at byte {exc.start}") from exc
    return text.removeprefix("\ufeff")


def _stem(filename: str) -> str:
    return PurePosixPath(filename.replace("\\", "/")).stem


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_END_SPACE = re.compile(r"[^\S\n]+(?=\n|\Z)")
_BLANK_LINES = re.compile(r"\n{3,}")


def _clean_text(text: str) -> str:
    """Text as every document keeps it (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    # A str decoded from UTF-8 holds no surrogate; JSON escapes and PDF strings may.
    text = _LONE_SURROGATE.sub("\ufffd", text)
    text = _LINE_END_SPACE.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def _clean_title(title: str) -> str:
    title = " ".join(_LONE_SURROGATE.sub("\ufffd", title.replace("\x00", "")).split())
    return title[:MAX_TITLE_CHARS]


def _document(
    external_id: str,
    title: str,
    text: str,
    metadata: dict[str, Any],
    *,
    what: str = "the document's text",
) -> Extracted | None:
    """The cleaned document, or None when its text is empty."""
    text = _clean_text(text)
    if len(text) > MAX_TEXT_CHARS:
        raise ExtractionError(
            f"{what} has {len(text)} characters, more than the limit of {MAX_TEXT_CHARS}"
        )
    if not text:
        return None
    return Extracted(external_id, _clean_title(title), text, metadata)


# Markdown: only what hides words from retrieval goes; emphasis and headings stay.
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_DESTINATION = r"\((?:[^()\n]|\([^()\n]*\))*\)"  # one level of parentheses, as in Wikipedia URLs
_IMAGE = re.compile(r"!\[([^\]\n]*)\]" + _DESTINATION)
_LINK = re.compile(r"\[([^\]\n]*)\]" + _DESTINATION)
_FENCE = re.compile(r" {0,3}(?:```|~~~)")
_ATX_TITLE = re.compile(r" {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")


def _markdown_text(source: str) -> tuple[str, str]:
    """(the first level-1 ATX heading outside code fences or "", the retrievable text)."""
    text = _HTML_COMMENT.sub("", source)
    text = _IMAGE.sub(r"\1", text)  # images first: [![alt](src)](href) is a link around one
    text = _LINK.sub(r"\1", text)
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (heading := _ATX_TITLE.fullmatch(line)):
            return heading.group(1), text
    return "", text


# HTML
_SKIPPED_ELEMENTS = frozenset({"script", "style", "noscript", "template"})
_PARAGRAPH_ELEMENTS = frozenset(
    "p h1 h2 h3 h4 h5 h6 pre blockquote section article header footer aside nav main "
    "table ul ol dl figure figcaption form fieldset hr address details summary".split()
)
_LINE_ELEMENTS = frozenset("br div li tr dt dd caption option".split())
_CELL_ELEMENTS = frozenset({"td", "th"})
_SPACES = re.compile(r"\s+")


class _HTMLText(HTMLParser):
    """Collects an HTML page's visible text, its <title> and its first <h1>.

    Flat counters, no element stack: deeply nested markup costs nothing extra. A <head>
    holds no text but its title, so it needs no rule of its own.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self.heading = ""
        self._skip_depth = 0
        self._pre_depth = 0
        self._title_parts: list[str] | None = None
        self._heading_parts: list[str] | None = None
        self._heading_seen = False
        self._newlines = 2  # at the end of parts: no break is needed at the start

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_ELEMENTS:
            self._skip_depth += 1
        elif tag == "title":
            self._title_parts = []
        elif tag == "h1" and not self._heading_seen:
            self._heading_seen = True
            self._heading_parts = []
        elif tag == "pre":
            self._pre_depth += 1
        self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_ELEMENTS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "title" and self._title_parts is not None:
            self.title = self.title or " ".join("".join(self._title_parts).split())
            self._title_parts = None
        elif tag == "h1" and self._heading_parts is not None:
            self.heading = " ".join("".join(self._heading_parts).split())
            self._heading_parts = None
        elif tag == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)
        elif tag in _CELL_ELEMENTS and not self._newlines:
            self._write(" ")
        self._break(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/> is one break, not the start and end of two.
        self._break(tag)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._title_parts is not None:
            self._title_parts.append(data)
            return
        if self._heading_parts is not None:
            self._heading_parts.append(data)
        if self._pre_depth:
            self._write(data)
            return
        text = _SPACES.sub(" ", data)
        self._write(text.lstrip(" ") if self._newlines else text)

    def _write(self, text: str) -> None:
        if not text or self._skip_depth:
            return
        self.parts.append(text)
        body = text.rstrip("\n")
        self._newlines = len(text) - len(body) + (self._newlines if not body else 0)

    def _break(self, tag: str) -> None:
        # Breaks do not add up: </li><li> is one line break, </p><p> one blank line.
        wanted = 2 if tag in _PARAGRAPH_ELEMENTS else 1 if tag in _LINE_ELEMENTS else 0
        self._write("\n" * (wanted - self._newlines))


def _html_text(source: str) -> tuple[str, str]:
    """(the <title>, else the first <h1>, else "", the visible text)."""
    parser = _HTMLText()
    try:
        parser.feed(source)
        parser.close()
    except (AssertionError, ValueError) as exc:  # html.parser on some malformed markup
        raise ExtractionError(f"unreadable HTML: {exc}") from exc
    return parser.title or parser.heading, "".join(parser.parts)


# PDF
def _check_pdf_header(data: bytes) -> None:
    if PDF_MAGIC not in data[:PDF_HEADER_WINDOW]:
        raise ExtractionError(
            f"not a PDF: no {PDF_MAGIC.decode()} header in the first {PDF_HEADER_WINDOW} bytes"
        )


def _pdf_errors() -> tuple[type[BaseException], ...]:
    """What pypdf may raise on a malformed file.

    Besides its own PyPdfError, pypdf lets plain Python errors from its parsing code
    through on broken input (a missing key, a bad index, a short stream, deep nesting).
    """
    from pypdf.errors import PyPdfError

    return (
        PyPdfError,
        ArithmeticError,
        AssertionError,
        AttributeError,
        LookupError,
        NotImplementedError,
        RecursionError,
        TypeError,
        ValueError,
        struct.error,
        zlib.error,
    )


def _extract_pdf(data: bytes, filename: str) -> list[Extracted]:
    """One document: the pages' text joined by blank lines; metadata {"pages": n}."""
    _check_pdf_header(data)
    title, texts = _read_pdf(data)
    document = _document(filename, title or _stem(filename), "\n\n".join(texts), {})
    if document is None:
        raise ExtractionError("no text could be extracted (scanned PDF?)")
    return [Extracted(document.external_id, document.title, document.text, {"pages": len(texts)})]


def _read_pdf(data: bytes) -> tuple[str, list[str]]:
    """(the metadata title or "", each page's text); every failure an ExtractionError."""
    # Imported here: the API's validate and the other formats do without pypdf.
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    step = "opening"  # named in the message of a parser error
    try:
        reader = PdfReader(BytesIO(data))
        # An empty user password (permissions only) opens; any other needs the password.
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise ExtractionError("encrypted PDF: a password is needed to read it")
        step = "the page tree"
        if (pages := len(reader.pages)) > MAX_PDF_PAGES:
            raise ExtractionError(f"PDF has {pages} pages, more than the limit of {MAX_PDF_PAGES}")
        step = "the metadata"
        info = reader.metadata
        title = str(info.title or "") if info is not None else ""
        texts: list[str] = []
        length = 0
        for number, page in enumerate(reader.pages, 1):
            step = f"page {number}"
            texts.append(page.extract_text())
            length += len(texts[-1])
            if length > MAX_TEXT_CHARS:
                raise ExtractionError(
                    f"PDF text passes {MAX_TEXT_CHARS} characters at page {number}"
                )
    except ExtractionError:
        raise
    except FileNotDecryptedError as exc:
        raise ExtractionError("encrypted PDF: a password is needed to read it") from exc
    except DependencyError as exc:
        raise ExtractionError(f"encrypted PDF: cannot decrypt it ({exc})") from exc
    except _pdf_errors() as exc:
        raise ExtractionError(f"unreadable PDF ({step}): {exc or type(exc).__name__}") from exc
    return title, texts


# JSON Lines
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_line(line: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line, parse_constant=_reject_constant)
    except RecursionError:
        raise ExtractionError(f"line {number}: JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ExtractionError(
            f"line {number}, column {exc.colno}: not valid JSON ({exc.msg})"
        ) from exc
    except ValueError as exc:  # NaN, Infinity, an integer of more than 4300 digits
        raise ExtractionError(f"line {number}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise ExtractionError(f"line {number}: expected a JSON object, got {_json_type(record)}")
    return record


def _string_field(record: dict[str, Any], key: str, number: int, *, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ExtractionError(f"line {number}: {key!r} is required")
        return ""
    if not isinstance(value, str):
        raise ExtractionError(f"line {number}: {key!r} must be a string, got {_json_type(value)}")
    return value


def _jsonl_document(record: dict[str, Any], number: int) -> Extracted:
    """The document of one line: {"id", "text", optional "title" and "metadata"}."""
    external_id = _string_field(record, "id", number, required=True)
    title = _string_field(record, "title", number, required=False)
    text = _string_field(record, "text", number, required=True)
    metadata = record.get("metadata")
    if not external_id.strip():
        raise ExtractionError(f"line {number}: 'id' must not be empty")
    for key, value, limit in (("id", external_id, MAX_ID_CHARS), ("title", title, MAX_TITLE_CHARS)):
        if len(value) > limit:
            raise ExtractionError(
                f"line {number}: {key!r} has {len(value)} characters, "
                f"more than the limit of {limit}"
            )
    if (reason := storable.problem(external_id)) is not None:
        raise ExtractionError(f"line {number}: 'id' {reason}")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise ExtractionError(
            f"line {number}: 'metadata' must be an object, got {_json_type(metadata)}"
        )
    elif (found := storable.find_unstorable(metadata, ("metadata",))) is not None:
        raise ExtractionError(f"line {number}: {found[0]!r} {found[1]}")
    document = _document(external_id, title, text, metadata, what=f"line {number}: 'text'")
    if document is None:
        raise ExtractionError(f"line {number}: 'text' is empty")
    return document


def _extract_jsonl(text: str) -> list[Extracted]:
    """One document per non-blank line; ids unique within the file."""
    documents: list[Extracted] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if len(documents) == MAX_DOCUMENTS_PER_FILE:
            raise ExtractionError(
                f"line {number}: more than the limit of {MAX_DOCUMENTS_PER_FILE} documents"
            )
        document = _jsonl_document(_parse_line(line, number), number)
        if (first := first_line.get(document.external_id)) is not None:
            raise ExtractionError(
                f"line {number}: duplicate id {document.external_id!r} (first on line {first})"
            )
        first_line[document.external_id] = number
        documents.append(document)
    return documents
