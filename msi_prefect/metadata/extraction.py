"""Metadata of one file: generic facts plus what the file's format says, never an exception.

:func:`extract_metadata` reads a file twice:

1. **One streaming pass** over the whole file in 1 MiB blocks computes the SHA-256 (and,
   if asked, the MD5), the size, and keeps the first 64 KiB (the *head*), from which and
   the name :func:`~msi_prefect.metadata.detect.detect_mime` tells the type. A caller that
   already holds a verified SHA-256 (the ``extract-metadata`` flow, for a rebuilt file
   shown unchanged since the reassembler verified it) passes ``known_sha256``: then only
   the head is read.
2. **One bounded pass** by the first extractor of
   :data:`~msi_prefect.metadata.registry.EXTRACTORS` whose ``matches`` accepts the file.
   It reads headers only (tifffile's IFDs, RosettaSciIO with ``lazy=True``, h5py's
   metadata, Pillow's header); never the pixel data. Its
   :class:`~msi_prefect.metadata.model.Extraction` becomes
   :attr:`FileMetadata.normalized` and :attr:`FileMetadata.details`, the latter made
   JSON-safe and bounded by :func:`~msi_prefect.metadata.bounded.bounded_json`.

Bad content never raises: an extractor that meets a malformed file raises
:class:`ExtractionError` (optionally carrying what it did read) or any other exception,
and the message becomes an entry of :attr:`FileMetadata.warnings`; the generic facts are
always returned. Only an unreadable path (missing, no permission, not a regular file)
raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from msi_prefect.metadata import registry
from msi_prefect.metadata.bounded import bounded_json
from msi_prefect.metadata.detect import detect_mime
from msi_prefect.metadata.model import (
    HEAD_SIZE,
    MAX_WARNING_CHARS,
    MIB,
    Extraction,
    ExtractionError,
    Extractor,
    FileMetadata,
    JSONValue,
    NormalizedMetadata,
    truncate,
)

logger = logging.getLogger(__name__)

#: Block size of the hashing pass; the only large buffer, allocated once per call.
HASH_BLOCK_SIZE: Final = 1 * MIB
#: Loggers of the format libraries: what they log while reading a file (a tag skipped, a
#: block that does not parse) is what could not be read, so it becomes a warning.
LIBRARY_LOGGERS: Final = ("tifffile", "rsciio", "h5py", "PIL")
#: Library log records kept per file.
MAX_LIBRARY_NOTES: Final = 20


class _LibraryNotes(logging.Handler):
    """Collects the format libraries' warnings logged by one thread (one extraction)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.thread = threading.get_ident()
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Other threads may be extracting other files at the same time.
        if record.thread == self.thread and len(self.notes) < MAX_LIBRARY_NOTES:
            library = record.name.split(".", 1)[0]
            self.notes.append(f"{library}: {record.getMessage()}")


@contextlib.contextmanager
def _library_notes() -> Iterator[list[str]]:
    handler = _LibraryNotes()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for library_logger in loggers:
        library_logger.addHandler(handler)
    try:
        yield handler.notes
    finally:
        for library_logger in loggers:
            library_logger.removeHandler(handler)


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


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
            warnings.append(truncate(f"{extractor.name}: matches() failed: {exc!r}", 500))
    return registry.GENERIC_EXTRACTOR


def extract_metadata(
    path: Path | str,
    relpath: str | None = None,
    *,
    compute_md5: bool = False,
    extractors: Sequence[Extractor] | None = None,
    known_sha256: str | None = None,
) -> FileMetadata:
    """Generic facts and type-specific details of one file.

    Args:
        path: The file to describe.
        relpath: Its relative POSIX path, reported and used to guess the MIME type (the file
            on disk may have a staging name). Defaults to the file name.
        compute_md5: Also compute the MD5 in the hashing pass. Off by default: nothing
            in msi_prefect uses it (the SHA-256 identifies the content), and on a large
            file it costs as much time again as the SHA-256.
        extractors: Candidates in priority order; defaults to
            :data:`~msi_prefect.metadata.registry.EXTRACTORS` (entry point plugins loaded
            on first use).
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
        extractors = registry.registered_extractors()
    extractor = _select(extractors, path, head, mime, warnings)
    normalized, details = _run_extractor(extractor, path, warnings)
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
        normalized=normalized.to_json_dict(),
    )


def _run_extractor(
    extractor: Extractor, path: Path, warnings: list[str]
) -> tuple[NormalizedMetadata, dict[str, JSONValue]]:
    """The extractor's normalised facts and bounded details; its problems into ``warnings``."""
    raw: Mapping[str, Any] | Extraction
    normalized = NormalizedMetadata()
    try:
        with _library_notes() as notes:
            raw = extractor.extract(path)
    except ExtractionError as exc:
        raw = exc.details
        normalized = exc.normalized or normalized
        warnings.extend(truncate(f"{extractor.name}: {m}", MAX_WARNING_CHARS) for m in exc.messages)
    except Exception as exc:
        # A plugin bug, a library's surprise on a damaged file or an I/O error must not
        # cost the generic facts.
        raw = {}
        warnings.append(truncate(f"{extractor.name}: failed: {exc!r}", MAX_WARNING_CHARS))
    warnings.extend(truncate(f"{extractor.name}: {note}", MAX_WARNING_CHARS) for note in notes)
    if isinstance(raw, Extraction):
        normalized, raw = raw.normalized, raw.details
    if not isinstance(raw, Mapping):
        warnings.append(f"{extractor.name}: extract() returned {type(raw).__name__}, not a dict")
        return normalized, {}
    bounded = bounded_json({str(k): v for k, v in raw.items()})
    if bounded.converted_types:
        names = ", ".join(sorted(bounded.converted_types))
        warnings.append(f"{extractor.name}: converted to strings: {names}")
    details = bounded.value if isinstance(bounded.value, dict) else {}
    return normalized, details
