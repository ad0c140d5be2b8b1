"""The long-running transfers as Prefect work: watch a folder, rebuild files from a topic.

These run the transfer core directly, not as a task run per file or per chunk: a Prefect
flow keeps every task run it made in memory, and these flows see unbounded numbers of
files. Each file outcome becomes a Prefect event (which triggers the downstream
deployments), written first to a durable outbox that a sender thread delivers, so a
Prefect server outage delays events but loses none
(``msi_prefect.prefect_layer.event_outbox``); ``reconstruct-files`` also relays the events
the host's downstream runs left behind. The run's counts are published as a markdown
artifact at most once a minute, so memory stays flat however long the flow runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.dispatch.batcher import (
    AdaptiveGate,
    FileBatcher,
    ServerRunBacklog,
    batch_outbox,
)
from msi_prefect.prefect_layer.event_outbox import DownstreamEventRelay, EventChannel
from msi_prefect.prefect_layer.events import (
    DownstreamDispatch,
    FileFacts,
    batch_event,
    facts_of,
    from_reassembler,
    from_upload,
)
from msi_prefect.prefect_layer.file_history import RejectionHistoryWriter
from msi_prefect.prefect_layer.transfers.crypto import KafkaCryptoSettings
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.transfer import (
    EVENT_OUTBOX_FILE,
    GOOD_OUTCOMES,
    CryptoCodec,
    DecodeLimits,
    FileEvent,
    FileEventKind,
    FileProducer,
    KafkaConnection,
    Reassembler,
    ReassemblerSettings,
    Registry,
    StopConditions,
    StopOnSignal,
    UploadResult,
    UploadTally,
    WatchSettings,
    WireFormat,
    ensure_topic,
    iter_upload_files,
    watch_and_send,
)

logger = logging.getLogger(__name__)

ARTIFACT_INTERVAL_S = 60.0
# How long the end of a run waits for its last progress artifact.
FINAL_PUBLISH_WAIT_S = 15.0


@dataclass
class RunCounts:
    """Counts of one long-running flow run, published as an artifact now and then.

    Publishing happens in a thread of its own: while the Prefect server is away, Prefect's
    client retries for about a minute, and the transfer must not wait for it.
    """

    title: str
    artifact_key: str
    counts: Counter[str] = field(default_factory=Counter)
    last_file: str | None = None
    _published_at: float = 0.0
    _publisher: threading.Thread | None = None

    def add(self, outcome: str, relpath: str | None) -> None:
        """Count one file outcome; publish the counts if the last publication is old."""
        self.counts[outcome] += 1
        self.last_file = relpath
        if time.monotonic() - self._published_at > ARTIFACT_INTERVAL_S:
            self.publish(wait=False)

    def publish(self, wait: bool = True) -> None:
        """Create a markdown artifact with the counts so far (a new version of the key).

        Args:
            wait: Wait (at most :data:`FINAL_PUBLISH_WAIT_S`) until it is published, as at
                the end of a run; otherwise return at once, and skip this publication if
                the previous one is still under way.
        """
        if self._publisher is not None and self._publisher.is_alive():
            if not wait:
                return
            self._publisher.join(FINAL_PUBLISH_WAIT_S)
        self._published_at = time.monotonic()
        rows = "\n".join(f"| {outcome} | {n} |" for outcome, n in sorted(self.counts.items()))
        markdown = (
            f"## {self.title}\n\n| outcome | files |\n| --- | --- |\n{rows}\n\n"
            f"Last file: `{self.last_file or '-'}`\n"
        )
        # The copied context carries the flow run, so the artifact is attached to it.
        context = contextvars.copy_context()
        self._publisher = threading.Thread(
            target=context.run,
            args=(self._create, markdown),
            name=f"publish-{self.artifact_key}",
            daemon=True,
        )
        self._publisher.start()
        if wait:
            self._publisher.join(FINAL_PUBLISH_WAIT_S)

    def _create(self, markdown: str) -> None:
        from prefect.artifacts import create_markdown_artifact

        try:
            create_markdown_artifact(markdown=markdown, key=self.artifact_key)
        except Exception:  # progress reporting must never stop a transfer
            logger.exception("could not publish the progress artifact")


@contextlib.contextmanager
def _crypto_codec(
    crypto: KafkaCryptoSettings | None, connection: KafkaConnection, topic: str
) -> Iterator[CryptoCodec | None]:
    """The block's KafkaCrypto node, open for the run (None for a clear transfer)."""
    if crypto is None:
        yield None
        return
    codec = crypto.open_codec(connection, [topic])
    try:
        yield codec
    finally:
        codec.close()


