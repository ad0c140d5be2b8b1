"""Send files to a Kafka topic as chunks (wire format v1), reading each file once.

The producer is idempotent (`enable.idempotence`, `acks=all`) and keeps at most
`max_inflight_bytes` of chunk data unacknowledged, so its memory is flat whatever the
file size. Files are pipelined: the next file is read while the previous one's chunks are
still in flight, and a file counts as sent only when the broker has acknowledged every one
of its chunks (the delivery reports drive the registry).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from msi_prefect.errors import MsiError
from msi_prefect.transfer.formats import WireFormat
from msi_prefect.transfer.kafka import Compression, KafkaConnection
from msi_prefect.transfer.registry import Claim, Registry
from msi_prefect.transfer.wire import (
    DEFAULT_CHUNK_SIZE,
    AbortNotice,
    ChunkHeader,
    ChunkHeaderEncoder,
    KafkaHeaderList,
    encode_abort_headers,
    message_key,
)

logger = logging.getLogger(__name__)

# librdkafka's idempotent producer keeps at most this many messages in flight per partition
# (RD_KAFKA_IDEMP_MAX_INFLIGHT), and while more wait in its queue its broker thread spins on
# a CPU core. So by default no more chunks are in flight than it can send: measured, this
# freed about 1 CPU-s per 512 MiB on the sending side and sped transfers up (bench/RESULTS.md).
IDEMPOTENT_INFLIGHT_MESSAGES = 5
# Room for the headers on top of the chunk in librdkafka's per-message limit.
HEADER_ALLOWANCE_BYTES = 64 * 1024
LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
BACKPRESSURE_POLL_S = 0.05
# Delivery reports are served in bulk (one registry transaction) at most this often.
DELIVERY_SERVE_INTERVAL_S = 0.05
FLUSH_TIMEOUT_S = 120.0
# librdkafka asks for the idempotent producer id only on a metadata response or on a fixed
# 500 ms timer, and the first response usually arrives before the connection it needs is up.
# Two metadata requests at once get the id in about 50 ms instead (bench/RESULTS.md).
PRODUCER_ID_METADATA_REQUESTS = 2
PRODUCER_ID_METADATA_TIMEOUT_S = 1.0
# upload_all opens this many files at a time and claims them in one registry commit:
# one commit per small file cost more than reading and sending it (bench/RESULTS.md).
CLAIM_BATCH_FILES = 64


class UploadOutcome(StrEnum):
    """What became of one file handed to the producer."""

    SENT = "sent"  # every chunk acknowledged by the broker
    ALREADY_SENT = "already-sent"  # this exact version was sent before (registry)
    CHANGED_WHILE_READING = "changed-while-reading"  # aborted; sent again once stable
    VANISHED = "vanished"  # deleted before or while it was read
    UNREADABLE = "unreadable"  # permission denied or another OS error
    FAILED = "failed"  # the broker did not acknowledge a chunk


@dataclass(frozen=True)
class UploadResult:
    """The outcome of one file, with what the Prefect layer needs for its event."""

    relpath: str
    outcome: UploadOutcome
    size: int = 0
    generation: int | None = None
    sha256: str | None = None
    file_id: str | None = None
    reason: str | None = None


# Outcomes after which a file needs nothing more from this run.
SETTLED_OUTCOMES = frozenset(
    {UploadOutcome.SENT, UploadOutcome.ALREADY_SENT, UploadOutcome.FAILED, UploadOutcome.UNREADABLE}
)

# Outcomes after which the file is at the destination's topic: nothing failed.
GOOD_OUTCOMES = frozenset({UploadOutcome.SENT, UploadOutcome.ALREADY_SENT})


@dataclass
class UploadTally:
    """Counts of one run's outcomes (constant memory, however many files go by)."""

    outcomes: Counter[UploadOutcome] = field(default_factory=Counter)
    bytes_sent: int = 0

    def add(self, result: UploadResult) -> None:
        """Count one file's outcome."""
        self.outcomes[result.outcome] += 1
        if result.outcome is UploadOutcome.SENT:
            self.bytes_sent += result.size

    @property
    def settled(self) -> int:
        """Files this run is done with."""
        return sum(n for outcome, n in self.outcomes.items() if outcome in SETTLED_OUTCOMES)


def default_producer_id() -> str:
    """Host name: identifies the instrument machine a file came from."""
    return socket.gethostname()


