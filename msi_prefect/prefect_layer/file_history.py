"""One artifact per file in the Prefect UI: the file's history, updated by each step.

A scientist looks for a file on the UI's Artifacts page by typing part of its name: every
file has one table artifact, keyed :func:`file_history_key` (``file-<slug of the path>-<10
hex digits of a hash of topic and path>``, e.g. ``file-run7-sample-01-tif-3f9c2a1b7e``), with
a row per step of each generation: sent, rejected, rebuilt, backup, metadata and analysis,
when it happened, the run that did it and what it says (``msi-prefect files`` shows the
same from the events, and also a backup the audit found missing; the audit's repair
backup updates the ``backup`` row). Each version of the key holds the
whole history known at that moment; the UI shows the newest and keeps the older ones.

Who writes it, and why so:

* The downstream steps (``backup-file``, ``extract-metadata``'s publish, ``analyze-file``,
  also each file of a batch run) call :func:`record_file_step` with the event they just
  emitted. The first of them for a generation also reads that file's ``sent`` and
  ``rebuilt`` events from the server (one query) and writes their rows.
* The transfers do not write it per file: they handle thousands of files a second, and an
  artifact costs the server a write and events of its own; the downstream runs that each
  rebuilt file starts write the transfer's rows for it. A file still in flight has no
  artifact yet (``msi-prefect files`` shows how far it got).
* A rejected file starts no downstream run: ``reconstruct-files`` writes its row through
  :class:`RejectionHistoryWriter`, a thread of its own with a bounded queue (a flood of bad
  messages drops rows, counted in the log; the events keep every rejection).

Backup, metadata and analysis of one file run at the same time. Each writer reads the
newest version, adds its row, writes a new version, then reads the newest again: if a
version written meanwhile lacks one of its rows, it writes the union once more (at most
:data:`MAX_WRITE_ROUNDS` writes). The writer whose version is last read every version
before it, so the last version holds every row. The calls are retried while the server is
busy (503, timeouts) for at most :data:`CALL_DEADLINE_S`, not for the minute Prefect's
client would: a step never waits long for an absent server. A failure is logged, pauses
the history of the process for :data:`PAUSE_AFTER_FAILURE_S`, and never fails the step:
the events remain the record.

Nothing here imports Prefect at module level: :func:`file_history_key` is used by the CLI.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from msi_prefect.prefect_layer.event_queries import RETRIED_STATUS_CODES
from msi_prefect.prefect_layer.events import RESOURCE_PREFIX, EventName, FileEventSpec

__all__ = [
    "HISTORY_KEY_PREFIX",
    "HistoryRow",
    "RejectionHistoryWriter",
    "file_history_key",
    "merge_rows",
    "record_file_step",
    "rows_from_events",
]

logger = logging.getLogger(__name__)

HISTORY_KEY_PREFIX = "file"
#: Characters of the path kept in the key (its end: the file name matters most).
MAX_SLUG_CHARS = 60
#: Hex digits of the SHA-256 of topic and path: two files never share a key.
KEY_HASH_DIGITS = 10
#: Writes of one step at most (its own, then repairs after concurrent writers).
MAX_WRITE_ROUNDS = 3
#: Versions of a file's history read to gather its rows (each carries all rows known when
#: it was written, so the newest few suffice).
MAX_VERSIONS_READ = 20
#: Events of one file read at most for its sent and rebuilt rows.
MAX_FILE_EVENTS = 50
#: How far back the file's events are looked for.
EVENTS_LOOKBACK = timedelta(days=30)
#: A longer detail (an analysis result) is cut in the row.
MAX_DETAIL_CHARS = 200
#: Rejected files waiting for their row in :class:`RejectionHistoryWriter`.
MAX_QUEUED_REJECTIONS = 100
#: How long the end of a reconstruct run waits for the rejections' rows (short: `down`
#: kills a transfer 10 s after asking it to stop).
REJECTION_DRAIN_WAIT_S = 3.0
#: Timeout of one attempt of a call of the history.
CALL_TIMEOUT_S = 10.0
#: A call is retried (busy server: 503, timeouts) until this long after it began; not
#: Prefect's client's minute of retries, so a step never waits long for the server.
CALL_DEADLINE_S = 15.0
FIRST_RETRY_PAUSE_S = 0.5
#: After a failed call, the history of this process is not written for this long.
PAUSE_AFTER_FAILURE_S = 30.0

_NOT_SLUG = re.compile(r"[^a-z0-9]+")

#: The step each file event records, in the order a file goes (the rows' order).
STEP_OF_EVENT: dict[str, str] = {
    EventName.UPLOADED.value: "sent",
    EventName.REJECTED.value: "rejected",
    EventName.RECONSTRUCTED.value: "rebuilt",
    EventName.BACKED_UP.value: "backup",
    EventName.METADATA_EXTRACTED.value: "metadata",
    EventName.ANALYZED.value: "analysis",
    EventName.BACKUP_MISSING.value: "backup_missing",
}
_STEP_ORDER = {step: index for index, step in enumerate(STEP_OF_EVENT.values())}
#: Payload fields shown in a step's ``details``.
DETAIL_FIELDS: dict[str, tuple[str, ...]] = {
    "sent": ("size", "sha256"),
    "rejected": ("reason_code", "reason"),
    "rebuilt": ("url", "size", "sha256"),
    "backup": ("backup_url",),
    "metadata": ("mime_type", "extractor", "metadata_topic"),
    "analysis": ("analysis", "result"),
    "backup_missing": ("status",),
}
#: The steps a downstream run needs the server's events for (it did not see them).
_TRANSFER_STEPS = frozenset({"sent", "rebuilt"})


def file_history_key(topic: str, path: str) -> str:
    """The artifact key of a file's history: stable, readable, unique per topic and path.

    Prefect keys hold lower-case letters, digits and dashes only, so the path is turned
    into a slug (``Run7/Sample_01.TIF`` -> ``run7-sample-01-tif``; its end is kept if it
    is long), and a hash of topic and path tells apart files whose slugs are alike.

    Args:
        topic: The file's topic.
        path: Its relative path.
    """
    slug = _NOT_SLUG.sub("-", path.lower()).strip("-")
    if len(slug) > MAX_SLUG_CHARS:
        slug = slug[-MAX_SLUG_CHARS:].lstrip("-")
    digest = hashlib.sha256(f"{topic}\n{path}".encode()).hexdigest()[:KEY_HASH_DIGITS]
    return "-".join(part for part in (HISTORY_KEY_PREFIX, slug, digest) if part)


@dataclass(frozen=True)
class HistoryRow:
    """One row of a file's history table.

    Attributes:
        generation: The generation (None for a message rejected before it had one).
        step: ``sent``, ``rejected``, ``rebuilt``, ``backup``, ``metadata``, ``analysis``
            or ``backup_missing``.
        at: When (ISO 8601, UTC).
        run: The name of the run that did it (empty if unknown).
        details: What the step's event says (``backup_url s3://...``).
    """

    generation: int | None
    step: str
    at: str
    run: str
    details: str

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> HistoryRow | None:
        """A row read back from a stored version; None if it is not one of ours."""
        step = row.get("step")
        generation = row.get("generation")
        if step not in _STEP_ORDER or not (generation is None or isinstance(generation, int)):
            return None
        return cls(
            generation=generation,
            step=str(step),
            at=str(row.get("at", "")),
            run=str(row.get("run", "")),
            details=str(row.get("details", "")),
        )


def details_of(step: str, payload: Mapping[str, Any]) -> str:
    """The ``details`` cell of a step from its event's payload."""
    parts = [
        f"{name} {payload[name]}"
        for name in DETAIL_FIELDS.get(step, ())
        if payload.get(name) not in (None, "")
    ]
    text = ", ".join(parts)
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def _run_name(event: Mapping[str, Any]) -> str:
    for related in event.get("related") or []:
        if related.get("prefect.resource.role") == "flow-run":
            return str(related.get("prefect.resource.name") or "")
    return ""


