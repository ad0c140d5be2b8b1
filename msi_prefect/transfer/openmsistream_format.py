"""OpenMSIStream 1.8's file-chunk messages: our own decoder and encoder of that format.

Labs run OpenMSIStream's ``UploadDataFile`` / ``DataFileUploadDirectory`` on instrument
computers and ``DataFileDownloadDirectory`` on the receiving side. This module lets
msi_prefect read what the former write and write what the latter reads, so either side can
migrate first. ``docs/wire-format.md`` (section "OpenMSIStream format") is the reference;
the facts were checked against openmsistream 1.8.8's serializer and ``DataFileChunk``.

One message per chunk:

- **key**: UTF-8 text ``<subdir with '/' replaced by '_'>_<filename>_chunk_<i>_of_<N>``
  (with an empty subdir the key starts with ``_``);
- **value**: a msgpack array of 10 items (older producers send the first 9):
  ``[filename, file_sha512, chunk_sha512, offset, i, N, subdir, filename_append, data,
  mtime]`` where the hashes are 64-byte raw SHA-512 digests, ``offset`` is the byte offset
  of ``data`` in the file, ``i`` counts from 1 to ``N``, and ``mtime`` is the file's
  modification time in float seconds (0.0 when unknown);
- **no headers**, no file size, no generation.

Because the key holds the chunk index, the chunks of one file are spread over partitions.

How a message maps onto our :class:`~msi_prefect.transfer.wire.ChunkHeader`:

- path: ``subdir/stem + filename_append + suffix``, validated like any of our paths;
- file id: a uuid5 of the path and the file's SHA-512 (in a namespace of its own), so each
  distinct content of a path is a distinct file, always generation 1. Sending the same
  content again is recognised as already delivered; new content is a new version and is
  delivered over the old one;
- size: unknown until the last chunk, so it is recorded as :data:`UNKNOWN_SIZE`; the
  verified size replaces it when the file is complete;
- chunk size: the length of any chunk but the last, or ``offset / (N - 1)`` for the last;
  every chunk of a file must agree on it, so chunks tile the file without gap or overlap;
- checksum: every chunk carries ``sha512:<hex>``; :meth:`OpenMsiStreamCodec.verify` checks
  the rebuilt file against it and computes the SHA-256 that events carry.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import msgpack

from msi_prefect.transfer.formats import (
    HASH_BLOCK_BYTES,
    VerificationError,
    VerifiedFile,
    WireFormat,
)
from msi_prefect.transfer.paths import UnsafePathError, check_relative_path
from msi_prefect.transfer.progress import FileProgress
from msi_prefect.transfer.wire import (
    MAX_HEADER_INT,
    UNKNOWN_SIZE,
    AbortNotice,
    Chunk,
    ChunkHeader,
    DecodeLimits,
    KafkaHeaders,
    RejectReason,
    WireFormatError,
)

#: Namespace of OpenMSIStream file ids; distinct from wire format v1's, so ids never clash.
OMSI_FILE_ID_NAMESPACE = uuid.UUID("6f0d3b0e-93a5-4f43-a3f5-0c1f2a7d9b51")
#: ``msi.pid`` equivalent for events and logs; OpenMSIStream sends no producer id.
OMSI_PRODUCER_ID = "openmsistream"
#: Prefix of the expected digest as stored in the progress row.
SHA512_PREFIX = "sha512:"
SHA512_BYTES = 64
FIELDS_WITH_MTIME = 10
FIELDS_WITHOUT_MTIME = 9
#: msgpack framing and the text fields on top of the chunk data in one value.
VALUE_OVERHEAD_BYTES = 64 * 1024
MAX_KEY_BYTES = 16 * 1024


def omsi_file_id(relpath: str, sha512_hex: str) -> str:
    """The file id of one content of one path: uuid5 of both, 32 lowercase hex digits."""
    return uuid.uuid5(OMSI_FILE_ID_NAMESPACE, f"{relpath}\x00{sha512_hex}").hex


def omsi_key(subdir: str, filename: str, index: int, count: int) -> str:
    """The message key OpenMSIStream gives chunk ``index`` (from 1) of ``count``."""
    return f"{'_'.join(subdir.split('/'))}_{filename}_chunk_{index}_of_{count}"


def split_relpath(relpath: str) -> tuple[str, str]:
    """Split a relative POSIX path into OpenMSIStream's subdir string and file name."""
    subdir, _, filename = relpath.rpartition("/")
    return subdir, filename


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value: object, what: str) -> str:
    if not isinstance(value, bytes):
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE, f"{what} must be a string, got {type(value).__name__}"
        )
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE, f"{what} is not valid UTF-8: {_show(value)}"
        ) from None


