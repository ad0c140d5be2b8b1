"""Wire format v1: how one file travels as a sequence of Kafka messages.

Each file is cut into chunks; each chunk is one message whose key is the file id, whose
value is the raw chunk bytes and whose headers describe the chunk. An abort message tells
consumers to drop a generation the producer could not finish (the file changed while it
was being read). ``docs/wire-format.md`` is the reference for newcomers; this module is the
single implementation of its rules, used by producers (encode) and consumers (decode).

:func:`decode_message` is fed untrusted bytes and raises nothing but
:class:`WireFormatError`, whose ``reason`` says why the message was refused.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from msi_prefect.errors import TransferError
from msi_prefect.transfer.paths import MAX_PATH_BYTES, UnsafePathError, check_relative_path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

#: Version written by this code: ``major.minor``. Consumers refuse another major; a higher
#: minor only adds optional headers, which older consumers ignore.
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1

#: Measured with `python -m bench.compare --chunk-sizes` (bench/RESULTS.md): of 256 KiB,
#: 512 KiB and 896 KiB, 896 KiB moved large files fastest once the producer's in-flight
#: limit matched librdkafka's idempotent window (five messages per partition, so bigger
#: messages carry more per round trip). With its headers it still fits Apache Kafka's default
#: 1 MB message limit.
DEFAULT_CHUNK_SIZE = 896 * KIB

#: Namespace of the uuid5 file ids. Never change it: every file id ever sent depends on it.
FILE_ID_NAMESPACE = uuid.UUID("e41b4f65-352b-4505-8173-5536922b3d81")
_FILE_ID_NAMESPACE_BYTES = FILE_ID_NAMESPACE.bytes
# Recent paths' ids are remembered: every chunk of a file checks its id, and the producer
# needs it twice per file.
_FILE_IDS_CACHED = 1024

#: Largest integer any header may carry; it also fits SQLite's signed 64-bit INTEGER.
MAX_HEADER_INT = 2**63 - 1
#: Producer ids are free text shown in logs and the UI; keep them short.
MAX_PRODUCER_ID_CHARS = 200
#: No legitimate header value is longer than a path; refuse bigger ones before parsing.
MAX_HEADER_VALUE_BYTES = MAX_PATH_BYTES

#: One Kafka header value as confluent-kafka types it. Our encoders always put bytes in it.
HeaderValue = str | bytes | None
#: Header list accepted by ``Producer.produce(headers=...)``. Spelled with ``HeaderValue``
#: (not plain ``bytes``) because ``list`` is invariant: a ``list[tuple[str, bytes]]`` would
#: not type-check as an argument there.
KafkaHeaderList = list[tuple[str, HeaderValue]]
#: Headers as ``confluent_kafka.Message.headers()`` types them (``HeadersType``), mirrored
#: here so this module needs no confluent-kafka import.
KafkaHeaders = KafkaHeaderList | dict[str, HeaderValue]

_INT_RE = re.compile(rb"0|[1-9][0-9]{0,18}")
_SIGNED_INT_RE = re.compile(rb"0|-?[1-9][0-9]{0,18}")
_VERSION_RE = re.compile(rb"(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})")
_FILE_ID_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class HeaderName(enum.StrEnum):
    """Kafka header names of wire format v1."""

    VERSION = "msi.v"
    KIND = "msi.kind"
    FILE_ID = "msi.fid"
    PATH = "msi.path"
    SIZE = "msi.size"
    CHUNK_SIZE = "msi.csz"
    INDEX = "msi.idx"
    COUNT = "msi.n"
    OFFSET = "msi.off"
    MTIME = "msi.mtime"
    PRODUCER_ID = "msi.pid"
    GENERATION = "msi.gen"
    SHA256 = "msi.sha256"


class MessageKind(enum.StrEnum):
    """Value of the ``msi.kind`` header."""

    CHUNK = "chunk"
    ABORT = "abort"
    #: An encrypted chunk or abort (see ``msi_prefect.transfer.crypto``); only a consumer
    #: with a KafkaCrypto node can open it.
    SEALED = "sealed"


_COMMON_HEADERS = (
    HeaderName.VERSION,
    HeaderName.KIND,
    HeaderName.FILE_ID,
    HeaderName.PATH,
    HeaderName.GENERATION,
    HeaderName.PRODUCER_ID,
)
_CHUNK_ONLY_HEADERS = (
    HeaderName.SIZE,
    HeaderName.CHUNK_SIZE,
    HeaderName.INDEX,
    HeaderName.COUNT,
    HeaderName.OFFSET,
    HeaderName.MTIME,
)
_CHUNK_HEADERS = _COMMON_HEADERS + _CHUNK_ONLY_HEADERS
_HEADER_BY_NAME = {header.value: header for header in HeaderName}


class RejectReason(enum.StrEnum):
    """Why a message was refused by :func:`decode_message`."""

    NOT_MSI = "not-msi"
    UNKNOWN_VERSION = "unknown-version"
    UNKNOWN_KIND = "unknown-kind"
    MALFORMED_MESSAGE = "malformed-message"
    MISSING_HEADER = "missing-header"
    DUPLICATE_HEADER = "duplicate-header"
    BAD_HEADER_VALUE = "bad-header-value"
    UNSAFE_PATH = "unsafe-path"
    TOO_LARGE = "too-large"
    INCONSISTENT_CHUNK = "inconsistent-chunk"
    FILE_ID_MISMATCH = "file-id-mismatch"
    KEY_MISMATCH = "key-mismatch"
    BAD_CHECKSUM_FIELD = "bad-checksum-field"
    ENCRYPTED = "encrypted"
    NOT_ENCRYPTED = "not-encrypted"
    UNDECRYPTABLE = "undecryptable"
    KEY_MISSING = "key-missing"
    CHUNK_HASH_MISMATCH = "chunk-hash-mismatch"


_REASON_TEXT: dict[RejectReason, str] = {
    RejectReason.NOT_MSI: "it is not an msi_prefect message (no msi.v header)",
    RejectReason.UNKNOWN_VERSION: "its wire-format version is not supported",
    RejectReason.UNKNOWN_KIND: "its message kind is not known to this version",
    RejectReason.MALFORMED_MESSAGE: "it is malformed",
    RejectReason.MISSING_HEADER: "a required header is missing",
    RejectReason.DUPLICATE_HEADER: "a header appears more than once",
    RejectReason.BAD_HEADER_VALUE: "a header value is invalid",
    RejectReason.UNSAFE_PATH: "its path is unsafe",
    RejectReason.TOO_LARGE: "it exceeds a configured size limit",
    RejectReason.INCONSISTENT_CHUNK: "its chunk fields do not agree with each other",
    RejectReason.FILE_ID_MISMATCH: "its file id does not match its path",
    RejectReason.KEY_MISMATCH: "its message key does not match its file id",
    RejectReason.BAD_CHECKSUM_FIELD: "its checksum header is missing, misplaced or malformed",
    RejectReason.ENCRYPTED: "it is encrypted and this consumer has no KafkaCrypto node",
    RejectReason.NOT_ENCRYPTED: "it is not encrypted but this consumer requires encryption",
    RejectReason.UNDECRYPTABLE: "it cannot be decrypted",
    RejectReason.KEY_MISSING: "its decryption key is missing",
    RejectReason.CHUNK_HASH_MISMATCH: "its data does not match the checksum it carries",
}


class WireFormatError(TransferError, ValueError):
    """A message that does not follow wire format v1.

    Attributes:
        reason: Machine-readable category, stable across releases.
        detail: What exactly was wrong, for people.
    """

    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"Message rejected because {_REASON_TEXT[reason]}: {detail}.")


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds a consumer enforces on incoming messages.

    Attributes:
        max_file_size: Largest whole-file size accepted, in bytes.
        max_chunk_size: Largest chunk size accepted, in bytes.
        max_chunk_count: Most chunks one file may have. Bounds the per-file progress bitmap
            (2**24 chunks = 2 MiB of bitmap) whatever chunk size a sender picks.
    """

    max_file_size: int = TIB
    max_chunk_size: int = 64 * MIB
    max_chunk_count: int = 2**24

    def __post_init__(self) -> None:
        for name in ("max_file_size", "max_chunk_size", "max_chunk_count"):
            value = getattr(self, name)
            if not 0 < value <= MAX_HEADER_INT:
                raise ValueError(f"{name} must be between 1 and {MAX_HEADER_INT}, got {value}")


