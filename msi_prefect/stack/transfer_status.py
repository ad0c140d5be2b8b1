"""How the stack's transfer is doing, for `msi-prefect status`: counts, backlog, last file.

Each part comes from the source that knows it, read without changing it:

* the watched folder and the producer registry (``.msi-producer-registry.sqlite`` beside
  the folder): files sent in the last hour, the last one sent, and the files in the
  folder whose current version is not sent yet (a scan of the folder with the transfer's
  include/exclude rules, at most :data:`MAX_FOLDER_FILES` files);
* the destination's progress store (``DEST/.msi-state/progress.sqlite``): files rebuilt
  and rejected in the last hour, files being received, the last one rebuilt;
* the broker: messages on the topic not yet consumed by the consumer group (the group's
  committed offset against each partition's end offset: messages, not files; a file is
  one message per chunk);
* the dispatch outbox (files waiting for their batch) and the Prefect API: downstream runs
  (backup, metadata, analysis, per file or per batch) Scheduled, Pending and Running.

The topic, consumer group and file rules are those of the ``embedded`` transfer settings
block (read from the API). A source that is down or missing leaves its numbers ``None``
and adds a note saying what is missing and why; status never fails because of it.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from msi_prefect.prefect_layer.dispatch.mode import FILE_FLOWS
from msi_prefect.stack.config import Component, StackConfig

#: The window of the "last hour" counts.
WINDOW_S = 3600.0
#: Files of the watched folder looked at, at most (a huge folder is counted in part).
MAX_FOLDER_FILES = 100_000
#: Timeout of each call to the Prefect API and the broker.
SOURCE_TIMEOUT_S = 5.0
#: What the lag reader may prefetch (it reads only the last batch of each partition).
LAG_PREFETCH_KIB = 4096
LAG_POLL_S = 0.2
#: Name of the block documents the stack's deployments use.
EMBEDDED_BLOCK = "embedded"
TRANSFER_BLOCK_TYPE = "msi-transfer-settings"
# Defaults of the embedded transfer block (stack/embedded_blocks.py, prefect_layer
# transfers/settings.py), used when the block cannot be read; tests check they agree.
DEFAULT_TOPIC = "lab-files"
DEFAULT_CONSUMER_GROUP = "msi-reassembler"


@dataclass
class LastFile:
    """The last file of a step.

    Attributes:
        path: Its relative path.
        generation: Its generation.
        at: When (ISO 8601, UTC).
    """

    path: str
    generation: int
    at: str


@dataclass
class ProducerStatus:
    """The watcher's side.

    Attributes:
        sent_last_hour: Files sent in the last hour.
        last_sent: The file sent last.
        waiting_in_folder: Files in the watched folder whose current version is not sent
            yet (new, changed, still settling, being sent, failed).
        folder_scan_cut: Whether the folder had more files than were looked at.
        skipped: Files the watcher skipped and has not sent since (excluded, still
            changing, unreadable: ``msi-prefect files`` lists them).
    """

    sent_last_hour: int | None = None
    last_sent: LastFile | None = None
    waiting_in_folder: int | None = None
    folder_scan_cut: bool = False
    skipped: int | None = None


@dataclass
class ConsumerStatus:
    """The reassembler's side.

    Attributes:
        rebuilt_last_hour: Files rebuilt (verified and delivered) in the last hour.
        rejected_last_hour: Files rejected in the last hour (bad checksum, conflicting
            chunks...; messages rejected before they named a file are not counted).
        receiving: Files whose chunks are arriving.
        last_rebuilt: The file rebuilt last.
    """

    rebuilt_last_hour: int | None = None
    rejected_last_hour: int | None = None
    receiving: int | None = None
    last_rebuilt: LastFile | None = None


@dataclass
class DownstreamStatus:
    """The work each rebuilt file starts.

    Attributes:
        files_waiting_for_batch: Rebuilt files waiting in the dispatch outbox for their
            batch.
        runs_scheduled: Downstream runs Scheduled (waiting for their start time or a
            worker).
        runs_pending: Downstream runs Pending (a worker is starting them).
        runs_running: Downstream runs Running.
    """

    files_waiting_for_batch: int | None = None
    runs_scheduled: int | None = None
    runs_pending: int | None = None
    runs_running: int | None = None


@dataclass
class TransferStatus:
    """One transfer of the stack: watched folder -> topic -> destination -> downstream runs.

    Attributes:
        topic: The topic.
        consumer_group: The reassemblers' consumer group.
        watch_dir: The watched folder.
        destination_dir: Where files are rebuilt.
        window_s: The window of the ``*_last_hour`` counts, in seconds.
        producer: The watcher's side.
        consumer: The reassembler's side.
        messages_on_topic: Messages the consumer group has not consumed yet (consumer lag).
        downstream: The downstream work.
        notes: What could not be read, and why.
    """

    topic: str
    consumer_group: str
    watch_dir: str | None
    destination_dir: str | None
    window_s: float = WINDOW_S
    producer: ProducerStatus = field(default_factory=ProducerStatus)
    consumer: ConsumerStatus = field(default_factory=ConsumerStatus)
    messages_on_topic: int | None = None
    downstream: DownstreamStatus = field(default_factory=DownstreamStatus)
    notes: list[str] = field(default_factory=list)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def transfer_status(
    config: StackConfig,
    now: float | None = None,
    block_name: str = EMBEDDED_BLOCK,
    stopped: frozenset[Component] = frozenset(),
) -> TransferStatus:
    """How the stack's transfer is doing; every source read on its own (see the module).

    Args:
        config: The stack's settings (folders, ports).
        now: Unix time the window ends at (default: now).
        block_name: The transfer settings block the deployments use.
        stopped: Parts known to be stopped: not asked (a note says so), so a stopped
            broker costs no timeout.
    """
    now = time.time() if now is None else now
    notes: list[str] = []
    prefect_up = Component.PREFECT not in stopped
    if prefect_up:
        block = _transfer_block(config, block_name, notes)
    else:
        block = {}
        notes.append(
            "transfer settings, downstream runs: the Prefect server is stopped; assuming "
            f"topic {DEFAULT_TOPIC!r} and group {DEFAULT_CONSUMER_GROUP!r}"
        )
    status = TransferStatus(
        topic=str(block.get("topic") or DEFAULT_TOPIC),
        consumer_group=str(block.get("consumer_group") or DEFAULT_CONSUMER_GROUP),
        watch_dir=config.watch_dir,
        destination_dir=config.destination_dir,
        notes=notes,
    )
    since = now - WINDOW_S
    if config.watch_dir:
        _read_producer(status, Path(config.watch_dir), block, since)
    if config.destination_dir:
        _read_consumer(status, Path(config.destination_dir), since)
    if Component.BROKER in stopped:
        status.notes.append("broker: stopped; no consumer lag")
    else:
        _read_broker(status, config)
    if prefect_up:
        _read_runs(status, config)
    return status


def _transfer_block(config: StackConfig, name: str, notes: list[str]) -> dict[str, Any]:
    """The transfer settings block's fields, or {} (with a note)."""
    import httpx

    body = {
        "block_documents": {"name": {"any_": [name]}},
        "block_types": {"slug": {"any_": [TRANSFER_BLOCK_TYPE]}},
        "limit": 1,
    }
    try:
        response = httpx.post(
            f"{config.prefect_api_url}/block_documents/filter",
            json=body,
            timeout=SOURCE_TIMEOUT_S,
        )
        response.raise_for_status()
        found = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        notes.append(
            f"transfer settings: the Prefect API did not answer ({type(exc).__name__}); "
            f"assuming topic {DEFAULT_TOPIC!r}, group {DEFAULT_CONSUMER_GROUP!r} and the "
            "default file rules"
        )
        return {}
    if not found:
        notes.append(
            f"transfer settings: no block {TRANSFER_BLOCK_TYPE}/{name} (flows not "
            "deployed?); assuming the defaults"
        )
        return {}
    data: dict[str, Any] = found[0].get("data") or {}
    return data


