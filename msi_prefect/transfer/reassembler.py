"""Rebuild files from a topic: a consumer-group member that writes chunks in place.

Per batch of messages: every chunk is written with a positional write into its
generation's staging file; the touched staging files are fsynced; the chunks are recorded
in the progress store in one transaction; files whose last chunk is in are verified
(SHA-256, size) and handed to the sink (an atomic rename into the destination, or an upload);
the outcome of every finished file is handed to the event callback (which makes it durable,
e.g. in an event outbox); only then is the progress transaction committed, and then the
batch's offsets. A crash at any point therefore loses nothing and repeats at most one batch,
whose chunks are recognised as already written.

Events are part of that commit order. A callback that fails on storage (an ``OSError`` or
``sqlite3.OperationalError``, such as a full disk under the event outbox) raises
``EventDeliveryError``: the batch is neither recorded nor committed, it is rewound and
retried after a pause like any local write error, and the replay delivers its files again
with the same events. Events the callback already took before the failure are not handed
to it again. Any other exception from the callback is a bug, not a state of the disk: it
stops the consumer with the batch uncommitted (the next start replays it) rather than
retrying forever or committing a file whose event was lost.

Several reassemblers may share a consumer group, and a partition can move to another
member while a file is half received. So the offset committed for a partition never passes
the first message of a file that is still unfinished there: whoever reads the partition
next (another member, or this one after a restart) starts at that file's beginning. Chunks
already durable here are recognised and not written again, so a restart costs a re-read
from the broker, never a rewrite; another member rebuilds the whole file. This needs no
broker feature beyond plain offset commits (Tansu, for one, does not keep commit metadata).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from msi_prefect.errors import EventDeliveryError, MsiError
from msi_prefect.transfer.formats import VerificationError, WireFormat, codec_for
from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.layout import DestinationLayout
from msi_prefect.transfer.paths import UnsafePathError
from msi_prefect.transfer.progress import (
    ChunkReceipt,
    FileProgress,
    OpenOutcome,
    ProgressState,
    ProgressStore,
)
from msi_prefect.transfer.sinks import LocalDirectorySink, Sink, SinkError, sink_for
from msi_prefect.transfer.stopping import StopConditions
from msi_prefect.transfer.wire import (
    MIB,
    AbortNotice,
    Chunk,
    DecodeLimits,
    KafkaHeaderList,
    KafkaHeaders,
    RejectReason,
    WireFormatError,
)
from msi_prefect.transfer.work_lock import FolderLock

logger = logging.getLogger(__name__)

MAX_OPEN_STAGING_FILES = 256
FSYNC_THREADS = 4
DEFAULT_BATCH_MESSAGES = 500
# A batch also stops at about this many bytes, so large chunks do not pile up in memory.
BATCH_BYTES = 32 * MIB
PREFETCH_KBYTES = 16 * 1024
FETCH_QUEUE_BACKOFF_MS = 10
FETCH_WAIT_MAX_MS = 50
# Short: consume() waits this long for a full batch, which delays the last files.
DEFAULT_POLL_TIMEOUT_S = 0.1
# A file with no chunk for this long no longer holds back the partition's committed offset
# (its producer died for good); its staging file waits for a producer retry or a prune.
DEFAULT_ABANDON_AFTER_S = 3600.0
# Pause before retrying a batch that failed on a local error (disk full, I/O error).
LOCAL_ERROR_BACKOFF_S = 5.0
#: Errors of this machine, not of the data: the batch is rewound and retried after a pause.
LOCAL_ERRORS = (OSError, SinkError, sqlite3.OperationalError)
# Rejection codes beyond the wire format's own RejectReason values.
VERIFICATION_FAILED = "verification-failed"
INCONSISTENT_WITH_EARLIER_CHUNKS = "inconsistent-with-earlier-chunks"
# Added to twice the session timeout: how long a partial assignment is tolerated in a format
# whose files span partitions.
PARTIAL_ASSIGNMENT_MARGIN_S = 5.0
# Identities of recently rejected messages: a file whose every chunk is rejected counts as
# one rejected file, not one per chunk.
REJECTED_IDENTITIES_KEPT = 1024


class FileEventKind(StrEnum):
    """What happened to a file (or a message) on the consumer side."""

    RECONSTRUCTED = "reconstructed"
    REJECTED = "rejected"


@dataclass(frozen=True)
class FileEvent:
    """One reconstructed or rejected file (or rejected message), for logs and events.

    Attributes:
        kind: Reconstructed or rejected.
        topic: Topic the file came from.
        relpath: Relative path claimed by the message (may be unsafe for rejections).
        file_id: File id (message key), if known.
        generation: File generation, if known.
        size: File size in bytes, if known.
        sha256: Verified SHA-256 (reconstructed files only).
        url: Where the file now is (reconstructed files only).
        reason: Why it was rejected.
        reason_code: Machine-readable rejection code.
        partition: Partition of the message that decided the outcome.
        offset: Offset of that message.
    """

    kind: FileEventKind
    topic: str
    relpath: str | None
    file_id: str | None = None
    generation: int | None = None
    size: int | None = None
    sha256: str | None = None
    url: str | None = None
    reason: str | None = None
    reason_code: str | None = None
    partition: int | None = None
    offset: int | None = None

    @property
    def names_file(self) -> bool:
        """Whether the outcome is about a file: it has a path or a file id.

        A rejected message that names neither (garbage, another application's message on
        the topic) is not a file: it is counted apart and reported by partition and offset.
        """
        return self.relpath is not None or self.file_id is not None

    def where(self) -> str:
        """The file's path, or for a message that names no file its partition and offset."""
        if self.relpath is not None:
            return repr(self.relpath)
        if self.file_id is not None:
            return f"file id {self.file_id}"
        return f"message at partition {self.partition} offset {self.offset}"


