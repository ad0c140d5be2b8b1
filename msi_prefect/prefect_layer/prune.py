"""Free the instrument's disk: delete sent files once their backup is verified (opt-in).

The ``prune-source`` deployment runs :func:`prune_source` on the instrument's worker. With
``retention_days`` set on the ``MSI Transfer Settings`` block, it deletes a file from the
watched folder when every one of these holds at that moment, and keeps it (saying why)
otherwise:

1. the producer registry (beside the folder, what ``watch-directory`` keeps) holds the file
   as SENT: its newest generation, size, mtime, inode and SHA-256;
2. the file on disk has that size, mtime and inode, and (read last, once) that SHA-256:
   it has not changed since it was sent;
3. the server's ``msi.file.backed-up`` events announce no older generation as the newest
   backup (a newer generation sent but not backed up yet is kept);
4. the backup object exists with that size and SHA-256
   (:meth:`~msi_prefect.transfer.Sink.check`, the check the backup audit makes); a store
   that cannot be reached keeps the file;
5. the backup is at least ``retention_days`` old: counted from the ``msi.file.backed-up``
   event of that generation, or, when the server no longer holds it (Prefect keeps events
   7 days by default), from the backup object's modification time.

:func:`decide` is that rule, pure; the rest gathers its evidence cheapest first (the folder
and registry, one paged read of the events, the store, then the file's content). Every
deletion emits ``msi.file.pruned`` (resource ``msi.file.<topic>.<file id>``, like the other
file events) through the host's durable outbox, and every run writes a table artifact
``prune-source`` (deletions first, then what was kept and why). A dry run decides the same
way and deletes nothing.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path, PurePosixPath

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.event_outbox import emit_downstream_event
from msi_prefect.prefect_layer.events import RESOURCE_PREFIX, EventName, FileFacts, file_event
from msi_prefect.prefect_layer.flow_inputs import FileInputError
from msi_prefect.transfer import (
    CopyStatus,
    FileRecord,
    FileState,
    Registry,
    Sink,
    SinkError,
    UnsafePathError,
    file_id_for,
    relative_posix,
)

__all__ = [
    "PRUNE_ARTIFACT_KEY",
    "Action",
    "BackupCheck",
    "BackupEvent",
    "DiskIdentity",
    "Need",
    "PruneEvidence",
    "PruneIncompleteError",
    "PruneItem",
    "PruneReport",
    "Reason",
    "Verdict",
    "decide",
    "plan_prune",
    "prune_source",
]

#: Key of the run's table artifact (one history of prunes in the UI).
PRUNE_ARTIFACT_KEY = "prune-source"
#: Rows of the table artifact: deletions first, then kept files, as many as fit.
MAX_TABLE_ROWS = 1000
#: ``msi.file.backed-up`` events read at most per run (the newest); a file whose event was
#: not read is judged by its backup object alone.
MAX_EVENTS_READ = 100_000
#: The server returns at most this many events per page.
EVENTS_PER_PAGE = 50
#: Events are read from this long before the oldest candidate was sent (clocks differ).
EVENT_CLOCK_MARGIN = timedelta(hours=1)
#: After this many backups in a row could not be checked, the store is taken as down and
#: the rest are not tried (each try waits out the store client's retries, ~15 s).
MAX_STORE_FAILURES_IN_A_ROW = 3
SECONDS_PER_DAY = 86_400.0


class Action(StrEnum):
    """What happens to one file of the watched folder."""

    DELETE = "delete"
    KEEP = "keep"


class Reason(StrEnum):
    """Why a file is deleted (``verified``) or kept (the rest)."""

    VERIFIED = "verified"
    """Sent, unchanged, backed up long enough ago, backup verified now."""
    NEVER_SENT = "never-sent"
    """Not in the producer registry (excluded by a pattern, or not stable yet)."""
    NOT_SENT = "not-sent"
    """Its last generation is being sent, was aborted or failed."""
    CHANGED_SINCE_SENT = "changed-since-sent"
    """Size, mtime, inode or content differ from what was sent."""
    NEWEST_NOT_BACKED_UP = "newest-generation-not-backed-up"
    """The newest backup announced is of an older generation than the one sent."""
    BACKUP_MISSING = "backup-missing"
    """No backup object."""
    BACKUP_MISMATCH = "backup-mismatch"
    """The backup object's size or SHA-256 is not the sent file's."""
    BACKUP_UNVERIFIABLE = "backup-unverifiable"
    """The backup store could not be checked (unreachable, refused, no time)."""
    TOO_RECENT = "too-recent"
    """Backed up less than the retention period ago."""


class Need(StrEnum):
    """Evidence :func:`decide` asks for before it can decide (the costly kinds)."""

    BACKUP_CHECK = "backup-check"
    CONTENT_HASH = "content-hash"


@dataclass(frozen=True)
class Verdict:
    """The decision about one file.

    Attributes:
        action: Delete or keep.
        reason: Why.
        detail: The facts behind it, for people.
    """

    action: Action
    reason: Reason
    detail: str


@dataclass(frozen=True)
class DiskIdentity:
    """What the file on disk is now (compared with what the registry says was sent)."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class BackupEvent:
    """The newest ``msi.file.backed-up`` event the server holds for a file.

    Attributes:
        generation: The generation backed up.
        sha256: Its SHA-256.
        occurred: When it was announced.
        backup_url: Where the copy went.
    """

    generation: int
    sha256: str
    occurred: datetime
    backup_url: str