def _read_producer(
    status: TransferStatus, watch_dir: Path, block: dict[str, Any], since: float
) -> None:
    from msi_prefect.transfer import FileFilter, Registry, registry_beside

    producer = status.producer
    registry_path = registry_beside(watch_dir)
    if not registry_path.is_file():
        status.notes.append(f"producer: no registry at {registry_path} yet (nothing sent)")
        return
    try:
        rules = FileFilter(
            include=tuple(block.get("include") or ()), exclude=tuple(block.get("exclude") or ())
        )
    except (TypeError, ValueError) as exc:
        status.notes.append(f"producer: the block's file rules are unusable ({exc})")
        rules = FileFilter()
    upload_existing = bool(block.get("upload_existing", True))
    try:
        with Registry(registry_path) as registry:
            producer.sent_last_hour = registry.sent_since(status.topic, since)
            last = registry.last_sent(status.topic)
            if last is not None:
                producer.last_sent = LastFile(last.relpath, last.generation, _iso(last.updated_at))
            producer.skipped = sum(1 for r in registry.skipped() if r.topic == status.topic)
            if watch_dir.is_dir():
                first_ns = registry.first_watched(status.topic, str(watch_dir.resolve()))
                # Without "upload existing files", files older than the first watch stay.
                older_stay = None if upload_existing else first_ns
                waiting, cut = _count_waiting(registry, status.topic, watch_dir, rules, older_stay)
                producer.waiting_in_folder, producer.folder_scan_cut = waiting, cut
            else:
                status.notes.append(f"producer: the watched folder {watch_dir} is missing")
    except (sqlite3.Error, OSError) as exc:
        status.notes.append(f"producer: cannot read the registry {registry_path}: {exc}")