@dataclass
class ReassemblerStats:
    """Counters of one reassembler run.

    The outcome counters count each outcome once: those of a batch that is retried after
    a local error count only when the retry commits. ``messages``, ``chunks_written`` and
    ``bytes_written`` count the work done, retries included.

    Attributes:
        messages: Messages read.
        chunks_written: Chunks written into staging files.
        bytes_written: Bytes written into staging files.
        files_reconstructed: Files verified and delivered.
        files_rejected: Rejected files: files that failed verification, and rejected
            messages that name a file (by path or file id; once per file however many of
            its chunks were rejected).
        messages_rejected: Rejected messages that name no file (garbage, another
            application's messages); not files, so not in ``files_rejected``.
        rejected_by_reason: Rejections (of files and of messages) by reason code.
    """

    messages: int = 0
    chunks_written: int = 0
    bytes_written: int = 0
    files_reconstructed: int = 0
    files_rejected: int = 0
    messages_rejected: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def files_done(self) -> int:
        """Files finished either way (what ``--stop-after-files`` counts)."""
        return self.files_reconstructed + self.files_rejected


@dataclass(frozen=True)
class _OutcomeSnapshot:
    """The outcome counters before a batch, restored if the batch is rolled back."""

    files_reconstructed: int
    files_rejected: int
    messages_rejected: int
    rejected_by_reason: Counter[str]
    rejected_identities: OrderedDict[tuple[str | None, ...], None]


@dataclass(frozen=True)
class ReassemblerSettings:
    """Where and how files are rebuilt.

    Attributes:
        topic: Topic to read.
        destination: A local directory, or an fsspec URL such as s3://bucket/prefix.
        group_id: Consumer group; members of one group share the topic's partitions.
        work_dir: Staging and progress state. Defaults to DEST/.msi-state for a local
            destination; required for a remote one.
        storage_options: fsspec options (credentials, endpoint) for a remote destination.
        limits: Bounds on what a message may claim.
        session_timeout_ms: Consumer session timeout (Tansu joins in about half of it).
        batch_messages: Messages handled per batch (and per offset commit).
        abandon_after_s: An unfinished file silent this long stops holding back commits.
        wire_format: How files are laid out on the topic: ours, or OpenMSIStream's. A format
            that spreads a file over partitions allows one reassembler per group only.
        owner_label: Who this reassembler is (a flow run's name and id), written into the
            work and staging folders' locks so that a second one names it in its error;
            default: the process's command line.
    """

    topic: str
    destination: str
    group_id: str = "msi-reassembler"
    work_dir: Path | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    session_timeout_ms: int = 10000
    batch_messages: int = DEFAULT_BATCH_MESSAGES
    abandon_after_s: float = DEFAULT_ABANDON_AFTER_S
    wire_format: WireFormat = WireFormat.NATIVE
    owner_label: str | None = None


@dataclass
class _OpenStaging:
    """A staging file kept open across batches, with its in-order running hash.

    ``recorded`` is False for a one-chunk file of the native format: it gets no progress
    row while it is written, only one when it is finished (delivered or rejected), in the
    same batch. A crash before that batch commits replays the chunk, which rewrites the
    same bytes; so such a file costs one SQL statement to find and one to record.
    """

    progress: FileProgress
    fd: int
    hasher: Any | None
    next_index: int = 0
    recorded: bool = True


@dataclass
class _OpenFileMark:
    """Where an unfinished file began in its partition, and when it was last heard of."""

    start_offset: int
    last_seen: float


