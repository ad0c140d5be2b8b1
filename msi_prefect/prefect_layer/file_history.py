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
  ``rebuilt`` events from the server and writes their rows.
* A batch run writes its files' histories together (:func:`file_history_batch`, used by
  ``dispatch/batches.py``): one new version per file holding the rows of its three steps
  (``process-batch`` does them all), and the reads shared by up to
  :data:`HISTORIES_PER_CALL` files: one call for their latest versions, one for their
  transfer events (only the files whose history lacks them; 16 files a call), and after
  the writes one for the latest versions again and one for the newest versions. A
  per-file run is a batch of one: a read, the write, two reads (and the events for the
  generation's first step).
* The transfers do not write it per file: they handle thousands of files a second, and an
  artifact costs the server a write and events of its own; the downstream runs that each
  rebuilt file starts write the transfer's rows for it. A file still in flight has no
  artifact yet (``msi-prefect files`` shows how far it got).
* A rejected file starts no downstream run: ``reconstruct-files`` writes its row through
  :class:`RejectionHistoryWriter`, a thread of its own with a bounded queue (a flood of bad
  messages drops rows, counted in the log; the events keep every rejection).

Why this cost, and not less. At 10 files/s the history was 60 % of the API's requests
(about 27 artifact calls and 2.5 event queries per file): every step of every file read
the file's recent versions, wrote, read them again and the newest, and wrote again when
another step had written meanwhile. Options weighed:

* per-step keys (``file-...-backup``): one write and no read, but three artifacts per
  file and none with the file's whole way: not what the user looks for;
* each step writing its version without reading: the newest version would hold only the
  last writer's row, or need a repair write nearly every time (two writes per step);
* a single writer per file, from the events at write time: no step knows it is the last
  (the three run at once, in separate runs), and the server stores an event up to seconds
  after it was posted, so a history built from the events misses the steps that finished
  just before: the newest version would lack rows;
* kept: the read-write-look of before, but with the read of the latest version only, a
  repair write only by the writer committed last, and the calls shared by a batch's
  files. Per file and step that is
  one write (a repair write only when two steps of a file wrote at the same moment: by
  the one committed last) and, in a batch run, about 3/25 of a read.

Backup, metadata and analysis of one file run at the same time, and a version is a whole
table. Each writer reads the newest version, adds its row, writes a new version, then
looks: if another version was committed after its own, that one's writer looks in turn;
if its own is the last, it reads the file's newest versions and, while its version lacks
a row one of them holds, writes their union once more (at most :data:`MAX_WRITE_ROUNDS`
writes). So the version committed last, the one the UI shows, holds every row (see
:func:`_write_files`). The calls
are retried while the server is busy (503, timeouts) for at most :data:`CALL_DEADLINE_S`,
not for the minute Prefect's client would: a step never waits long for an absent server.
A failure is logged, pauses the history of the process for
:data:`PAUSE_AFTER_FAILURE_S`, and never fails the step: the events remain the record.

Nothing here imports Prefect at module level: :func:`file_history_key` is used by the CLI.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from msi_prefect.prefect_layer.event_queries import RETRIED_STATUS_CODES
from msi_prefect.prefect_layer.events import RESOURCE_PREFIX, EventName, FileEventSpec

__all__ = [
    "HISTORY_KEY_PREFIX",
    "HistoryBatch",
    "HistoryRow",
    "PendingStep",
    "RejectionHistoryWriter",
    "file_history_batch",
    "file_history_key",
    "merge_rows",
    "record_file_step",
    "rows_from_events",
    "write_steps",
]

logger = logging.getLogger(__name__)

HISTORY_KEY_PREFIX = "file"
#: Characters of the path kept in the key (its end: the file name matters most).
MAX_SLUG_CHARS = 60
#: Hex digits of the SHA-256 of topic and path: two files never share a key.
KEY_HASH_DIGITS = 10
#: Writes of one file's history by one writer at most (its own, then repairs after
#: concurrent writers).
MAX_WRITE_ROUNDS = 3
#: Files whose histories one round of calls writes: one read of their latest versions,
#: and after the writes one of them again and one of their newest versions (a batch
#: run's files share them).
HISTORIES_PER_CALL = 25
#: Versions per file read in the look after a write (all written since the read before
#: it: other steps of the file, a few rounds each). Times :data:`HISTORIES_PER_CALL`, it
#: stays within the API's largest page (200).
VERSIONS_PER_FILE = 8
#: The API's largest page of events; files whose transfer events one query reads (a sent
#: and a rebuilt event per generation, with room for a file sent again).
MAX_EVENTS_PER_QUERY = 50
FILES_PER_EVENTS_QUERY = 16
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


@dataclass(frozen=True)
class PendingStep:
    """A step's row waiting to be written to its file's history.

    Attributes:
        key: The file's history key (:func:`file_history_key`).
        topic: The file's topic.
        path: Its relative path.
        file_id: Its file id (empty if unknown: then its transfer rows are not looked up).
        row: The step's row.
        task_run_id: The task run the new version is attached to (None outside one).
        flow_run_id: The flow run it is attached to (None outside one).
    """

    key: str
    topic: str
    path: str
    file_id: str
    row: HistoryRow
    task_run_id: str | None = None
    flow_run_id: str | None = None

    @property
    def resource_id(self) -> str:
        """The id of the file's events' resource (``msi.file.<topic>.<file id>``)."""
        return f"{RESOURCE_PREFIX}.{self.topic}.{self.file_id}"

    @property
    def description(self) -> str:
        """The artifact's description."""
        return (
            f"History of `{self.path}` (topic `{self.topic}`): each generation's steps. "
            f"`msi-prefect files '{self.path}'` shows the same from the events."
        )

    def lacks_transfer_rows(self, rows: Iterable[HistoryRow]) -> bool:
        """Whether ``rows`` lack this step's generation's sent or rebuilt row, and the
        file's events can give them."""
        if not self.file_id or self.row.step == "sent":
            return False
        seen = {row.step for row in rows if row.generation == self.row.generation}
        return not seen >= _TRANSFER_STEPS


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

    def latest_of(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The version of each key the UI shows, by key: its artifact collection (the
        version's ``data``, and its id as ``latest_id``; ``id`` is the collection's).

        One call for at most :data:`HISTORIES_PER_CALL` keys; a key never written is absent.
        """
        found: list[dict[str, Any]] = self.post(
            "/artifacts/latest/filter",
            {"artifacts": {"key": {"any_": list(keys)}}, "limit": len(keys)},
        )
        return {str(artifact.get("key")): artifact for artifact in found}

    def versions_of(self, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The newest versions of the keys, newest first, by key (one call: the newest
        :data:`VERSIONS_PER_FILE` per key of the keys together)."""
        found: list[dict[str, Any]] = self.post(
            "/artifacts/filter",
            {
                "artifacts": {"key": {"any_": list(keys)}},
                "sort": "CREATED_DESC",
                "limit": VERSIONS_PER_FILE * len(keys),
            },
        )
        by_key: dict[str, list[dict[str, Any]]] = {}
        for artifact in found:
            by_key.setdefault(str(artifact.get("key")), []).append(artifact)
        return by_key

    def transfer_events(self, resource_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The ``sent`` and ``rebuilt`` events of files (one call, newest first, at most
        one page: :data:`MAX_EVENTS_PER_QUERY`)."""
        now = datetime.now(UTC)
        body = {
            "filter": {
                "event": {"name": [EventName.UPLOADED.value, EventName.RECONSTRUCTED.value]},
                "resource": {"id": list(resource_ids)},
                "occurred": {
                    "since": (now - EVENTS_LOOKBACK).isoformat(),
                    "until": (now + timedelta(hours=1)).isoformat(),
                },
                "order": "DESC",
            },
            "limit": MAX_EVENTS_PER_QUERY,
        }
        events: list[dict[str, Any]] = self.post("/events/filter", body).get("events", [])
        return events

    def create_table(
        self,
        key: str,
        rows: list[HistoryRow],
        description: str,
        task_run_id: str | None,
        flow_run_id: str | None,
    ) -> str:
        """A new version of ``key``, attached to the given task and flow run; its id."""
        created = self.post(
            "/artifacts/",
            {
                "key": key,
                "type": "table",
                "description": description,
                "data": json.dumps([asdict(row) for row in rows]),
                "task_run_id": task_run_id,
                "flow_run_id": flow_run_id,
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


def _this_run() -> tuple[str, str | None, str | None]:
    """The current run's name, and the ids of the task and flow run (empty outside a run)."""
    from prefect.runtime import flow_run, task_run
    from prefect.utilities.context import get_task_and_flow_run_ids

    try:
        name = str(task_run.name or flow_run.name or "")
    except Exception:  # outside a run: the row simply names no run
        name = ""
    task_run_id, flow_run_id = get_task_and_flow_run_ids()
    return (
        name,
        str(task_run_id) if task_run_id else None,
        str(flow_run_id) if flow_run_id else None,
    )


class HistoryBatch:
    """The history rows of a batch run's files, written together.

    A batch run's task records its file's step here (:func:`record_file_step` inside
    :func:`file_history_batch`) instead of writing it; :meth:`flush` writes every file's
    new version with one read of the latest versions, one of the files' transfer events
    (if needed) and one look after the writes, per :data:`HISTORIES_PER_CALL` files.
    """

    def __init__(self) -> None:
        self._steps: list[PendingStep] = []
        self.written = 0

    def add(self, step: PendingStep) -> None:
        """Hold a step's row until the next flush."""
        self._steps.append(step)

    def flush_if_full(self) -> None:
        """Write the held rows once there are enough for a full call (bounds memory, and
        a long batch's files get their history while it runs)."""
        if len(self._steps) >= HISTORIES_PER_CALL:
            self.flush()

    def flush(self) -> bool:
        """Write the held rows; never raises (see :func:`write_steps`).

        Returns:
            Whether they were written.
        """
        steps, self._steps = self._steps, []
        if not steps:
            return True
        done = write_steps(steps)
        if done:
            self.written += len(steps)
        return done


_BATCH: contextvars.ContextVar[HistoryBatch | None] = contextvars.ContextVar(
    "msi_file_history_batch", default=None
)


@contextlib.contextmanager
def file_history_batch() -> Iterator[HistoryBatch]:
    """Hold the history rows recorded inside, and write them together at the end.

    For a batch run (``msi_prefect.prefect_layer.dispatch.batches``): one version per file
    of the batch, and the reads shared by the batch's files. The rows are written also
    when the block ends with an exception.
    """
    batch = HistoryBatch()
    token = _BATCH.set(batch)
    try:
        yield batch
    finally:
        _BATCH.reset(token)
        batch.flush()


def record_file_step(spec: FileEventSpec, run_name: str | None = None) -> bool:
    """Add the step an event records to its file's history artifact (a new version).

    Call it in the run that emitted the event, after emitting it: the artifact belongs to
    that run. Inside :func:`file_history_batch` the row is held and written with the
    batch's others; else it is written now. Never raises: a failure is logged, the step
    goes on.

    Args:
        spec: The file event just emitted.
        run_name: The run to name in the row; default: the current task or flow run.

    Returns:
        Whether the artifact was written (or, in a batch, its row held for the batch's write).
    """
    step = STEP_OF_EVENT.get(spec.name.value)
    payload = spec.payload
    path, topic = payload.get("path"), payload.get("topic")
    if step is None or not path or not topic:
        return False
    generation = payload.get("generation")
    this_run, task_run_id, flow_run_id = _this_run()
    pending = PendingStep(
        key=file_history_key(str(topic), str(path)),
        topic=str(topic),
        path=str(path),
        file_id=str(payload.get("file_id") or ""),
        row=HistoryRow(
            generation=generation if isinstance(generation, int) else None,
            step=step,
            at=datetime.now(UTC).isoformat(),
            run=this_run if run_name is None else run_name,
            details=details_of(step, payload),
        ),
        task_run_id=task_run_id,
        flow_run_id=flow_run_id,
    )
    batch = _BATCH.get()
    if batch is not None:
        batch.add(pending)
        return True
    return write_steps([pending])


def write_steps(steps: Sequence[PendingStep]) -> bool:
    """Write the steps' rows to their files' histories; never raises.

    A failure is logged and pauses the history of this process for
    :data:`PAUSE_AFTER_FAILURE_S` (the rows are dropped; the events remain the record).

    Returns:
        Whether they were written.
    """
    api = _api()
    with api.lock:
        if time.monotonic() < api.paused_until:
            logger.debug("history of %d files not written: the server failed a moment ago",
                         len(steps))  # fmt: skip
            return False
        try:
            write_histories(api, steps)
        except Exception as exc:  # the history is a view; the steps' work is done
            api.paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            logger.warning("could not update the history artifact of %s%s: %r",
                           steps[0].path, f" and {len(steps) - 1} more files" if len(steps) > 1
                           else "", exc)  # fmt: skip
            return False
    return True


def write_histories(api: _HistoryApi, steps: Sequence[PendingStep]) -> None:
    """Write one new version of each file's history holding its steps' rows and every row
    known so far, :data:`HISTORIES_PER_CALL` files per round of calls.

    Raises:
        Exception: A call failed (the server is away or refused it).
    """
    by_key: dict[str, list[PendingStep]] = {}
    for step in steps:
        by_key.setdefault(step.key, []).append(step)
    files = list(by_key.values())
    for start in range(0, len(files), HISTORIES_PER_CALL):
        _write_files(api, files[start : start + HISTORIES_PER_CALL])


def _write_files(api: _HistoryApi, files: list[list[PendingStep]]) -> None:
    """Write the histories of at most :data:`HISTORIES_PER_CALL` files (the steps of each).

    The steps of one file (backup, metadata, analysis) write at the same moment, and a
    version is a whole table: a writer that read before another's write would drop that
    row from the newest version. So each writer reads the latest version first (one call
    for all its files), writes its version with its rows added, then looks (one or two
    calls): if the version the UI shows (the last committed) is not its own, a writer
    committed after it and looks in turn, so it stops; if it is its own, it reads the
    file's newest versions and, while its version lacks a row one of them holds, writes
    the union once more (at most :data:`MAX_WRITE_ROUNDS` writes). So the writer of the
    version committed last stops only on a complete one. Of two writers that both read
    before both wrote, only the one committed last writes again. (Commit order, not the
    versions' creation stamps: on PostgreSQL an older-stamped version can commit last.)
    """
    keys = [steps[0].key for steps in files]
    latest = api.latest_of(keys)
    tables = {
        steps[0].key: merge_rows(_table_rows(latest.get(steps[0].key)), [s.row for s in steps])
        for steps in files
    }
    lacking = [steps[-1] for steps in files if steps[-1].lacks_transfer_rows(tables[steps[0].key])]
    for start in range(0, len(lacking), FILES_PER_EVENTS_QUERY):
        part = lacking[start : start + FILES_PER_EVENTS_QUERY]
        by_resource: dict[str, list[dict[str, Any]]] = {}
        for event in api.transfer_events([step.resource_id for step in part]):
            resource = (event.get("resource") or {}).get("prefect.resource.id")
            by_resource.setdefault(str(resource), []).append(event)
        for step in part:
            rows = rows_from_events(by_resource.get(step.resource_id, []))
            tables[step.key] = merge_rows(rows, tables[step.key])
    unsettled = files
    for _ in range(MAX_WRITE_ROUNDS):
        written = {}
        for steps in unsettled:
            last = steps[-1]
            written[last.key] = api.create_table(
                last.key, tables[last.key], last.description, last.task_run_id, last.flow_run_id
            )
        # A file whose shown version is not ours had a version committed after ours: its
        # writer looks after its own write and sees ours, so this writer may stop.
        shown = api.latest_of([steps[0].key for steps in unsettled])
        ours_shown = [
            steps for steps in unsettled
            if str(shown.get(steps[0].key, {}).get("latest_id")) == written[steps[0].key]
        ]  # fmt: skip
        versions = api.versions_of([steps[0].key for steps in ours_shown]) if ours_shown else {}
        still = []
        for steps in ours_shown:
            key = steps[0].key
            found = versions.get(key, [])
            known = merge_rows(*(_table_rows(version) for version in found), tables[key])
            if not set(known) <= set(tables[key]):
                tables[key] = known
                still.append(steps)
        unsettled = still
        if not unsettled:
            return
    logger.debug("history of %d files still written concurrently after %d rounds",
                 len(unsettled), MAX_WRITE_ROUNDS)  # fmt: skip


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