def rows_from_events(events: Iterable[Mapping[str, Any]]) -> list[HistoryRow]:
    """History rows of file events as the API returns them (``POST /events/filter``)."""
    rows = []
    for event in events:
        step = STEP_OF_EVENT.get(str(event.get("event")))
        if step is None:
            continue
        payload = event.get("payload") or {}
        generation = payload.get("generation")
        rows.append(
            HistoryRow(
                generation=generation if isinstance(generation, int) else None,
                step=step,
                at=str(event.get("occurred", "")),
                run=_run_name(event),
                details=details_of(step, payload),
            )
        )
    return rows


def merge_rows(*sources: Iterable[HistoryRow]) -> list[HistoryRow]:
    """Every (generation, step) once, its newest row kept; by generation, then step."""
    merged: dict[tuple[int, str], HistoryRow] = {}
    for rows in sources:
        for row in rows:
            key = (row.generation or 0, row.step)
            if key not in merged or row.at > merged[key].at:
                merged[key] = row
    return sorted(merged.values(), key=lambda r: (r.generation or 0, _STEP_ORDER[r.step], r.at))


def _table_rows(artifact: Mapping[str, Any] | None) -> list[HistoryRow]:
    """The rows of a stored version (its ``data`` is the table as JSON)."""
    if not artifact:
        return []
    data = artifact.get("data")
    try:
        table = json.loads(data) if isinstance(data, str) else data
    except ValueError:
        return []
    if not isinstance(table, list):
        return []
    rows = (HistoryRow.from_mapping(row) for row in table if isinstance(row, Mapping))
    return [row for row in rows if row is not None]


