"""Producer-side registry: which generation of which file was sent, in SQLite.

One row per ``(topic, relpath)``. The producer asks :meth:`Registry.begin` before reading a
file and reports the outcome with :meth:`Registry.mark_sent`, :meth:`Registry.mark_failed`
or :meth:`Registry.mark_aborted`. Rules:

* A file whose ``(size, mtime_ns, inode)`` was already SENT is not sent again.
* A changed file (or one already SENT and then changed while the watcher was down) is sent
  as a new generation.
* A file left SENDING or FAILED by a crash or error is retried with the *same* generation
  when its identity is unchanged: consumers treat the repeated chunks idempotently.
* An aborted generation (the file changed while being read) goes back to PENDING and its
  generation number is never reused: the next :meth:`Registry.begin` bumps it.

Generation numbers only ever grow, so consumers can always tell older from newer.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from msi_prefect.transfer.sqlite_db import Durability, SqliteDatabase, SqliteStore

SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS files (
    topic TEXT NOT NULL,
    relpath TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode TEXT NOT NULL,
    sha256 TEXT,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (topic, relpath)
)""",
    "CREATE INDEX IF NOT EXISTS files_by_state ON files (topic, state)",
    # When a folder was first watched for a topic: an unknown file that appeared after that
    # was missed (the watcher was down, or it was not ready yet) and must be sent.
    """CREATE TABLE IF NOT EXISTS watched_folders (
    topic TEXT NOT NULL,
    root TEXT NOT NULL,
    first_watched_ns INTEGER NOT NULL,
    PRIMARY KEY (topic, root)
)""",
    # What the watcher skipped and why (excluded, still changing, unreadable): a few
    # recent rows per topic, not a log (Registry.record_skipped keeps MAX_SKIPPED_FILES).
    # Added without a schema version change: older code simply ignores the table.
    """CREATE TABLE IF NOT EXISTS skipped_files (
    topic TEXT NOT NULL,
    relpath TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (topic, relpath)
)""",
    "CREATE INDEX IF NOT EXISTS skipped_by_time ON skipped_files (topic, at)",
)

_COLUMNS = "topic, relpath, size, mtime_ns, inode, sha256, generation, state, reason, updated_at"
# Built once: it runs for every file sent.
_SELECT_FILE = f"SELECT {_COLUMNS} FROM files WHERE topic = ? AND relpath = ?"


#: Skipped files kept per topic (the newest); older ones are dropped.
MAX_SKIPPED_FILES = 1000


class SkipReason(enum.StrEnum):
    """Why the watcher did not send a file (yet)."""

    EXCLUDED = "excluded"
    """An include/exclude rule leaves it out."""
    STILL_CHANGING = "still-changing"
    """It changed within its stability window; it goes once it stops changing."""
    UNREADABLE = "unreadable"
    """It could not be stat-ed or opened; it is tried again when it changes."""


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file the watcher skipped, and why.

    Attributes:
        relpath: Relative POSIX path below the watched folder.
        reason: Why.
        detail: The rule that excluded it, or the error.
        at: Unix time the watcher skipped it.
    """

    relpath: str
    reason: SkipReason
    detail: str
    at: float


@dataclass(frozen=True)
class SkippedRecord:
    """A skipped file as the registry holds it.

    Attributes:
        topic: The topic the watcher sends to.
        skipped: The file, why and when it was skipped.
    """

    topic: str
    skipped: SkippedFile


class FileState(enum.StrEnum):
    """Where a file stands on the producer side."""

    PENDING = "pending"
    """Must be sent again; its recorded generation is used up (aborted)."""
    SENDING = "sending"
    """A generation is being sent (or was, when the process died)."""
    SENT = "sent"
    """Every chunk of the generation was acknowledged by the broker."""
    FAILED = "failed"
    """Sending the generation failed; see ``reason``."""


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another without reading it.

    Attributes:
        size: Size in bytes.
        mtime_ns: Modification time in nanoseconds.
        inode: Inode number (file id on Windows); stored as text because some filesystems
            use numbers beyond SQLite's 64-bit integers.
    """

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class Claim:
    """Permission to send one generation of a file.

    Attributes:
        topic: Kafka topic.
        relpath: Relative POSIX path of the file.
        generation: The generation to put in every message of this send.
    """

    topic: str
    relpath: str
    generation: int


@dataclass(frozen=True)
class FileRecord:
    """One registry row.

    Attributes:
        topic: Kafka topic.
        relpath: Relative POSIX path of the file.
        identity: Size, mtime and inode of the version last claimed.
        sha256: Whole-file digest of the last SENT generation, if any.
        generation: Last generation claimed.
        state: Where that generation stands.
        reason: Why it failed or was aborted, if it did.
        updated_at: Unix time of the last change.
    """

    topic: str
    relpath: str
    identity: FileIdentity
    sha256: str | None
    generation: int
    state: FileState
    reason: str | None
    updated_at: float