@dataclass
class _Ledger:
    """Per partition: the unfinished files, which hold back the committed offset."""

    open_files: dict[tuple[str, int], _OpenFileMark] = field(default_factory=dict)

    def commit_offset(self, next_offset: int, now: float, abandon_after_s: float) -> int:
        """The offset safe to commit: not past the start of any file still being received."""
        for key, mark in list(self.open_files.items()):
            if now - mark.last_seen > abandon_after_s:
                logger.warning(
                    "file %s generation %d abandoned: no chunk for %.0f s",
                    *key,
                    now - mark.last_seen,
                )
                del self.open_files[key]
        starts = [mark.start_offset for mark in self.open_files.values()]
        return min([next_offset, *starts])


@dataclass
class _PendingWrites:
    """Chunks written but not yet fsynced and recorded."""

    receipts: list[ChunkReceipt] = field(default_factory=list)
    touched: dict[tuple[str, int], _OpenStaging] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    # Unrecorded one-chunk files (see _OpenStaging.recorded) with their receipt.
    unrecorded: dict[tuple[str, int], tuple[_OpenStaging, ChunkReceipt]] = field(
        default_factory=dict
    )

    def add(self, receipt: ChunkReceipt, staging: _OpenStaging) -> None:
        key = (receipt.file_id, receipt.generation)
        if staging.recorded:
            self.receipts.append(receipt)
        else:
            self.unrecorded[key] = (staging, receipt)
        self.touched[key] = staging
        self.generations[receipt.file_id] = receipt.generation

    def clear(self) -> None:
        self.receipts.clear()
        self.touched.clear()
        self.generations.clear()
        self.unrecorded.clear()


EventCallback = Callable[[FileEvent], None]
# What tells one event from another: the outcome, the file generation, or the message.
_EventKey = tuple[str, str | None, int | None, str | None, int | None, int | None]


def _event_key(event: FileEvent) -> _EventKey:
    return (
        event.kind.value,
        event.file_id,
        event.generation,
        event.relpath,
        event.partition,
        event.offset,
    )


class MessageOpener(Protocol):
    """Turns what was read from the topic back into a wire-format message (e.g. decrypts)."""

    def unseal(
        self, topic: str, key: object, value: object, headers: KafkaHeaders | None
    ) -> tuple[bytes | memoryview, KafkaHeaderList]:
        """Return the wire-format value and headers; raise WireFormatError to reject."""
        ...