@dataclass(frozen=True)
class ProducerSettings:
    """How files are cut and sent.

    Attributes:
        topic: Destination topic.
        chunk_size: Bytes per message value.
        max_inflight_bytes: Unacknowledged chunk bytes allowed before reading pauses; by
            default as many chunks as librdkafka's idempotent producer sends at once
            (`IDEMPOTENT_INFLIGHT_MESSAGES`), with room for their headers.
        compression: Producer compression codec.
        producer_id: Written into every message (`msi.pid`).
        linger_ms: How long librdkafka waits to fill a batch.
        wire_format: Our wire format, or OpenMSIStream's (for consumers not migrated yet:
            no headers, no generations on the wire, no abort messages).
    """

    topic: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_inflight_bytes: int | None = None
    compression: Compression = Compression.NONE
    producer_id: str = field(default_factory=default_producer_id)
    linger_ms: int = 5
    wire_format: WireFormat = WireFormat.NATIVE

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise MsiError(f"chunk size must be positive, got {self.chunk_size}")
        if self.max_inflight_bytes is not None and self.max_inflight_bytes < self.chunk_size:
            raise MsiError("max in-flight bytes must be at least one chunk")

    @property
    def inflight_limit(self) -> int:
        """Unacknowledged bytes allowed: `max_inflight_bytes`, or the default for the chunk."""
        if self.max_inflight_bytes is not None:
            return self.max_inflight_bytes
        # Sealed (encrypted) chunks are slightly larger than the chunk size.
        return IDEMPOTENT_INFLIGHT_MESSAGES * (self.chunk_size + HEADER_ALLOWANCE_BYTES)


@dataclass
class _PendingFile:
    """A file whose chunks are (partly) in flight."""

    relpath: str
    file_id: str
    generation: int
    size: int
    chunks_left: int
    sha256: str | None = None
    error: str | None = None
    aborted: bool = False

    def result(self, outcome: UploadOutcome, reason: str | None = None) -> UploadResult:
        """The file's outcome, as reported to callers."""
        return UploadResult(
            self.relpath,
            outcome,
            size=self.size,
            generation=self.generation,
            sha256=self.sha256 if outcome is UploadOutcome.SENT else None,
            file_id=self.file_id,
            reason=reason,
        )


@dataclass(frozen=True)
class _OpenSource:
    """A file opened for sending, with its identity taken from the open handle."""

    relpath: str
    handle: Any
    before: os.stat_result


ResultCallback = Callable[[UploadResult], None]
KafkaHeaders = list[tuple[str, str | bytes | None]]


class MessageSealer(Protocol):
    """Turns a wire-format message into what goes on the topic (e.g. encrypts it)."""

    def seal(
        self, topic: str, key: bytes, value: bytes | memoryview, headers: KafkaHeaderList
    ) -> tuple[bytes, KafkaHeaderList]:
        """Return the value and headers to produce instead."""
        ...


ProgressCallback = Callable[[str, int, int], None]