class _HistoryApi:
    """The calls the history makes: one kept client per process, short retries of its own.

    A step never waits for an absent server (Prefect's client would retry for about a
    minute): a failed call pauses the history of this process for
    :data:`PAUSE_AFTER_FAILURE_S`, as the downstream event outbox does.
    """

    def __init__(self) -> None:
        from msi_prefect.prefect_layer.event_outbox import PrefectEventPoster

        self._poster = PrefectEventPoster(timeout_s=CALL_TIMEOUT_S, retries=False)
        # One write at a time per process (a batch run's files, the rejection writer).
        self.lock = threading.Lock()
        self.paused_until = 0.0

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """One call, retried while the server says "not now" (busy, 503), up to a deadline.

        A server that is away refuses at once: that fails within seconds.
        """
        import httpx

        deadline = time.monotonic() + CALL_DEADLINE_S
        pause = FIRST_RETRY_PAUSE_S
        while True:
            try:
                return self._poster.post_json(path, body)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code not in RETRIED_STATUS_CODES:
                    raise
                error: Exception = exc
            except httpx.TransportError as exc:
                error = exc
            if time.monotonic() + pause >= deadline:
                raise error
            time.sleep(pause)
            pause *= 2

    def latest(self, key: str) -> dict[str, Any] | None:
        """The version of ``key`` the UI shows (its collection's latest)."""
        found = self.post(
            "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [key]}}, "limit": 1}
        )
        return found[0] if found else None

    def versions(self, key: str) -> list[dict[str, Any]]:
        """The newest versions of ``key``, newest first (at most :data:`MAX_VERSIONS_READ`)."""
        found: list[dict[str, Any]] = self.post(
            "/artifacts/filter",
            {
                "artifacts": {"key": {"any_": [key]}},
                "sort": "CREATED_DESC",
                "limit": MAX_VERSIONS_READ,
            },
        )
        return found

    def file_events(self, topic: str, file_id: str) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        body = {
            "filter": {
                "event": {"name": [EventName.UPLOADED.value, EventName.RECONSTRUCTED.value]},
                "resource": {"id": [f"{RESOURCE_PREFIX}.{topic}.{file_id}"]},
                "occurred": {
                    "since": (now - EVENTS_LOOKBACK).isoformat(),
                    "until": (now + timedelta(hours=1)).isoformat(),
                },
                "order": "DESC",
            },
            "limit": MAX_FILE_EVENTS,
        }
        events: list[dict[str, Any]] = self.post("/events/filter", body).get("events", [])
        return events

    def create_table(self, key: str, rows: list[HistoryRow], description: str) -> str:
        """A new version of ``key``, attached to the current task and flow run."""
        from prefect.utilities.context import get_task_and_flow_run_ids

        task_run_id, flow_run_id = get_task_and_flow_run_ids()
        created = self.post(
            "/artifacts/",
            {
                "key": key,
                "type": "table",
                "description": description,
                "data": json.dumps([asdict(row) for row in rows]),
                "task_run_id": str(task_run_id) if task_run_id else None,
                "flow_run_id": str(flow_run_id) if flow_run_id else None,
            },
        )
        return str(created["id"])


_API: _HistoryApi | None = None
_API_LOCK = threading.Lock()


def _api() -> _HistoryApi:
    global _API
    with _API_LOCK:
        if _API is None:
            _API = _HistoryApi()
        return _API


def _this_run_name() -> str:
    from prefect.runtime import flow_run, task_run

    try:
        return str(task_run.name or flow_run.name or "")
    except Exception:  # outside a run: the row simply names no run
        return ""


