"""Prefect events for file outcomes: names, resources, and deterministic ids.

Every file outcome becomes one Prefect event whose resource is the file
(`msi.file.<topic>.<file id>`), labelled with its topic, path, size, SHA-256 and
destination, with the topic as a related resource. The event id is a uuid5 of the file
id, the generation and the event name: a replay after a crash emits the same id, and
the Prefect server, which deduplicates events by id, starts no downstream work twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from msi_prefect.prefect_layer.dispatch.mode import DownstreamDispatch
from msi_prefect.transfer import FileEvent, FileEventKind, UploadOutcome, UploadResult

# Fixed namespace: changing it would change every event id.
EVENT_ID_NAMESPACE = uuid.UUID("0b7a3c52-9d4e-4a57-9a0e-6f1d2c8b5e41")
RESOURCE_PREFIX = "msi.file"
BATCH_RESOURCE_PREFIX = "msi.batch"
DISPATCH_LABEL = "msi.dispatch"
TOPIC_RESOURCE_PREFIX = "msi.topic"
# Prefect labels are strings; long untrusted paths are cut for display.
MAX_LABEL_CHARS = 1024


class EventName(StrEnum):
    """The events this project emits."""

    UPLOADED = "msi.file.uploaded"
    RECONSTRUCTED = "msi.file.reconstructed"
    REJECTED = "msi.file.rejected"
    BACKED_UP = "msi.file.backed-up"
    METADATA_EXTRACTED = "msi.file.metadata-extracted"
    ANALYZED = "msi.file.analyzed"
    BACKUP_MISSING = "msi.backup.missing"
    PRUNED = "msi.file.pruned"
    BATCH_READY = "msi.files.batch-ready"


@dataclass(frozen=True)
class FileEventSpec:
    """Everything `prefect.events.emit_event` needs, computed without Prefect."""

    name: EventName
    resource: dict[str, str]
    related: list[dict[str, str]]
    payload: dict[str, Any]
    event_id: uuid.UUID

    def emit(self) -> None:
        """Send the event to the Prefect API the environment points at."""
        from prefect.events import emit_event

        emit_event(
            event=self.name.value,
            resource=self.resource,
            related=self.related,
            payload=self.payload,
            id=self.event_id,
        )


def event_id_for(name: EventName, topic: str, key: str, generation: int | None) -> uuid.UUID:
    """The deterministic id of one event about one generation of one file (or message)."""
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{name.value}/{topic}/{key}/{generation or 0}")


#: The rebuilt-file contract: what a ``msi.file.reconstructed`` event's payload says about
#: the file, what each entry of a ``msi.files.batch-ready`` payload holds, and the
#: parameters every per-file downstream flow takes (``prefect.yaml`` renders them from the
#: payload under ``file_parameters``; ``tests/test_events.py`` checks both match this).
REBUILT_FILE_FIELDS = ("topic", "file_id", "generation", "path", "url", "size", "sha256")


@dataclass(frozen=True)
class FileFacts:
    """What every file event says about its file.

    For a rebuilt file every field is set, and :meth:`parameters` is the rebuilt-file
    contract (:data:`REBUILT_FILE_FIELDS`); events about files not rebuilt yet (uploaded,
    rejected) leave out what they do not know.

    Attributes:
        topic: The Kafka topic the file travels through.
        file_id: The file id (a uuid5 of ``path``, 32 hex digits).
        path: The file's relative POSIX path below the watched folder and the destination.
        generation: The file's version; grows each time the file is sent anew.
        size: Size in bytes.
        sha256: Lower-case hex SHA-256 of the content.
        url: Where the rebuilt file is (``file://`` URL).
        extra: More payload fields of one event (e.g. a rejection's reason).
    """

    topic: str
    file_id: str
    path: str
    generation: int | None = None
    size: int | None = None
    sha256: str | None = None
    url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> FileFacts:
        """The facts of a rebuilt-file contract mapping (a payload, a batch entry).

        Raises:
            KeyError: A field of :data:`REBUILT_FILE_FIELDS` is missing.
        """
        return cls(**{name: parameters[name] for name in REBUILT_FILE_FIELDS})

    def parameters(self) -> dict[str, Any]:
        """The rebuilt-file contract of this file: the per-file flows' parameters."""
        return {name: getattr(self, name) for name in REBUILT_FILE_FIELDS}


def file_event(
    name: EventName,
    facts: FileFacts,
    dedup_key: str | None = None,
    dispatch: DownstreamDispatch | None = None,
) -> FileEventSpec:
    """Build the event `name` about a file.

    Args:
        name: Which event.
        facts: The file's topic, id, path, generation and, when known, size, hash, URL.
        dedup_key: What makes the event unique besides name, topic and generation;
            the file id by default (a rejected message without one uses its offset).
        dispatch: For events that start downstream work: which triggers should act on it.
    """
    labels = {
        "prefect.resource.id": f"{RESOURCE_PREFIX}.{facts.topic}.{facts.file_id}",
        "prefect.resource.name": facts.path[:MAX_LABEL_CHARS],
        "msi.topic": facts.topic,
        "msi.path": facts.path[:MAX_LABEL_CHARS],
        "msi.file-id": facts.file_id,
    }
    optional = {
        "msi.generation": facts.generation,
        "msi.size": facts.size,
        "msi.sha256": facts.sha256,
        "msi.url": facts.url,
    }
    labels.update({key: str(value) for key, value in optional.items() if value is not None})
    if dispatch is not None:
        labels[DISPATCH_LABEL] = dispatch.value
    payload: dict[str, Any] = {**facts.parameters(), **facts.extra}
    return FileEventSpec(
        name=name,
        resource=labels,
        related=[
            {
                "prefect.resource.id": f"{TOPIC_RESOURCE_PREFIX}.{facts.topic}",
                "prefect.resource.role": "topic",
            }
        ],
        payload=payload,
        event_id=event_id_for(name, facts.topic, dedup_key or facts.file_id, facts.generation),
    )


def from_reassembler(
    event: FileEvent, dispatch: DownstreamDispatch = DownstreamDispatch.PER_FILE
) -> FileEventSpec:
    """`msi.file.reconstructed` or `msi.file.rejected` for a reassembler outcome.

    Args:
        event: The outcome.
        dispatch: Labels a `reconstructed` event for the per-file or the batch triggers.

    Raises:
        ValueError: ``dispatch`` is ``adaptive``, a mode that decides the label per file.
    """
    if dispatch is DownstreamDispatch.ADAPTIVE:
        raise ValueError("adaptive dispatch is not a label: label the event per-file or batch")
    if event.kind is FileEventKind.RECONSTRUCTED:
        name = EventName.RECONSTRUCTED
        extra: dict[str, Any] = {}
        dedup_key = None
    else:
        name = EventName.REJECTED
        extra = {"reason": event.reason, "reason_code": event.reason_code}
        # A message rejected before its file id was trusted is told apart by its position.
        dedup_key = (
            None
            if event.generation is not None
            else f"{event.file_id}@{event.partition}:{event.offset}"
        )
    facts = FileFacts(
        topic=event.topic,
        file_id=event.file_id or "unknown",
        path=event.relpath or "",
        generation=event.generation,
        size=event.size,
        sha256=event.sha256,
        url=event.url,
        extra=extra,
    )
    return file_event(name, facts, dedup_key, dispatch if name is EventName.RECONSTRUCTED else None)


def facts_of(spec: FileEventSpec) -> FileFacts:
    """The file facts a file event was built from (read back from its payload)."""
    return FileFacts.from_parameters(spec.payload)


def batch_file_entry(facts: FileFacts) -> dict[str, Any]:
    """One file of a `msi.files.batch-ready` payload: the per-file flows' parameters."""
    return facts.parameters()


def batch_event(topic: str, files: list[FileFacts]) -> FileEventSpec:
    """`msi.files.batch-ready`: several rebuilt files for the batch deployment at once.

    The batch id, and so the event id, is a uuid5 of the members' ids and generations: the
    same batch emitted again after a crash is deduplicated by the server like a file event.

    Args:
        topic: The topic the files came through.
        files: The rebuilt files (at least one).

    Raises:
        ValueError: ``files`` is empty.
    """
    if not files:
        raise ValueError("a batch needs at least one file")
    members = sorted(f"{facts.file_id}/{facts.generation or 0}" for facts in files)
    batch_id = uuid.uuid5(EVENT_ID_NAMESPACE, f"batch/{topic}/{'|'.join(members)}").hex
    first = files[0].path
    return FileEventSpec(
        name=EventName.BATCH_READY,
        resource={
            "prefect.resource.id": f"{BATCH_RESOURCE_PREFIX}.{topic}.{batch_id}",
            "prefect.resource.name": f"{len(files)} files from {first}"[:MAX_LABEL_CHARS],
            "msi.topic": topic,
            "msi.files": str(len(files)),
            DISPATCH_LABEL: DownstreamDispatch.BATCH.value,
        },
        related=[
            {
                "prefect.resource.id": f"{TOPIC_RESOURCE_PREFIX}.{topic}",
                "prefect.resource.role": "topic",
            }
        ],
        payload={"topic": topic, "files": [batch_file_entry(facts) for facts in files]},
        event_id=event_id_for(EventName.BATCH_READY, topic, batch_id, None),
    )


def from_upload(topic: str, result: UploadResult) -> FileEventSpec | None:
    """`msi.file.uploaded` for a file the producer sent; None for other outcomes."""
    if result.outcome is not UploadOutcome.SENT or result.file_id is None:
        return None
    facts = FileFacts(
        topic=topic,
        file_id=result.file_id,
        path=result.relpath,
        generation=result.generation,
        size=result.size,
        sha256=result.sha256,
    )
    return file_event(EventName.UPLOADED, facts)