def _uint(value: object, what: str, minimum: int) -> int:
    # bool is an int to Python but not to msgpack's senders: refuse it.
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE, f"{what} must be an integer, got {_show(value)}"
        )
    if not minimum <= value <= MAX_HEADER_INT:
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE,
            f"{what} must be between {minimum} and {MAX_HEADER_INT}, got {value}",
        )
    return value


def _digest(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != SHA512_BYTES:
        raise WireFormatError(
            RejectReason.BAD_CHECKSUM_FIELD, f"{what} must be a 64-byte SHA-512 digest"
        )
    return value


def _mtime(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireFormatError(
            RejectReason.BAD_HEADER_VALUE, f"the mtime must be a number, got {_show(value)}"
        )
    if not math.isfinite(value):
        raise WireFormatError(RejectReason.BAD_HEADER_VALUE, "the mtime must be finite")
    return float(value)


def _relpath(subdir: str, filename: str, append: str) -> str:
    """The path OpenMSIStream's downloader writes the file to, validated."""
    if not filename or "/" in filename:
        raise WireFormatError(
            RejectReason.UNSAFE_PATH, f"the file name must be one path segment: {_show(filename)}"
        )
    name = filename
    if append:
        # OpenMSIStream appends to the stem: 'scan.tif' + '_copy' -> 'scan_copy.tif'.
        pure = PurePosixPath(filename)
        name = f"{pure.stem}{append}{pure.suffix}"
    relpath = f"{subdir}/{name}" if subdir else name
    try:
        check_relative_path(relpath)
    except UnsafePathError as exc:
        raise WireFormatError(RejectReason.UNSAFE_PATH, exc.detail) from None
    return relpath


def _unpack(value: object, limits: DecodeLimits) -> list[Any]:
    if value is None:
        raise WireFormatError(RejectReason.MALFORMED_MESSAGE, "the message has no value")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise WireFormatError(RejectReason.MALFORMED_MESSAGE, "the message value is not bytes")
    raw = bytes(value)
    if len(raw) > limits.max_chunk_size + VALUE_OVERHEAD_BYTES:
        raise WireFormatError(
            RejectReason.TOO_LARGE,
            f"the value has {len(raw)} bytes, the chunk size limit is {limits.max_chunk_size}",
        )
    try:
        # raw=True: text arrives as bytes, decoded (strictly) below; bounded containers.
        fields = msgpack.unpackb(
            raw,
            raw=True,
            use_list=True,
            max_array_len=FIELDS_WITH_MTIME,
            max_map_len=0,
            max_ext_len=0,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireFormatError(
            RejectReason.MALFORMED_MESSAGE, f"the value is not msgpack ({type(exc).__name__})"
        ) from None
    if not isinstance(fields, list) or len(fields) not in (
        FIELDS_WITHOUT_MTIME,
        FIELDS_WITH_MTIME,
    ):
        shown = f"{len(fields)} items" if isinstance(fields, list) else type(fields).__name__
        raise WireFormatError(
            RejectReason.MALFORMED_MESSAGE,
            f"the value must be a msgpack array of 9 or 10 items, got {shown}",
        )
    return fields


def _chunk_size(offset: int, index: int, count: int, length: int) -> int:
    """The file's chunk size implied by one chunk, checking the chunk's position."""
    if not 1 <= index <= count:
        raise WireFormatError(
            RejectReason.INCONSISTENT_CHUNK, f"chunk {index} is outside 1..{count}"
        )
    if count == 1:
        if offset != 0:
            raise WireFormatError(
                RejectReason.INCONSISTENT_CHUNK, f"the only chunk starts at {offset}, not 0"
            )
        return max(1, length)
    if index < count:
        if length == 0 or offset != (index - 1) * length:
            raise WireFormatError(
                RejectReason.INCONSISTENT_CHUNK,
                f"chunk {index} of {count} has {length} bytes at offset {offset}; chunks "
                "before the last must be full and contiguous",
            )
        return length
    chunk_size, remainder = divmod(offset, count - 1)
    if remainder or chunk_size == 0 or not 1 <= length <= chunk_size:
        raise WireFormatError(
            RejectReason.INCONSISTENT_CHUNK,
            f"the last chunk ({length} bytes at offset {offset}) does not follow {count - 1} "
            "equal chunks",
        )
    return chunk_size


@dataclass(frozen=True)
class OmsiChunkFields:
    """The fields of one OpenMSIStream message, typed and checked.

    Attributes:
        filename: File name as sent.
        file_sha512: Raw SHA-512 of the whole file.
        offset: Byte offset of ``data`` in the file.
        index: Chunk number, from 1.
        count: Number of chunks of the file.
        subdir: Subdirectory string ('' for the top level).
        filename_append: Text OpenMSIStream appends to the file name's stem.
        data: The chunk bytes.
        mtime: Modification time in seconds (0.0 if not sent).
        relpath: Where the file is written, relative to the destination.
    """

    filename: str
    file_sha512: bytes
    offset: int
    index: int
    count: int
    subdir: str
    filename_append: str
    data: bytes
    mtime: float
    relpath: str


def parse_omsi_value(value: object, limits: DecodeLimits) -> OmsiChunkFields:
    """Parse and check an OpenMSIStream message value (the key is not looked at).

    Raises:
        WireFormatError: Bad msgpack, wrong item count or types, unsafe path, a chunk hash
            that does not match the data, or positions that do not add up.
    """
    fields = _unpack(value, limits)
    filename = _text(fields[0], "the file name")
    file_sha512 = _digest(fields[1], "the file hash")
    chunk_sha512 = _digest(fields[2], "the chunk hash")
    offset = _uint(fields[3], "the chunk offset", 0)
    index = _uint(fields[4], "the chunk index", 1)
    count = _uint(fields[5], "the chunk count", 1)
    subdir = _text(fields[6], "the subdirectory")
    append = _text(fields[7], "the file name suffix")
    data = fields[8]
    if not isinstance(data, bytes):
        raise WireFormatError(RejectReason.BAD_HEADER_VALUE, "the chunk data must be bytes")
    mtime = _mtime(fields[9]) if len(fields) == FIELDS_WITH_MTIME else 0.0
    relpath = _relpath(subdir, filename, append)
    if hashlib.sha512(data).digest() != chunk_sha512:
        raise WireFormatError(
            RejectReason.CHUNK_HASH_MISMATCH,
            f"chunk {index} of {relpath!r} does not match its SHA-512",
        )
    return OmsiChunkFields(
        filename=filename,
        file_sha512=file_sha512,
        offset=offset,
        index=index,
        count=count,
        subdir=subdir,
        filename_append=append,
        data=data,
        mtime=mtime,
        relpath=relpath,
    )


def decode_omsi_message(key: bytes | None, value: bytes | None, limits: DecodeLimits) -> Chunk:
    """Decode and validate one OpenMSIStream chunk message into our chunk model.

    Args:
        key: The message key (must be the one OpenMSIStream derives from the value).
        value: The msgpack value.
        limits: Size bounds of this consumer.

    Returns:
        A :class:`Chunk` whose header is mapped as the module docstring describes.

    Raises:
        WireFormatError: For any message that breaks the format; nothing else.
    """
    try:
        return _decode(key, value, limits)
    except WireFormatError:
        raise
    except Exception as exc:  # untrusted input must never crash a consumer
        raise WireFormatError(
            RejectReason.MALFORMED_MESSAGE, f"unexpected {type(exc).__name__} while decoding"
        ) from exc


def _decode(key: bytes | None, value: bytes | None, limits: DecodeLimits) -> Chunk:
    parsed = parse_omsi_value(value, limits)
    expected_key = omsi_key(parsed.subdir, parsed.filename, parsed.index, parsed.count)
    if not isinstance(key, bytes) or len(key) > MAX_KEY_BYTES:
        raise WireFormatError(RejectReason.KEY_MISMATCH, "the message has no usable key")
    if key != expected_key.encode("utf-8"):
        raise WireFormatError(
            RejectReason.KEY_MISMATCH,
            f"the key is {_show(key)} but the value says {_show(expected_key)}",
        )
    length = len(parsed.data)
    chunk_size = _chunk_size(parsed.offset, parsed.index, parsed.count, length)
    if chunk_size > limits.max_chunk_size:
        raise WireFormatError(
            RejectReason.TOO_LARGE,
            f"the chunk size is {chunk_size} bytes, the limit is {limits.max_chunk_size}",
        )
    if parsed.count > limits.max_chunk_count:
        raise WireFormatError(
            RejectReason.TOO_LARGE,
            f"the file has {parsed.count} chunks, the limit is {limits.max_chunk_count}",
        )
    smallest_size = (parsed.count - 1) * chunk_size + (1 if parsed.count > 1 else length)
    if smallest_size > limits.max_file_size:
        raise WireFormatError(
            RejectReason.TOO_LARGE,
            f"the file has at least {smallest_size} bytes, the limit is {limits.max_file_size}",
        )
    sha512_hex = parsed.file_sha512.hex()
    header = ChunkHeader(
        file_id=omsi_file_id(parsed.relpath, sha512_hex),
        relpath=parsed.relpath,
        size=UNKNOWN_SIZE,
        chunk_size=chunk_size,
        index=parsed.index - 1,
        count=parsed.count,
        offset=parsed.offset,
        # Not part of a version's identity: the same content sent again after a `touch`
        # must be recognised as already delivered, not conflict with the first send.
        mtime_ns=0,
        producer_id=OMSI_PRODUCER_ID,
        generation=1,
        sha256=SHA512_PREFIX + sha512_hex,
    )
    return Chunk(header=header, data=parsed.data)


# --- the codec the reassembler is given ----------------------------------------------------


class OpenMsiStreamCodec:
    """Reads OpenMSIStream 1.8 topics (see the module docstring)."""

    wire_format = WireFormat.OPENMSISTREAM
    #: The key holds the chunk index, so a file's chunks are spread over partitions.
    file_spans_partitions = True

    def decode(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: KafkaHeaders | None,
        limits: DecodeLimits,
    ) -> Chunk | AbortNotice:
        """Decode one OpenMSIStream message; headers are not part of the format."""
        return decode_omsi_message(key, value, limits)

    def verify(
        self, progress: FileProgress, staged: Path, running_sha256: str | None
    ) -> VerifiedFile:
        """Check the rebuilt file's SHA-512; return its size and SHA-256."""
        expected = progress.sha256 or ""
        if not expected.startswith(SHA512_PREFIX):
            raise VerificationError("no SHA-512 was recorded for this file")
        sha512 = hashlib.sha512()
        sha256 = hashlib.sha256()
        size = 0
        with staged.open("rb") as handle:
            while block := handle.read(HASH_BLOCK_BYTES):
                sha512.update(block)
                sha256.update(block)
                size += len(block)
        low = (progress.chunk_count - 1) * progress.chunk_size
        if not low <= size <= progress.chunk_count * progress.chunk_size:
            raise VerificationError(
                f"size {size} does not fit {progress.chunk_count} chunks of "
                f"{progress.chunk_size} bytes"
            )
        actual = SHA512_PREFIX + sha512.hexdigest()
        if actual != expected:
            raise VerificationError(
                f"SHA-512 mismatch: expected {expected[len(SHA512_PREFIX) :]}, "
                f"got {actual[len(SHA512_PREFIX) :]}"
            )
        return VerifiedFile(size=size, sha256=sha256.hexdigest())

    def relpath_hint(self, key: bytes | None, headers: KafkaHeaders | None) -> str | None:
        """The message key (it names the file), as text."""
        if not isinstance(key, bytes):
            return None
        return key[:300].decode("utf-8", errors="replace")


# --- encoding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileDigests:
    """What one read of a file gives: its size, SHA-512 (raw) and SHA-256 (hex)."""

    size: int
    sha512: bytes
    sha256: str


def digest_stream(handle: BinaryIO, block_bytes: int = HASH_BLOCK_BYTES) -> FileDigests:
    """Read a file object to its end, hashing it both ways."""
    sha512 = hashlib.sha512()
    sha256 = hashlib.sha256()
    size = 0
    while block := handle.read(block_bytes):
        sha512.update(block)
        sha256.update(block)
        size += len(block)
    return FileDigests(size=size, sha512=sha512.digest(), sha256=sha256.hexdigest())


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks of a file; an empty file is sent as one empty chunk (OpenMSIStream sends none)."""
    return max(1, -(-size // chunk_size))


def encode_omsi_chunk(
    *,
    relpath: str,
    file_sha512: bytes,
    index: int,
    count: int,
    offset: int,
    data: bytes,
    mtime: float,
) -> tuple[bytes, bytes]:
    """Encode one chunk as OpenMSIStream 1.8 does: ``(key, value)``.

    Args:
        relpath: Relative POSIX path of the file (validated).
        file_sha512: Raw SHA-512 of the whole file.
        index: Chunk number, from 1.
        count: Number of chunks.
        offset: Byte offset of ``data`` in the file.
        data: The chunk bytes.
        mtime: The file's modification time in seconds.

    Returns:
        The UTF-8 key and the msgpack value.

    Raises:
        WireFormatError: The path is unsafe or the digest is not 64 bytes.
    """
    subdir, filename = split_relpath(relpath)
    _relpath(subdir, filename, "")
    _digest(file_sha512, "the file hash")
    value = msgpack.packb(
        [
            filename,
            file_sha512,
            hashlib.sha512(data).digest(),
            offset,
            index,
            count,
            subdir,
            "",
            data,
            float(mtime),
        ],
        use_bin_type=True,
    )
    return omsi_key(subdir, filename, index, count).encode("utf-8"), value


def iter_omsi_messages(
    handle: BinaryIO,
    relpath: str,
    digests: FileDigests,
    chunk_size: int,
    mtime: float,
) -> Iterator[tuple[bytes, bytes, int]]:
    """Read a file (from its current position) and yield ``(key, value, bytes)`` per chunk.

    The caller must have computed ``digests`` in an earlier pass: every chunk carries the
    whole file's SHA-512. A file that changed in between is sent as read; consumers then
    reject it on the SHA-512 check, and the caller reports it as changed.

    Raises:
        WireFormatError: The path is unsafe.
    """
    count = chunk_count(digests.size, chunk_size)
    for index in range(1, count + 1):
        data = handle.read(chunk_size)
        key, value = encode_omsi_chunk(
            relpath=relpath,
            file_sha512=digests.sha512,
            index=index,
            count=count,
            offset=(index - 1) * chunk_size,
            data=data,
            mtime=mtime,
        )
        yield key, value, len(data)
