"""Streaming readers for ``embedq ingest``: JSONL, CSV or plain text, one document at a time."""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from embedq.errors import InvalidInputError
from embedq.keys import content_hash

FORMATS = ("auto", "jsonl", "csv", "text")
# Python's csv refuses fields over 128 KiB by default; documents can be longer.
csv.field_size_limit(2**31 - 1)


@dataclass
class Document:
    """One input document, before embedding."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadRecord:
    """A record that could not be read, with where and why (reported, never fatal)."""

    line: int
    reason: str


def detect_format(path: Path, wanted: str = "auto") -> str:
    """``jsonl`` for .jsonl/.json/.ndjson, ``csv`` for .csv/.tsv, else ``text``."""
    if wanted != "auto":
        return wanted
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "text"


def count_records(path: Path) -> int | None:
    """Number of lines (an upper bound of records), read in 1 MiB blocks; None for stdin."""
    if str(path) == "-":
        return None
    count, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(2**20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def to_document(
    record: dict[str, Any], line: int, id_field: str = "id", text_field: str = "text"
) -> Document | BadRecord:
    """A Document from one record; fields other than id and text become metadata."""
    text = record.get(text_field)
    if not isinstance(text, str):
        return BadRecord(line, f"field {text_field!r} is missing or not a string")
    raw_id = record.get(id_field)
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
        return BadRecord(line, f"field {id_field!r} is not a string or integer")
    metadata = {k: v for k, v in record.items() if k not in (id_field, text_field)}
    doc_id = str(raw_id) if raw_id is not None and raw_id != "" else content_hash(text)
    return Document(doc_id, text, metadata)


def _jsonl(fh: TextIO, id_field: str, text_field: str) -> Iterator[Document | BadRecord]:
    for line_no, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield BadRecord(line_no, f"not valid JSON: {exc.msg}")
            continue
        if not isinstance(record, dict):
            yield BadRecord(line_no, "not a JSON object")
            continue
        yield to_document(record, line_no, id_field, text_field)


def _csv(fh: TextIO, id_field: str, text_field: str) -> Iterator[Document | BadRecord]:
    # The sniffing sample ends on a line boundary, then the rest of the file follows it.
    head = fh.read(64 * 1024) + fh.readline()
    try:
        dialect: Any = csv.Sniffer().sniff(head, delimiters=",\t;|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(itertools.chain(io.StringIO(head), fh), dialect=dialect)
    if reader.fieldnames is None or text_field not in reader.fieldnames:
        raise InvalidInputError(
            f"the CSV has no {text_field!r} column (columns: {reader.fieldnames}); "
            "name the text column with --text-field"
        )
    for row in reader:
        yield to_document(dict(row), reader.line_num, id_field, text_field)


def _text(fh: TextIO) -> Iterator[Document | BadRecord]:
    for line_no, line in enumerate(fh, 1):
        text = line.rstrip("\n")
        if text.strip():
            yield Document(content_hash(text), text, {"line": line_no})


def read_documents(
    path: Path, fmt: str = "auto", id_field: str = "id", text_field: str = "text"
) -> Iterator[Document | BadRecord]:
    """Yield documents lazily from ``path`` (``-`` is stdin); bad records come as BadRecord."""
    fmt = detect_format(path, fmt)
    if fmt not in FORMATS[1:]:
        raise InvalidInputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    stream = (
        sys.stdin if str(path) == "-" else path.open(encoding="utf-8", errors="replace", newline="")
    )
    with stream as fh:
        if fmt == "jsonl":
            yield from _jsonl(fh, id_field, text_field)
        elif fmt == "csv":
            yield from _csv(fh, id_field, text_field)
        else:
            yield from _text(fh)