def record_file_step(spec: FileEventSpec, run_name: str | None = None) -> bool:
    """Add the step an event records to its file's history artifact (a new version).

    Call it in the run that emitted the event, after emitting it: the artifact belongs to
    that run. Never raises: a failure is logged, the step goes on.

    Args:
        spec: The file event just emitted.
        run_name: The run to name in the row; default: the current task or flow run.

    Returns:
        Whether the artifact was written.
    """
    step = STEP_OF_EVENT.get(spec.name.value)
    payload = spec.payload
    path, topic = payload.get("path"), payload.get("topic")
    if step is None or not path or not topic:
        return False
    generation = payload.get("generation")
    own = HistoryRow(
        generation=generation if isinstance(generation, int) else None,
        step=step,
        at=datetime.now(UTC).isoformat(),
        run=_this_run_name() if run_name is None else run_name,
        details=details_of(step, payload),
    )
    api = _api()
    with api.lock:
        if time.monotonic() < api.paused_until:
            logger.debug("history of %s not written: the server failed a moment ago", path)
            return False
        try:
            _write(api, str(topic), str(path), str(payload.get("file_id") or ""), own)
        except Exception as exc:  # the history is a view; the step's work is done
            api.paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            logger.warning("could not update the history artifact of %s: %r", path, exc)
            return False
    return True


def _write(api: _HistoryApi, topic: str, path: str, file_id: str, own: HistoryRow) -> None:
    """Add ``own`` to the file's history: a new version holding every row known so far.

    The steps of one file (backup, metadata, analysis) write at the same moment, and a
    version is a whole table: a writer that read before another's write would drop that
    row from the newest version. So every version carries the rows of all recent versions,
    and each writer looks again after its write: while the newest version lacks a row some
    version has, it writes the union once more. The last writer's look comes after every
    write, so the newest version ends complete.
    """
    key = file_history_key(topic, path)
    description = (
        f"History of `{path}` (topic `{topic}`): each generation's steps. "
        f"`msi-prefect files '{path}'` shows the same from the events."
    )
    rows = merge_rows(*(_table_rows(version) for version in api.versions(key)), [own])
    seen = {row.step for row in rows if row.generation == own.generation}
    if file_id and not seen >= _TRANSFER_STEPS and own.step != "sent":
        rows = merge_rows(rows_from_events(api.file_events(topic, file_id)), rows)
    for _ in range(MAX_WRITE_ROUNDS):
        api.create_table(key, rows, description)
        known = merge_rows(*(_table_rows(version) for version in api.versions(key)), rows)
        if set(known) <= set(_table_rows(api.latest(key))):
            return
        rows = known


class RejectionHistoryWriter:
    """Writes rejected files' history rows from a thread, so the transfer never waits.

    Used by ``reconstruct-files``: :meth:`submit` puts the rejection's event on a bounded
    queue and returns at once; a full queue (a flood of bad messages) drops the row and
    counts it. The thread runs in the context of the run that created the writer, so its
    artifacts belong to that run.
    """

    def __init__(self, max_queued: int = MAX_QUEUED_REJECTIONS) -> None:
        self._queue: queue.Queue[FileEventSpec | None] = queue.Queue(maxsize=max_queued)
        self.dropped = 0
        self.written = 0
        self._stopping = False
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._loop,), name="msi-rejection-history", daemon=True
        )
        self._thread.start()

    def submit(self, spec: FileEventSpec) -> None:
        """Queue the history row of a rejection (only files with a path get one)."""
        if spec.name is not EventName.REJECTED or not spec.payload.get("path"):
            return
        try:
            self._queue.put_nowait(spec)
        except queue.Full:
            self.dropped += 1

    def _loop(self) -> None:
        while not self._stopping and (spec := self._queue.get()) is not None:
            if record_file_step(spec):
                self.written += 1

    def close(self, wait_s: float = REJECTION_DRAIN_WAIT_S) -> None:
        """Write what is queued, waiting at most ``wait_s``; the rest is left (counted)."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            self._stopping = True  # the thread stops after the item in hand
        self._thread.join(wait_s)
        left = self._queue.qsize()
        if self.dropped or left:
            logger.warning(
                "%d rejected files got no history row (too many at once, or the server "
                "was slow); their msi.file.rejected events have them",
                self.dropped + left,
            )
