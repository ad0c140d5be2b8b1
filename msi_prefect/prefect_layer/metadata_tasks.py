"""Extract the metadata of one rebuilt file, publish it to Kafka, show it in the Prefect UI.

The ``extract-metadata`` deployment (and ``process-batch``, for each file of a batch)
runs one task run per file, :func:`extract_file_metadata`:

1. :func:`describe_rebuilt_file`, i.e. :func:`~msi_prefect.metadata.extract_metadata` on
   the rebuilt file. The reassembler verified the content's SHA-256 before it announced
   the file, so the file is not read again to hash it when it can be shown unchanged
   since: its size is the announced one and its change time (``ctime``, which every
   write, ``utime`` or rename moves to "now") is not later than the announcing event
   (``announced_at``, rendered from the event's ``occurred`` by the deployment trigger).
   Otherwise (no ``announced_at``, as in a manual run, or a later change time) the file
   is hashed and a SHA-256 other than the announced one fails the run. Then, for an
   image-like file, its preview picture, stored beside the backup and shown as an image
   artifact ``preview-<first 12 digits of the file id>``
   (:mod:`msi_prefect.prefect_layer.previews`; a preview that fails is only a warning);
   and a markdown artifact ``metadata-<first 12 digits of the file id>`` with the result
   and a link to the preview;
2. :func:`publish_metadata`: the metadata as JSON to the topic ``<topic>.metadata``
   (created if missing; key = file id; headers ``msi.v``, ``msi.kind=metadata``,
   ``msi.gen``), delivery confirmed by the broker, then the event
   ``msi.file.metadata-extracted``.

One task run, not one per part: each task run costs the Prefect server its three state
events and rows, and the run its engine's work. As two task runs they cost 7 to 13 %
more of the server's CPU per file of a batch (bench/RESULTS.md, "one task run for the
metadata"). A retry (the broker was unreachable) extracts again: extraction is bounded
in time and memory for any file, and the artifact's new version replaces the first.

Downstream consumers read ``<topic>.metadata`` like any topic; the JSON object is
:meth:`~msi_prefect.metadata.FileMetadata.to_json_dict`.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from msi_prefect.errors import MsiError
from msi_prefect.metadata import FileMetadata, extract_metadata, metadata_markdown
from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.event_outbox import emit_downstream_event
from msi_prefect.prefect_layer.events import EventName, file_event
from msi_prefect.prefect_layer.file_history import record_file_step
from msi_prefect.prefect_layer.flow_inputs import (
    FileChangedError,
    FileInputError,
    RebuiltFile,
    retry_unless_input_error,
)
from msi_prefect.prefect_layer.previews import preview_markdown, store_file_preview
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.transfer import FORMAT_VERSION, MAX_TOPIC_CHARS, HeaderName, ensure_topic

__all__ = [
    "METADATA_KIND",
    "METADATA_TOPIC_SUFFIX",
    "ExtractedMetadata",
    "MetadataPublishError",
    "PublishedMetadata",
    "artifact_key",
    "describe_rebuilt_file",
    "extract_file_metadata",
    "metadata_topic",
    "publish_metadata",
    "unchanged_since_announced",
]

#: Suffix of the topic that receives the metadata of a file topic's files.
METADATA_TOPIC_SUFFIX = ".metadata"
#: Value of the ``msi.kind`` header of metadata messages.
METADATA_KIND = "metadata"
#: How long the producer may take to get a delivery report from the broker.
DELIVERY_TIMEOUT_S = 30.0
#: Digits of the file id in artifact keys (unique enough to tell files apart in the UI).
ARTIFACT_KEY_ID_DIGITS = 12
# A broker that is away may take minutes to come back (a bad file is not retried).
METADATA_RETRIES = 3
METADATA_RETRY_DELAYS_S: list[float] = [10.0, 30.0, 60.0]

_ARTIFACT_KEY_BAD_CHARS = re.compile(r"[^a-z0-9-]+")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_MICROSECOND = 1000


class MetadataPublishError(MsiError):
    """The metadata could not be delivered to its topic."""


@dataclass(frozen=True)
class PublishedMetadata:
    """Where the metadata of one file went.

    Attributes:
        relpath: Relative POSIX path of the file.
        topic: The metadata topic.
        partition: Partition the message was written to.
        offset: Its offset in that partition.
        size: Bytes of JSON produced.
    """

    relpath: str
    topic: str
    partition: int
    offset: int
    size: int


@dataclass(frozen=True)
class ExtractedMetadata:
    """The metadata of one file, and where it was published.

    Attributes:
        metadata: What was extracted (the analysis of a batch run starts from it).
        published: Where the message went.
    """

    metadata: FileMetadata
    published: PublishedMetadata


def metadata_topic(topic: str) -> str:
    """The metadata topic of a file topic: ``<topic>.metadata``.

    Raises:
        FileInputError: The result would be longer than Kafka allows.
    """
    name = f"{topic}{METADATA_TOPIC_SUFFIX}"
    if len(name) > MAX_TOPIC_CHARS:
        raise FileInputError(
            f"topic {topic!r} is too long to add {METADATA_TOPIC_SUFFIX!r} (Kafka allows "
            f"{MAX_TOPIC_CHARS} characters); use a shorter topic name"
        )
    return name


def artifact_key(prefix: str, file_id: str) -> str:
    """An artifact key ``<prefix>-<start of the file id>`` (lower-case letters, digits, '-')."""
    raw = f"{prefix}-{file_id[:ARTIFACT_KEY_ID_DIGITS]}".lower()
    return _ARTIFACT_KEY_BAD_CHARS.sub("-", raw).strip("-")


def _ns_since_epoch(moment: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime, exactly (no float rounding)."""
    return (moment - _EPOCH) // timedelta(microseconds=1) * _NS_PER_MICROSECOND