DEFAULT_LIMITS = DecodeLimits()


@functools.lru_cache(maxsize=_FILE_IDS_CACHED)
def file_id_for(relpath: str) -> str:
    """Return the stable file id of a relative POSIX path.

    The id is the uuid5 of the path (exact string, no Unicode normalisation) in
    :data:`FILE_ID_NAMESPACE`, as 32 lowercase hex digits. It is the message key, so every
    generation of one path lands on the same partition, in order.

    Args:
        relpath: Relative POSIX path of the file.

    Returns:
        32 lowercase hex characters.
    """
    # uuid.uuid5(FILE_ID_NAMESPACE, relpath).hex without building a UUID object (5 times
    # slower): SHA-1 of namespace and name, then the version and variant bits (RFC 4122).
    digest = bytearray(hashlib.sha1(_FILE_ID_NAMESPACE_BYTES + relpath.encode("utf-8")).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return digest[:16].hex()


def message_key(file_id: str) -> bytes:
    """Return the Kafka message key for a file id."""
    return file_id.encode("ascii")


def plan_chunks(size: int, chunk_size: int) -> int:
    """Return how many chunks a file of ``size`` bytes is cut into.

    An empty file is one empty chunk, so the count is never zero.

    Args:
        size: Whole-file size in bytes (>= 0).
        chunk_size: Chunk size in bytes (> 0).

    Returns:
        ``max(1, ceil(size / chunk_size))``.

    Raises:
        ValueError: If ``size`` is negative or ``chunk_size`` is not positive.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return max(1, -(-size // chunk_size))


#: A header's ``size`` when its format does not announce the file size (OpenMSIStream's
#: chunks do not): the verified size replaces it in the progress row once the file is rebuilt.
UNKNOWN_SIZE = -1


@dataclass(frozen=True)
class ChunkHeader:
    """Everything the headers of one chunk message say.

    Attributes:
        file_id: uuid5 of ``relpath`` (see :func:`file_id_for`); also the message key.
        relpath: Relative POSIX path of the file.
        size: Whole-file size in bytes, or :data:`UNKNOWN_SIZE`.
        chunk_size: Chunk size the producer used, in bytes.
        index: 0-based chunk index.
        count: Number of chunks of the file.
        offset: Byte offset of this chunk in the file.
        mtime_ns: File modification time in integer nanoseconds since the epoch.
        producer_id: Free-text id of the producer that sent the file.
        generation: Generation of the file (>= 1); a changed file is sent again with a
            higher generation.
        sha256: Whole-file SHA-256 hex digest; only on the last chunk, ``None`` otherwise.
    """

    file_id: str
    relpath: str
    size: int
    chunk_size: int
    index: int
    count: int
    offset: int
    mtime_ns: int
    producer_id: str
    generation: int
    sha256: str | None = None

    @classmethod
    def for_chunk(
        cls,
        *,
        relpath: str,
        size: int,
        chunk_size: int,
        index: int,
        mtime_ns: int,
        producer_id: str,
        generation: int,
        sha256: str | None = None,
    ) -> ChunkHeader:
        """Build the header of chunk ``index``, deriving file id, count and offset.

        Args:
            relpath: Relative POSIX path of the file.
            size: Whole-file size in bytes.
            chunk_size: Chunk size in bytes.
            index: 0-based chunk index.
            mtime_ns: File modification time in nanoseconds.
            producer_id: Free-text producer id.
            generation: File generation (>= 1).
            sha256: Whole-file digest; pass it for the last chunk only.

        Returns:
            The header. It is not validated here; :func:`encode_chunk_headers` does that.
        """
        return cls(
            file_id=file_id_for(relpath),
            relpath=relpath,
            size=size,
            chunk_size=chunk_size,
            index=index,
            count=plan_chunks(size, chunk_size),
            offset=index * chunk_size,
            mtime_ns=mtime_ns,
            producer_id=producer_id,
            generation=generation,
            sha256=sha256,
        )

    @property
    def is_last(self) -> bool:
        """Whether this is the last chunk of the file (the one carrying the SHA-256)."""
        return self.index == self.count - 1

    @property
    def data_length(self) -> int:
        """Number of bytes the chunk's value must hold."""
        return max(0, min(self.chunk_size, self.size - self.offset))


@dataclass(frozen=True)
class Chunk:
    """A decoded chunk message.

    Attributes:
        header: What the headers said.
        data: The chunk bytes (the message value).
    """

    header: ChunkHeader
    data: bytes | memoryview


@dataclass(frozen=True)
class AbortNotice:
    """A decoded abort message: drop the named generation of a file.

    Attributes:
        file_id: uuid5 of ``relpath``; also the message key.
        relpath: Relative POSIX path of the file.
        generation: The generation to drop.
        producer_id: Free-text id of the producer that gave up on it.
    """

    file_id: str
    relpath: str
    generation: int
    producer_id: str

    @classmethod
    def for_path(cls, relpath: str, generation: int, producer_id: str) -> AbortNotice:
        """Build the abort notice of a path's generation, deriving its file id."""
        return cls(
            file_id=file_id_for(relpath),
            relpath=relpath,
            generation=generation,
            producer_id=producer_id,
        )


# --- validation shared by encoding and decoding -------------------------------------------


def _check_common(file_id: str, relpath: str, generation: int, producer_id: str) -> None:
    """Check the fields chunks and aborts share."""
    try:
        check_relative_path(relpath)
    except UnsafePathError as exc:
        raise WireFormatError(RejectReason.UNSAFE_PATH, exc.detail) from None
    if not _FILE_ID_RE.fullmatch(file_id):
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE,
            f"{HeaderName.FILE_ID} must be 32 lowercase hex digits, got {_show(file_id)}",
        )
    expected = file_id_for(relpath)
    if file_id != expected:
        raise WireFormatError(
            RejectReason.FILE_ID_MISMATCH,
            f"{HeaderName.FILE_ID} is {file_id} but the path {_show(relpath)} has id {expected}",
        )
    if not 1 <= generation <= MAX_HEADER_INT:
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE,
            f"{HeaderName.GENERATION} must be at least 1, got {generation}",
        )
    if not 1 <= len(producer_id) <= MAX_PRODUCER_ID_CHARS or _CONTROL_RE.search(producer_id):
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE,
            f"{HeaderName.PRODUCER_ID} must be 1 to {MAX_PRODUCER_ID_CHARS} characters "
            "without control characters",
        )


