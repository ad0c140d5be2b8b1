"""Audit the backups of a destination and re-trigger the missing ones.

The consumer's progress store knows every file it delivered, with its size and SHA-256. It
is in the rebuilder's work directory: ``<destination>/.msi-state/progress.sqlite`` for a
local destination by default, ``<work_dir>/progress.sqlite`` when the rebuilder was given a
``work_dir``, which a remote destination (``s3://...``) always needs; so the audit of a
remote destination is given that ``work_dir`` too (:func:`progress_store_path`). Several
rebuilders into one destination (storage hosts) each have their own progress store, and
each host audits what it delivered. :func:`audit_destination` checks the backup of each
one (:meth:`~msi_prefect.transfer.sinks.Sink.check`: size, and the stored or streamed
SHA-256) and :func:`audit_backups`, the task of the scheduled ``audit-backups`` deployment,

* emits ``msi.backup.missing`` for each backup that is missing or wrong, with the same
  payload as ``msi.file.reconstructed`` (``topic``, ``file_id``, ``generation``, ``path``,
  ``url``, ``size``, ``sha256``) so the backup deployment's trigger re-runs it. The event id
  includes the audit run, so each audit can re-trigger, and a retried audit run cannot
  trigger twice;
* writes a table artifact ``audit-backups`` (problems first) and returns the counts;
* fails if some backups could not be checked (the store is unreachable), after reporting.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.events import DownstreamDispatch, EventName, FileFacts, file_event
from msi_prefect.prefect_layer.flow_inputs import FileInputError, retry_unless_input_error
from msi_prefect.transfer import (
    CopyStatus,
    DestinationLayout,
    FileProgress,
    ProgressStore,
    Sink,
    SinkError,
    UnsafePathError,
    sink_for,
    validate_relative_path,
)

__all__ = [
    "AUDIT_ARTIFACT_KEY",
    "AuditEntry",
    "AuditIncompleteError",
    "AuditReport",
    "AuditStatus",
    "audit_backups",
    "audit_destination",
    "is_remote",
    "progress_store_path",
]

#: Key of the audit's table artifact (one history of audits in the UI).
AUDIT_ARTIFACT_KEY = "audit-backups"
#: Rows of the table artifact; problems come first, then as many good files as fit.
MAX_TABLE_ROWS = 1000
#: ``msi.backup.missing`` events one audit emits at most (a broken store must not start
#: thousands of backup runs at once; the next audit re-triggers the rest).
DEFAULT_MAX_MISSING_EVENTS = 1000
#: A file delivered less than this long ago whose backup is not there yet is counted as
#: ``recent``, not re-triggered: its backup run may still be queued behind a backlog, and
#: re-triggering it would only add runs to that backlog.
DEFAULT_GRACE_MINUTES = 15.0
AUDIT_RETRIES = 1
SECONDS_PER_MINUTE = 60.0
AUDIT_RETRY_DELAY_S = 60


class AuditStatus(StrEnum):
    """How the backup of one delivered file stands."""

    OK = "ok"
    MISSING = "missing"
    WRONG_SIZE = "wrong-size"
    WRONG_HASH = "wrong-hash"
    UNREADABLE = "unreadable"
    RECENT = "recent"


_FROM_COPY_STATUS = {
    CopyStatus.OK: AuditStatus.OK,
    CopyStatus.MISSING: AuditStatus.MISSING,
    CopyStatus.WRONG_SIZE: AuditStatus.WRONG_SIZE,
    CopyStatus.WRONG_HASH: AuditStatus.WRONG_HASH,
}


class AuditIncompleteError(MsiError):
    """Some backups could not be checked (the report and events were still made)."""


@dataclass(frozen=True)
class AuditEntry:
    """The audit of one delivered file.

    Attributes:
        file: The file's progress row (topic, id, generation, path, size, SHA-256).
        status: How its backup stands.
        url: URL of the delivered file (``file://``, or the remote destination's object).
        detail: Why it is unreadable, or empty.
    """

    file: FileProgress
    status: AuditStatus
    url: str
    detail: str = ""


@dataclass
class AuditReport:
    """Outcome of one audit.

    Attributes:
        run_id: Identifies the audit run (part of its events' ids).
        destination: The audited destination directory.
        backup: Description of the backup storage.
        counts: Files per status.
        events_emitted: ``msi.backup.missing`` events sent.
        events_skipped: Repairable files not announced (over the per-audit limit).
    """

    run_id: str
    destination: str
    backup: str
    counts: dict[AuditStatus, int] = field(default_factory=lambda: dict.fromkeys(AuditStatus, 0))
    events_emitted: int = 0
    events_skipped: int = 0

    @property
    def checked(self) -> int:
        """Files checked."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """Counts by status name, plus ``checked``, ``events_emitted``, ``events_skipped``."""
        return {
            **{status.value: count for status, count in self.counts.items()},
            "checked": self.checked,
            "events_emitted": self.events_emitted,
            "events_skipped": self.events_skipped,
        }


def is_remote(destination: str | Path) -> bool:
    """Whether ``destination`` is a URL (``s3://bucket/prefix``) rather than a folder."""
    return "://" in str(destination) and not str(destination).startswith("file://")


def progress_store_path(destination: str | Path, work_dir: str | Path | None = None) -> Path:
    """The progress store of the rebuilder that delivers to ``destination``.

    Args:
        destination: The reconstruct flow's destination: an absolute folder, or a URL.
        work_dir: The reconstruct flow's ``work_dir``, if it was given one (a remote
            destination always is).

    Raises:
        FileInputError: ``destination`` is a relative or missing folder, a remote
            destination comes without ``work_dir``, or there is no progress store where
            it should be.
    """
    if is_remote(destination):
        if work_dir is None or not str(work_dir).strip():
            raise FileInputError(
                f"the destination {destination} is not a folder, so its rebuilder's progress "
                "store is not in it: give work_dir, the work_dir of the reconstruct-files run "
                "that rebuilds into it (its progress.sqlite is there; WORK_DIR/rebuild on a "
                "storage host of `msi-prefect worker --role storage`)"
            )
    else:
        destination = Path(destination)
        if not destination.is_absolute():
            raise FileInputError(
                f"destination {str(destination)!r} is relative; give the absolute directory "
                "the reconstruct flow writes to (flows run in other working directories)"
            )
        if not destination.is_dir():
            raise FileInputError(f"destination {destination} is not a directory")
    if work_dir is not None and str(work_dir).strip():
        work = Path(work_dir)
        if not work.is_absolute():
            raise FileInputError(f"work_dir {str(work)!r} is relative; give an absolute folder")
        store = DestinationLayout.of_remote(work).progress_store
        if not store.is_file():
            raise FileInputError(
                f"work_dir {work} has no {store.name}; is it the work_dir of the "
                f"reconstruct-files run that rebuilds into {destination}?"
            )
        return store
    assert isinstance(destination, Path)
    store = DestinationLayout.of_local(destination).progress_store
    if not store.is_file():
        raise FileInputError(
            f"{destination} has no {store.relative_to(destination)}; is it the directory "
            "the reconstruct flow delivers files to? (a rebuilder given a work_dir keeps it "
            "there: give that work_dir)"
        )
    return store


def _check_one(
    sink: Sink, url_of: Callable[[PurePosixPath], str], row: FileProgress, recent_since: float
) -> AuditEntry:
    try:
        relpath = validate_relative_path(row.relpath)
    except UnsafePathError as exc:
        return AuditEntry(row, AuditStatus.UNREADABLE, "", f"unsafe path in the store: {exc}")
    url = url_of(relpath)
    if row.sha256 is None:
        return AuditEntry(row, AuditStatus.UNREADABLE, url, "no SHA-256 recorded")
    try:
        status = sink.check(relpath, row.size, row.sha256)
    except SinkError as exc:
        return AuditEntry(row, AuditStatus.UNREADABLE, url, str(exc))
    if status is not CopyStatus.OK and row.updated_at >= recent_since:
        return AuditEntry(
            row, AuditStatus.RECENT, url, f"delivered recently; its backup is {status.value} so far"
        )
    return AuditEntry(row, _FROM_COPY_STATUS[status], url)


def audit_destination(
    destination: str | Path,
    sink: Sink,
    topic: str | None = None,
    work_dir: str | Path | None = None,
    grace_minutes: float = DEFAULT_GRACE_MINUTES,
) -> Iterator[AuditEntry]:
    """Check the backup of every file delivered to ``destination``.

    Args:
        destination: The reconstruct flow's destination: an absolute folder, or a URL.
        sink: The backup storage.
        topic: Only files of this topic; all when ``None``.
        work_dir: The reconstruct flow's ``work_dir`` (required for a remote destination).
        grace_minutes: A file delivered less than this long ago whose backup is not right
            yet is ``recent`` (its backup may still be on its way), not a problem.

    Yields:
        One entry per delivered file (its newest complete generation), in path order.

    Raises:
        FileInputError: No progress store (see :func:`progress_store_path`).
    """
    store_path = progress_store_path(destination, work_dir)
    recent_since = time.time() - grace_minutes * SECONDS_PER_MINUTE
    url_of: Callable[[PurePosixPath], str]
    if is_remote(destination):
        url_of = sink_for(str(destination)).url_of  # the URL reconstruct-files announced
    else:
        root = Path(os.path.abspath(destination))
        url_of = lambda relpath: root.joinpath(*relpath.parts).as_uri()  # noqa: E731
    with ProgressStore(store_path) as store:
        rows = store.completed(topic)
    for row in rows:
        yield _check_one(sink, url_of, row, recent_since)


def _missing_event_facts(entry: AuditEntry, run_id: str, backup: str) -> FileFacts:
    row = entry.file
    return FileFacts(
        topic=row.topic,
        file_id=row.file_id,
        path=row.relpath,
        generation=row.generation,
        size=row.size,
        sha256=row.sha256,
        url=entry.url,
        extra={"status": entry.status.value, "audit_run_id": run_id, "backup": backup},
    )


def _table_rows(problems: list[AuditEntry], good: list[AuditEntry]) -> list[dict[str, str | int]]:
    shown = (problems + good)[:MAX_TABLE_ROWS]
    return [
        {
            "relpath": entry.file.relpath,
            "status": entry.status.value,
            "topic": entry.file.topic,
            "generation": entry.file.generation,
            "size": entry.file.size,
            "detail": entry.detail,
        }
        for entry in shown
    ]


@task(
    name="audit-backups",
    task_run_name="audit backups of {destination}",
    retries=AUDIT_RETRIES,
    retry_delay_seconds=AUDIT_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
)
def audit_backups(
    destination: str | Path,
    storage: BackupStorage,
    topic: str | None = None,
    run_id: str | None = None,
    max_missing_events: int = DEFAULT_MAX_MISSING_EVENTS,
    work_dir: str | Path | None = None,
    grace_minutes: float = DEFAULT_GRACE_MINUTES,
) -> AuditReport:
    """Check every delivered file's backup; announce the missing and wrong ones.

    Args:
        destination: The reconstruct flow's destination: an absolute folder, or a URL.
        storage: The backup storage to check.
        topic: Only files of this topic; all when ``None``.
        run_id: Identifies this audit in event ids (the flow run id); random if ``None``.
        max_missing_events: ``msi.backup.missing`` events sent at most.
        work_dir: The reconstruct flow's ``work_dir`` (required for a remote destination).
        grace_minutes: Files delivered less than this long ago are not re-triggered yet.

    Returns:
        The counts per status and the events sent.

    Raises:
        FileInputError: No progress store (see :func:`progress_store_path`).
        AuditIncompleteError: Some backups could not be checked (after reporting the rest).
    """
    logger = get_run_logger()
    sink = storage.sink()
    report = AuditReport(
        run_id=run_id or uuid.uuid4().hex, destination=str(destination), backup=sink.describe()
    )
    problems: list[AuditEntry] = []
    good: list[AuditEntry] = []
    first_unreadable = ""
    for entry in audit_destination(destination, sink, topic, work_dir, grace_minutes):
        report.counts[entry.status] += 1
        if entry.status in (AuditStatus.OK, AuditStatus.RECENT):
            if len(good) < MAX_TABLE_ROWS:
                good.append(entry)
            continue
        if len(problems) < MAX_TABLE_ROWS:
            problems.append(entry)
        if entry.status is AuditStatus.UNREADABLE:
            first_unreadable = first_unreadable or f"{entry.file.relpath}: {entry.detail}"
            continue
        if report.events_emitted >= max_missing_events:
            report.events_skipped += 1
            continue
        logger.warning("Backup of %s is %s; re-triggering it", entry.file.relpath, entry.status)
        facts = _missing_event_facts(entry, report.run_id, report.backup)
        file_event(
            EventName.BACKUP_MISSING,
            facts,
            f"{entry.file.file_id}@{report.run_id}",
            DownstreamDispatch.PER_FILE,  # a repair is always one backup-file run
        ).emit()
        report.events_emitted += 1
    summary = ", ".join(f"{count} {status}" for status, count in report.counts.items() if count)
    create_table_artifact(
        table=_table_rows(problems, good),
        key=AUDIT_ARTIFACT_KEY,
        description=f"Backups of {destination} in {report.backup}: {summary or 'no files'}",
    )
    logger.info("Audit of %s: %s", destination, summary or "no delivered files")
    unreadable = report.counts[AuditStatus.UNREADABLE]
    if unreadable:
        raise AuditIncompleteError(
            f"{unreadable} backup(s) could not be checked, e.g. {first_unreadable}"
        )
    return report