def _count_waiting(
    registry: Any, topic: str, root: Path, rules: Any, older_stay_ns: int | None
) -> tuple[int, bool]:
    """Files in the folder whose current version the registry has not sent; was it cut?"""
    from msi_prefect.transfer import FileSeen, FileState, LocalFileSystem

    waiting = 0
    # The watcher's own walk (symlinks skipped, as the watcher does); a file unreadable
    # meanwhile is the watcher's to report.
    seen = LocalFileSystem(root).walk(lambda _relpath: True)
    files = (item for item in seen if isinstance(item, FileSeen))
    for looked, file in enumerate(files):
        if looked >= MAX_FOLDER_FILES:
            return waiting, True
        if not rules.matches(file.relpath):
            continue
        record = registry.get(topic, file.relpath)
        if record is None:
            if older_stay_ns is None or file.stat.ctime_ns >= older_stay_ns:
                waiting += 1
            continue
        identity = record.identity
        current = (file.stat.size, file.stat.mtime_ns, file.stat.inode)
        if record.state is not FileState.SENT or current != (
            identity.size,
            identity.mtime_ns,
            identity.inode,
        ):
            waiting += 1
    return waiting, False


def _read_consumer(status: TransferStatus, destination: Path, since: float) -> None:
    from msi_prefect.transfer import DestinationLayout, DurableQueue, ProgressState, ProgressStore

    layout = DestinationLayout.of_local(destination)
    consumer = status.consumer
    if not layout.progress_store.is_file():
        status.notes.append(
            f"consumer: no progress store at {layout.progress_store} yet (nothing received)"
        )
    else:
        try:
            with ProgressStore(layout.progress_store) as progress:
                recent = progress.count_since(status.topic, since)
                consumer.rebuilt_last_hour = recent[ProgressState.COMPLETE]
                consumer.rejected_last_hour = recent[ProgressState.REJECTED]
                consumer.receiving = progress.count_receiving(status.topic)
                last = progress.last_finished(status.topic, ProgressState.COMPLETE)
                if last is not None:
                    consumer.last_rebuilt = LastFile(
                        last.relpath, last.generation, _iso(last.updated_at)
                    )
        except (sqlite3.Error, OSError) as exc:
            status.notes.append(f"consumer: cannot read {layout.progress_store}: {exc}")
    if layout.batch_outbox.is_file():
        try:
            with DurableQueue(layout.batch_outbox, name="dispatch outbox") as queue:
                status.downstream.files_waiting_for_batch = queue.count()
        except (sqlite3.Error, OSError) as exc:
            status.notes.append(f"downstream: cannot read {layout.batch_outbox}: {exc}")
    else:
        status.downstream.files_waiting_for_batch = 0  # no batch was ever waited for