def _check_chunk_header(header: ChunkHeader, limits: DecodeLimits | None) -> None:
    """Enforce the consistency rules of one chunk header (the value length aside).

    Args:
        header: The header to check.
        limits: Consumer limits; ``None`` when encoding (the producer has none of its own).
    """
    _check_file_fields(header, limits)
    _check_chunk_position(
        header.index, header.count, header.offset, header.chunk_size, header.sha256
    )


def _check_file_fields(header: ChunkHeader, limits: DecodeLimits | None) -> None:
    """The rules on what every chunk of a file shares (path, sizes, count, generation...)."""
    _check_common(header.file_id, header.relpath, header.generation, header.producer_id)
    for name, value in (
        (HeaderName.SIZE, header.size),
        (HeaderName.CHUNK_SIZE, header.chunk_size),
        (HeaderName.INDEX, header.index),
        (HeaderName.COUNT, header.count),
        (HeaderName.OFFSET, header.offset),
    ):
        if not 0 <= value <= MAX_HEADER_INT:
            raise WireFormatError(
                RejectReason.BAD_HEADER_VALUE,
                f"{name} must be between 0 and {MAX_HEADER_INT}, got {value}",
            )
    if not -MAX_HEADER_INT <= header.mtime_ns <= MAX_HEADER_INT:
        raise WireFormatError(RejectReason.BAD_HEADER_VALUE, f"{HeaderName.MTIME} is out of range")
    if header.chunk_size == 0:
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE, f"{HeaderName.CHUNK_SIZE} must be greater than 0"
        )
    if limits is not None:
        if header.size > limits.max_file_size:
            raise WireFormatError(
                RejectReason.TOO_LARGE,
                f"the file has {header.size} bytes, the limit is {limits.max_file_size}",
            )
        if header.chunk_size > limits.max_chunk_size:
            raise WireFormatError(
                RejectReason.TOO_LARGE,
                f"the chunk size is {header.chunk_size} bytes, "
                f"the limit is {limits.max_chunk_size}",
            )
    planned = plan_chunks(header.size, header.chunk_size)
    if limits is not None and planned > limits.max_chunk_count:
        raise WireFormatError(
            RejectReason.TOO_LARGE,
            f"the file is cut into {planned} chunks, the limit is {limits.max_chunk_count}",
        )
    if header.count != planned:
        raise WireFormatError(
            RejectReason.INCONSISTENT_CHUNK,
            f"{HeaderName.COUNT} is {header.count} but {header.size} bytes in chunks of "
            f"{header.chunk_size} make {planned}",
        )


