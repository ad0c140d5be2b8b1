"""Metadata of rebuilt lab data files: generic facts plus pluggable, per-type details.

:func:`extract_metadata` reads a file twice:

1. **One streaming pass** over the whole file in 1 MiB blocks computes the SHA-256 (and,
   unless disabled, the MD5), the size, and keeps the first 64 KiB (the *head*). The MIME
   type is guessed from the file name with :mod:`mimetypes` and then refined from the head:
   PNG and TIFF signatures win over the name, and text of unknown or plain type is
   recognised as JSON or, through :class:`csv.Sniffer`, as CSV/TSV.
2. **One bounded pass** by the first extractor of :data:`EXTRACTORS` whose ``matches``
   accepts the file. Its result becomes :attr:`FileMetadata.details`.

Bad content never raises: an extractor that meets a malformed file raises
:class:`ExtractionError` (optionally carrying what it did read) or any other exception, and
the message becomes an entry of :attr:`FileMetadata.warnings`; the generic facts are always
returned. Only an unreadable path (missing, no permission, not a regular file) raises.

Built-in extractors, in priority order: :class:`PngExtractor`, :class:`TiffExtractor`,
:class:`JsonExtractor`, :class:`CsvExtractor`. Files nothing matches get generic facts only
(extractor ``"generic"``). Every built-in bounds its memory and work whatever the file size:
it seeks over pixel data, caps the rows, chunks, IFDs and tags it scans and truncates every
string it reports.

Plugging in an extractor
------------------------

An extractor is any object with ``name`` and ``version`` strings and the two methods of
:class:`Extractor`; ``extract`` returns a mapping of JSON-compatible values (anything else
is converted to a string, with a warning). Research code registers one at run time::

    from msi_prefect.metadata import register_extractor

    class ImzmlExtractor:
        name = "imzml"
        version = "1"

        def matches(self, path, head, mime):
            return path.suffix.lower() == ".imzml"

        def extract(self, path):
            return {"spectra": count_spectra(path)}

    register_extractor(ImzmlExtractor())           # first=True: ahead of the built-ins

An installed package can instead declare it in the entry point group
``msi_prefect.extractors``; the value is an extractor instance, an extractor class or a
zero-argument factory returning one::

    # pyproject.toml of the plugin package
    [project.entry-points."msi_prefect.extractors"]
    imzml = "my_lab.extractors:ImzmlExtractor"

Entry points are loaded once, on the first :func:`extract_metadata` or
:func:`register_extractor` call (or explicitly with :func:`load_entry_point_extractors`),
and placed ahead of the built-ins in entry point name order. A plugin that fails to load
is logged and skipped. An extractor registered under a name already in use replaces it.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import mimetypes
import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, TextIO, TypeAlias, runtime_checkable

logger = logging.getLogger(__name__)

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"

ENTRY_POINT_GROUP: Final = "msi_prefect.extractors"

KIB: Final = 1024
MIB: Final = 1024 * KIB
#: Block size of the hashing pass; the only large buffer, allocated once per call.
HASH_BLOCK_SIZE: Final = 1 * MIB
#: How much of the file's start ``matches`` sees and MIME refinement looks at.
HEAD_SIZE: Final = 64 * KIB
#: csv.Sniffer is quadratic on some inputs (30 s for 64 KiB of ``,"``); 4 KiB stays < 0.1 s.
SNIFF_SAMPLE_CHARS: Final = 4 * KIB
#: Longest string any built-in extractor reports (descriptions get more).
MAX_STRING_CHARS: Final = 200
MAX_WARNING_CHARS: Final = 500
OCTET_STREAM: Final = "application/octet-stream"

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# Byte-order mark + magic number -> (struct byte order, BigTIFF).
_TIFF_MAGICS: Final[dict[bytes, tuple[str, bool]]] = {
    b"II*\x00": ("<", False),
    b"MM\x00*": (">", False),
    b"II+\x00": ("<", True),
    b"MM\x00+": (">", True),
}
_CSV_MIMES: Final = frozenset({"text/csv", "text/tab-separated-values"})
_CSV_DELIMITERS: Final = ",\t;|"
# Consulted before mimetypes: the system's mime.types may be missing or disagree.
_MIME_BY_SUFFIX: Final[dict[str, str]] = {
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".json": "application/json",
    ".png": "image/png",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
# Extension-based types that content sniffing may replace with something more specific.
_VAGUE_MIMES: Final = frozenset({None, "text/plain", OCTET_STREAM})
_UTF8_BOM: Final = codecs.BOM_UTF8
_JSON_WHITESPACE: Final = b" \t\r\n"


class ExtractionError(Exception):
    """Malformed content met by an extractor.

    Args:
        *messages: One warning per problem found.
        details: What the extractor did manage to read; kept in the result.
    """

    def __init__(self, *messages: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__("; ".join(messages) or "malformed content")
        self.messages: tuple[str, ...] = messages or ("malformed content",)
        self.details: dict[str, Any] = dict(details or {})


class _Malformed(Exception):
    """Internal: a structural problem that stops the current parsing step."""


@runtime_checkable
class Extractor(Protocol):
    """A type-specific metadata extractor.

    Implementations may use plain class attributes for ``name`` and ``version``.
    """

    @property
    def name(self) -> str:
        """Short unique name, reported in :attr:`FileMetadata.extractor`."""
        ...

    @property
    def version(self) -> str:
        """Version of the extractor's output schema, bumped when ``details`` changes."""
        ...

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """Whether this extractor handles the file.

        Args:
            path: The file on disk (its name may be a staging name; prefer ``mime``).
            head: The first bytes of the file (up to :data:`HEAD_SIZE`).
            mime: The refined MIME type, guessed from the file's relative path and content.
        """
        ...

    def extract(self, path: Path) -> Mapping[str, Any]:
        """Type-specific details; raise :class:`ExtractionError` for malformed content."""
        ...


