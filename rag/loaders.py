"""Document loaders: ``.txt``, ``.md``, ``.html``, ``.pdf``, BEIR ``.jsonl`` and directories.

Every loader yields ``Document`` objects with a stable id (a file's path relative to the ingested
root, a BEIR ``_id``, or what the caller chose), its text, a title and where it came from. Bad
input raises ``LoaderError`` with a code the API turns into a 400: an empty file, a type we do not
read, a PDF or JSON line that does not parse.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from typing import Any

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")


class LoaderError(ValueError):
    def __init__(self, message: str, code: str = "invalid_file") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __reduce__(self) -> tuple[type[LoaderError], tuple[str, str]]:
        return LoaderError, (self.message, self.code)  # whole across a process boundary


@dataclass
class Document:
    id: str
    text: str
    title: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def check_suffix(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise LoaderError(
            f"{filename!r}: unsupported file type {suffix or '(none)'!r}; "
            f"supported: {', '.join(SUFFIXES)}",
            code="unsupported_file_type",
        )
    return suffix


def load_bytes(
    filename: str, data: bytes, *, doc_id: str | None = None, metadata: dict[str, Any] | None = None
) -> list[Document]:
    """The documents in one uploaded file (a BEIR ``.jsonl`` holds many, others one)."""
    suffix = check_suffix(filename)
    if not data.strip():
        raise LoaderError(f"{filename!r} is empty", code="empty_file")
    meta = dict(metadata or {})
    if suffix == ".jsonl":
        return list(_jsonl(filename, data, meta))
    if suffix == ".pdf":
        title, text = _pdf(filename, data)
    else:
        raw = _decode(filename, data)
        if suffix in (".html", ".htm"):
            title, text = _html(raw)
        elif suffix in (".md", ".markdown"):
            title, text = _markdown_title(raw), raw
        else:
            title, text = "", raw
    text = _clean(text)
    if not text:
        raise LoaderError(f"{filename!r} contains no text", code="empty_file")
    return [
        Document(
            id=doc_id or filename,
            text=text,
            title=title or Path(filename).stem,
            source=filename,
            metadata=meta,
        )
    ]


def load_path(path: Path, *, metadata: dict[str, Any] | None = None) -> Iterator[Document]:
    """A file, or every supported file under a directory (ids: paths relative to it)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise LoaderError(f"{path} holds no {', '.join(SUFFIXES)} files", code="empty_file")
        for file in files:
            yield from load_bytes(str(file.relative_to(path)), file.read_bytes(), metadata=metadata)
    elif path.is_file():
        yield from load_bytes(path.name, path.read_bytes(), metadata=metadata)
    else:
        raise LoaderError(f"{path} does not exist", code="not_found")


# -- formats --------------------------------------------------------------------------------------


def _decode(filename: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoaderError(
            f"{filename!r} is not UTF-8 text (byte {exc.start})", code="file_parse_error"
        ) from None


def _clean(text: str) -> str:
    text = text.replace("\x00", "").replace("\r\n", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _markdown_title(text: str) -> str:
    match = re.search(r"^#\s+(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


class _HtmlText(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "head"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._stack: list[str] = []
        self._open: Counter[str] = Counter()  # open tags by name: no scan of the stack

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._stack.append(tag)
        self._open[tag] += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self._open[tag]:
            while self._stack:
                closed = self._stack.pop()
                self._open[closed] -= 1
                if closed == tag:
                    break
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._open["title"]:
            self.title.append(data)
        elif not any(self._open[tag] for tag in self._SKIP):
            self.parts.append(data)


# a "<" with no ">" before the next "<" (or the end) opens no tag: it is text. Left to
# HTMLParser, each such "<" is re-scanned to the end of the input: quadratic.
_UNCLOSED = re.compile(r"<(?=[^<>]*(?:<|$))")


def _defused(raw: str) -> str:
    """``raw`` without the constructs ``HTMLParser`` parses in quadratic time: stray ``<``s
    become ``&lt;`` and an unterminated comment ends the document (as it does in a browser)."""
    raw = _UNCLOSED.sub("&lt;", raw)
    pos = 0
    while (start := raw.find("<!--", pos)) >= 0:
        end = raw.find("-->", start + 4)
        if end < 0:
            return raw[:start]
        pos = end + 3
    return raw


def _html(raw: str) -> tuple[str, str]:
    parser = _HtmlText()
    parser.feed(_defused(raw))
    parser.close()
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    text = "\n".join(line.strip() for line in text.splitlines())
    return " ".join("".join(parser.title).split()), text


MAX_PDF_PAGES = 2000


class _TooManyPages(Exception):
    pass


def _pdf(filename: str, data: bytes) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(BytesIO(data), strict=False)
        count = len(reader.pages)
        if count > MAX_PDF_PAGES:
            raise _TooManyPages(count)
        pages = [page.extract_text() or "" for page in reader.pages]
        info: Any = reader.metadata or {}
        title = str(info.get("/Title") or "")
    except _TooManyPages as exc:
        raise LoaderError(
            f"{filename!r} has {exc.args[0]} pages; at most {MAX_PDF_PAGES} are read per file "
            "(split it).",
            "file_too_large",
        ) from None
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise LoaderError(
            f"{filename!r} is not a readable PDF: {exc}", "file_parse_error"
        ) from None
    return title, "\n\n".join(pages)


def _jsonl(filename: str, data: bytes, meta: dict[str, Any]) -> Iterator[Document]:
    """BEIR corpus lines: ``{"_id", "title", "text", "metadata"?}`` (``id`` also accepted)."""
    text = _decode(filename, data)
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoaderError(
                f"{filename}:{number}: invalid JSON ({exc.msg})", "file_parse_error"
            ) from None
        if not isinstance(row, dict):
            raise LoaderError(f"{filename}:{number}: expected an object", "file_parse_error")
        doc_id = row.get("_id", row.get("id"))
        body = row.get("text")
        if doc_id is None or not isinstance(body, str):
            raise LoaderError(
                f'{filename}:{number}: each line needs "_id" and "text"', "file_parse_error"
            )
        doc_id = str(doc_id)
        if doc_id in seen:
            raise LoaderError(f"{filename}:{number}: duplicate _id {doc_id!r}", "file_parse_error")
        seen.add(doc_id)
        extra: dict[str, Any] = row["metadata"] if isinstance(row.get("metadata"), dict) else {}
        yield Document(
            id=doc_id,
            text=_clean(body),
            title=str(row.get("title") or ""),
            source=f"{filename}:{number}",
            metadata={**meta, **extra},
        )
