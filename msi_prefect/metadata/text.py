"""Delimited text (CSV/TSV) and JSON: streamed, with bounded memory whatever the file size.

Neither has a library of the field to lean on, and both are simple enough that the
standard library's :mod:`csv` and :mod:`json` do the parsing; what this module adds is the
bounds (rows, line length, parsed size, keys listed) and the partial results on bad input.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from msi_prefect.metadata.detect import (
    CSV_MIMES,
    JSON_WHITESPACE,
    UTF8_BOM,
    decode_text_head,
    sniff_delimiter,
)
from msi_prefect.metadata.model import HEAD_SIZE, MIB, ExtractionError, truncate


class _Malformed(Exception):
    """Internal: a structural problem that stops the current parsing step."""


# --------------------------------------------------------------------------- CSV / TSV


@dataclass(frozen=True)
class CsvExtractor:
    """Delimited text: ``.csv``, ``.tsv`` and plain text the CSV sniffer accepts.

    Details: ``delimiter``, ``encoding``, ``columns`` (the first row, at most
    ``max_columns_listed`` names), ``column_count``, ``row_count`` (records after the first
    row; blank lines skipped), ``row_count_capped``, ``ragged_rows`` (records whose field
    count differs from ``column_count``) and ``sample_rows`` (the first data records).

    Attributes:
        max_rows: Stop counting after this many records (``row_count_capped`` is then true).
        max_line_chars: Give up on a line longer than this (bounds memory on binary junk).
        sample_size: Number of sample records.
        max_value_chars: Truncate column names and sample values to this length.
        max_columns_listed: Names and sample values listed per record.
    """

    max_rows: int = 10_000_000
    max_line_chars: int = 1 * MIB
    sample_size: int = 3
    max_value_chars: int = 100
    max_columns_listed: int = 1000

    name = "csv"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """CSV/TSV MIME type, or a ``.txt`` file with a sniffable delimiter."""
        if mime in CSV_MIMES:
            return True
        if path.suffix.lower() != ".txt":
            return False
        complete = len(head) < HEAD_SIZE
        text = decode_text_head(head, complete)
        return text is not None and sniff_delimiter(text, complete) is not None

    def extract(self, path: Path) -> dict[str, Any]:
        """Stream the records once; memory is bounded by ``max_line_chars``."""
        with path.open("rb") as raw:
            head = raw.read(HEAD_SIZE)
        complete = len(head) < HEAD_SIZE
        text = decode_text_head(head, complete)
        if head.startswith(UTF8_BOM):
            encoding = "utf-8-sig"
        elif text is not None or b"\x00" in head:
            encoding = "utf-8"
        else:
            # Not UTF-8: latin-1 decodes every byte, so counting still works.
            encoding = "latin-1"
        sniffed = sniff_delimiter(text, complete) if text is not None else None
        # A .tsv is tab-separated by definition, even when one column defeats the sniffer.
        delimiter = "\t" if path.suffix.lower() == ".tsv" else sniffed or ","
        details: dict[str, Any] = {
            "delimiter": delimiter,
            "encoding": encoding,
            "columns": [],
            "column_count": 0,
            "row_count": 0,
            "row_count_capped": False,
            "ragged_rows": 0,
            "sample_rows": [],
        }
        problems: list[str] = []
        with path.open(encoding=encoding, errors="replace", newline="") as f:
            reader = csv.reader(self._lines(f), delimiter=delimiter)
            try:
                self._scan(reader, details)
            except (csv.Error, _Malformed) as exc:
                problems.append(f"stopped at line {reader.line_num}: {exc}")
        if problems:
            raise ExtractionError(*problems, details=details)
        return details

    def _lines(self, f: TextIO) -> Iterator[str]:
        # csv.reader would otherwise pull a newline-free multi-GB "line" into memory.
        while line := f.readline(self.max_line_chars):
            if len(line) >= self.max_line_chars and not line.endswith(("\n", "\r")):
                raise _Malformed(f"line longer than {self.max_line_chars} characters")
            yield line

    def _row(self, row: list[str]) -> list[str]:
        limit = self.max_value_chars
        return [truncate(value, limit) for value in row[: self.max_columns_listed]]

    def _scan(self, reader: Iterable[list[str]], details: dict[str, Any]) -> None:
        header: list[str] | None = None
        rows = ragged = 0
        samples: list[list[str]] = []
        try:
            for row in reader:
                if not row:
                    continue
                if header is None:
                    header = row
                    details["columns"] = self._row(row)
                    details["column_count"] = len(row)
                    continue
                if rows >= self.max_rows:
                    details["row_count_capped"] = True
                    break
                rows += 1
                if len(row) != len(header):
                    ragged += 1
                if len(samples) < self.sample_size:
                    samples.append(self._row(row))
        finally:
            # Partial counts are still worth reporting when the scan stops early.
            details["row_count"] = rows
            details["ragged_rows"] = ragged
            details["sample_rows"] = samples


# --------------------------------------------------------------------------- JSON


class _JsonObject:
    """Stand-in for a parsed object, so nested objects do not stay in memory."""

    __slots__ = ("count", "keys")

    def __init__(self, pairs: list[tuple[str, Any]], max_keys: int) -> None:
        self.count = len(pairs)
        self.keys = [key for key, _ in pairs[:max_keys]]


def _json_type_name(value: Any) -> str:
    if isinstance(value, _JsonObject):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


_JSON_FIRST_BYTE_TYPES: Final[dict[int, str]] = {
    **{c: "number" for c in b"-0123456789"},
    ord("{"): "object",
    ord("["): "array",
    ord('"'): "string",
    ord("t"): "boolean",
    ord("f"): "boolean",
    ord("n"): "null",
}


def _json_peek_type(head: bytes) -> str | None:
    """The top-level type a JSON document starting with ``head`` would have."""
    body = head.removeprefix(UTF8_BOM).lstrip(JSON_WHITESPACE)
    return _JSON_FIRST_BYTE_TYPES.get(body[0]) if body else None


@dataclass(frozen=True)
class JsonExtractor:
    """JSON documents (``.json`` or JSON-looking text).

    Details: ``top_level_type`` (object, array, string, number, boolean, null), ``parsed``,
    for objects ``key_count`` and ``keys`` (the first ``max_keys``), for arrays ``length``.
    Files larger than ``max_bytes`` are not parsed: only the top-level type is reported,
    from the first non-blank byte.

    Attributes:
        max_bytes: Largest file that is parsed. Nested objects are replaced by small
            stand-ins while parsing, but peak memory is still a few times this size.
        max_keys: Top-level keys listed.
    """

    max_bytes: int = 64 * MIB
    max_keys: int = 100

    name = "json"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """JSON MIME type (``+json`` suffixes included)."""
        return mime == "application/json" or mime.endswith("+json")

    def extract(self, path: Path) -> dict[str, Any]:
        """Parse (up to ``max_bytes``) or peek at the first byte."""
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(HEAD_SIZE if size > self.max_bytes else self.max_bytes + 1)
        details: dict[str, Any] = {"top_level_type": _json_peek_type(data), "parsed": False}
        if size > self.max_bytes or len(data) > self.max_bytes:  # the latter: grew since fstat
            details["size_capped"] = True
            if details["top_level_type"] is None:
                raise ExtractionError("does not start like a JSON document", details=details)
            return details
        if not data.strip(JSON_WHITESPACE):
            raise ExtractionError("empty file is not JSON", details=details)
        try:
            value = json.loads(
                data, object_pairs_hook=lambda pairs: _JsonObject(pairs, self.max_keys)
            )
        except (ValueError, RecursionError) as exc:
            raise ExtractionError(f"invalid JSON: {truncate(str(exc))}", details=details) from None
        del data
        details["top_level_type"] = _json_type_name(value)
        details["parsed"] = True
        if isinstance(value, _JsonObject):
            details["key_count"] = value.count
            details["keys"] = [truncate(key) for key in value.keys]
        elif isinstance(value, list):
            details["length"] = len(value)
        return details
