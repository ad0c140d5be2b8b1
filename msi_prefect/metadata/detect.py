"""What kind of file this is, from its name and first bytes (no extractor library needed).

The MIME type is guessed from the file name with :mod:`mimetypes` and then refined from the
head: PNG, TIFF and HDF5 signatures win over the name, and text of unknown or plain type is
recognised as JSON or, through :class:`csv.Sniffer`, as CSV/TSV. The extractors' ``matches``
use the same helpers, so choosing an extractor costs no library import.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import mimetypes
import os
from typing import Final

from msi_prefect.metadata.model import KIB, OCTET_STREAM

#: csv.Sniffer is quadratic on some inputs (30 s for 64 KiB of ``,"``); 4 KiB stays < 0.1 s.
SNIFF_SAMPLE_CHARS: Final = 4 * KIB
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
HDF5_SIGNATURE: Final = b"\x89HDF\r\n\x1a\n"
#: HDF5 may put a user block before its superblock, at 0, 512, 1024, 2048 … bytes.
HDF5_FIRST_SUPERBLOCK_OFFSET: Final = 512
HDF5_MIME: Final = "application/x-hdf5"
TIFF_MAGICS: Final = frozenset({b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"})
CSV_MIMES: Final = frozenset({"text/csv", "text/tab-separated-values"})
_CSV_DELIMITERS: Final = ",\t;|"
# Consulted before mimetypes: the system's mime.types may be missing or disagree.
_MIME_BY_SUFFIX: Final[dict[str, str]] = {
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".json": "application/json",
    ".png": "image/png",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".h5": HDF5_MIME,
    ".hdf5": HDF5_MIME,
    ".nxs": HDF5_MIME,
    # The system's mime.types knows these suffixes as something else entirely (a Java
    # serialisation, a MARC record); microscope files say nothing more than octet-stream.
    ".ser": OCTET_STREAM,
    ".mrc": OCTET_STREAM,
}
# Extension-based types that content sniffing may replace with something more specific.
_VAGUE_MIMES: Final = frozenset({None, "text/plain", OCTET_STREAM})
UTF8_BOM: Final = codecs.BOM_UTF8
JSON_WHITESPACE: Final = b" \t\r\n"


def is_hdf5(head: bytes) -> bool:
    """Whether ``head`` holds an HDF5 superblock signature (at 0 or a power-of-two offset)."""
    if head.startswith(HDF5_SIGNATURE):
        return True
    offset = HDF5_FIRST_SUPERBLOCK_OFFSET
    while offset + len(HDF5_SIGNATURE) <= len(head):
        if head[offset : offset + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE:
            return True
        offset *= 2
    return False


def decode_text_head(head: bytes, complete: bool) -> str | None:
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
    body = head.removeprefix(UTF8_BOM).lstrip(JSON_WHITESPACE)
    if not body.startswith((b"{", b"[")):
        return False
    if complete:
        try:
            json.loads(body)
        except (ValueError, RecursionError):
            return False
        return True
    # Only a prefix is known: require a plausible first token after the bracket.
    rest = body[1:].lstrip(JSON_WHITESPACE)[:1]
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
        the PNG, TIFF or HDF5 type when the signature says so (TIFF-based formats with
        their own image type, e.g. DNG, keep it); for unknown or plain-text names, JSON or
        CSV/TSV if the content looks like it; otherwise the name-based type or
        ``application/octet-stream``.
    """
    suffix = os.path.splitext(name)[1].lower()
    by_name = _MIME_BY_SUFFIX.get(suffix) or mimetypes.guess_type(name, strict=False)[0]
    if head.startswith(PNG_SIGNATURE):
        return "image/png"
    if is_hdf5(head):
        return HDF5_MIME
    if head[:4] in TIFF_MAGICS and (
        by_name is None or not by_name.startswith("image/") or by_name == "image/png"
    ):
        return "image/tiff"
    if by_name in _VAGUE_MIMES:
        text = decode_text_head(head, complete)
        if text is not None:
            if _looks_like_json(head, complete):
                return "application/json"
            delimiter = sniff_delimiter(text, complete)
            if delimiter is not None:
                return "text/tab-separated-values" if delimiter == "\t" else "text/csv"
    return by_name or OCTET_STREAM