def _check_chunk_position(
    index: int, count: int, offset: int, chunk_size: int, sha256: str | None
) -> None:
    """The rules on where one chunk sits in its file, and on its checksum field."""
    if not 0 <= index < count:
        raise WireFormatError(
            RejectReason.INCONSISTENT_CHUNK,
            f"{HeaderName.INDEX} is {index} but the file has {count} chunks",
        )
    if offset != index * chunk_size:
        raise WireFormatError(
            RejectReason.INCONSISTENT_CHUNK,
            f"{HeaderName.OFFSET} is {offset} but chunk {index} of size "
            f"{chunk_size} starts at {index * chunk_size}",
        )
    if index == count - 1:
        if sha256 is None:
            raise WireFormatError(
                RejectReason.BAD_CHECKSUM_FIELD,
                f"the last chunk must carry {HeaderName.SHA256}",
            )
        if not _SHA256_RE.fullmatch(sha256):
            raise WireFormatError(
                RejectReason.BAD_CHECKSUM_FIELD,
                f"{HeaderName.SHA256} must be 64 lowercase hex digits, got {_show(sha256)}",
            )
    elif sha256 is not None:
        raise WireFormatError(
            RejectReason.BAD_CHECKSUM_FIELD,
            f"{HeaderName.SHA256} is only allowed on the last chunk, found it on chunk "
            f"{index} of {count}",
        )