def unchanged_since_announced(file: RebuiltFile, announced_at: datetime | None) -> bool:
    """Whether the file on disk can be shown unchanged since its event announced it.

    It can when it still has the announced size and its change time is not later than the
    event. The change time (``ctime``) is set by the kernel to "now" on every write,
    truncation, ``utime`` (so a restored mtime does not hide a rewrite), rename or
    ``chmod``; a new generation renamed into place is a new inode with a new one. The
    reassembler renamed the file into place and verified its SHA-256 before it built the
    event, so a file unchanged since keeps that SHA-256.

    Args:
        file: The rebuilt file.
        announced_at: When the event that announced the file occurred; None (a manual run,
            an older trigger): the file cannot be shown unchanged.

    Raises:
        FileInputError: ``announced_at`` has no time zone.
        FileChangedError: The file cannot be examined.
    """
    if announced_at is None:
        return False
    if announced_at.tzinfo is None or announced_at.utcoffset() is None:
        raise FileInputError(
            f"announced_at {announced_at.isoformat()} has no time zone; give the event's "
            "occurred time as rendered by the trigger (it is UTC)"
        )
    try:
        info = os.lstat(file.local_path)
    except OSError as exc:
        raise FileChangedError(f"{file.path} cannot be examined: {exc}") from exc
    return info.st_size == file.size and info.st_ctime_ns <= _ns_since_epoch(announced_at)


def describe_rebuilt_file(file: RebuiltFile, announced_at: datetime | None = None) -> FileMetadata:
    """The metadata of a rebuilt file, its SHA-256 the announced one (checked if need be).

    Hashes the whole file only when :func:`unchanged_since_announced` cannot show it
    unchanged; the metadata's ``md5`` is None either way (it is only informational, and a
    second digest of every byte is not worth its time on a large file).

    Args:
        file: The rebuilt file, validated from the event parameters.
        announced_at: When the event that announced the file occurred, if known.

    Returns:
        The metadata; its ``sha256`` is the announced one.

    Raises:
        FileChangedError: The file is gone, of another size, or hashes to another SHA-256.
        FileInputError: It cannot be read, or ``announced_at`` has no time zone.
    """
    file.check_unchanged(hash_content=False)
    # A file read by URL was just fetched into a private copy, its SHA-256 checked on the way.
    verified = file.remote_url is not None or unchanged_since_announced(file, announced_at)
    known_sha256 = file.sha256 if verified else None
    try:
        metadata = extract_metadata(
            file.local_path, file.path.as_posix(), known_sha256=known_sha256
        )
    except (OSError, ValueError) as exc:
        raise FileInputError(f"cannot read {file.local_path}: {exc}") from exc
    file.check_sha256(metadata.sha256)
    return metadata


@task(
    name="extract-file-metadata",
    task_run_name="extract and publish metadata of {file.path}",
    retries=METADATA_RETRIES,
    retry_delay_seconds=METADATA_RETRY_DELAYS_S,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
)
def extract_file_metadata(
    file: RebuiltFile,
    kafka: KafkaCluster,
    preview_storage: BackupStorage | None = None,
    announced_at: datetime | None = None,
) -> ExtractedMetadata:
    """Extract the metadata of a rebuilt file, show it (and its preview) as artifacts and
    publish it to ``<topic>.metadata``; emit ``msi.file.metadata-extracted``.

    Args:
        file: The rebuilt file, validated from the event parameters.
        kafka: The cluster of the topics.
        preview_storage: The backup storage the preview of an image-like file is stored
            in; None: no preview.
        announced_at: When the event that announced the file occurred; with it, a file
            unchanged since is not hashed again (:func:`describe_rebuilt_file`).

    Returns:
        The metadata (its SHA-256 matches the event's) and where it was published.

    Raises:
        FileInputError: The topic is too long for the metadata suffix, or the file cannot
            be read (not retried).
        FileChangedError: The file is gone or no longer the one the event announced.
        MetadataPublishError: The broker did not confirm the message (retried).
        MsiError: The broker is unreachable or refuses to create the topic (retried).
    """
    metadata_topic(file.topic)  # a topic too long for the suffix fails before any work
    metadata = describe_rebuilt_file(file, announced_at)
    preview = store_file_preview(
        file, metadata, preview_storage, artifact_key("preview", file.file_id)
    )
    create_markdown_artifact(
        markdown=metadata_markdown(metadata) + preview_markdown(preview),
        key=artifact_key("metadata", file.file_id),
        description=f"Metadata of {file.path} (generation {file.generation})",
    )
    return ExtractedMetadata(metadata, publish_metadata(file, metadata, kafka))