class FileProducer:
    """Reads files and produces their chunks; reports each file's outcome once.

    Args:
        connection: The Kafka cluster.
        settings: Topic and chunking settings.
        registry: Producer registry; it hands out generations and prevents re-sending a
            version that was sent already. Required: generations must grow per path.
        on_result: Called once per file with its final outcome (from `submit` for immediate
            outcomes, from delivery reports for sent or failed files).
        codec: Optional sealer applied to every message before it is produced (end-to-end
            encryption: ``msi_prefect.transfer.crypto.CryptoCodec``). The caller closes it.
    """

    def __init__(
        self,
        connection: KafkaConnection,
        settings: ProducerSettings,
        registry: Registry,
        on_result: ResultCallback | None = None,
        codec: MessageSealer | None = None,
    ) -> None:
        from confluent_kafka import Producer

        if codec is not None and settings.wire_format is not WireFormat.NATIVE:
            raise MsiError(
                f"end-to-end encryption works with the native wire format only, not "
                f"{settings.wire_format.value} (OpenMSIStream's own consumers could not read it)"
            )
        self._codec = codec
        self.settings = settings
        self.registry = registry
        self._on_result = on_result
        self._inflight_bytes = 0
        self._served_at = time.monotonic()
        self._pending: dict[tuple[str, int], _PendingFile] = {}
        self._producer = Producer(self._config(connection))
        self._request_producer_id()

    def _config(self, connection: KafkaConnection) -> dict[str, Any]:
        config = connection.client_config()
        config.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": self.settings.compression.value,
                "linger.ms": self.settings.linger_ms,
                # librdkafka also caps a whole batch at this size: never go below its
                # default, or each produce request would carry a single chunk.
                "message.max.bytes": max(
                    LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES,
                    self.settings.chunk_size + HEADER_ALLOWANCE_BYTES,
                ),
                # librdkafka's own queue is bounded too; our in-flight limit is the tighter one.
                "queue.buffering.max.kbytes": max(1024, 2 * self.settings.inflight_limit // 1024),
            }
        )
        return config

    def _request_producer_id(self) -> None:
        """Have librdkafka fetch its producer id now rather than after its 500 ms timer."""
        from confluent_kafka import KafkaException

        for _ in range(PRODUCER_ID_METADATA_REQUESTS):
            try:
                self._producer.list_topics(
                    self.settings.topic, timeout=PRODUCER_ID_METADATA_TIMEOUT_S
                )
            except KafkaException:
                return  # unreachable: the first produce reports it, as it would anyway

    @property
    def inflight_bytes(self) -> int:
        """Chunk bytes produced and not yet acknowledged (at most `inflight_limit`)."""
        return self._inflight_bytes

    @property
    def pending_files(self) -> int:
        """Files with chunks still awaiting acknowledgement."""
        return len(self._pending)

    def submit(
        self, path: Path, relpath: str, on_progress: ProgressCallback | None = None
    ) -> UploadResult | None:
        """Read one file and produce its chunks.

        Returns:
            The result right away when the file was not sent (already sent, vanished,
            unreadable, changed while read); None when its chunks are in flight (the result
            then comes through `on_result` from `poll` or `flush`).
        """
        return self.submit_many([(path, relpath)], on_progress)[0]

    def submit_many(
        self, files: Sequence[tuple[Path, str]], on_progress: ProgressCallback | None = None
    ) -> list[UploadResult | None]:
        """Open several files, claim them in one registry commit, then send each.

        Every claim is committed before any chunk is produced, as for a single file, so a
        crash leaves the claimed files SENDING and the next start retries each with the same
        generation (or a new one if it changed meanwhile).

        Args:
            files: (path on disk, relative POSIX path) pairs; each is held open until sent.
            on_progress: Called after each chunk with (relpath, bytes read, size).

        Returns:
            One entry per file, as :meth:`submit` returns it.
        """
        results: list[UploadResult | None] = [None] * len(files)
        with contextlib.ExitStack() as open_files:
            sources: list[tuple[int, _OpenSource]] = []
            for position, (path, relpath) in enumerate(files):
                opened = self._open_source(path, relpath)
                if isinstance(opened, UploadResult):
                    results[position] = opened
                else:
                    open_files.callback(opened.handle.close)
                    sources.append((position, opened))
            topic = self.settings.topic
            with self.registry.batch():
                claims = [
                    self.registry.begin(
                        topic,
                        source.relpath,
                        source.before.st_size,
                        source.before.st_mtime_ns,
                        source.before.st_ino,
                    )
                    for _, source in sources
                ]
            for (position, source), claim in zip(sources, claims, strict=True):
                results[position] = self._send_claimed(source, claim, on_progress)
                source.handle.close()  # now, not at the end of the window
        return results

    def _open_source(self, path: Path, relpath: str) -> _OpenSource | UploadResult:
        """Open a file and take its identity, or report why it cannot be sent."""
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return self._report(UploadResult(relpath, UploadOutcome.VANISHED, reason="gone"))
        except OSError as exc:
            reason = f"cannot open: {exc.strerror or exc}"
            return self._report(UploadResult(relpath, UploadOutcome.UNREADABLE, reason=reason))
        try:
            return _OpenSource(relpath, handle, os.fstat(handle.fileno()))
        except BaseException:
            handle.close()
            raise

    def _send_claimed(
        self, source: _OpenSource, claim: Claim | None, on_progress: ProgressCallback | None
    ) -> UploadResult | None:
        relpath, before = source.relpath, source.before
        if claim is None:
            record = self.registry.get(self.settings.topic, relpath)
            return self._report(
                UploadResult(
                    relpath,
                    UploadOutcome.ALREADY_SENT,
                    size=before.st_size,
                    generation=record.generation if record else None,
                    sha256=record.sha256 if record else None,
                )
            )
        try:
            return self._send(source.handle, before, relpath, claim.generation, on_progress)
        except OSError as exc:
            reason = f"read error: {exc.strerror or exc}"
            self._abort(relpath, claim.generation)
            self.registry.mark_failed(self.settings.topic, relpath, claim.generation, reason)
            return self._report(UploadResult(relpath, UploadOutcome.UNREADABLE, reason=reason))

    def _send(
        self,
        handle: Any,
        before: os.stat_result,
        relpath: str,
        generation: int,
        on_progress: ProgressCallback | None,
    ) -> UploadResult | None:
        if self.settings.wire_format is WireFormat.OPENMSISTREAM:
            return self._send_openmsistream(handle, before, relpath, generation, on_progress)
        size = before.st_size
        chunk_size = self.settings.chunk_size
        first = ChunkHeader.for_chunk(
            relpath=relpath,
            size=size,
            chunk_size=chunk_size,
            index=0,
            mtime_ns=before.st_mtime_ns,
            producer_id=self.settings.producer_id,
            generation=generation,
        )
        encoder = ChunkHeaderEncoder(first)
        pending = _PendingFile(relpath, first.file_id, generation, size, first.count)
        self._pending[(first.file_id, generation)] = pending
        digest = hashlib.sha256()
        key = message_key(first.file_id)
        last = first.count - 1
        for index in range(first.count):
            offset = index * chunk_size
            expected = min(chunk_size, size - offset)
            # Never more than the file holds: read(chunk_size) would allocate a whole
            # chunk's buffer for every small file.
            data = handle.read(expected)
            if len(data) != expected:
                return self._changed(pending, "it shrank while being read")
            if index == last:
                digest.update(data)
                after = os.stat(handle.fileno())
                if handle.read(1) or _identity(after) != _identity(before):
                    return self._changed(pending, "it changed while being read")
                pending.sha256 = digest.hexdigest()
                self._produce(key, data, encoder.headers(index, pending.sha256), pending)
            else:
                self._produce(key, data, encoder.headers(index, None), pending)
                # Hashed once handed over, so librdkafka sends it meanwhile (the last
                # chunk's headers carry the digest, so it is hashed first).
                digest.update(data)
            if on_progress is not None:
                on_progress(relpath, offset + len(data), size)
        return None

    def _send_openmsistream(
        self,
        handle: Any,
        before: os.stat_result,
        relpath: str,
        generation: int,
        on_progress: ProgressCallback | None,
    ) -> UploadResult | None:
        """Send a file as OpenMSIStream 1.8 messages (``openmsistream_format.py``).

        Every chunk carries the whole file's SHA-512, so the file is read twice: once to
        hash it, once to send it. The format has no abort message: a file that changes
        meanwhile is still sent as read (consumers reject it on the SHA-512) and reported
        as changed, so the watcher sends it again once it is stable.
        """
        from msi_prefect.transfer import openmsistream_format as omsi

        digests = omsi.digest_stream(handle)
        size = digests.size
        if size != before.st_size or _identity(os.stat(handle.fileno())) != _identity(before):
            self.registry.mark_aborted(self.settings.topic, relpath, generation)
            return self._report(
                UploadResult(
                    relpath,
                    UploadOutcome.CHANGED_WHILE_READING,
                    size=size,
                    generation=generation,
                    reason="not sent: it changed while being hashed; it will be sent once "
                    "it is stable",
                )
            )
        handle.seek(0)
        count = omsi.chunk_count(size, self.settings.chunk_size)
        file_id = omsi.omsi_file_id(relpath, digests.sha512.hex())
        pending = _PendingFile(relpath, file_id, generation, size, count, sha256=digests.sha256)
        self._pending[(file_id, generation)] = pending
        done = 0
        for key, value, length in omsi.iter_omsi_messages(
            handle, relpath, digests, self.settings.chunk_size, before.st_mtime
        ):
            self._produce(key, value, None, pending)
            done += length
            if on_progress is not None:
                on_progress(relpath, done, size)
        after = os.stat(handle.fileno())
        if done != size or handle.read(1) or _identity(after) != _identity(before):
            return self._changed(pending, "it changed while being read")
        return None

    def _produce(
        self,
        key: bytes,
        data: bytes,
        headers: KafkaHeaders | None,
        pending: _PendingFile | None,
    ) -> None:
        if self._codec is not None:
            data, headers = self._codec.seal(self.settings.topic, key, data, headers or [])
        size = len(data)
        # Bound memory: wait for acknowledgements before putting more bytes in flight.
        while self._inflight_bytes and self._inflight_bytes + size > self.settings.inflight_limit:
            self._serve_deliveries(BACKPRESSURE_POLL_S)
        self._inflight_bytes += size

        def delivered(err: Any, _msg: Any) -> None:
            self._inflight_bytes -= size
            if pending is not None:
                self._on_chunk_delivered(pending, err)

        while True:
            try:
                self._producer.produce(
                    self.settings.topic,
                    key=key,
                    value=data,
                    headers=headers,
                    on_delivery=delivered,
                )
                break
            except BufferError:  # librdkafka's queue is full: serve callbacks, then retry
                self._serve_deliveries(BACKPRESSURE_POLL_S)
        if time.monotonic() - self._served_at > DELIVERY_SERVE_INTERVAL_S:
            self._serve_deliveries(0)

    def _serve_deliveries(self, timeout_s: float) -> int:
        """Run delivery callbacks; their registry updates share one transaction."""
        self._served_at = time.monotonic()
        with self.registry.batch():
            return int(self._producer.poll(timeout_s))

    def _on_chunk_delivered(self, pending: _PendingFile, err: Any) -> None:
        if err is not None and pending.error is None:
            pending.error = str(err)
        pending.chunks_left -= 1
        if pending.chunks_left > 0 or pending.aborted:
            return
        self._pending.pop((pending.file_id, pending.generation), None)
        topic = self.settings.topic
        if pending.error is not None or pending.sha256 is None:
            reason = f"broker did not acknowledge a chunk: {pending.error}"
            self.registry.mark_failed(topic, pending.relpath, pending.generation, reason)
            self._report(pending.result(UploadOutcome.FAILED, reason))
            return
        self.registry.mark_sent(topic, pending.relpath, pending.generation, pending.sha256)
        self._report(pending.result(UploadOutcome.SENT))

    def _changed(self, pending: _PendingFile, why: str) -> UploadResult | None:
        """Abort a half-sent generation so consumers drop it; it is sent again later."""
        pending.aborted = True
        self._pending.pop((pending.file_id, pending.generation), None)
        self._abort(pending.relpath, pending.generation)
        self.registry.mark_aborted(self.settings.topic, pending.relpath, pending.generation)
        return self._report(
            pending.result(
                UploadOutcome.CHANGED_WHILE_READING,
                f"not sent: {why}; it will be sent once it is stable",
            )
        )

    def _abort(self, relpath: str, generation: int) -> None:
        if self.settings.wire_format is not WireFormat.NATIVE:
            return  # OpenMSIStream has no abort message; its consumers check the SHA-512
        notice = AbortNotice.for_path(relpath, generation, self.settings.producer_id)
        self._produce(message_key(notice.file_id), b"", encode_abort_headers(notice), None)

    def _report(self, result: UploadResult) -> UploadResult:
        quiet = result.outcome in (UploadOutcome.SENT, UploadOutcome.ALREADY_SENT)
        logger.log(
            logging.DEBUG if quiet else logging.WARNING,
            "%s: %s%s",
            result.relpath,
            result.outcome.value,
            f" ({result.reason})" if result.reason else "",
        )
        if self._on_result is not None:
            self._on_result(result)
        return result

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports (and so report finished files)."""
        self._serve_deliveries(timeout_s)

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until every produced chunk is acknowledged or failed.

        Raises:
            MsiError: chunks are still unacknowledged after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while self._flush_some(min(1.0, max(0.0, deadline - time.monotonic()))) > 0:
            if time.monotonic() >= deadline:
                raise MsiError(
                    f"{len(self._pending)} file(s) not acknowledged by the broker within "
                    f"{timeout_s:.0f} s; is the broker at the configured address reachable?"
                )

    def _flush_some(self, timeout_s: float) -> int:
        with self.registry.batch():
            return int(self._producer.flush(timeout_s))

    def upload_all(
        self, files: Iterable[tuple[Path, str]], on_progress: ProgressCallback | None = None
    ) -> list[UploadResult]:
        """Send files one after another (pipelined); return every outcome after a flush.

        Args:
            files: (path on disk, relative POSIX path to send it as) pairs.
            on_progress: Called after each chunk with (relpath, bytes read, size).
        """
        collected: list[UploadResult] = []
        outer = self._on_result

        def collect(result: UploadResult) -> None:
            collected.append(result)
            if outer is not None:
                outer(result)

        self._on_result = collect
        try:
            window: list[tuple[Path, str]] = []
            for item in files:
                window.append(item)
                if len(window) == CLAIM_BATCH_FILES:
                    self.submit_many(window, on_progress)
                    window.clear()
            self.submit_many(window, on_progress)
            self.flush()
        finally:
            self._on_result = outer
        return collected

    def close(self) -> None:
        """Flush what is in flight."""
        self.flush()


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)