@dataclass(frozen=True)
class BackupCheck:
    """The backup object as the store shows it now.

    Attributes:
        status: How it compares with the sent size and SHA-256; None if it could not be
            checked.
        error: Why it could not be checked.
        modified_at: When the object was written, if the store says.
        url: The object's URL.
    """

    status: CopyStatus | None
    error: str = ""
    modified_at: datetime | None = None
    url: str = ""


@dataclass(frozen=True)
class PruneEvidence:
    """What is known about one file; :func:`decide` asks for the missing costly parts.

    Attributes:
        relpath: Path below the watched folder.
        sent: Its producer registry row, None if never claimed.
        on_disk: Its size, mtime and inode now.
        backup_event: The newest backup the server announced, None if it holds none.
        backup_check: The backup object now, None if not checked yet.
        content_sha256: The file's SHA-256 now, None if not read yet, empty if unreadable.
    """

    relpath: str
    sent: FileRecord | None
    on_disk: DiskIdentity
    backup_event: BackupEvent | None = None
    backup_check: BackupCheck | None = None
    content_sha256: str | None = None


def _keep(reason: Reason, detail: str) -> Verdict:
    return Verdict(Action.KEEP, reason, detail)


def _days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / SECONDS_PER_DAY:.2f} days"


def decide(evidence: PruneEvidence, retention_days: float, now: datetime) -> Verdict | Need:
    """Delete or keep one file, or name the evidence still needed to tell.

    Args:
        evidence: What is known about the file.
        retention_days: How long after its backup a file may be deleted.
        now: The time of the decision (timezone-aware).

    Returns:
        The verdict, or the costly evidence to gather first (then decide again).
    """
    sent = evidence.sent
    if sent is None:
        return _keep(
            Reason.NEVER_SENT,
            "not in the producer registry: never sent (excluded by a pattern, or not stable)",
        )
    if sent.state is not FileState.SENT or sent.sha256 is None:
        because = f": {sent.reason}" if sent.reason else ""
        return _keep(Reason.NOT_SENT, f"generation {sent.generation} is {sent.state}{because}")
    disk = evidence.on_disk
    was = sent.identity
    if (disk.size, disk.mtime_ns, disk.inode) != (was.size, was.mtime_ns, was.inode):
        return _keep(
            Reason.CHANGED_SINCE_SENT,
            f"size/mtime/inode {disk.size}/{disk.mtime_ns}/{disk.inode} differ from "
            f"generation {sent.generation} as sent ({was.size}/{was.mtime_ns}/{was.inode}); "
            "it is sent again once stable",
        )
    event = evidence.backup_event
    backed_up_at: datetime | None = None
    if event is not None:
        if event.generation < sent.generation:
            return _keep(
                Reason.NEWEST_NOT_BACKED_UP,
                f"generation {sent.generation} was sent; the newest backup announced is of "
                f"generation {event.generation}",
            )
        if event.generation > sent.generation or event.sha256 != sent.sha256:
            return _keep(
                Reason.BACKUP_MISMATCH,
                f"the newest backup announced (generation {event.generation}, SHA-256 "
                f"{event.sha256}) is not generation {sent.generation} as sent from here",
            )
        backed_up_at = event.occurred
    retention = timedelta(days=retention_days)
    if backed_up_at is not None and now - backed_up_at < retention:
        return _keep(Reason.TOO_RECENT, f"backed up {_days(now - backed_up_at)} ago")
    check = evidence.backup_check
    if check is None:
        return Need.BACKUP_CHECK
    if check.status is None:
        return _keep(Reason.BACKUP_UNVERIFIABLE, f"the backup cannot be checked: {check.error}")
    if check.status is CopyStatus.MISSING:
        return _keep(Reason.BACKUP_MISSING, f"no backup at {check.url}")
    if check.status is not CopyStatus.OK:
        not_yet = "" if event is not None else " (not backed up yet, or a damaged backup)"
        return _keep(
            Reason.BACKUP_MISMATCH,
            f"the backup at {check.url} is {check.status}: its size or SHA-256 is not "
            f"generation {sent.generation}'s{not_yet}",
        )
    if backed_up_at is None:
        # The server no longer holds the event (or never read it): the object's own time.
        if check.modified_at is None:
            return _keep(
                Reason.BACKUP_UNVERIFIABLE,
                f"no backed-up event on the server and no modification time at {check.url}",
            )
        backed_up_at = check.modified_at
        if now - backed_up_at < retention:
            return _keep(Reason.TOO_RECENT, f"backup written {_days(now - backed_up_at)} ago")
    if evidence.content_sha256 is None:
        return Need.CONTENT_HASH
    if not evidence.content_sha256:
        return _keep(
            Reason.CHANGED_SINCE_SENT, "it cannot be read now to compare its SHA-256 with the sent"
        )
    if evidence.content_sha256 != sent.sha256:
        return _keep(
            Reason.CHANGED_SINCE_SENT,
            f"its SHA-256 is {evidence.content_sha256}, not {sent.sha256} as sent "
            f"(generation {sent.generation})",
        )
    return Verdict(
        Action.DELETE,
        Reason.VERIFIED,
        f"generation {sent.generation} unchanged since sent, backed up "
        f"{_days(now - backed_up_at)} ago, backup verified at {check.url}",
    )


