"""SciFact slices for the RAG tests (read from ../shared/data, never copied into the repo)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tests.conftest import SHARED_DATA

SCIFACT = SHARED_DATA / "scifact"


@cache
def corpus() -> list[dict[str, str]]:
    with open(SCIFACT / "corpus.jsonl") as f:
        return [json.loads(line) for line in f]


@cache
def claims_for(doc_ids: frozenset[str]) -> list[tuple[str, set[str]]]:
    """(claim, relevant document ids) for claims whose evidence is all inside ``doc_ids``."""
    queries = {}
    with open(SCIFACT / "queries.jsonl") as f:
        for line in f:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    qrels: dict[str, set[str]] = {}
    with open(SCIFACT / "qrels.tsv") as f:
        for line in f.readlines()[1:]:
            qid, did, score = line.split()
            if int(score) > 0:
                qrels.setdefault(qid, set()).add(did)
    return [(queries[q], docs) for q, docs in qrels.items() if q in queries and docs <= doc_ids]


def slice_jsonl(n: int, start: int = 0) -> bytes:
    rows = corpus()[start : start + n]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_slice(path: Path, n: int, start: int = 0) -> Path:
    path.write_bytes(slice_jsonl(n, start))
    return path


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose page shows ``text`` (Helvetica), with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def many_pages_pdf(pages: int, text: str) -> bytes:
    """A PDF of ``pages`` pages, each showing ``text`` (slow to extract when long)."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    kids = " ".join(f"{5 + i} 0 R" for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids.encode(), pages),
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    page = (
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R "
        b"/Resources << /Font << /F1 4 0 R >> >> >>"
    )
    objects += [page] * pages
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)