class _MetadataProducers:
    """One producer per cluster and per process, and the topics known to exist.

    A batch run publishes the metadata of up to a thousand files; a new Producer (and two
    admin clients for the topic check) per file cost more than the message. The process is
    a flow run's, so the clients live as long as the run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._producers: dict[tuple[tuple[str, str], ...], Any] = {}
        self._topics: set[tuple[tuple[tuple[str, str], ...], str]] = set()

    @staticmethod
    def _key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((name, repr(value)) for name, value in config.items()))

    def producer(self, kafka: KafkaCluster) -> Any:
        """The cluster's idempotent producer (created on first use)."""
        from confluent_kafka import Producer

        config = {**kafka.to_connection().client_config(), "enable.idempotence": True}
        config["acks"] = "all"
        key = self._key(config)
        with self._lock:
            if key not in self._producers:
                self._producers[key] = Producer(config)
            return self._producers[key]

    def forget(self, kafka: KafkaCluster) -> None:
        """Drop the cluster's producer after a failure; the next publication makes anew."""
        config = {**kafka.to_connection().client_config(), "enable.idempotence": True}
        config["acks"] = "all"
        with self._lock:
            self._producers.pop(self._key(config), None)

    def ensure_topic(self, kafka: KafkaCluster, topic: str) -> None:
        """Create ``topic`` if missing, once per cluster and process."""
        connection = kafka.to_connection()
        key = (self._key(connection.client_config()), topic)
        if key in self._topics:
            return
        ensure_topic(connection, topic)
        self._topics.add(key)


_PRODUCERS = _MetadataProducers()


def _produce(kafka: KafkaCluster, topic: str, key: str, value: bytes, generation: int) -> Any:
    """Produce one message and wait for its delivery report; return the delivered message."""
    producer = _PRODUCERS.producer(kafka)
    reports: list[tuple[Any, Any]] = []
    producer.produce(
        topic,
        key=key.encode("utf-8"),
        value=value,
        headers=[
            (HeaderName.VERSION.value, FORMAT_VERSION.encode("ascii")),
            (HeaderName.KIND.value, METADATA_KIND.encode("ascii")),
            (HeaderName.GENERATION.value, str(generation).encode("ascii")),
        ],
        on_delivery=lambda err, msg: reports.append((err, msg)),
    )
    remaining = producer.flush(DELIVERY_TIMEOUT_S)
    if remaining or not reports:
        _PRODUCERS.forget(kafka)
        raise MetadataPublishError(
            f"the broker at {kafka.bootstrap_servers} did not confirm the metadata message "
            f"to {topic!r} within {DELIVERY_TIMEOUT_S:.0f} s"
        )
    error, message = reports[0]
    if error is not None:
        _PRODUCERS.forget(kafka)
        raise MetadataPublishError(f"the metadata message to {topic!r} was not delivered: {error}")
    return message


def publish_metadata(
    file: RebuiltFile, metadata: FileMetadata, kafka: KafkaCluster
) -> PublishedMetadata:
    """Produce the metadata JSON to ``<topic>.metadata``; emit ``msi.file.metadata-extracted``.

    Args:
        file: The rebuilt file the metadata describes.
        metadata: Its metadata, from :func:`describe_rebuilt_file`.
        kafka: The cluster of the topics.

    Returns:
        Where the message went.

    Raises:
        MetadataPublishError: The broker did not confirm the message.
        MsiError: The broker is unreachable or refuses to create the topic.
    """
    topic = metadata_topic(file.topic)
    _PRODUCERS.ensure_topic(kafka, topic)
    value = metadata.to_json_bytes()
    message = _produce(kafka, topic, file.file_id, value, file.generation)
    published = PublishedMetadata(
        relpath=file.path.as_posix(),
        topic=topic,
        partition=message.partition(),
        offset=message.offset(),
        size=len(value),
    )
    get_run_logger().info(
        "Metadata of %s (%s, extractor %s, %d warning(s)) published to %s [%d] at offset %d",
        file.path,
        metadata.mime_type,
        metadata.extractor,
        len(metadata.warnings),
        topic,
        published.partition,
        published.offset,
    )
    facts = file.facts(
        metadata_topic=topic,
        mime_type=metadata.mime_type,
        extractor=metadata.extractor,
        warnings=len(metadata.warnings),
    )
    event = file_event(EventName.METADATA_EXTRACTED, facts)
    emit_downstream_event(event)
    record_file_step(event)
    return published