# --------------------------------------------------------------------------- gathering


class PruneIncompleteError(MsiError):
    """Some backups could not be checked (the files were kept; the report was made).

    Attributes:
        report: The prune's report, with the files kept.
    """

    def __init__(self, message: str, report: PruneReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class PruneItem:
    """One file of the watched folder and what happens to it.

    Attributes:
        path: The file on disk.
        evidence: What was known when it was decided.
        verdict: The decision.
        deleted: Whether it was deleted (never in a dry run).
    """

    path: Path
    evidence: PruneEvidence
    verdict: Verdict
    deleted: bool = False


@dataclass
class PruneReport:
    """Outcome of one prune.

    Attributes:
        directory: The watched folder.
        dry_run: Nothing was deleted.
        retention_days: The rule applied; None when retention is off (nothing looked at).
        counts: Files per reason.
        deleted: Files deleted.
        freed_bytes: Their bytes.
        rows: The table artifact's rows (deletions first).
    """

    directory: str
    dry_run: bool
    retention_days: float | None
    counts: dict[Reason, int] = field(default_factory=lambda: dict.fromkeys(Reason, 0))
    deleted: int = 0
    freed_bytes: int = 0
    rows: list[dict[str, str | int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        """Counts by reason, plus ``deleted`` and ``freed_bytes``."""
        return {
            **{reason.value: count for reason, count in self.counts.items()},
            "deleted": self.deleted,
            "freed_bytes": self.freed_bytes,
        }


def _walk_files(directory: Path) -> Iterator[tuple[Path, str, DiskIdentity]]:
    """Regular files below ``directory`` (no links), their relative paths and identities."""
    for folder, _, names in os.walk(directory, followlinks=False):
        for name in sorted(names):
            path = Path(folder) / name
            try:
                info = os.lstat(path)
                relpath = relative_posix(directory, path)
            except (OSError, UnsafePathError):
                continue  # gone meanwhile, or a name no transfer sends
            if stat.S_ISREG(info.st_mode):
                yield path, relpath, DiskIdentity(info.st_size, info.st_mtime_ns, info.st_ino)


def _read_backup_events(topic: str, relpaths: set[str], since: datetime) -> dict[str, BackupEvent]:
    """The newest ``msi.file.backed-up`` event of each of ``relpaths``, from the server.

    Raises:
        httpx.HTTPError: The server did not answer.
    """
    from prefect.client.orchestration import get_client

    from msi_prefect.prefect_layer.event_queries import event_pages

    body = {
        "filter": {
            "event": {"name": [EventName.BACKED_UP.value]},
            "resource": {"id_prefix": [f"{RESOURCE_PREFIX}.{topic}."]},
            "occurred": {
                "since": since.isoformat(),
                "until": (datetime.now(UTC) + EVENT_CLOCK_MARGIN).isoformat(),
            },
            "order": "DESC",
        },
        "limit": EVENTS_PER_PAGE,
    }
    found: dict[str, BackupEvent] = {}
    read = 0
    with get_client(sync_client=True) as client:
        # Prefect's own httpx client: the API's address, its auth and retries.
        for page in event_pages(client._client, body):
            for event in page:
                payload = event.get("payload") or {}
                relpath = payload.get("path")
                if relpath not in relpaths or payload.get("topic") != topic:
                    continue
                generation, sha256 = payload.get("generation"), payload.get("sha256")
                if not isinstance(generation, int) or not isinstance(sha256, str):
                    continue
                newest = found.get(relpath)
                # Newest first: keep the highest generation, and its newest announcement.
                if newest is None or generation > newest.generation:
                    found[relpath] = BackupEvent(
                        generation=generation,
                        sha256=sha256,
                        occurred=datetime.fromisoformat(str(event["occurred"])),
                        backup_url=str(payload.get("backup_url") or ""),
                    )
            read += len(page)
            if read >= MAX_EVENTS_READ:
                break
    return found


def _object_modified_at(storage: BackupStorage, relpath: PurePosixPath) -> datetime | None:
    """When the backup object of ``relpath`` was written, if the store tells."""
    from fsspec.core import url_to_fs

    fs, base = url_to_fs(storage.url, **storage.storage_options())
    info = fs.info(f"{base.rstrip('/')}/{relpath.as_posix()}")
    modified = info.get("LastModified", info.get("mtime"))
    if isinstance(modified, datetime):
        return modified if modified.tzinfo else modified.replace(tzinfo=UTC)
    if isinstance(modified, int | float):
        return datetime.fromtimestamp(modified, UTC)
    return None


def _check_backup(
    sink: Sink, storage: BackupStorage, relpath: str, sent: FileRecord
) -> BackupCheck:
    path = PurePosixPath(relpath)
    try:
        url = sink.url_of(path)
        status = sink.check(path, sent.identity.size, str(sent.sha256))
        modified = _object_modified_at(storage, path) if status is CopyStatus.OK else None
    except SinkError as exc:
        return BackupCheck(status=None, error=str(exc))
    except Exception as exc:  # the store's client raises its own kinds (botocore, aiohttp)
        return BackupCheck(status=None, error=f"{type(exc).__name__}: {exc}")
    return BackupCheck(status=status, modified_at=modified, url=url)


def _sha256_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()
    except OSError:
        return None


def plan_prune(
    directory: Path,
    registry_path: Path,
    topic: str,
    retention_days: float,
    storage: BackupStorage,
    now: datetime | None = None,
) -> Iterator[PruneItem]:
    """Decide, for every regular file below ``directory``, whether it may be deleted.

    Args:
        directory: The watched folder (absolute).
        registry_path: The producer registry of that folder.
        topic: The topic its files were sent on.
        retention_days: How long after its backup a file may be deleted.
        storage: Where the backups are.
        now: The time of the decisions (default: now).

    Yields:
        One item per file: those that fail the local checks first, then the rest.

    Raises:
        FileInputError: The folder or the registry is not there.
        httpx.HTTPError: The Prefect server did not answer.
    """
    if not directory.is_absolute() or not directory.is_dir():
        raise FileInputError(f"{str(directory)!r} is not an absolute path of a folder")
    if not registry_path.is_file():
        raise FileInputError(
            f"no producer registry at {registry_path}; is {directory} the folder "
            "watch-directory watches (or give its registry_path)?"
        )
    now = now or datetime.now(UTC)
    candidates: list[tuple[Path, PruneEvidence]] = []
    with Registry(registry_path) as registry:
        for path, relpath, disk in _walk_files(directory):
            evidence = PruneEvidence(relpath, registry.get(topic, relpath), disk)
            verdict = decide(evidence, retention_days, now)
            if isinstance(verdict, Verdict):
                yield PruneItem(path, evidence, verdict)
            else:
                candidates.append((path, evidence))
    if not candidates:
        return
    oldest_sent = min(evidence.sent.updated_at for _, evidence in candidates if evidence.sent)
    since = datetime.fromtimestamp(oldest_sent, UTC) - EVENT_CLOCK_MARGIN
    events = _read_backup_events(topic, {evidence.relpath for _, evidence in candidates}, since)
    sink = storage.sink()
    failures_in_a_row = 0
    last_error = ""
    for path, first in candidates:
        evidence = PruneEvidence(
            first.relpath, first.sent, first.on_disk, events.get(first.relpath)
        )
        while not isinstance(verdict := decide(evidence, retention_days, now), Verdict):
            if verdict is Need.BACKUP_CHECK:
                assert evidence.sent is not None
                if failures_in_a_row >= MAX_STORE_FAILURES_IN_A_ROW:
                    check = BackupCheck(None, f"not tried, the store is down: {last_error}")
                else:
                    check = _check_backup(sink, storage, evidence.relpath, evidence.sent)
                    failures_in_a_row = failures_in_a_row + 1 if check.status is None else 0
                    last_error = check.error
                evidence = replace(evidence, backup_check=check)
            else:
                evidence = replace(evidence, content_sha256=_sha256_of(path) or "")
        yield PruneItem(path, evidence, verdict)


def _unchanged_still(item: PruneItem) -> bool:
    """Whether the file is still the one decided on (the instrument may write any time)."""
    try:
        info = os.lstat(item.path)
    except OSError:
        return False
    disk = item.evidence.on_disk
    return (info.st_size, info.st_mtime_ns, info.st_ino) == (disk.size, disk.mtime_ns, disk.inode)


def _pruned_event(item: PruneItem, topic: str, retention_days: float) -> None:
    sent = item.evidence.sent
    assert sent is not None and item.evidence.backup_check is not None
    event = item.evidence.backup_event
    facts = FileFacts(
        topic=topic,
        file_id=file_id_for(item.evidence.relpath),
        path=item.evidence.relpath,
        generation=sent.generation,
        size=sent.identity.size,
        sha256=sent.sha256,
        extra={
            "source": str(item.path),
            "backup_url": item.evidence.backup_check.url,
            "backed_up_at": event.occurred.isoformat() if event else None,
            "retention_days": retention_days,
            "reason": item.verdict.detail,
        },
    )
    # Durable: on disk before this returns, posted at once (event_outbox).
    emit_downstream_event(file_event(EventName.PRUNED, facts))


def _row(item: PruneItem, dry_run: bool) -> dict[str, str | int]:
    if item.verdict.action is Action.DELETE:
        action = "deleted" if item.deleted else ("would delete" if dry_run else "kept")
    else:
        action = "kept"
    sent = item.evidence.sent
    return {
        "path": item.evidence.relpath,
        "action": action,
        "reason": item.verdict.reason.value,
        "detail": item.verdict.detail,
        "generation": sent.generation if sent else "",
        "size": item.evidence.on_disk.size,
    }


@task(name="prune-source", task_run_name="prune {directory}", cache_policy=NO_CACHE)
def prune_source(
    directory: Path,
    registry_path: Path,
    topic: str,
    retention_days: float,
    storage: BackupStorage,
    dry_run: bool = False,
) -> PruneReport:
    """Delete the files of a watched folder whose verified backup is old enough.

    Args:
        directory: The watched folder (absolute).
        registry_path: Its producer registry.
        topic: The topic its files are sent on.
        retention_days: How long after its backup a file may be deleted.
        storage: Where the backups are.
        dry_run: Decide and report, delete nothing.

    Returns:
        Counts per reason, deletions and bytes freed, and the table's rows.

    Raises:
        FileInputError: The folder or its registry is not there.
        PruneIncompleteError: Some backups could not be checked (after reporting).
    """
    logger = get_run_logger()
    report = PruneReport(str(directory), dry_run, retention_days)
    deletions: list[dict[str, str | int]] = []
    kept: list[dict[str, str | int]] = []
    for item in plan_prune(directory, registry_path, topic, retention_days, storage):
        verdict = item.verdict
        if verdict.action is Action.DELETE and not dry_run:
            if not _unchanged_still(item):
                item.verdict = _keep(Reason.CHANGED_SINCE_SENT, "changed while it was checked")
            else:
                try:
                    item.path.unlink()
                except OSError as exc:
                    logger.warning("Cannot delete %s: %s", item.path, exc)
                else:
                    item.deleted = True
                    report.deleted += 1
                    report.freed_bytes += item.evidence.on_disk.size
                    _pruned_event(item, topic, retention_days)
                    logger.info("Deleted %s: %s", item.path, verdict.detail)
        report.counts[item.verdict.reason] += 1
        rows = deletions if item.verdict.action is Action.DELETE else kept
        if len(rows) < MAX_TABLE_ROWS:
            rows.append(_row(item, dry_run))
    report.rows = (deletions + kept)[:MAX_TABLE_ROWS]
    verb = "would delete" if dry_run else "deleted"
    deletable = report.counts[Reason.VERIFIED]
    summary = ", ".join(f"{count} {reason}" for reason, count in report.counts.items() if count)
    create_table_artifact(
        table=report.rows,
        key=PRUNE_ARTIFACT_KEY,
        description=f"Prune of {directory} (retention {retention_days:g} days): {verb} "
        f"{deletable if dry_run else report.deleted} file(s); {summary or 'no files'}",
    )
    logger.info("Prune of %s: %s", directory, summary or "no files")
    unverifiable = report.counts[Reason.BACKUP_UNVERIFIABLE]
    if unverifiable:
        raise PruneIncompleteError(
            f"{unverifiable} backup(s) could not be checked; those files were kept",
            report,
        )
    return report
