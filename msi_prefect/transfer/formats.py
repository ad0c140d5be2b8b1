"""Wire formats a topic may use, and the codec strategy the reassembler is given for each.

The reassembler's loop (staging writes, progress store, offset commits, sinks, events) is
the same for every format. What differs is kept behind :class:`WireCodec`:

- how one untrusted Kafka message becomes a :class:`~msi_prefect.transfer.wire.Chunk`
  (or an abort),
- how a fully received staging file is verified (SHA-256 and size for ours, SHA-512 for
  OpenMSIStream's), which yields the size and SHA-256 every event carries, and
- whether one file's chunks stay on one partition (so several consumers may share a group).

``native`` is wire format v1 (``docs/wire-format.md``); ``openmsistream`` is OpenMSIStream
1.8's ``DataFileChunk`` messages (``msi_prefect/transfer/openmsistream_format.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from msi_prefect.errors import TransferError
from msi_prefect.transfer.progress import FileProgress
from msi_prefect.transfer.wire import (
    MIB,
    AbortNotice,
    Chunk,
    DecodeLimits,
    KafkaHeaders,
    decode_message,
)

HASH_BLOCK_BYTES = 4 * MIB


class WireFormat(StrEnum):
    """How files are laid out as messages on a topic."""

    NATIVE = "native"
    """msi_prefect's wire format v1: keyed by file, chunk facts in headers."""
    OPENMSISTREAM = "openmsistream"
    """OpenMSIStream 1.8's ``DataFileChunk`` messages: keyed by chunk, msgpack values."""


@dataclass(frozen=True)
class VerifiedFile:
    """A staging file that passed its format's whole-file check.

    Attributes:
        size: Its size in bytes.
        sha256: Its SHA-256, hex (what events and sinks carry, whatever the format).
    """

    size: int
    sha256: str


class VerificationError(TransferError):
    """A fully received file does not match what its messages promised.

    Attributes:
        reason: What did not match, for people (it becomes the rejection reason).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class WireCodec(Protocol):
    """What the reassembler needs to know about a wire format."""

    @property
    def wire_format(self) -> WireFormat:
        """The format this codec reads."""
        ...

    @property
    def file_spans_partitions(self) -> bool:
        """Whether one file's chunks may land on several partitions.

        If so, a reassembler must own every partition of its topic: two members of one
        group would each hold only part of a file.
        """
        ...

    def decode(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: KafkaHeaders | None,
        limits: DecodeLimits,
    ) -> Chunk | AbortNotice:
        """Decode and validate one untrusted message.

        Raises:
            WireFormatError: For any message that breaks the format; nothing else.
        """
        ...

    def verify(
        self, progress: FileProgress, staged: Path, running_sha256: str | None
    ) -> VerifiedFile:
        """Check a fully received staging file against what its messages promised.

        Args:
            progress: The generation's row (expected size and digest as the codec stored
                them through the chunk headers).
            staged: The staging file.
            running_sha256: SHA-256 computed while the chunks arrived in order, if any.

        Raises:
            VerificationError: The file does not match.
            OSError: The staging file cannot be read.
        """
        ...

    def relpath_hint(self, key: bytes | None, headers: KafkaHeaders | None) -> str | None:
        """Best-effort path of a rejected message, for its event (may be unsafe text)."""
        ...


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


class NativeCodec:
    """Wire format v1 (``wire.py``): the size and SHA-256 ride on the chunk headers."""

    wire_format = WireFormat.NATIVE
    file_spans_partitions = False

    def decode(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: KafkaHeaders | None,
        limits: DecodeLimits,
    ) -> Chunk | AbortNotice:
        """Decode one wire-format-v1 message (see :func:`~wire.decode_message`)."""
        return decode_message(key, value, headers, limits)

    def verify(
        self, progress: FileProgress, staged: Path, running_sha256: str | None
    ) -> VerifiedFile:
        """Compare size and SHA-256 with the headers' claims."""
        actual_size = staged.stat().st_size
        digest = running_sha256 if running_sha256 is not None else sha256_of(staged)
        if actual_size != progress.size:
            raise VerificationError(
                f"size mismatch: expected {progress.size} bytes, got {actual_size}"
            )
        if digest != progress.sha256:
            raise VerificationError(f"SHA-256 mismatch: expected {progress.sha256}, got {digest}")
        return VerifiedFile(size=actual_size, sha256=digest)

    def relpath_hint(self, key: bytes | None, headers: KafkaHeaders | None) -> str | None:
        """The ``msi.path`` header, if any."""
        try:
            items = headers.items() if isinstance(headers, dict) else headers or []
            for name, value in items:
                if name == "msi.path" and isinstance(value, bytes):
                    return value[:300].decode("utf-8", errors="replace")
        except (TypeError, ValueError):
            return None
        return None


def codec_for(wire_format: WireFormat | str) -> WireCodec:
    """The codec of a wire format.

    Raises:
        ValueError: Unknown format name.
    """
    chosen = WireFormat(wire_format)
    if chosen is WireFormat.OPENMSISTREAM:
        from msi_prefect.transfer.openmsistream_format import OpenMsiStreamCodec

        return OpenMsiStreamCodec()
    return NativeCodec()
