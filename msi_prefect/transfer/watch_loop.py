"""Watch a folder and send every file that settles: the loop behind `watch` and its flow."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from msi_prefect.errors import MsiError
from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.producer import (
    FileProducer,
    MessageSealer,
    ProducerSettings,
    UploadResult,
    UploadTally,
)
from msi_prefect.transfer.registry import FileState, Registry, SkippedFile
from msi_prefect.transfer.stopping import StopConditions
from msi_prefect.transfer.watcher import DirectoryWatcher, FileStat, ReadyFile, WatchSettings

# Ready files waiting for the producer; the watcher blocks when it is full.
READY_QUEUE_SIZE = 10_000
LOOP_TICK_S = 0.2
PENDING_TICK_S = 0.01
TIMESTAMP_SLACK_NS = 1_000_000_000
#: How often the files the watcher skipped go to the registry (one transaction each time).
SKIP_FLUSH_S = 2.0
#: Skipped files waiting for that; more are dropped (the registry keeps a few anyway).
MAX_PENDING_SKIPS = 1000


class SkipBuffer:
    """The files the watcher skipped, from its thread, until the loop records them.

    Bounded: beyond :data:`MAX_PENDING_SKIPS` waiting, more are dropped (and counted).
    """

    def __init__(self, limit: int = MAX_PENDING_SKIPS) -> None:
        self._lock = threading.Lock()
        self._pending: list[SkippedFile] = []
        self._limit = limit
        self.dropped = 0

    def add(self, skipped: SkippedFile) -> None:
        """Keep one (called on the watcher's thread)."""
        with self._lock:
            if len(self._pending) < self._limit:
                self._pending.append(skipped)
            else:
                self.dropped += 1

    def flush(self, registry: Registry, topic: str) -> None:
        """Record what waits in the registry."""
        with self._lock:
            pending, self._pending = self._pending, []
        registry.record_skipped(topic, pending)


def registry_wants(
    registry: Registry, topic: str, first_watched_ns: int
) -> Callable[[str, FileStat], bool]:
    """A watcher predicate: which files present at start must be sent after all.

    A file whose last send was cut short (the registry still says SENDING) or that changed
    while the watcher was down; and a file the registry does not know that appeared after
    this folder was first watched (`first_watched_ns`): it was missed, created while the
    watcher was down, not yet ready when it stopped, or created during this start-up.
    Files older than the first watch are left to "upload existing files".
    """

    # File timestamps come from a coarse kernel clock that can lag time.time() by a tick.
    new_since_ns = first_watched_ns - TIMESTAMP_SLACK_NS

    def wants(relpath: str, stat: FileStat) -> bool:
        record = registry.get(topic, relpath)
        if record is None:
            return stat.ctime_ns >= new_since_ns
        return record.state is not FileState.SENT or record.identity != stat.identity

    return wants


def watch_and_send(
    connection: KafkaConnection,
    producer_settings: ProducerSettings,
    watch_settings: WatchSettings,
    registry: Registry,
    stop: threading.Event,
    conditions: StopConditions | None = None,
    on_result: Callable[[UploadResult], None] | None = None,
    codec: MessageSealer | None = None,
) -> UploadTally:
    """Send each file of a folder once it settles, until stopped; return the counts.

    The watcher runs in a thread and hands ready files over a bounded queue; this thread
    owns the producer. On return everything produced is flushed.

    Args:
        connection: The Kafka cluster.
        producer_settings: Topic and chunking.
        watch_settings: Folder, filter and stability window.
        registry: The producer registry (generations, what was sent).
        stop: Set it to end the loop (a signal handler or a cancellation does).
        conditions: Optional self-stop conditions (count of settled files, idle time).
        on_result: Called with every file's outcome, in this thread.
        codec: Optional sealer (end-to-end encryption) handed to the producer.
    """
    conditions = conditions or StopConditions()
    tally = UploadTally()
    topic = producer_settings.topic

    def record(result: UploadResult) -> None:
        tally.add(result)
        if on_result is not None:
            on_result(result)

    producer = FileProducer(connection, producer_settings, registry, on_result=record, codec=codec)
    root_key = str(watch_settings.root.resolve())
    wants = registry_wants(registry, topic, registry.first_watched_ns(topic, root_key))
    skips = SkipBuffer()
    watcher = DirectoryWatcher(
        replace(watch_settings, existing_needs_upload=wants, on_skipped=skips.add)
    )
    ready: queue.Queue[ReadyFile] = queue.Queue(maxsize=READY_QUEUE_SIZE)
    watcher_errors: list[BaseException] = []

    def run_watcher() -> None:
        try:
            watcher.run(ready.put, stop)
        except BaseException as exc:  # reported from this thread once the loop ends
            watcher_errors.append(exc)
            stop.set()

    thread = threading.Thread(target=run_watcher, name="msi-watcher", daemon=True)
    thread.start()
    last_activity = time.monotonic()
    next_skip_flush = last_activity + SKIP_FLUSH_S
    try:
        while not stop.is_set():
            if time.monotonic() >= next_skip_flush:
                skips.flush(registry, topic)
                next_skip_flush = time.monotonic() + SKIP_FLUSH_S
            # Short waits while chunks are in flight, so each file is reported soon after
            # the broker acknowledged it.
            tick = PENDING_TICK_S if producer.pending_files else LOOP_TICK_S
            try:
                item = ready.get(timeout=tick)
            except queue.Empty:
                if not watch_settings.root.is_dir():
                    raise MsiError(f"the watched folder {watch_settings.root} is gone") from None
            else:
                last_activity = time.monotonic()
                producer.submit(item.path, item.relpath)
            producer.poll(0)
            if producer.pending_files:
                last_activity = time.monotonic()
            if conditions.stop_after_files is not None and (
                tally.settled >= conditions.stop_after_files
            ):
                break
            idle = time.monotonic() - last_activity
            if conditions.idle_timeout_s is not None and idle > conditions.idle_timeout_s:
                break
    finally:
        stop.set()
        producer.flush()
        thread.join(timeout=10)
        skips.flush(registry, topic)
    if watcher_errors:
        error = watcher_errors[0]
        if not watch_settings.root.is_dir():
            # The folder vanished under the watcher (unmounted share, deleted): say so plainly.
            raise MsiError(f"the watched folder {watch_settings.root} is gone") from error
        raise error
    return tally