@dataclass(frozen=True)
class ConsumerLag:
    """Messages of a topic its consumer group has not consumed yet.

    Attributes:
        messages: How many.
        exact: False when some partition's end could not be confirmed in time (then
            ``messages`` is a lower bound).
    """

    messages: int
    exact: bool


def consumer_lag(
    bootstrap_servers: str, topic: str, group: str, timeout_s: float = SOURCE_TIMEOUT_S
) -> ConsumerLag:
    """Messages of ``topic`` the consumer group has not consumed (committed) yet.

    For each partition: its end offset minus the group's committed offset (its start
    offset when the group committed nothing there). The end is confirmed by reading from
    the last offset the broker reports to the end of the partition: Tansu reports the
    start of a partition's last record batch plus one as its end (measured: a batch of
    two messages at offsets 0-1 was reported as ending at 1), so the reported end alone
    under-counts. The read stays in the partition's last batch; the group joins nothing
    and commits nothing.

    Raises:
        LookupError: The topic does not exist.
        confluent_kafka.KafkaException: The broker did not answer in time.
    """
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "socket.timeout.ms": int(timeout_s * 1000),
            # Only the last batch of each partition is read: no large prefetch.
            "queued.max.messages.kbytes": LAG_PREFETCH_KIB,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise LookupError(f"no topic {topic!r} on the broker")
        partitions = [TopicPartition(topic, p) for p in sorted(described.partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout_s)}
        bounds = {
            tp.partition: consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            for tp in partitions
        }
        ends = {partition: high for partition, (_, high) in bounds.items()}
        unconfirmed = {partition for partition, (low, high) in bounds.items() if high > low}
        consumer.assign([TopicPartition(topic, p, bounds[p][1] - 1) for p in unconfirmed])
        deadline = time.monotonic() + timeout_s
        while unconfirmed and time.monotonic() < deadline:
            message = consumer.poll(LAG_POLL_S)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                unconfirmed.discard(message.partition())
                continue
            partition, offset = message.partition(), message.offset()
            if partition in ends and offset is not None:
                ends[partition] = max(ends[partition], offset + 1)
        lag = 0
        for partition, (low, _) in bounds.items():
            start = committed[partition] if committed[partition] >= 0 else low
            lag += max(0, ends[partition] - start)
        return ConsumerLag(messages=lag, exact=not unconfirmed)
    finally:
        consumer.close()


def _read_broker(status: TransferStatus, config: StackConfig) -> None:
    try:
        lag = consumer_lag(config.bootstrap_servers, status.topic, status.consumer_group)
    except LookupError as exc:
        status.notes.append(f"broker: {exc} (nothing sent yet?)")
    except Exception as exc:  # any broker trouble is a note, never a failed status
        status.notes.append(
            f"broker: no consumer lag from {config.bootstrap_servers} ({type(exc).__name__}: {exc})"
        )
    else:
        status.messages_on_topic = lag.messages
        if not lag.exact:
            status.notes.append(
                "broker: the end of some partitions could not be confirmed in time; "
                "messages_on_topic is a lower bound"
            )


def _read_runs(status: TransferStatus, config: StackConfig) -> None:
    import httpx

    downstream = status.downstream
    counts: dict[str, int] = {}
    try:
        with httpx.Client(base_url=config.prefect_api_url, timeout=SOURCE_TIMEOUT_S) as client:
            for state in ("SCHEDULED", "PENDING", "RUNNING"):
                response = client.post(
                    "/flow_runs/count",
                    json={
                        "flows": {"name": {"any_": list(FILE_FLOWS)}},
                        "flow_runs": {"state": {"type": {"any_": [state]}}},
                    },
                )
                response.raise_for_status()
                counts[state] = int(response.json())
    except (httpx.HTTPError, ValueError) as exc:
        status.notes.append(
            f"downstream runs: the Prefect API did not answer ({type(exc).__name__})"
        )
        return
    downstream.runs_scheduled = counts["SCHEDULED"]
    downstream.runs_pending = counts["PENDING"]
    downstream.runs_running = counts["RUNNING"]