@dataclass(frozen=True)
class FileMetadata:
    """Everything known about one file.

    Attributes:
        relpath: The file's relative POSIX path (or its name).
        size: Size in bytes, as hashed.
        sha256: Hex SHA-256 of the content.
        md5: Hex MD5 of the content, or None when not computed.
        mime_type: MIME type from the name, refined by the content.
        modified_at: Modification time, ISO 8601 UTC (``...Z``).
        extracted_at: When extraction finished, ISO 8601 UTC.
        extractor: Name of the extractor that produced ``details`` (``"generic"`` if none).
        extractor_version: That extractor's version.
        details: Type-specific, JSON-compatible facts.
        warnings: Problems met; non-empty means ``details`` may be partial.
    """

    relpath: str
    size: int
    sha256: str
    md5: str | None
    mime_type: str
    modified_at: str
    extracted_at: str
    extractor: str
    extractor_version: str
    details: dict[str, JSONValue] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, JSONValue]:
        """A plain dict that :func:`json.dumps` accepts (details and warnings copied)."""
        return {
            "relpath": self.relpath,
            "size": self.size,
            "sha256": self.sha256,
            "md5": self.md5,
            "mime_type": self.mime_type,
            "modified_at": self.modified_at,
            "extracted_at": self.extracted_at,
            "extractor": self.extractor,
            "extractor_version": self.extractor_version,
            "details": json.loads(json.dumps(self.details)),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> FileMetadata:
        """Rebuild from :meth:`to_json_dict` output.

        Raises:
            KeyError: A required field is missing.
        """
        return cls(
            relpath=str(data["relpath"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            md5=None if data.get("md5") is None else str(data["md5"]),
            mime_type=str(data["mime_type"]),
            modified_at=str(data["modified_at"]),
            extracted_at=str(data["extracted_at"]),
            extractor=str(data["extractor"]),
            extractor_version=str(data["extractor_version"]),
            details=dict(data.get("details") or {}),
            warnings=[str(w) for w in data.get("warnings") or ()],
        )


# --------------------------------------------------------------------------- helpers


def _truncate(text: str, limit: int = MAX_STRING_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _named(names: Mapping[int, str], code: int | None) -> str | None:
    if code is None:
        return None
    return names.get(code, f"unknown({code})")


def _decode_text_head(head: bytes, complete: bool) -> str | None:
    """The head as UTF-8 text, or None if it looks binary (NUL bytes, invalid UTF-8)."""
    if b"\x00" in head:
        return None
    # An incremental decoder tolerates a multi-byte character cut at the head's end.
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(head, final=complete)
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff")


def _sniff_sample(text: str, complete: bool) -> str:
    sample = text[:SNIFF_SAMPLE_CHARS]
    if not complete or len(text) > SNIFF_SAMPLE_CHARS:
        # A cut-off last line would skew the sniffer's vote; drop it.
        cut = sample.rfind("\n")
        sample = sample[: cut + 1] if cut >= 0 else ""
    return sample


def sniff_delimiter(text: str, complete: bool = True) -> str | None:
    """The delimiter of delimited text, or None if it does not look like CSV/TSV.

    :class:`csv.Sniffer` proposes one of ``, TAB ; |`` from the first 4 KiB; it is accepted
    only if at least two non-blank lines all split into the same number (>= 2) of fields.

    Args:
        text: The start of the file, decoded.
        complete: Whether ``text`` is the whole file (otherwise its last line is ignored).
    """
    sample = _sniff_sample(text, complete)
    if not sample.strip():
        return None
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=_CSV_DELIMITERS).delimiter
    except csv.Error:
        return None
    try:
        rows = [row for row in csv.reader(io.StringIO(sample), delimiter=delimiter) if row]
    except csv.Error:
        return None
    widths = {len(row) for row in rows}
    if len(rows) >= 2 and len(widths) == 1 and widths.pop() >= 2:
        return delimiter
    return None


def _looks_like_json(head: bytes, complete: bool) -> bool:
    body = head.removeprefix(_UTF8_BOM).lstrip(_JSON_WHITESPACE)
    if not body.startswith((b"{", b"[")):
        return False
    if complete:
        try:
            json.loads(body)
        except (ValueError, RecursionError):
            return False
        return True
    # Only a prefix is known: require a plausible first token after the bracket.
    rest = body[1:].lstrip(_JSON_WHITESPACE)[:1]
    if body.startswith(b"{"):
        return rest in (b'"', b"}")
    return rest != b"" and rest in b'[{"-0123456789tfn]'


def detect_mime(name: str, head: bytes, complete: bool) -> str:
    """The MIME type of a file from its name and first bytes.

    Args:
        name: File name or relative path (only the suffix matters).
        head: The first bytes of the file.
        complete: Whether ``head`` is the whole file.

    Returns:
        ``image/png`` / ``image/tiff`` when the signature says so (TIFF-based formats with
        their own image type, e.g. DNG, keep it); for unknown or plain-text names, JSON or
        CSV/TSV if the content looks like it; otherwise the name-based type or
        ``application/octet-stream``.
    """
    suffix = os.path.splitext(name)[1].lower()
    by_name = _MIME_BY_SUFFIX.get(suffix) or mimetypes.guess_type(name, strict=False)[0]
    if head.startswith(PNG_SIGNATURE):
        return "image/png"
    if head[:4] in _TIFF_MAGICS and (
        by_name is None or not by_name.startswith("image/") or by_name == "image/png"
    ):
        return "image/tiff"
    if by_name in _VAGUE_MIMES:
        text = _decode_text_head(head, complete)
        if text is not None:
            if _looks_like_json(head, complete):
                return "application/json"
            delimiter = sniff_delimiter(text, complete)
            if delimiter is not None:
                return "text/tab-separated-values" if delimiter == "\t" else "text/csv"
    return by_name or OCTET_STREAM


def _read_at(f: BinaryIO, offset: int, size: int, file_size: int, what: str) -> bytes:
    if offset < 0 or offset + size > file_size:
        raise _Malformed(f"{what} at offset {offset} ({size} bytes) lies beyond end of file")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise _Malformed(f"file ended while reading {what} at offset {offset}")
    return data


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- generic


class GenericExtractor:
    """Fallback: generic facts only, no details."""

    name = "generic"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """Matches every file."""
        return True

    def extract(self, path: Path) -> dict[str, Any]:
        """No details."""
        return {}


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
        if mime in _CSV_MIMES:
            return True
        if path.suffix.lower() != ".txt":
            return False
        complete = len(head) < HEAD_SIZE
        text = _decode_text_head(head, complete)
        return text is not None and sniff_delimiter(text, complete) is not None

    def extract(self, path: Path) -> dict[str, Any]:
        """Stream the records once; memory is bounded by ``max_line_chars``."""
        with path.open("rb") as raw:
            head = raw.read(HEAD_SIZE)
        complete = len(head) < HEAD_SIZE
        text = _decode_text_head(head, complete)
        if head.startswith(_UTF8_BOM):
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
        return [_truncate(value, limit) for value in row[: self.max_columns_listed]]

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
    body = head.removeprefix(_UTF8_BOM).lstrip(_JSON_WHITESPACE)
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
        if not data.strip(_JSON_WHITESPACE):
            raise ExtractionError("empty file is not JSON", details=details)
        try:
            value = json.loads(
                data, object_pairs_hook=lambda pairs: _JsonObject(pairs, self.max_keys)
            )
        except (ValueError, RecursionError) as exc:
            raise ExtractionError(f"invalid JSON: {_truncate(str(exc))}", details=details) from None
        del data
        details["top_level_type"] = _json_type_name(value)
        details["parsed"] = True
        if isinstance(value, _JsonObject):
            details["key_count"] = value.count
            details["keys"] = [_truncate(key) for key in value.keys]
        elif isinstance(value, list):
            details["length"] = len(value)
        return details


# --------------------------------------------------------------------------- PNG

_PNG_COLOR_TYPES: Final[dict[int, str]] = {
    0: "grayscale",
    2: "rgb",
    3: "palette",
    4: "grayscale_alpha",
    6: "rgba",
}
_PNG_BIT_DEPTHS: Final[dict[int, tuple[int, ...]]] = {
    0: (1, 2, 4, 8, 16),
    2: (8, 16),
    3: (1, 2, 4, 8),
    4: (8, 16),
    6: (8, 16),
}
_PNG_INTERLACE: Final[dict[int, str]] = {0: "none", 1: "adam7"}
_PNG_TEXT_CHUNKS: Final = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_PNG_MAX_CHUNK_LENGTH: Final = 2**31 - 1


@dataclass(frozen=True)
class PngExtractor:
    """PNG images: header fields and text chunks, seeking over image data.

    Details: ``width``, ``height``, ``bit_depth``, ``color_type`` (grayscale, rgb, palette,
    grayscale_alpha, rgba), ``interlace`` (none, adam7), ``text_keys`` (keywords of the
    tEXt/zTXt/iTXt chunks, file order) and ``text`` (keyword -> value, truncated).
    ``chunks_capped`` is true if the chunk walk stopped at ``max_chunks``.

    Attributes:
        max_chunks: Chunks walked (each costs one seek and an 8-byte read).
        max_text_chunks: Text chunks read.
        max_text_chunk_bytes: Larger text chunks are listed by keyword only.
    """

    max_chunks: int = 100_000
    max_text_chunks: int = 50
    max_text_chunk_bytes: int = 1 * MIB

    name = "png"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """PNG signature or MIME type."""
        return head.startswith(PNG_SIGNATURE) or mime == "image/png"

    def extract(self, path: Path) -> dict[str, Any]:
        """Walk the chunks up to IEND."""
        details: dict[str, Any] = {}
        problems: list[str] = []
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise ExtractionError("not a PNG file (bad signature)")
            try:
                self._walk(f, size, details, problems)
            except _Malformed as exc:
                problems.append(str(exc))
        if problems:
            raise ExtractionError(*problems, details=details)
        return details

    def _walk(self, f: BinaryIO, size: int, details: dict[str, Any], problems: list[str]) -> None:
        text_keys: list[str] = []
        text: dict[str, str] = {}
        details["text_keys"] = text_keys
        details["text"] = text
        pos = len(PNG_SIGNATURE)
        chunks = 0
        while True:
            if chunks >= self.max_chunks:
                details["chunks_capped"] = True
                return
            if pos + 8 > size:
                raise _Malformed(f"truncated: file ends at offset {size} before the IEND chunk")
            length, ctype = struct.unpack(">I4s", _read_at(f, pos, 8, size, "chunk header"))
            label = ctype.decode("latin-1")
            if length > _PNG_MAX_CHUNK_LENGTH:
                raise _Malformed(f"{label!r} chunk at offset {pos} has invalid length {length}")
            end = pos + 12 + length
            if end > size:
                raise _Malformed(
                    f"truncated: {label!r} chunk at offset {pos} needs {length} bytes, "
                    f"file ends at {size}"
                )
            chunks += 1
            if chunks == 1 and ctype != b"IHDR":
                raise _Malformed(f"first chunk is {label!r}, not 'IHDR'")
            if ctype == b"IHDR":
                self._ihdr(self._chunk_data(f, pos, length, ctype, size, problems), details)
            elif ctype in _PNG_TEXT_CHUNKS and len(text_keys) < self.max_text_chunks:
                if length > self.max_text_chunk_bytes:
                    keyword = _read_at(f, pos + 8, 80, size, "text keyword").split(b"\0")[0]
                    text_keys.append(_truncate(keyword.decode("latin-1"), 80))
                else:
                    data = self._chunk_data(f, pos, length, ctype, size, problems)
                    self._text(ctype, data, text_keys, text, problems)
            elif ctype == b"IEND":
                return
            pos = end

    def _chunk_data(
        self, f: BinaryIO, pos: int, length: int, ctype: bytes, size: int, problems: list[str]
    ) -> bytes:
        data_crc = _read_at(f, pos + 8, length + 4, size, f"{ctype!r} chunk")
        data, (crc,) = data_crc[:length], struct.unpack(">I", data_crc[length:])
        if zlib.crc32(ctype + data) != crc:
            problems.append(f"CRC mismatch in {ctype.decode('latin-1')!r} chunk at offset {pos}")
        return data

    @staticmethod
    def _ihdr(data: bytes, details: dict[str, Any]) -> None:
        if len(data) != 13:
            raise _Malformed(f"IHDR chunk has {len(data)} bytes, expected 13")
        width, height, depth, color, _compression, _filter, interlace = struct.unpack(
            ">IIBBBBB", data
        )
        details.update(
            width=width,
            height=height,
            bit_depth=depth,
            color_type=_named(_PNG_COLOR_TYPES, color),
            interlace=_named(_PNG_INTERLACE, interlace),
        )
        if width == 0 or height == 0:
            raise _Malformed(f"invalid image size {width}x{height}")
        if depth not in _PNG_BIT_DEPTHS.get(color, ()):
            raise _Malformed(f"invalid bit depth {depth} for color type {color}")

    def _text(
        self,
        ctype: bytes,
        data: bytes,
        text_keys: list[str],
        text: dict[str, str],
        problems: list[str],
    ) -> None:
        keyword_raw, sep, rest = data.partition(b"\0")
        keyword = _truncate(keyword_raw.decode("latin-1"), 80)
        text_keys.append(keyword)
        if not sep:
            problems.append(f"{ctype.decode()} chunk {keyword!r} has no NUL separator")
            return
        try:
            if ctype == b"tEXt":
                value = rest.decode("latin-1")
            elif ctype == b"zTXt":
                value = self._inflate(rest[1:]).decode("latin-1")
            else:  # iTXt: flag, method, language\0, translated keyword\0, UTF-8 text
                compressed = rest[:1] == b"\x01"
                body = rest[2:].split(b"\0", 2)
                if len(body) != 3:
                    raise _Malformed("missing language or translated keyword")
                raw = self._inflate(body[2]) if compressed else body[2][: 4 * MAX_STRING_CHARS]
                value = raw.decode("utf-8", errors="replace")
        except (_Malformed, zlib.error) as exc:
            problems.append(f"{ctype.decode()} chunk {keyword!r}: {exc}")
            return
        text.setdefault(keyword, _truncate(value))

    @staticmethod
    def _inflate(data: bytes) -> bytes:
        # max_length bounds the output, so a zip bomb costs nothing.
        return zlib.decompressobj().decompress(data, 4 * MAX_STRING_CHARS)


# --------------------------------------------------------------------------- TIFF

# Field type -> (struct code per value, bytes per value). RATIONALs are two 32-bit ints.
_TIFF_TYPES: Final[dict[int, tuple[str, int]]] = {
    1: ("B", 1),
    2: ("B", 1),
    3: ("H", 2),
    4: ("I", 4),
    5: ("I", 8),
    6: ("b", 1),
    7: ("B", 1),
    8: ("h", 2),
    9: ("i", 4),
    10: ("i", 8),
    11: ("f", 4),
    12: ("d", 8),
    13: ("I", 4),
    16: ("Q", 8),
    17: ("q", 8),
    18: ("Q", 8),
}
_TIFF_INTEGER_TYPES: Final = frozenset({1, 3, 4, 6, 8, 9, 13, 16, 17, 18})
_TIFF_RATIONAL_TYPES: Final = frozenset({5, 10})
_TIFF_COMPRESSION: Final[dict[int, str]] = {
    1: "none",
    2: "ccitt_rle",
    3: "ccitt_group3",
    4: "ccitt_group4",
    5: "lzw",
    6: "ojpeg",
    7: "jpeg",
    8: "adobe_deflate",
    32773: "packbits",
    32946: "deflate",
    33003: "jpeg2000_aperio",
    33005: "jpeg2000_aperio",
    34712: "jpeg2000",
    34887: "lerc",
    34892: "lossy_jpeg",
    34925: "lzma",
    50000: "zstd",
    50001: "webp",
    52546: "jpegxl",
}
_TIFF_PHOTOMETRIC: Final[dict[int, str]] = {
    0: "min_is_white",
    1: "min_is_black",
    2: "rgb",
    3: "palette",
    4: "mask",
    5: "separated",
    6: "ycbcr",
    8: "cielab",
    9: "icclab",
    10: "itulab",
    32803: "cfa",
    32844: "logl",
    32845: "logluv",
    34892: "linear_raw",
}
_TIFF_SAMPLE_FORMATS: Final[dict[int, str]] = {
    1: "uint",
    2: "int",
    3: "float",
    4: "void",
    5: "complexint",
    6: "complex",
}
_TIFF_PLANAR: Final[dict[int, str]] = {1: "contig", 2: "separate"}
_TIFF_RESOLUTION_UNITS: Final[dict[int, str]] = {1: "none", 2: "inch", 3: "centimeter"}
# Reported string tags: tag -> (name, max characters).
_TIFF_STRING_TAGS: Final[dict[int, tuple[str, int]]] = {
    270: ("ImageDescription", 1000),
    271: ("Make", MAX_STRING_CHARS),
    272: ("Model", MAX_STRING_CHARS),
    305: ("Software", MAX_STRING_CHARS),
    306: ("DateTime", MAX_STRING_CHARS),
}
_TIFF_RESOLUTION_TAGS: Final[dict[int, str]] = {282: "XResolution", 283: "YResolution"}


@dataclass(frozen=True)
class _IfdEntry:
    tag: int
    type: int
    count: int
    value: bytes  # the raw value/offset field: 4 bytes (classic) or 8 (BigTIFF)


@dataclass(frozen=True)
class _TiffReader:
    """Bounds-checked access to IFDs and tag values of one open TIFF."""

    f: BinaryIO
    size: int
    order: str  # struct byte order: "<" or ">"
    big: bool
    max_tags: int

    def unpack(self, fmt: str, data: bytes) -> tuple[Any, ...]:
        return struct.unpack(self.order + fmt, data)

    def first_ifd(self, header: bytes) -> int:
        if not self.big:
            return int(self.unpack("I", header[4:8])[0])
        if len(header) < 16:
            raise _Malformed("truncated BigTIFF header")
        offset_size, zero, first = self.unpack("HHQ", header[4:16])
        if offset_size != 8 or zero != 0:
            raise _Malformed(f"invalid BigTIFF header (offset size {offset_size})")
        return int(first)

    @property
    def _layout(self) -> tuple[str, int, str]:
        """(entry count format, entry size, next-offset format)."""
        return ("Q", 20, "Q") if self.big else ("H", 12, "I")

    def _count(self, offset: int) -> int:
        count_fmt, entry_size, next_fmt = self._layout
        raw = _read_at(self.f, offset, struct.calcsize(count_fmt), self.size, "IFD")
        (count,) = self.unpack(count_fmt, raw)
        end = offset + len(raw) + count * entry_size + struct.calcsize(next_fmt)
        if count == 0 or end > self.size:
            raise _Malformed(f"IFD at offset {offset} is corrupt ({count} entries)")
        return int(count)

    def entries(self, offset: int) -> tuple[list[_IfdEntry], bool]:
        """The first ``max_tags`` entries of an IFD and whether there were more."""
        count_fmt, entry_size, _ = self._layout
        count = self._count(offset)
        read = min(count, self.max_tags)
        start = offset + struct.calcsize(count_fmt)
        raw = _read_at(self.f, start, read * entry_size, self.size, "IFD entries")
        fmt = self.order + ("HHQ8s" if self.big else "HHI4s")
        entries = [_IfdEntry(*fields) for fields in struct.iter_unpack(fmt, raw)]
        return entries, count > read

    def next_ifd(self, offset: int) -> int:
        count_fmt, entry_size, next_fmt = self._layout
        count = self._count(offset)
        pos = offset + struct.calcsize(count_fmt) + count * entry_size
        raw = _read_at(self.f, pos, struct.calcsize(next_fmt), self.size, "next IFD offset")
        return int(self.unpack(next_fmt, raw)[0])

    def _value_bytes(self, entry: _IfdEntry, item_size: int, count: int) -> bytes:
        if entry.count * item_size <= len(entry.value):
            return entry.value[: count * item_size]
        (offset,) = self.unpack("Q" if self.big else "I", entry.value)
        return _read_at(self.f, int(offset), count * item_size, self.size, f"tag {entry.tag}")

    def numbers(self, entry: _IfdEntry, max_count: int = 1024) -> list[float]:
        """Numeric values of a tag (at most ``max_count``); rationals as floats."""
        if entry.type not in _TIFF_TYPES or entry.type == 2:
            raise _Malformed(f"tag {entry.tag} has non-numeric type {entry.type}")
        code, item_size = _TIFF_TYPES[entry.type]
        count = min(entry.count, max_count)
        data = self._value_bytes(entry, item_size, count)
        if entry.type in _TIFF_RATIONAL_TYPES:
            pairs = self.unpack(f"{2 * count}{code}", data)
            return [
                num / den if den else math.nan
                for num, den in zip(pairs[::2], pairs[1::2], strict=True)
            ]
        return list(self.unpack(f"{count}{code}", data))

    def integers(self, entry: _IfdEntry, max_count: int = 1024) -> list[int]:
        if entry.type not in _TIFF_INTEGER_TYPES:
            raise _Malformed(f"tag {entry.tag} has non-integer type {entry.type}")
        return [int(v) for v in self.numbers(entry, max_count)]

    def string(self, entry: _IfdEntry, max_chars: int) -> str:
        if entry.type not in (1, 2, 7):
            raise _Malformed(f"tag {entry.tag} has non-text type {entry.type}")
        # UTF-8 may need 4 bytes a character; the +1 tells whether anything was cut.
        data = self._value_bytes(entry, 1, min(entry.count, 4 * max_chars + 1))
        value = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        return _truncate(value, max_chars)


def _tiff_dtype(bits: list[int], formats: list[int]) -> str | None:
    """numpy-style dtype name (uint16, float32, complex64, ...) when all samples agree."""
    if len(set(bits)) != 1 or len(set(formats)) != 1:
        return None
    kind = _TIFF_SAMPLE_FORMATS.get(formats[0])
    return f"{kind}{bits[0]}" if kind else None


def _one_or_list(values: list[Any]) -> Any:
    return values[0] if len(set(values)) == 1 else values


@dataclass(frozen=True)
class TiffExtractor:
    """TIFF and BigTIFF images (either byte order), described from the first IFD.

    Details: ``byte_order`` (little, big), ``bigtiff``, ``page_count`` (IFDs in the main
    chain, capped; SubIFDs not counted), ``page_count_capped``, ``width``, ``height``,
    ``bits_per_sample``, ``samples_per_pixel``, ``sample_format`` (uint, int, float, ...),
    ``dtype`` (e.g. uint16, float32; None if samples differ), ``compression`` and
    ``photometric`` (named; ``unknown(N)`` otherwise), ``planar_configuration``, ``tiled``,
    ``flavor`` (``ome``, ``imagej`` or None, from the description) and ``tags``
    (ImageDescription, Make, Model, Software, DateTime, XResolution, YResolution,
    ResolutionUnit; only those present). Per-sample fields are a single value when all
    samples agree, else a list.

    Attributes:
        max_pages: IFDs counted before giving up (``page_count_capped``).
        max_tags: IFD entries read from the first IFD.
    """

    max_pages: int = 10_000
    max_tags: int = 4096

    name = "tiff"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """TIFF signature (TIFF-based raw formats included) or MIME type."""
        return head[:4] in _TIFF_MAGICS or mime == "image/tiff"

    def extract(self, path: Path) -> dict[str, Any]:
        """Read the header, the first IFD, then walk the IFD chain."""
        details: dict[str, Any] = {}
        problems: list[str] = []
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = f.read(16)
            kind = _TIFF_MAGICS.get(header[:4])
            if kind is None or len(header) < 8:
                raise ExtractionError("not a TIFF file (bad byte order mark or magic number)")
            order, big = kind
            details["byte_order"] = "little" if order == "<" else "big"
            details["bigtiff"] = big
            reader = _TiffReader(f, size, order, big, self.max_tags)
            try:
                first = reader.first_ifd(header)
                if first < 8:
                    raise _Malformed(f"first IFD offset {first} points into the header")
                self._describe(reader, first, details, problems)
                self._count_pages(reader, first, details, problems)
            except _Malformed as exc:
                problems.append(str(exc))
        if problems:
            raise ExtractionError(*problems, details=details)
        return details

    def _describe(
        self, reader: _TiffReader, offset: int, details: dict[str, Any], problems: list[str]
    ) -> None:
        entries, more = reader.entries(offset)
        if more:
            problems.append(f"first IFD has more than {self.max_tags} entries; rest ignored")
        by_tag: dict[int, _IfdEntry] = {}
        for entry in entries:
            by_tag.setdefault(entry.tag, entry)

        def ints(tag: int, default: list[int]) -> list[int]:
            entry = by_tag.get(tag)
            if entry is None:
                return default
            try:
                return reader.integers(entry) or default
            except _Malformed as exc:
                problems.append(str(exc))
                return default

        width, height = ints(256, [0])[0] or None, ints(257, [0])[0] or None
        samples = ints(277, [1])[0]
        bits = ints(258, [1])
        formats = ints(339, [1])
        # Writers often store one value for all samples; samples itself may be hostile.
        listed = max(1, min(samples, 1024))
        bits = bits * listed if len(bits) == 1 else bits
        formats = formats * listed if len(formats) == 1 else formats
        photometric = by_tag.get(262)
        details.update(
            width=width,
            height=height,
            bits_per_sample=_one_or_list(bits),
            samples_per_pixel=samples,
            sample_format=_one_or_list([_named(_TIFF_SAMPLE_FORMATS, code) for code in formats]),
            dtype=_tiff_dtype(bits, formats),
            compression=_named(_TIFF_COMPRESSION, ints(259, [1])[0]),
            photometric=_named(_TIFF_PHOTOMETRIC, ints(262, [0])[0]) if photometric else None,
            planar_configuration=_named(_TIFF_PLANAR, ints(284, [1])[0]),
            tiled=322 in by_tag,
        )
        if width is None or height is None:
            problems.append("first IFD lacks ImageWidth or ImageLength")
        details["tags"] = tags = self._tags(reader, by_tag, problems)
        description = str(tags.get("ImageDescription", ""))
        if description.startswith("ImageJ="):
            details["flavor"] = "imagej"
        elif "<OME" in description:
            details["flavor"] = "ome"
        else:
            details["flavor"] = None

    @staticmethod
    def _tags(
        reader: _TiffReader, by_tag: dict[int, _IfdEntry], problems: list[str]
    ) -> dict[str, Any]:
        tags: dict[str, Any] = {}
        for tag, (label, max_chars) in _TIFF_STRING_TAGS.items():
            if tag in by_tag:
                try:
                    tags[label] = reader.string(by_tag[tag], max_chars)
                except _Malformed as exc:
                    problems.append(str(exc))
        for tag, label in _TIFF_RESOLUTION_TAGS.items():
            if tag in by_tag:
                try:
                    values = reader.numbers(by_tag[tag], 1)
                    tags[label] = values[0] if values else None
                except _Malformed as exc:
                    problems.append(str(exc))
        if 296 in by_tag:
            try:
                unit = reader.integers(by_tag[296], 1)
                tags["ResolutionUnit"] = _named(_TIFF_RESOLUTION_UNITS, unit[0]) if unit else None
            except _Malformed as exc:
                problems.append(str(exc))
        return tags

    def _count_pages(
        self, reader: _TiffReader, first: int, details: dict[str, Any], problems: list[str]
    ) -> None:
        pages = 0
        seen: set[int] = set()
        offset = first
        details["page_count_capped"] = False
        while offset:
            if pages >= self.max_pages:
                details["page_count_capped"] = True
                break
            if offset in seen:
                problems.append(f"IFD chain loops back to offset {offset}")
                break
            seen.add(offset)
            try:
                offset = reader.next_ifd(offset)
            except _Malformed as exc:
                problems.append(f"page {pages + 1}: {exc}")
                break
            pages += 1
        details["page_count"] = pages


# --------------------------------------------------------------------------- registry

GENERIC_EXTRACTOR: Final = GenericExtractor()
#: Extractors in priority order; the first whose ``matches`` is true wins. Mutate it through
#: :func:`register_extractor` / :func:`unregister_extractor`.
EXTRACTORS: list[Extractor] = [PngExtractor(), TiffExtractor(), JsonExtractor(), CsvExtractor()]
_REGISTRY_LOCK = threading.RLock()
_entry_points_loaded = False


def _check_extractor(obj: object) -> Extractor:
    if not isinstance(obj, Extractor) or not isinstance(getattr(obj, "name", None), str):
        raise TypeError(f"{obj!r} is not an extractor (needs name, version, matches, extract)")
    return obj


def _insert(extractor: Extractor, first: bool) -> None:
    with _REGISTRY_LOCK:
        EXTRACTORS[:] = [e for e in EXTRACTORS if e.name != extractor.name]
        EXTRACTORS.insert(0 if first else len(EXTRACTORS), extractor)


def register_extractor(extractor: Extractor, first: bool = True) -> Extractor:
    """Add an extractor to :data:`EXTRACTORS`, replacing one of the same name.

    Entry point plugins are loaded first, so an explicit registration with ``first=True``
    takes priority over them too.

    Args:
        extractor: Object following the :class:`Extractor` protocol.
        first: Put it ahead of all others (default) rather than last.

    Returns:
        The extractor, unchanged.

    Raises:
        TypeError: ``extractor`` lacks part of the protocol.
    """
    _check_extractor(extractor)
    _ensure_entry_points_loaded()
    _insert(extractor, first)
    return extractor


def unregister_extractor(name: str) -> bool:
    """Remove the extractor called ``name``; returns whether one was registered."""
    with _REGISTRY_LOCK:
        before = len(EXTRACTORS)
        EXTRACTORS[:] = [e for e in EXTRACTORS if e.name != name]
        return len(EXTRACTORS) != before


def load_entry_point_extractors(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Register the extractors installed packages declare in an entry point group.

    Each entry point may name an extractor instance, an extractor class or a zero-argument
    factory. They go ahead of everything registered so far, in entry point name order.
    Failures are logged and skipped.

    Returns:
        Names of the extractors registered.
    """
    loaded: list[Extractor] = []
    for ep in sorted(entry_points(group=group), key=lambda ep: ep.name):
        try:
            obj = ep.load()
            if isinstance(obj, type) or not isinstance(obj, Extractor):
                obj = obj()  # a class or factory
            loaded.append(_check_extractor(obj))
        except Exception:
            logger.warning("Skipping metadata extractor plugin %r", ep.value, exc_info=True)
    for extractor in reversed(loaded):
        _insert(extractor, first=True)
    return [e.name for e in loaded]


def _ensure_entry_points_loaded() -> None:
    global _entry_points_loaded
    with _REGISTRY_LOCK:
        if _entry_points_loaded:
            return
        # Set first: a plugin's import may itself call register_extractor.
        _entry_points_loaded = True
        load_entry_point_extractors()


# --------------------------------------------------------------------------- extraction


def _jsonable(value: Any, notes: set[str], depth: int = 0) -> JSONValue:
    """Coerce a plugin's output into JSON types (non-finite floats become None)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return str(value)
    if depth < 32 and isinstance(value, Mapping):
        return {str(k): _jsonable(v, notes, depth + 1) for k, v in value.items()}
    if depth < 32 and isinstance(value, (list, tuple)):
        return [_jsonable(v, notes, depth + 1) for v in value]
    notes.add(type(value).__name__)
    return _truncate(str(value), 1000)


def _hash_pass(path: Path, md5: bool) -> tuple[os.stat_result, int, str, str | None, bytes]:
    sha = hashlib.sha256()
    md = hashlib.md5(usedforsecurity=False) if md5 else None
    buffer = bytearray(HASH_BLOCK_SIZE)
    view = memoryview(buffer)
    head = bytearray()
    total = 0
    with path.open("rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        # readinto a reused buffer: no allocation per block, however large the file.
        while n := f.readinto(buffer):
            block = view[:n]
            sha.update(block)
            if md is not None:
                md.update(block)
            if len(head) < HEAD_SIZE:
                head += block[: HEAD_SIZE - len(head)]
            total += n
    return st, total, sha.hexdigest(), md.hexdigest() if md else None, bytes(head)


def _head_pass(path: Path) -> tuple[os.stat_result, bytes]:
    """The file's status and its first :data:`HEAD_SIZE` bytes (no hashing)."""
    with path.open("rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        head = bytearray()
        while len(head) < HEAD_SIZE and (block := f.read(HEAD_SIZE - len(head))):
            head += block
    return st, bytes(head)


def _select(
    candidates: Sequence[Extractor], path: Path, head: bytes, mime: str, warnings: list[str]
) -> Extractor:
    for extractor in candidates:
        try:
            if extractor.matches(path, head, mime):
                return extractor
        except Exception as exc:
            warnings.append(_truncate(f"{extractor.name}: matches() failed: {exc!r}", 500))
    return GENERIC_EXTRACTOR


def extract_metadata(
    path: Path | str,
    relpath: str | None = None,
    *,
    compute_md5: bool = True,
    extractors: Sequence[Extractor] | None = None,
    known_sha256: str | None = None,
) -> FileMetadata:
    """Generic facts and type-specific details of one file.

    Args:
        path: The file to describe.
        relpath: Its relative POSIX path, reported and used to guess the MIME type (the file
            on disk may have a staging name). Defaults to the file name.
        compute_md5: Also compute the MD5 in the hashing pass.
        extractors: Candidates in priority order; defaults to :data:`EXTRACTORS` (entry
            point plugins loaded on first use).
        known_sha256: The content's SHA-256 as already verified by the caller (e.g. the
            rebuilt file's, checked by the reassembler): no hashing pass, only the head of
            the file is read, and ``md5`` is None.

    Returns:
        The metadata; problems with the content are in its ``warnings``.

    Raises:
        OSError: The file cannot be opened or read.
        ValueError: ``path`` is not a regular file (a FIFO would block the read).
    """
    path = Path(path)
    if not stat.S_ISREG(path.stat().st_mode):
        raise ValueError(f"not a regular file: {path}")
    warnings: list[str] = []
    if known_sha256 is None:
        st, size, sha256, md5, head = _hash_pass(path, compute_md5)
    else:
        st, head = _head_pass(path)
        size, sha256, md5 = st.st_size, known_sha256, None
    if size != st.st_size:
        warnings.append(f"file size changed while hashing ({st.st_size} -> {size} bytes)")
    name = relpath if relpath is not None else path.name
    mime = detect_mime(name, head, complete=len(head) == size)

    if extractors is None:
        _ensure_entry_points_loaded()
        with _REGISTRY_LOCK:
            extractors = tuple(EXTRACTORS)
    extractor = _select(extractors, path, head, mime, warnings)
    raw: Mapping[str, Any]
    try:
        raw = extractor.extract(path)
    except ExtractionError as exc:
        raw = exc.details
        warnings.extend(
            _truncate(f"{extractor.name}: {m}", MAX_WARNING_CHARS) for m in exc.messages
        )
    except Exception as exc:
        # A plugin bug or an I/O error must not cost the generic facts.
        raw = {}
        warnings.append(_truncate(f"{extractor.name}: failed: {exc!r}", MAX_WARNING_CHARS))
    notes: set[str] = set()
    details: dict[str, JSONValue] = {}
    if isinstance(raw, Mapping):
        details = {str(k): _jsonable(v, notes) for k, v in raw.items()}
    else:
        warnings.append(f"{extractor.name}: extract() returned {type(raw).__name__}, not a dict")
    if notes:
        warnings.append(f"{extractor.name}: converted to strings: {', '.join(sorted(notes))}")
    for warning in warnings:
        logger.debug("metadata of %s: %s", name, warning)
    return FileMetadata(
        relpath=name,
        size=size,
        sha256=sha256,
        md5=md5,
        mime_type=mime,
        modified_at=_iso_utc(datetime.fromtimestamp(st.st_mtime, UTC)),
        extracted_at=_iso_utc(datetime.now(UTC)),
        extractor=extractor.name,
        extractor_version=extractor.version,
        details=details,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- markdown

# Values come from the files themselves: keep them from forming links, HTML or table cells.
_MARKDOWN_ESCAPES: Final = str.maketrans(
    {
        "\\": "\\\\",
        "|": "\\|",
        "`": "\\`",
        "*": "\\*",
        "_": "\\_",
        "[": "\\[",
        "]": "\\]",
        "#": "\\#",
        "<": "&lt;",
        ">": "&gt;",
        "&": "&amp;",
        "\n": " ",
        "\r": " ",
    }
)


def _md(value: JSONValue, limit: int = MAX_STRING_CHARS) -> str:
    if isinstance(value, str) and value.isprintable():
        text = value
    else:
        # json shows control characters (a TAB delimiter) and nested values unambiguously.
        text = json.dumps(value, ensure_ascii=False)
    return _truncate(text, limit).translate(_MARKDOWN_ESCAPES)


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    amount = float(size)
    unit = "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):  # noqa: B007 -- the unit reached is used below
        amount /= 1024
        if amount < 1024:
            break
    return f"{amount:.1f} {unit}"


def _flatten(details: Mapping[str, JSONValue], prefix: str = "") -> Iterator[tuple[str, JSONValue]]:
    for key, value in details.items():
        if isinstance(value, dict) and value and not prefix:
            yield from _flatten(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def metadata_markdown(meta: FileMetadata, max_detail_rows: int = 60) -> str:
    """A markdown summary (two tables and any warnings), e.g. for a Prefect artifact.

    Args:
        meta: The metadata to show.
        max_detail_rows: Detail rows shown; nested dicts are flattened one level.
    """
    lines = [
        f"### {_md(meta.relpath)}",
        "",
        "| Field | Value |",
        "| --- | --- |",
        f"| Size | {_human_size(meta.size)} ({meta.size:,} bytes) |",
        f"| MIME type | {_md(meta.mime_type)} |",
        f"| SHA-256 | `{meta.sha256}` |",
        f"| MD5 | {f'`{meta.md5}`' if meta.md5 else '-'} |",
        f"| Modified | {_md(meta.modified_at)} |",
        f"| Extracted | {_md(meta.extracted_at)} |",
        f"| Extractor | {_md(meta.extractor)} {_md(meta.extractor_version)} |",
    ]
    rows = list(_flatten(meta.details))
    if rows:
        lines += ["", "| Detail | Value |", "| --- | --- |"]
        lines += [f"| {_md(key)} | {_md(value)} |" for key, value in rows[:max_detail_rows]]
        if len(rows) > max_detail_rows:
            lines.append(f"| … | {len(rows) - max_detail_rows} more |")
    if meta.warnings:
        lines += ["", "**Warnings**", ""]
        lines += [f"- {_md(w, MAX_WARNING_CHARS)}" for w in meta.warnings[:20]]
        if len(meta.warnings) > 20:
            lines.append(f"- … {len(meta.warnings) - 20} more")
    return "\n".join(lines) + "\n"


__all__ = [
    "ENTRY_POINT_GROUP",
    "EXTRACTORS",
    "GENERIC_EXTRACTOR",
    "CsvExtractor",
    "ExtractionError",
    "Extractor",
    "FileMetadata",
    "GenericExtractor",
    "JSONValue",
    "JsonExtractor",
    "PngExtractor",
    "TiffExtractor",
    "detect_mime",
    "extract_metadata",
    "load_entry_point_extractors",
    "metadata_markdown",
    "register_extractor",
    "sniff_delimiter",
    "unregister_extractor",
]