def run_watch_directory(
    directory: Path,
    kafka: KafkaCluster,
    transfer: TransferSettings,
    registry_path: Path,
    conditions: StopConditions,
    crypto: KafkaCryptoSettings | None = None,
) -> dict[str, int]:
    """Send every file that settles in `directory`; emit `msi.file.uploaded` per file.

    With `crypto`, every message is encrypted end to end by that KafkaCrypto node, which
    stays open (answering consumers' key requests) for the whole run.

    Returns:
        Files per outcome.

    Raises:
        MsiError: the folder does not exist or the settings are unusable.
    """
    if not directory.is_dir():
        raise MsiError(f"not a folder: {directory}")
    connection = kafka.to_connection()
    ensure_topic(connection, transfer.topic)
    watch_settings = WatchSettings(
        root=directory,
        filter=transfer.file_filter(),
        stability_window_s=transfer.stability_window_s,
        include_existing=transfer.upload_existing,
    )
    counts = RunCounts(f"Watching {directory}", artifact_key="watch-directory")

    def on_result(result: UploadResult) -> None:
        counts.add(result.outcome.value, result.relpath)
        spec = from_upload(transfer.topic, result)
        if spec is not None:
            events.emit(spec)

    with (
        EventChannel(registry_path.parent / EVENT_OUTBOX_FILE) as events,
        Registry(registry_path) as registry,
        _crypto_codec(crypto, connection, transfer.topic) as codec,
        StopOnSignal() as stop,
    ):
        tally = watch_and_send(
            connection,
            transfer.producer_settings(),
            watch_settings,
            registry,
            stop,
            conditions,
            on_result,
            codec=codec,
        )
    counts.publish()
    return {outcome.value: n for outcome, n in tally.outcomes.items()}


def run_upload_files(
    paths: list[Path],
    root: Path | None,
    kafka: KafkaCluster,
    transfer: TransferSettings,
    registry_path: Path,
) -> dict[str, int]:
    """Send files and folders once (no watching); emit `msi.file.uploaded` per file sent.

    A file already sent unchanged is not sent again (`already-sent`); a changed one goes
    as a new generation.

    Args:
        paths: Files and folders (sub-folders are kept).
        root: Relative paths are taken below it; default: each path's parent folder.
        kafka: The cluster.
        transfer: Topic, chunking, compression, wire format.
        registry_path: The producer registry (remembers what was sent).

    Returns:
        Files per outcome.

    Raises:
        MsiError: a path does not exist or lies outside ``root``, or some files could not
            be sent (the message names them).
    """
    files = list(iter_upload_files(paths, root))
    connection = kafka.to_connection()
    ensure_topic(connection, transfer.topic)
    with (
        EventChannel(registry_path.parent / EVENT_OUTBOX_FILE) as events,
        Registry(registry_path) as registry,
    ):

        def on_result(result: UploadResult) -> None:
            spec = from_upload(transfer.topic, result)
            if spec is not None:
                events.emit(spec)

        producer = FileProducer(connection, transfer.producer_settings(), registry, on_result)
        results = producer.upload_all(files)
    tally = UploadTally()
    for result in results:
        tally.add(result)
    failed = [r for r in results if r.outcome not in GOOD_OUTCOMES]
    if failed:
        named = "; ".join(f"{r.relpath}: {r.outcome.value} ({r.reason})" for r in failed[:10])
        raise MsiError(f"{len(failed)} of {len(results)} files were not sent: {named}")
    return {outcome.value: n for outcome, n in tally.outcomes.items()}