# --- encoding ------------------------------------------------------------------------------


def _int_bytes(value: int) -> bytes:
    return str(value).encode("ascii")


def encode_chunk_headers(header: ChunkHeader) -> KafkaHeaderList:
    """Return the Kafka headers of one chunk message.

    The header is checked against the same rules the decoder enforces (size limits
    aside), so a producer bug fails here instead of on every consumer.

    Args:
        header: The chunk's header; ``sha256`` must be set exactly on the last chunk.

    Returns:
        ``(name, value)`` pairs (values are bytes) for
        ``confluent_kafka.Producer.produce(headers=...)``.

    Raises:
        WireFormatError: If the header breaks a wire-format rule.
    """
    encoder = ChunkHeaderEncoder(header)
    # The header's own offset must agree too (the encoder derives it from the index).
    _check_chunk_position(
        header.index, header.count, header.offset, header.chunk_size, header.sha256
    )
    return encoder.headers(header.index, header.sha256)


class ChunkHeaderEncoder:
    """Encodes the headers of every chunk of one file, checking the per-file fields once.

    A producer makes one per file: the path, sizes and generation are validated and
    encoded when it is made, so each chunk costs only its index, offset and checksum.

    Args:
        file_header: A header of any chunk of the file (its index and sha256 are ignored).

    Raises:
        WireFormatError: If the file-level fields break a wire-format rule.
    """

    def __init__(self, file_header: ChunkHeader) -> None:
        _check_file_fields(file_header, limits=None)
        self._count = file_header.count
        self._chunk_size = file_header.chunk_size
        self._leading: KafkaHeaderList = [
            (HeaderName.VERSION.value, FORMAT_VERSION.encode("ascii")),
            (HeaderName.KIND.value, MessageKind.CHUNK.value.encode("ascii")),
            (HeaderName.FILE_ID.value, file_header.file_id.encode("ascii")),
            (HeaderName.PATH.value, file_header.relpath.encode("utf-8")),
            (HeaderName.SIZE.value, _int_bytes(file_header.size)),
            (HeaderName.CHUNK_SIZE.value, _int_bytes(file_header.chunk_size)),
        ]
        self._count_header = (HeaderName.COUNT.value, _int_bytes(file_header.count))
        self._trailing: KafkaHeaderList = [
            (HeaderName.MTIME.value, _int_bytes(file_header.mtime_ns)),
            (HeaderName.PRODUCER_ID.value, file_header.producer_id.encode("utf-8")),
            (HeaderName.GENERATION.value, _int_bytes(file_header.generation)),
        ]

    def headers(self, index: int, sha256: str | None = None) -> KafkaHeaderList:
        """The headers of chunk ``index``; pass ``sha256`` for the last chunk only.

        Raises:
            WireFormatError: If the index is out of range or the checksum rule is broken.
        """
        offset = index * self._chunk_size
        _check_chunk_position(index, self._count, offset, self._chunk_size, sha256)
        headers = [
            *self._leading,
            (HeaderName.INDEX.value, _int_bytes(index)),
            self._count_header,
            (HeaderName.OFFSET.value, _int_bytes(offset)),
            *self._trailing,
        ]
        if sha256 is not None:
            headers.append((HeaderName.SHA256.value, sha256.encode("ascii")))
        return headers