class Reassembler:
    """Consumes a topic and rebuilds its files at a destination.

    Args:
        connection: The Kafka cluster.
        settings: Topic, destination, group and limits.
        on_event: Called for every reconstructed or rejected file (or rejected message), in
            the consumer thread, once the batch's deliveries are durable and before its
            progress and offsets are committed. It must make the outcome durable before it
            returns. It may raise ``OSError`` or ``sqlite3.OperationalError`` when its
            storage fails (a full disk): the batch is then retried after a pause, and
            events it already took are not handed to it again. Any other exception stops
            the consumer with the batch uncommitted.
        on_tick: Called in the consumer thread after every poll of the broker (at least
            every 0.1 s), for work that is due on time rather than on a file.
        codec: Optional opener applied to every message before it is decoded (end-to-end
            encryption: ``msi_prefect.transfer.crypto.CryptoCodec``). The caller closes it.
    """

    def __init__(
        self,
        connection: KafkaConnection,
        settings: ReassemblerSettings,
        on_event: EventCallback | None = None,
        on_tick: Callable[[], None] | None = None,
        codec: MessageOpener | None = None,
    ) -> None:
        self._opener = codec
        self.settings = settings
        self.stats = ReassemblerStats()
        self._on_event = on_event
        self._on_tick = on_tick
        self._connection = connection
        self.sink: Sink = sink_for(settings.destination, settings.storage_options)
        if isinstance(self.sink, LocalDirectorySink):
            layout = DestinationLayout.of_local(Path(settings.destination), settings.work_dir)
        elif settings.work_dir is not None:
            layout = DestinationLayout.of_remote(settings.work_dir)
        else:
            raise MsiError("a work directory is needed for a remote destination")
        self.layout = layout
        self.work_dir = layout.work_dir
        self.staging_dir = layout.staging_dir
        self._staging_dir_text = os.fspath(self.staging_dir)
        self.quarantine_dir = layout.quarantine_dir
        layout.create()
        # One reassembler per progress store and staging folder (work_lock.py); released
        # by close(), or by the kernel when the process dies.
        self._locks = [FolderLock(layout.work_dir, "work folder", settings.owner_label)]
        try:
            if not layout.staging_dir.is_relative_to(layout.work_dir):
                self._locks.append(
                    FolderLock(layout.staging_dir, "staging folder", settings.owner_label)
                )
            self.progress = ProgressStore(layout.progress_store)
        except BaseException:
            self._release_locks()
            raise
        self._open: OrderedDict[tuple[str, int], _OpenStaging] = OrderedDict()
        self._ledgers: dict[int, _Ledger] = {}
        self._consumer: Any = None
        if codec is not None and settings.wire_format is not WireFormat.NATIVE:
            raise MsiError(
                "end-to-end encryption works with the native wire format only, not "
                f"{settings.wire_format.value}"
            )
        self._format = codec_for(settings.wire_format)
        # Set while this member owns only some partitions in a format that needs them all.
        self._partial_assignment: tuple[float, str] | None = None
        self._fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="msi-fsync")
        # Outcomes of the batch in hand, handed to on_event once its deliveries are durable.
        self._pending_events: list[FileEvent] = []
        # Events on_event took whose batch has not committed (it failed and is retried):
        # the retry does not hand them over again. Emptied as their batch commits.
        self._recorded_events: set[_EventKey] = set()
        self._batch_event_keys: list[_EventKey] = []
        self._rejected_identities: OrderedDict[tuple[str | None, ...], None] = OrderedDict()

    # ----------------------------------------------------------------- consumer set-up

    def _consumer_config(self) -> dict[str, Any]:
        config = self._connection.client_config()
        config.update(
            {
                "group.id": self.settings.group_id,
                "enable.auto.commit": False,  # we commit only what is durably written
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.settings.session_timeout_ms,
                # Bound prefetched data so memory stays flat (the default allows 64 MiB per
                # partition); without the short backoff a full queue pauses fetching for a
                # whole second, which cut large-file throughput by four.
                "queued.max.messages.kbytes": PREFETCH_KBYTES,
                "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
                # Tansu answers a waiting fetch late; a short wait cuts latency by ~0.1 s.
                "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
            }
        )
        return config

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            ledger = self._ledgers.pop(tp.partition, None)
            if ledger is None:
                continue
            for key in ledger.open_files:
                self._close_staging(key)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """For formats that spread a file over partitions: this member must own them all.

        A partial assignment is tolerated for a grace period (a crashed predecessor stays in
        the group until its session times out; then this member gets every partition).
        Working on a subset meanwhile is safe: offsets never pass an unfinished file.
        """
        if not self._format.file_spans_partitions:
            return
        try:
            metadata = consumer.list_topics(self.settings.topic, timeout=10)
            total = len(metadata.topics[self.settings.topic].partitions)
        except Exception as exc:  # metadata trouble must not stop a lone consumer
            logger.warning("cannot check the partition assignment: %s", exc)
            return
        if len(partitions) >= total:
            self._partial_assignment = None
            return
        message = (
            f"the {self.settings.wire_format.value} format spreads each file's chunks over "
            f"all partitions, so one reassembler must read all {total} partitions of "
            f"{self.settings.topic!r}, but group {self.settings.group_id!r} gave this one "
            f"{len(partitions)}: another member is in the group. Run a single "
            "reassembler per group for this format"
        )
        logger.warning("%s (waiting up to %.0f s for that to change)", message, self._grace_s())
        if self._partial_assignment is None:
            self._partial_assignment = (time.monotonic(), message)

    def _grace_s(self) -> float:
        """How long a partial assignment may last: a stale member's session, twice, plus."""
        return 2 * self.settings.session_timeout_ms / 1000 + PARTIAL_ASSIGNMENT_MARGIN_S

    def _check_assignment(self) -> None:
        if self._partial_assignment is None:
            return
        since, message = self._partial_assignment
        if time.monotonic() - since > self._grace_s():
            raise MsiError(message)

    # ----------------------------------------------------------------------- main loop

    def run(
        self, stop: threading.Event | None = None, conditions: StopConditions | None = None
    ) -> ReassemblerStats:
        """Consume until stopped; return the counters.

        Args:
            stop: Set it (e.g. from a SIGTERM handler) to end after the current batch.
            conditions: Optional self-stop conditions for scripted runs and tests.
        """
        from confluent_kafka import Consumer

        stop = stop or threading.Event()
        conditions = conditions or StopConditions()
        self._finish_complete_leftovers()
        self._consumer = Consumer(self._consumer_config())
        self._consumer.subscribe(
            [self.settings.topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        last_message_at = time.monotonic()
        batch_messages = self.settings.batch_messages
        try:
            while not stop.is_set():
                messages = self._consumer.consume(
                    num_messages=batch_messages, timeout=DEFAULT_POLL_TIMEOUT_S
                )
                self._check_assignment()
                if messages:
                    last_message_at = time.monotonic()
                    batch_messages = self._next_batch_size(messages)
                    self._handle_batch_with_retry(messages, stop)
                elif (
                    conditions.idle_timeout_s is not None
                    and time.monotonic() - last_message_at > conditions.idle_timeout_s
                ):
                    logger.info("no message for %.1f s: stopping", conditions.idle_timeout_s)
                    break
                if self._on_tick is not None:
                    self._on_tick()
                if (
                    conditions.stop_after_files is not None
                    and self.stats.files_done >= conditions.stop_after_files
                ):
                    break
        finally:
            self.close()
        return self.stats

    def _next_batch_size(self, messages: list[Any]) -> int:
        """Messages per batch so that a batch holds about BATCH_BYTES of chunk data."""
        total = sum(len(m.value() or b"") for m in messages)
        average = max(1, total // len(messages))
        return max(1, min(self.settings.batch_messages, BATCH_BYTES // average))

    def close(self) -> None:
        """Close staging files, leave the group cleanly and close the progress store."""
        for key in list(self._open):
            self._close_staging(key)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
            self._consumer = None
        self.progress.close()
        self._fsync_pool.shutdown()
        self._release_locks()

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()

    def _handle_batch_with_retry(self, messages: list[Any], stop: threading.Event) -> None:
        """Handle a batch; on a local error (disk full) rewind and retry it later.

        A local error is one of :data:`LOCAL_ERRORS`: an ``OSError`` (the staging files, or
        an event that could not be recorded: ``EventDeliveryError``), a ``SinkError`` (the
        destination failed a delivery or a flush) or a ``sqlite3.OperationalError`` (the
        progress store, under DEST/.msi-state by default, shares the destination's disk
        and reports a full disk in its own way).
        """
        from confluent_kafka import TopicPartition

        before = self._outcome_snapshot()
        try:
            self._handle_batch(messages)
        except LOCAL_ERRORS as exc:
            self._roll_back_outcomes(before)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            what = (
                "recording file events"
                if isinstance(exc, EventDeliveryError)
                else f"writing to {self.settings.destination}"
            )
            logger.error(
                "%s failed (%s); nothing was committed, retrying in %g s",
                what,
                reason,
                LOCAL_ERROR_BACKOFF_S,
            )
            for key in list(self._open):
                self._close_staging(key)
            if stop.wait(LOCAL_ERROR_BACKOFF_S):
                return  # stopping: the next run re-reads the uncommitted messages
            firsts: dict[int, int] = {}
            for message in messages:
                firsts.setdefault(message.partition(), message.offset())
            for partition, offset in firsts.items():
                with contextlib.suppress(Exception):
                    self._consumer.seek(TopicPartition(self.settings.topic, partition, offset))

    def _handle_batch(self, messages: list[Any]) -> None:
        """Write, sync, record and deliver a batch; record its events; commit its offsets.

        The progress updates of the whole batch are one transaction, committed after the
        sink made its deliveries durable and the event callback recorded their outcomes,
        and before the Kafka offsets are committed. A failure at any step before the
        offset commit rolls the transaction back, so the batch comes again whole.
        """
        commit_to: dict[int, int] = {}
        with self.progress.batch():
            self._handle_messages(messages, commit_to)
            self.sink.flush()  # a SinkError is a local error: the batch is retried
            self._deliver_events()
        self._commit(commit_to)
        self._events_committed()

    def _handle_messages(self, messages: list[Any], commit_to: dict[int, int]) -> None:
        pending = _PendingWrites()
        for message in messages:
            if message.error():
                if message.error().code() != _partition_eof_code():
                    logger.warning("consumer error: %s", message.error())
                continue
            self.stats.messages += 1
            partition, offset = message.partition(), message.offset()
            commit_to[partition] = offset + 1
            try:
                value, headers = message.value(), message.headers()
                if self._opener is not None:
                    value, headers = self._opener.unseal(
                        self.settings.topic, message.key(), value, headers
                    )
                decoded = self._format.decode(message.key(), value, headers, self.settings.limits)
            except WireFormatError as exc:
                self._reject_message(message, str(exc), code=exc.reason.value)
                continue
            if isinstance(decoded, AbortNotice):
                self._settle(pending)
                self._abort(decoded)
                continue
            header = decoded.header
            key = (header.file_id, header.generation)
            if pending.generations.get(header.file_id, header.generation) != header.generation:
                # A newer generation follows an older one in this batch: finish the older
                # one first, or the newer one would supersede it while it is complete.
                self._settle(pending)
            elif key not in self._open and len(self._open) >= MAX_OPEN_STAGING_FILES:
                # Opening one more file would close one with unsynced writes: settle first.
                self._settle(pending)
            staging = self._write_chunk(decoded, partition, offset, message)
            if staging is not None:
                pending.add(ChunkReceipt.for_header(self.settings.topic, header), staging)
        self._settle(pending)

    def _settle(self, pending: _PendingWrites) -> None:
        """Make the written chunks durable, record them, and finish the files now complete."""
        descriptors = [staging.fd for staging in pending.touched.values()]
        if len(descriptors) > 1:
            # Concurrent fsyncs share journal commits: about twice the files per second.
            # One task per thread, not per file: a future costs more than a small fsync.
            shares = [descriptors[start::FSYNC_THREADS] for start in range(FSYNC_THREADS)]
            list(self._fsync_pool.map(_fsync_each, shares))
        elif descriptors:
            os.fsync(descriptors[0])
        for progress in self.progress.record_chunks(pending.receipts):
            key = (progress.file_id, progress.generation)
            if progress.state is ProgressState.REJECTED:
                self._reject_file(progress, progress.reason or "rejected")
            elif progress.is_complete:
                self._finish(progress, self._open.get(key))
        for staging, receipt in pending.unrecorded.values():
            self._finish(staging.progress.fully_received(receipt.sha256), staging)
        pending.clear()

    # ------------------------------------------------------------------ chunk handling

    def _write_chunk(
        self, chunk: Chunk, partition: int, offset: int, message: Any
    ) -> _OpenStaging | None:
        header = chunk.header
        key = (header.file_id, header.generation)
        staging = self._open.get(key)
        if staging is None:
            # A string, not a Path: this runs for every file.
            path = os.path.join(
                self._staging_dir_text, f"{header.file_id}.{header.generation}.part"
            )
            record_now = header.count > 1 or self.settings.wire_format is not WireFormat.NATIVE
            opened = self.progress.open_file(
                self.settings.topic, header, path, record_new=record_now
            )
            for old in opened.superseded:
                self._discard(old)
            if opened.outcome is OpenOutcome.CONFLICT:
                self._reject_message(
                    message,
                    "the chunk disagrees with earlier chunks of the same file "
                    "(size, chunk size, path or mtime differ)",
                    code=INCONSISTENT_WITH_EARLIER_CHUNKS,
                )
                return None
            if opened.outcome in (OpenOutcome.FINISHED, OpenOutcome.STALE):
                return None  # a replay after a crash, or an outdated generation
            assert opened.progress is not None
            progress, fresh = opened.progress, opened.outcome is OpenOutcome.NEW
            if not fresh and progress.received_count and not Path(progress.staging_path).exists():
                progress = self._restart_file(progress)
                fresh = True
            staging = self._open_staging(progress, fresh=fresh)
            staging.recorded = record_now or opened.outcome is not OpenOutcome.NEW
        self._open.move_to_end(key)
        ledger = self._ledgers.get(partition)
        if ledger is None:
            ledger = self._ledgers[partition] = _Ledger()
        now = time.monotonic()
        mark = ledger.open_files.get(key)
        if mark is None:
            ledger.open_files[key] = _OpenFileMark(offset, now)
        else:
            mark.last_seen = now
        if staging.progress.has_chunk(header.index):
            return staging  # durable before this process opened the file: a replay
        data = chunk.data
        _pwrite_all(staging.fd, data, header.offset)
        if staging.hasher is not None:
            if header.index == staging.next_index:
                staging.hasher.update(data)
                staging.next_index += 1
            elif header.index > staging.next_index:
                staging.hasher = None  # out of order: verify by reading the file at the end
        self.stats.chunks_written += 1
        self.stats.bytes_written += len(data)
        return staging

    def _restart_file(self, progress: FileProgress) -> FileProgress:
        """Rebuild a file whose staging file vanished although chunks were recorded in it.

        This happens when a crash falls after the file was renamed into the destination and
        before that was recorded: the replay starts at the file's first chunk (offsets never
        pass an unfinished file), so every chunk comes again and is written anew.
        """
        logger.warning(
            "staging file of %r is gone (delivered before a crash?): rebuilding it from "
            "the replayed chunks",
            progress.relpath,
        )
        path = (
            self.staging_dir
            / f"{progress.file_id}.{progress.generation}.{uuid.uuid4().hex[:8]}.part"
        )
        restarted = self.progress.restart_file(
            self.settings.topic, progress.file_id, progress.generation, path
        )
        assert restarted is not None  # RESUMED: the row is RECEIVING, under our lock
        return restarted

    def _open_staging(self, progress: FileProgress, fresh: bool) -> _OpenStaging:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        if fresh:
            flags |= os.O_TRUNC
        fd = os.open(progress.staging_path, flags, 0o644)
        # A running hash works only from the first chunk on; a resumed file is re-read.
        hasher = hashlib.sha256() if fresh else None
        staging = _OpenStaging(progress, fd, hasher)
        key = (progress.file_id, progress.generation)
        self._open[key] = staging
        while len(self._open) > MAX_OPEN_STAGING_FILES:
            # Never one with unsynced writes: the batch loop settles before the cap is hit.
            oldest = next(iter(self._open))
            self._close_staging(oldest)
        return staging

    def _close_staging(self, key: tuple[str, int]) -> None:
        staging = self._open.pop(key, None)
        if staging is not None:
            with contextlib.suppress(OSError):
                os.close(staging.fd)

    # ---------------------------------------------------------------- file completion

    def _finish(self, progress: FileProgress, staging: _OpenStaging | None) -> None:
        """Verify a fully received file and deliver it to the sink."""
        key = (progress.file_id, progress.generation)
        path = Path(progress.staging_path)
        recorded = staging is None or staging.recorded
        running = None
        if (
            staging is not None
            and staging.hasher is not None
            and staging.next_index == progress.chunk_count
        ):
            running = staging.hasher.hexdigest()
        self._close_staging(key)
        try:
            verified = self._format.verify(progress, path, running)
        except OSError as exc:
            reason = f"staging file unreadable: {exc.strerror or exc}"
            self._reject_file(progress, reason, recorded=recorded)
            return
        except VerificationError as exc:
            self._reject_file(progress, exc.reason, recorded=recorded)
            return
        try:
            result = self.sink.deliver(
                path, PurePosixPath(progress.relpath), verified.size, verified.sha256
            )
        except SinkError as exc:
            if isinstance(exc.__cause__, UnsafePathError):  # e.g. a symlink planted inside
                self._reject_file(
                    progress, str(exc.__cause__), code=RejectReason.UNSAFE_PATH, recorded=recorded
                )
                return
            # Not the file's fault: leave it RECEIVING-complete so the next batch retries.
            raise SinkError(f"delivery to {self.sink.describe()} failed: {exc}") from exc
        if recorded:
            self.progress.mark_complete(
                self.settings.topic,
                progress.file_id,
                progress.generation,
                verified=(verified.size, verified.sha256),
            )
        else:
            self.progress.record_finished(
                progress.updated(
                    size=verified.size, sha256=verified.sha256, state=ProgressState.COMPLETE
                )
            )
        self._forget(key)
        self.stats.files_reconstructed += 1
        self._emit(
            FileEvent(
                kind=FileEventKind.RECONSTRUCTED,
                topic=self.settings.topic,
                relpath=progress.relpath,
                file_id=progress.file_id,
                generation=progress.generation,
                size=verified.size,
                sha256=verified.sha256,
                url=result.url,
            )
        )

    def _finish_complete_leftovers(self) -> None:
        """Files fully received before a crash but not delivered yet: deliver them now."""
        for progress in self.progress.receiving(self.settings.topic):
            if progress.is_complete:
                before = self._outcome_snapshot()
                try:
                    with self.progress.batch():
                        self._finish(progress, None)
                        self.sink.flush()
                        self._deliver_events()
                except LOCAL_ERRORS as exc:
                    self._roll_back_outcomes(before)
                    logger.error("cannot deliver %r yet: %s", progress.relpath, exc)
                else:
                    self._events_committed()

    def _abort(self, notice: AbortNotice) -> None:
        progress = self.progress.mark_aborted(
            self.settings.topic, notice.file_id, notice.generation, "the producer aborted it"
        )
        if progress is not None:
            self._discard(progress)

    def _discard(self, progress: FileProgress) -> None:
        key = (progress.file_id, progress.generation)
        self._close_staging(key)
        Path(progress.staging_path).unlink(missing_ok=True)
        self._forget(key)

    def _forget(self, key: tuple[str, int]) -> None:
        for ledger in self._ledgers.values():
            ledger.open_files.pop(key, None)

    # ----------------------------------------------------------------------- rejections

    def _reject_file(
        self,
        progress: FileProgress,
        reason: str,
        code: str = VERIFICATION_FAILED,
        *,
        recorded: bool = True,
    ) -> None:
        key = (progress.file_id, progress.generation)
        self._close_staging(key)
        staged = Path(progress.staging_path)
        if staged.exists():
            target = self.quarantine_dir / f"{progress.file_id}.{progress.generation}"
            with contextlib.suppress(OSError):
                shutil.move(str(staged), target)
        if recorded:
            self.progress.mark_rejected(
                self.settings.topic, progress.file_id, progress.generation, reason
            )
        else:
            self.progress.record_finished(
                progress.updated(state=ProgressState.REJECTED, reason=reason)
            )
        self._forget(key)
        logger.warning("rejected %r: %s", progress.relpath, reason)
        self._rejected(
            FileEvent(
                kind=FileEventKind.REJECTED,
                topic=self.settings.topic,
                relpath=progress.relpath,
                file_id=progress.file_id,
                generation=progress.generation,
                size=progress.size if progress.size >= 0 else None,  # < 0: not known yet
                reason=reason,
                reason_code=code,
            )
        )

    def _reject_message(self, message: Any, reason: str, code: str) -> None:
        """Report a message that cannot be used; the consumer moves on past it."""
        logger.warning(
            "rejected message at partition %d offset %d: %s",
            message.partition(),
            message.offset(),
            reason,
        )
        headers = message.headers()
        event = FileEvent(
            kind=FileEventKind.REJECTED,
            topic=self.settings.topic,
            relpath=self._format.relpath_hint(message.key(), headers),
            file_id=_header_text(headers, "msi.fid"),
            reason=reason,
            reason_code=code,
            partition=message.partition(),
            offset=message.offset(),
        )
        # The chunks of one file share path, file id and generation: count the file once.
        identity = (event.file_id, event.relpath, _header_text(headers, "msi.gen"))
        self._rejected(event, new_file=event.names_file and self._first_rejection_of(identity))

    def _first_rejection_of(self, identity: tuple[str | None, ...]) -> bool:
        """Whether no recent rejected message named this file (path, file id, generation)."""
        if identity in self._rejected_identities:
            self._rejected_identities.move_to_end(identity)
            return False
        self._rejected_identities[identity] = None
        if len(self._rejected_identities) > REJECTED_IDENTITIES_KEPT:
            self._rejected_identities.popitem(last=False)
        return True

    def _rejected(self, event: FileEvent, new_file: bool = True) -> None:
        """Count a rejected file or message by its reason code and report it.

        Args:
            event: The rejection.
            new_file: False for a further rejected chunk of a file already counted.
        """
        if not event.names_file:
            self.stats.messages_rejected += 1
        elif new_file:
            self.stats.files_rejected += 1
        self.stats.rejected_by_reason[event.reason_code or "unknown"] += 1
        self._emit(event)

    # ------------------------------------------------------------------------ events

    def _emit(self, event: FileEvent) -> None:
        """Queue an outcome; the callback gets it once the batch's deliveries are durable."""
        if self._on_event is not None:
            self._pending_events.append(event)

    def _deliver_events(self) -> None:
        """Hand the batch's outcomes to the callback, before the batch commits.

        Raises:
            EventDeliveryError: The callback could not record an event (its storage
                failed); the batch must not commit.
        """
        events, self._pending_events = self._pending_events, []
        for event in events:
            key = _event_key(event)
            self._batch_event_keys.append(key)
            if key in self._recorded_events:
                continue  # recorded by an earlier try of this batch, which did not commit
            self._record_event(event)
            self._recorded_events.add(key)

    def _record_event(self, event: FileEvent) -> None:
        assert self._on_event is not None
        try:
            self._on_event(event)
        except EventDeliveryError:
            raise
        except (OSError, sqlite3.OperationalError) as exc:
            raise EventDeliveryError(
                f"the {event.kind.value} event of {event.where()} could not be recorded: {exc}"
            ) from exc
        except Exception:
            # A bug, not a full disk: retrying would loop, committing would lose the event.
            logger.error(
                "the event callback failed for %s: stopping with the batch uncommitted",
                event.where(),
            )
            raise

    def _events_committed(self) -> None:
        """The batch committed: its events will not come again."""
        self._recorded_events.difference_update(self._batch_event_keys)
        self._batch_event_keys.clear()

    def _outcome_snapshot(self) -> _OutcomeSnapshot:
        stats = self.stats
        return _OutcomeSnapshot(
            stats.files_reconstructed,
            stats.files_rejected,
            stats.messages_rejected,
            Counter(stats.rejected_by_reason),
            OrderedDict(self._rejected_identities),
        )

    def _roll_back_outcomes(self, snapshot: _OutcomeSnapshot) -> None:
        """Forget the outcomes of a batch that did not commit (its retry counts them)."""
        self.stats.files_reconstructed = snapshot.files_reconstructed
        self.stats.files_rejected = snapshot.files_rejected
        self.stats.messages_rejected = snapshot.messages_rejected
        self.stats.rejected_by_reason = snapshot.rejected_by_reason
        self._rejected_identities = snapshot.rejected_identities
        self._pending_events.clear()
        self._batch_event_keys.clear()

    # ------------------------------------------------------------------------- commits

    def _commit(self, commit_to: dict[int, int]) -> None:
        from confluent_kafka import TopicPartition

        if not commit_to:
            return
        now = time.monotonic()
        offsets = []
        for partition, next_offset in commit_to.items():
            ledger = self._ledgers.setdefault(partition, _Ledger())
            safe = ledger.commit_offset(next_offset, now, self.settings.abandon_after_s)
            offsets.append(TopicPartition(self.settings.topic, partition, safe))
        self._consumer.commit(offsets=offsets, asynchronous=False)


def _fsync_each(descriptors: list[int]) -> None:
    for descriptor in descriptors:
        os.fsync(descriptor)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``.

    A write that runs out of space part-way returns a short count rather than an error
    (tmpfs and ext4 do); ignoring it would record a chunk whose tail was never written, and
    the file would fail verification. The next write of the rest raises ENOSPC instead.
    """
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written


def _header_text(headers: Any, name: str) -> str | None:
    """A header's value as text, for rejection reports of untrusted messages."""
    try:
        for key, value in headers or []:
            if key == name and isinstance(value, bytes):
                return value[:300].decode("utf-8", errors="replace")
    except (TypeError, ValueError):
        return None
    return None


def _partition_eof_code() -> int:
    from confluent_kafka import KafkaError

    return int(KafkaError._PARTITION_EOF)