def run_reconstruct_files(
    destination: str,
    kafka: KafkaCluster,
    transfer: TransferSettings,
    work_dir: Path | None,
    conditions: StopConditions,
    crypto: KafkaCryptoSettings | None = None,
    wire_format: WireFormat | None = None,
) -> dict[str, int]:
    """Rebuild files from the topic into `destination`; emit an event per file outcome.

    With `crypto`, messages are decrypted by that KafkaCrypto node; one whose key does not
    arrive within the block's key wait is rejected (`msi.file.rejected`, `key-missing`).

    Args:
        destination: A folder, or an fsspec URL such as s3://bucket/prefix.
        kafka: The cluster.
        transfer: Topic, group, limits and wire format.
        work_dir: Staging and progress state; required for a remote destination.
        conditions: Self-stop conditions.
        crypto: The KafkaCrypto node that decrypts, for an encrypted transfer.
        wire_format: Overrides the transfer block's wire format when given.

    Returns:
        Counters of the run (files reconstructed and rejected, bytes written).
    """
    connection = kafka.to_connection()
    ensure_topic(connection, transfer.topic)
    settings = ReassemblerSettings(
        topic=transfer.topic,
        destination=destination,
        group_id=transfer.consumer_group,
        work_dir=work_dir,
        limits=DecodeLimits(max_file_size=transfer.max_file_size),
        wire_format=wire_format or transfer.wire_format,
        owner_label=_flow_run_label(),
    )
    counts = RunCounts(f"Rebuilding {transfer.topic} into {destination}", "reconstruct-files")
    dispatch = transfer.downstream_dispatch
    batcher: FileBatcher | None = None
    events: EventChannel | None = None
    rejections: RejectionHistoryWriter | None = None

    def on_event(event: FileEvent) -> None:
        rebuilt = event.kind is FileEventKind.RECONSTRUCTED
        label = dispatch
        if dispatch is DownstreamDispatch.ADAPTIVE:
            alone = rebuilt and batcher is not None and batcher.dispatch_alone()
            label = DownstreamDispatch.PER_FILE if alone else DownstreamDispatch.BATCH
        spec = from_reassembler(event, label)
        assert events is not None, "events are open while the reassembler runs"
        events.emit(spec)
        # Counted once the event is on disk: a failed write retries the batch, which would
        # otherwise count the file twice.
        counts.add(event.kind.value, event.relpath)
        if not rebuilt and rejections is not None:
            rejections.submit(spec)  # a rejected file starts no run that would write it
        if batcher is not None and rebuilt and label is DownstreamDispatch.BATCH:
            batcher.add(facts_of(spec))

    def send_batch(files: list[FileFacts]) -> None:
        assert events is not None, "events are open while the reassembler runs"
        events.emit(batch_event(transfer.topic, files))

    def send_due_batches() -> None:
        if batcher is not None:
            batcher.send_due()

    with contextlib.ExitStack() as cleanup:
        codec = cleanup.enter_context(_crypto_codec(crypto, connection, transfer.topic))
        try:
            reassembler = Reassembler(
                connection, settings, on_event=on_event, on_tick=send_due_batches, codec=codec
            )
        except OSError as exc:
            raise MsiError(f"cannot use the destination {destination}: {exc}") from exc
        # run() closes it; this closes it (and frees its folders' locks) if a step below fails.
        cleanup.callback(reassembler.close)
        events = cleanup.enter_context(EventChannel(reassembler.layout.event_outbox))
        # The downstream runs of the files rebuilt here run on this host; what they leave
        # in their event outbox is delivered, and what they posted confirmed, from here.
        cleanup.enter_context(DownstreamEventRelay())
        rejections = RejectionHistoryWriter()
        cleanup.callback(rejections.close)
        if dispatch is not DownstreamDispatch.PER_FILE:
            outbox = cleanup.enter_context(batch_outbox(reassembler.layout.batch_outbox))
            gate = None
            if dispatch is DownstreamDispatch.ADAPTIVE:
                backlog = ServerRunBacklog()
                cleanup.callback(backlog.close)
                gate = AdaptiveGate(backlog)
            batcher = FileBatcher(
                outbox,
                transfer.batch_max_files,
                transfer.batch_max_wait_s,
                send_batch,
                gate=gate,
            )
            batcher.send_due()  # leftovers of a crashed run first, as the same batches
        with StopOnSignal() as stop:
            stats = reassembler.run(stop, conditions)
        if batcher is not None:
            batcher.send_due(force=True)
    counts.publish()
    return {
        "reconstructed": stats.files_reconstructed,
        "rejected": stats.files_rejected,
        "rejected_messages": stats.messages_rejected,
        "bytes_written": stats.bytes_written,
    }


def _flow_run_label() -> str | None:
    """``flow run NAME (ID)`` inside a flow run: what another rebuilder's error names."""
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name!r} ({flow_run.id})" if flow_run.id else None