def encode_abort_headers(notice: AbortNotice) -> KafkaHeaderList:
    """Return the Kafka headers of an abort message (its value is empty).

    Args:
        notice: Which generation of which file to drop.

    Returns:
        ``(name, value)`` pairs (values are bytes) for
        ``confluent_kafka.Producer.produce(headers=...)``.

    Raises:
        WireFormatError: If the notice breaks a wire-format rule.
    """
    _check_common(notice.file_id, notice.relpath, notice.generation, notice.producer_id)
    return [
        (HeaderName.VERSION.value, FORMAT_VERSION.encode("ascii")),
        (HeaderName.KIND.value, MessageKind.ABORT.value.encode("ascii")),
        (HeaderName.FILE_ID.value, notice.file_id.encode("ascii")),
        (HeaderName.PATH.value, notice.relpath.encode("utf-8")),
        (HeaderName.GENERATION.value, _int_bytes(notice.generation)),
        (HeaderName.PRODUCER_ID.value, notice.producer_id.encode("utf-8")),
    ]


# --- decoding ------------------------------------------------------------------------------


def _show(value: str | bytes, limit: int = 60) -> str:
    """Short printable form of an untrusted value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _collect_headers(headers: object) -> dict[HeaderName, bytes | None]:
    """Pick our headers out of a header list, refusing duplicates and oversized values."""
    if type(headers) is list:
        found = _collect_plain_pairs(headers)
        if found is not None:
            return found
    return _collect_headers_checked(headers)


def _collect_plain_pairs(headers: list[Any]) -> dict[HeaderName, bytes | None] | None:
    """The common case, cheaply: a list of ``(str, bytes | None)`` tuples, as confluent-kafka
    hands them over, with no duplicate and no oversized value of ours.

    Returns ``None`` at the first thing out of the ordinary, for
    :func:`_collect_headers_checked` to look at entry by entry and say what is wrong.
    """
    found: dict[HeaderName, bytes | None] = {}
    for entry in headers:
        if type(entry) is not tuple or len(entry) != 2 or type(entry[0]) is not str:
            return None
        key = _HEADER_BY_NAME.get(entry[0])
        if key is None:
            continue
        value = entry[1]
        if key in found or (
            value is not None and (type(value) is not bytes or len(value) > MAX_HEADER_VALUE_BYTES)
        ):
            return None
        found[key] = value
    return found


def _collect_headers_checked(headers: object) -> dict[HeaderName, bytes | None]:
    """:func:`_collect_headers` for any input, with an error saying what is wrong."""
    if headers is None:
        return {}
    if isinstance(headers, dict):
        headers = list(headers.items())
    if not isinstance(headers, Sequence) or isinstance(headers, str | bytes):
        raise WireFormatError(RejectReason.MALFORMED_MESSAGE, "the headers are not a list")
    found: dict[HeaderName, bytes | None] = {}
    for entry in headers:
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise WireFormatError(
                RejectReason.MALFORMED_MESSAGE, "a header entry is not a (name, value) pair"
            )
        name, value = entry
        if not isinstance(name, str):
            raise WireFormatError(RejectReason.MALFORMED_MESSAGE, "a header name is not text")
        key = _HEADER_BY_NAME.get(name)
        if key is None:
            continue  # foreign or newer-minor headers are ignored by design
        if key in found:
            raise WireFormatError(RejectReason.DUPLICATE_HEADER, f"{name} appears twice")
        if value is not None:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise WireFormatError(
                    RejectReason.MALFORMED_MESSAGE, f"the value of {name} is not bytes"
                )
            value = bytes(value)
            if len(value) > MAX_HEADER_VALUE_BYTES:
                raise WireFormatError(
                    RejectReason.BAD_HEADER_VALUE,
                    f"{name} is {len(value)} bytes long, the limit is {MAX_HEADER_VALUE_BYTES}",
                )
        found[key] = value
    return found


class _Fields:
    """Typed access to collected header values, raising WireFormatError on bad syntax."""

    def __init__(self, found: dict[HeaderName, bytes | None]) -> None:
        self._found = found

    def has(self, name: HeaderName) -> bool:
        return name in self._found

    def raw(self, name: HeaderName) -> bytes:
        value = self._found.get(name)
        if value is None:
            raise WireFormatError(RejectReason.BAD_HEADER_VALUE, f"{name} has no value")
        return value

    def text(self, name: HeaderName) -> str:
        raw = self.raw(name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireFormatError(
                RejectReason.BAD_HEADER_VALUE, f"{name} is not valid UTF-8: {_show(raw)}"
            ) from None

    def uint(self, name: HeaderName) -> int:
        raw = self.raw(name)
        if _INT_RE.fullmatch(raw) and (number := int(raw)) <= MAX_HEADER_INT:
            return number
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE,
            f"{name} must be a plain decimal integer up to {MAX_HEADER_INT}, got {_show(raw)}",
        )

    def checksum(self) -> str | None:
        """The optional ``msi.sha256`` value; its shape is checked with the chunk rules."""
        if not self.has(HeaderName.SHA256):
            return None
        raw = self._found[HeaderName.SHA256]
        if raw is None:
            raise WireFormatError(
                RejectReason.BAD_CHECKSUM_FIELD, f"{HeaderName.SHA256} has no value"
            )
        # Replacement characters cannot pass the 64-hex-digit check that follows.
        return raw.decode("utf-8", errors="replace")

    def sint(self, name: HeaderName) -> int:
        raw = self.raw(name)
        if not _SIGNED_INT_RE.fullmatch(raw) or abs(int(raw)) > MAX_HEADER_INT:
            raise WireFormatError(
                RejectReason.BAD_HEADER_VALUE,
                f"{name} must be a decimal integer, got {_show(raw)}",
            )
        return int(raw)


def _check_version(fields: _Fields) -> None:
    raw = fields.raw(HeaderName.VERSION)
    match = _VERSION_RE.fullmatch(raw)
    if match is None:
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE,
            f"{HeaderName.VERSION} must look like 'major.minor', got {_show(raw)}",
        )
    major = int(match.group(1))
    if major != SUPPORTED_MAJOR:
        raise WireFormatError(
            RejectReason.UNKNOWN_VERSION,
            f"{HeaderName.VERSION} is {raw.decode('ascii')!r} but this consumer reads major "
            f"version {SUPPORTED_MAJOR} only",
        )


def _require(fields: _Fields, names: Sequence[HeaderName], what: str) -> None:
    missing = [str(name) for name in names if not fields.has(name)]
    if missing:
        raise WireFormatError(RejectReason.MISSING_HEADER, f"{what} needs {', '.join(missing)}")


def _check_key(key: object, file_id: str) -> None:
    if key is None:
        raise WireFormatError(RejectReason.KEY_MISMATCH, "the message has no key")
    if not isinstance(key, bytes | bytearray | memoryview) or bytes(key) != message_key(file_id):
        shown = _show(bytes(key)) if isinstance(key, bytes | bytearray | memoryview) else "?"
        raise WireFormatError(
            RejectReason.KEY_MISMATCH,
            f"the key is {shown} but {HeaderName.FILE_ID} is {file_id}",
        )


def _decode(
    key: object, value: object, headers: object, limits: DecodeLimits
) -> Chunk | AbortNotice:
    found = _collect_headers(headers)
    if HeaderName.VERSION not in found:
        raise WireFormatError(RejectReason.NOT_MSI, f"there is no {HeaderName.VERSION} header")
    fields = _Fields(found)
    # Version first: a message of another major may use entirely different headers.
    _check_version(fields)
    _require(fields, (HeaderName.KIND,), "every message")
    kind_text = fields.text(HeaderName.KIND)
    try:
        kind = MessageKind(kind_text)
    except ValueError:
        raise WireFormatError(
            RejectReason.UNKNOWN_KIND, f"{HeaderName.KIND} is {_show(kind_text)}"
        ) from None

    if kind is MessageKind.SEALED:
        raise WireFormatError(
            RejectReason.ENCRYPTED,
            "open it with a KafkaCrypto node (--crypto-config) before decoding",
        )

    if kind is MessageKind.ABORT:
        _require(fields, _COMMON_HEADERS, "an abort message")
        notice = AbortNotice(
            file_id=fields.text(HeaderName.FILE_ID),
            relpath=fields.text(HeaderName.PATH),
            generation=fields.uint(HeaderName.GENERATION),
            producer_id=fields.text(HeaderName.PRODUCER_ID),
        )
        _check_common(notice.file_id, notice.relpath, notice.generation, notice.producer_id)
        _check_key(key, notice.file_id)
        return notice  # an abort's value carries nothing and is ignored

    _require(fields, _CHUNK_HEADERS, "a chunk message")
    header = ChunkHeader(
        file_id=fields.text(HeaderName.FILE_ID),
        relpath=fields.text(HeaderName.PATH),
        size=fields.uint(HeaderName.SIZE),
        chunk_size=fields.uint(HeaderName.CHUNK_SIZE),
        index=fields.uint(HeaderName.INDEX),
        count=fields.uint(HeaderName.COUNT),
        offset=fields.uint(HeaderName.OFFSET),
        mtime_ns=fields.sint(HeaderName.MTIME),
        producer_id=fields.text(HeaderName.PRODUCER_ID),
        generation=fields.uint(HeaderName.GENERATION),
        sha256=fields.checksum(),
    )
    _check_chunk_header(header, limits)
    _check_key(key, header.file_id)

    # Some clients hand an empty value over as None; only an empty chunk may have one.
    data: bytes | memoryview
    if value is None:
        data = b""
    elif isinstance(value, bytes | memoryview):
        data = value
    elif isinstance(value, bytearray):
        data = bytes(value)
    else:
        raise WireFormatError(RejectReason.MALFORMED_MESSAGE, "the message value is not bytes")
    length = data.nbytes if isinstance(data, memoryview) else len(data)
    if length != header.data_length:
        raise WireFormatError(
            RejectReason.INCONSISTENT_CHUNK,
            f"chunk {header.index} should hold {header.data_length} bytes but the value has "
            f"{length}",
        )
    return Chunk(header=header, data=data)


def decode_message(
    key: bytes | None,
    value: bytes | memoryview | None,
    headers: KafkaHeaders | None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Chunk | AbortNotice:
    """Decode and validate one Kafka message of wire format v1.

    Args:
        key: The message key (must equal the file id in ASCII).
        value: The message value (the chunk bytes; ignored for aborts).
        headers: The message headers as confluent-kafka returns them (a list of
            ``(name, bytes)`` pairs; the dict form is accepted too).
        limits: Size bounds of this consumer.

    Returns:
        A :class:`Chunk` or an :class:`AbortNotice`.

    Raises:
        WireFormatError: For any message that breaks the format, whatever its content.
            Nothing else is raised.
    """
    try:
        return _decode(key, value, headers, limits)
    except WireFormatError:
        raise
    except Exception as exc:
        # Untrusted input must not crash a consumer; the tests assert this path is unused.
        raise WireFormatError(
            RejectReason.MALFORMED_MESSAGE, f"unexpected {type(exc).__name__} while decoding"
        ) from exc