def _record(row: sqlite3.Row) -> FileRecord:
    return FileRecord(
        topic=row["topic"],
        relpath=row["relpath"],
        identity=FileIdentity(size=row["size"], mtime_ns=row["mtime_ns"], inode=int(row["inode"])),
        sha256=row["sha256"],
        generation=row["generation"],
        state=FileState(row["state"]),
        reason=row["reason"],
        updated_at=row["updated_at"],
    )


class Registry(SqliteStore):
    """SQLite registry of sent files, safe to share between threads of one process.

    Args:
        path: Database file; its parent directory is created if needed.
        clock: Source of ``updated_at`` timestamps (tests inject a fake).

    Raises:
        RuntimeError: If the database was written by a newer schema version.
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # With WAL, NORMAL never corrupts the database; a power cut may only lose the last
        # few commits. That is harmless here: a lost SENT mark means the same generation is
        # sent again, and consumers recognise the repeat.
        super().__init__(
            SqliteDatabase(path, _SCHEMA, SCHEMA_VERSION, Durability.NORMAL, name="registry")
        )

    def first_watched_ns(self, topic: str, root: str) -> int:
        """When ``root`` was first watched for ``topic`` (in ns); recorded now if never."""
        now_ns = int(self._clock() * 1e9)
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO watched_folders (topic, root, first_watched_ns)"
                " VALUES (?, ?, ?)",
                (topic, root, now_ns),
            )
            row = conn.execute(
                "SELECT first_watched_ns FROM watched_folders WHERE topic = ? AND root = ?",
                (topic, root),
            ).fetchone()
        return int(row[0])

    def begin(self, topic: str, relpath: str, size: int, mtime_ns: int, inode: int) -> Claim | None:
        """Claim a file for sending, or learn that this version was already sent.

        Args:
            topic: Kafka topic.
            relpath: Relative POSIX path of the file.
            size: Current size in bytes.
            mtime_ns: Current modification time in nanoseconds.
            inode: Current inode number.

        Returns:
            ``None`` if this exact version is already SENT; otherwise the claim, whose
            generation is new (first send, changed file, or after SENT/PENDING) or reused
            (retry of a SENDING or FAILED generation of the same version).
        """
        identity = FileIdentity(size=size, mtime_ns=mtime_ns, inode=inode)
        with self._transaction() as conn:
            row = conn.execute(_SELECT_FILE, (topic, relpath)).fetchone()
            if row is None:
                generation = 1
            else:
                previous = _record(row)
                same_version = previous.identity == identity
                if same_version and previous.state is FileState.SENT:
                    return None
                retry = same_version and previous.state in (FileState.SENDING, FileState.FAILED)
                generation = previous.generation if retry else previous.generation + 1
                if not retry:
                    # Losing a bumped generation to a power cut could hand the same number
                    # to different content later, which consumers would skip as done.
                    self._db.request_durable_commit()
            conn.execute(
                "INSERT INTO files (topic, relpath, size, mtime_ns, inode, sha256, generation,"
                " state, reason, updated_at) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, NULL, ?)"
                " ON CONFLICT (topic, relpath) DO UPDATE SET size = excluded.size,"
                " mtime_ns = excluded.mtime_ns, inode = excluded.inode, sha256 = NULL,"
                " generation = excluded.generation, state = excluded.state, reason = NULL,"
                " updated_at = excluded.updated_at",
                (
                    topic,
                    relpath,
                    size,
                    mtime_ns,
                    str(inode),
                    generation,
                    FileState.SENDING.value,
                    self._clock(),
                ),
            )
        return Claim(topic=topic, relpath=relpath, generation=generation)

    def _finish(
        self,
        topic: str,
        relpath: str,
        generation: int,
        state: FileState,
        sha256: str | None,
        reason: str | None,
    ) -> bool:
        """Move a SENDING generation to ``state``; stale generations are left alone."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE files SET state = ?, sha256 = ?, reason = ?, updated_at = ?"
                " WHERE topic = ? AND relpath = ? AND generation = ? AND state = ?",
                (
                    state.value,
                    sha256,
                    reason,
                    self._clock(),
                    topic,
                    relpath,
                    generation,
                    FileState.SENDING.value,
                ),
            )
            return cursor.rowcount == 1

    def mark_sent(self, topic: str, relpath: str, generation: int, sha256: str) -> bool:
        """Record that every chunk of a generation was acknowledged.

        Args:
            topic: Kafka topic.
            relpath: Relative POSIX path of the file.
            generation: The generation that was sent.
            sha256: Whole-file SHA-256 hex digest.

        Returns:
            Whether the row changed. ``False`` means the generation is no longer the one
            being sent (a late report about a superseded generation) and was ignored.
        """
        return self._finish(topic, relpath, generation, FileState.SENT, sha256, None)

    def mark_failed(self, topic: str, relpath: str, generation: int, reason: str) -> bool:
        """Record that sending a generation failed; a later begin retries it.

        Returns:
            Whether the row changed (see :meth:`mark_sent`).
        """
        return self._finish(topic, relpath, generation, FileState.FAILED, None, reason)

    def mark_aborted(
        self,
        topic: str,
        relpath: str,
        generation: int,
        reason: str = "the file changed while it was being read",
    ) -> bool:
        """Record that a generation was abandoned mid-send; the next begin bumps it.

        Returns:
            Whether the row changed (see :meth:`mark_sent`).
        """
        return self._finish(topic, relpath, generation, FileState.PENDING, None, reason)

    def get(self, topic: str, relpath: str) -> FileRecord | None:
        """Return the row of one file, or ``None`` if it was never claimed."""
        with self._db.reading() as conn:
            row = conn.execute(_SELECT_FILE, (topic, relpath)).fetchone()
        return None if row is None else _record(row)

    def unfinished(self, topic: str) -> list[FileRecord]:
        """Return the files left SENDING or PENDING, to resume after a restart."""
        with self._db.reading() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM files WHERE topic = ? AND state IN (?, ?)"
                " ORDER BY relpath",
                (topic, FileState.SENDING.value, FileState.PENDING.value),
            ).fetchall()
        return [_record(row) for row in rows]

    def not_sent(self) -> list[FileRecord]:
        """Return every file whose last claimed generation is not sent, on every topic.

        That is a send in progress (or cut short: ``SENDING``), one aborted because the
        file changed (``PENDING``) and one that failed (``FAILED``); the last two with their
        reason. Ordered by topic and path.
        """
        with self._db.reading() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM files WHERE state != ? ORDER BY topic, relpath",
                (FileState.SENT.value,),
            ).fetchall()
        return [_record(row) for row in rows]

    def record_skipped(self, topic: str, skipped: list[SkippedFile]) -> None:
        """Record files the watcher skipped (one transaction), keeping the newest per topic.

        A path's newer record replaces its older one; beyond :data:`MAX_SKIPPED_FILES`
        rows for the topic the oldest are dropped, so the table stays small.
        """
        if not skipped:
            return
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO skipped_files (topic, relpath, reason, detail, at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(topic, s.relpath, s.reason.value, s.detail, s.at) for s in skipped],
            )
            conn.execute(
                "DELETE FROM skipped_files WHERE topic = ? AND rowid NOT IN ("
                " SELECT rowid FROM skipped_files WHERE topic = ? ORDER BY at DESC LIMIT ?)",
                (topic, topic, MAX_SKIPPED_FILES),
            )

    def skipped(self) -> list[SkippedRecord]:
        """The skipped files not sent since, by topic and path.

        A record older than the file's last claim or send is left out: the file went after
        all (it stopped changing, became readable, or the rules changed).
        """
        with self._db.reading() as conn:
            rows = conn.execute(
                "SELECT s.topic, s.relpath, s.reason, s.detail, s.at FROM skipped_files s"
                " LEFT JOIN files f ON f.topic = s.topic AND f.relpath = s.relpath"
                " WHERE f.updated_at IS NULL OR f.updated_at < s.at"
                " ORDER BY s.topic, s.relpath"
            ).fetchall()
        return [
            SkippedRecord(
                topic=row["topic"],
                skipped=SkippedFile(
                    row["relpath"], SkipReason(row["reason"]), row["detail"], row["at"]
                ),
            )
            for row in rows
        ]

    def sent_since(self, topic: str, since: float) -> int:
        """How many files of a topic were last sent at or after ``since`` (Unix time)."""
        with self._db.reading() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM files WHERE topic = ? AND state = ? AND updated_at >= ?",
                (topic, FileState.SENT.value, since),
            ).fetchone()
        return int(row[0])

    def last_sent(self, topic: str) -> FileRecord | None:
        """The file of a topic sent last, or None."""
        with self._db.reading() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM files WHERE topic = ? AND state = ?"
                " ORDER BY updated_at DESC LIMIT 1",
                (topic, FileState.SENT.value),
            ).fetchone()
        return None if row is None else _record(row)

    def first_watched(self, topic: str, root: str) -> int | None:
        """When ``root`` was first watched for ``topic`` (in ns), without recording it."""
        with self._db.reading() as conn:
            row = conn.execute(
                "SELECT first_watched_ns FROM watched_folders WHERE topic = ? AND root = ?",
                (topic, root),
            ).fetchone()
        return None if row is None else int(row[0])

    def counts(self, topic: str) -> dict[FileState, int]:
        """Return how many files of a topic are in each state (zero included)."""
        result = dict.fromkeys(FileState, 0)
        with self._db.reading() as conn:
            rows = conn.execute(
                "SELECT state, COUNT(*) AS n FROM files WHERE topic = ? GROUP BY state",
                (topic,),
            ).fetchall()
        for row in rows:
            result[FileState(row["state"])] = row["n"]
        return result
