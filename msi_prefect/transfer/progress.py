"""Consumer-side reassembly progress, persisted in SQLite so a restart continues.

One row per ``(topic, file_id, generation)`` records which chunks are durably in the
staging file (a bitmap, one bit per chunk) and how the generation ended. The consumer's
loop is:

1. decode a message, then :meth:`ProgressStore.open_file` for its generation (this also
   tells whether the generation is new, resumed, finished, stale or conflicting, and
   returns the older generations it supersedes so their staging files can be deleted);
2. write chunks with positional writes, fsync the staging files;
3. :meth:`ProgressStore.record_chunks` for the whole batch in one transaction;
4. only then commit the Kafka offsets.

Finished generations (COMPLETE, REJECTED, ABORTED) stay in the table so a replay of their
chunks after a crash is recognised (:meth:`ProgressStore.is_finished`);
:meth:`ProgressStore.prune_finished` removes them once offsets are long past them.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from msi_prefect.transfer.sqlite_db import Durability, SqliteDatabase, SqliteStore
from msi_prefect.transfer.wire import UNKNOWN_SIZE, ChunkHeader

SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS progress (
    topic TEXT NOT NULL,
    file_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    relpath TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    received BLOB NOT NULL,
    received_count INTEGER NOT NULL,
    staging_path TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (topic, file_id, generation)
)""",
    "CREATE INDEX IF NOT EXISTS progress_by_state ON progress (state, updated_at)",
)

_COLUMNS = (
    "topic, file_id, generation, relpath, size, chunk_count, chunk_size, mtime_ns, sha256,"
    " received, received_count, staging_path, state, reason, updated_at"
)
_COLUMN_COUNT = _COLUMNS.count(",") + 1
_KEY_WHERE = "topic = ? AND file_id = ? AND generation = ?"
# Built once: the statements below run for every file received.
_INSERT_ROW = f"INSERT INTO progress ({_COLUMNS}) VALUES ({', '.join('?' * _COLUMN_COUNT)})"
# This generation's row if there is one, else the file's newest.
_SELECT_GENERATION_OR_NEWEST = (
    f"SELECT {_COLUMNS} FROM progress WHERE topic = ? AND file_id = ?"
    " ORDER BY generation = ? DESC, generation DESC LIMIT 1"
)


class Bitmap:
    """Fixed-size set of chunk indices, one bit each (bit ``i % 8`` of byte ``i // 8``).

    Args:
        size: Number of bits (chunks).
    """

    __slots__ = ("_bits", "_size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._size = size
        self._bits = bytearray((size + 7) // 8)

    @classmethod
    def full(cls, size: int) -> Bitmap:
        """A bitmap of ``size`` bits, every one set."""
        bitmap = cls(size)
        whole_bytes, spare_bits = divmod(size, 8)
        bitmap._bits[:whole_bytes] = b"\xff" * whole_bytes
        if spare_bits:
            bitmap._bits[whole_bytes] = (1 << spare_bits) - 1
        return bitmap

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> Bitmap:
        """Rebuild a bitmap saved with :meth:`to_bytes`.

        Raises:
            ValueError: If ``data`` has the wrong length or bits set beyond ``size``.
        """
        bitmap = cls(size)
        if len(data) != len(bitmap._bits):
            raise ValueError(f"a bitmap of {size} bits needs {len(bitmap._bits)} bytes")
        spare = len(data) * 8 - size
        # Stray padding bits would make count() lie.
        if spare and data[-1] >> (8 - spare):
            raise ValueError("bits are set beyond the bitmap size")
        bitmap._bits[:] = data
        return bitmap

    @property
    def size(self) -> int:
        """Number of bits."""
        return self._size

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self._size:
            raise IndexError(f"bit {index} is outside a bitmap of {self._size} bits")
        return index >> 3, 1 << (index & 7)

    def set(self, index: int) -> bool:
        """Set bit ``index``; return whether it was clear before (a new chunk)."""
        byte, mask = self._locate(index)
        if self._bits[byte] & mask:
            return False
        self._bits[byte] |= mask
        return True

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self._size:
            return False
        byte, mask = self._locate(index)
        return bool(self._bits[byte] & mask)

    def count(self) -> int:
        """Number of bits set."""
        return int.from_bytes(self._bits, "little").bit_count()

    def all_set(self) -> bool:
        """Whether every bit is set."""
        return self.count() == self._size

    def missing(self) -> Iterator[int]:
        """Yield the indices of clear bits, in order."""
        return (index for index in range(self._size) if index not in self)

    def to_bytes(self) -> bytes:
        """Return the bits for storage."""
        return bytes(self._bits)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self._size == other._size and self._bits == other._bits

    __hash__ = None  # type: ignore[assignment]  # mutable, so unhashable

    def __repr__(self) -> str:
        return f"Bitmap(size={self._size}, set={self.count()})"


class ProgressState(enum.StrEnum):
    """Where one generation of a file stands on the consumer side."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    REJECTED = "rejected"
    ABORTED = "aborted"


FINISHED_STATES = frozenset({ProgressState.COMPLETE, ProgressState.REJECTED, ProgressState.ABORTED})


class OpenOutcome(enum.StrEnum):
    """What :meth:`ProgressStore.open_file` found for a chunk's generation."""

    NEW = "new"
    """First chunk of this generation: a row was created."""
    RESUMED = "resumed"
    """The generation is being received; continue it."""
    FINISHED = "finished"
    """The generation already ended (complete, rejected or aborted): skip the chunk."""
    STALE = "stale"
    """A newer generation of the file is known: skip the chunk."""
    CONFLICT = "conflict"
    """The chunk's file fields disagree with earlier chunks of this generation: reject."""


@dataclass(frozen=True)
class FileProgress:
    """Snapshot of one generation's row.

    Attributes:
        topic: Kafka topic.
        file_id: File id (the message key).
        generation: File generation.
        relpath: Relative POSIX path of the file.
        size: Whole-file size in bytes.
        chunk_count: Number of chunks.
        chunk_size: Chunk size in bytes.
        mtime_ns: File modification time in nanoseconds.
        sha256: Whole-file digest, known once the last chunk was recorded.
        received: The received-chunks bitmap as stored (see :class:`Bitmap`).
        received_count: Number of distinct chunks durably written.
        staging_path: Where the chunks are being written.
        state: Where the generation stands.
        reason: Why it was rejected or aborted.
        updated_at: Unix time of the last change.
    """

    topic: str
    file_id: str
    generation: int
    relpath: str
    size: int
    chunk_count: int
    chunk_size: int
    mtime_ns: int
    sha256: str | None
    received: bytes
    received_count: int
    staging_path: str
    state: ProgressState
    reason: str | None
    updated_at: float

    @property
    def is_complete(self) -> bool:
        """Whether every chunk is durably written (the file can be verified)."""
        return self.received_count == self.chunk_count

    def has_chunk(self, index: int) -> bool:
        """Whether chunk ``index`` is durably written."""
        if not self.received_count:
            return False  # a new file, the usual case: no bitmap to build
        return index in self.bitmap()

    def bitmap(self) -> Bitmap:
        """Return a fresh :class:`Bitmap` of the received chunks."""
        return Bitmap.from_bytes(self.chunk_count, self.received)

    def fully_received(self, sha256: str | None) -> FileProgress:
        """This generation with every chunk received and the given whole-file digest."""
        return self.updated(
            received=Bitmap.full(self.chunk_count).to_bytes(),
            received_count=self.chunk_count,
            sha256=sha256,
        )

    def updated(self, **changes: object) -> FileProgress:
        """A copy with some fields changed, like ``dataclasses.replace``.

        Without replace's per-call field introspection: the reassembler makes several
        copies for every file it delivers.

        Raises:
            TypeError: If a name is not a field.
        """
        unknown = changes.keys() - self.__dict__.keys()
        if unknown:
            raise TypeError(f"FileProgress has no field {', '.join(sorted(unknown))}")
        copy = object.__new__(FileProgress)
        copy.__dict__.update(self.__dict__, **changes)
        return copy


@dataclass(frozen=True)
class OpenedFile:
    """Result of :meth:`ProgressStore.open_file`.

    Attributes:
        outcome: What was found.
        progress: The generation's row; ``None`` when the outcome is STALE.
        superseded: Older generations that were still RECEIVING and are now ABORTED; the
            caller deletes their staging files.
    """

    outcome: OpenOutcome
    progress: FileProgress | None
    superseded: tuple[FileProgress, ...] = ()


@dataclass(frozen=True)
class ChunkReceipt:
    """One chunk durably written to its staging file, to record.

    Attributes:
        topic: Kafka topic.
        file_id: File id.
        generation: File generation.
        index: Chunk index.
        sha256: Whole-file digest carried by the last chunk, else ``None``.
    """

    topic: str
    file_id: str
    generation: int
    index: int
    sha256: str | None = None

    @classmethod
    def for_header(cls, topic: str, header: ChunkHeader) -> ChunkReceipt:
        """Build the receipt of a decoded chunk."""
        return cls(
            topic=topic,
            file_id=header.file_id,
            generation=header.generation,
            index=header.index,
            sha256=header.sha256,
        )


def _progress(row: sqlite3.Row) -> FileProgress:
    return FileProgress(
        topic=row["topic"],
        file_id=row["file_id"],
        generation=row["generation"],
        relpath=row["relpath"],
        size=row["size"],
        chunk_count=row["chunk_count"],
        chunk_size=row["chunk_size"],
        mtime_ns=row["mtime_ns"],
        sha256=row["sha256"],
        received=bytes(row["received"]),
        received_count=row["received_count"],
        staging_path=row["staging_path"],
        state=ProgressState(row["state"]),
        reason=row["reason"],
        updated_at=row["updated_at"],
    )


def _row_values(progress: FileProgress) -> tuple[object, ...]:
    """A row's values in `_COLUMNS` order (tests check that the two orders agree)."""
    return (
        progress.topic,
        progress.file_id,
        progress.generation,
        progress.relpath,
        progress.size,
        progress.chunk_count,
        progress.chunk_size,
        progress.mtime_ns,
        progress.sha256,
        progress.received,
        progress.received_count,
        progress.staging_path,
        progress.state.value,
        progress.reason,
        progress.updated_at,
    )


def _same_file(progress: FileProgress, header: ChunkHeader) -> bool:
    """Whether a chunk header describes the same file version as an existing row.

    A header of unknown size (OpenMSIStream's) matches any size: once such a file is rebuilt
    its row holds the verified size, and a replay of its chunks after a crash must still be
    recognised as that file, not rejected as a conflicting one.
    """
    return (
        progress.relpath == header.relpath
        and (header.size == UNKNOWN_SIZE or progress.size == header.size)
        and progress.chunk_size == header.chunk_size
        and progress.chunk_count == header.count
        and progress.mtime_ns == header.mtime_ns
    )


class ProgressStore(SqliteStore):
    """SQLite store of reassembly progress, safe to share between threads of one process.

    Args:
        path: Database file (normally under the consumer's state directory); its parent
            directory is created if needed.
        clock: Source of ``updated_at`` timestamps (tests inject a fake).

    Raises:
        RuntimeError: If the database was written by a newer schema version.
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # FULL, not NORMAL: Kafka offsets are committed right after record_chunks, so a
        # recorded chunk lost to a power cut would never be replayed and the file would
        # never complete. Batching keeps the cost at one fsync per batch.
        super().__init__(
            SqliteDatabase(path, _SCHEMA, SCHEMA_VERSION, Durability.FULL, name="progress")
        )

    @staticmethod
    def _select(
        conn: sqlite3.Connection, topic: str, file_id: str, generation: int
    ) -> FileProgress | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM progress WHERE {_KEY_WHERE}", (topic, file_id, generation)
        ).fetchone()
        return None if row is None else _progress(row)

    def open_file(
        self,
        topic: str,
        header: ChunkHeader,
        staging_path: str | Path,
        *,
        record_new: bool = True,
    ) -> OpenedFile:
        """Create or load the row of a chunk's generation.

        When a new generation is created, older generations of the same file that are
        still RECEIVING are marked ABORTED in the same transaction and returned, so the
        caller can delete their staging files.

        Args:
            topic: Kafka topic the chunk came from.
            header: The decoded chunk header.
            staging_path: Where this generation's chunks are written (stored for a new
                row; an existing row keeps its own).
            record_new: Insert a new generation's row now. ``False`` for a file written in
                one go and recorded once finished (:meth:`record_finished`): the outcome is
                still NEW, with the row that would have been inserted.

        Returns:
            The outcome, the row (except for STALE) and the superseded generations.
        """
        with self._transaction() as conn:
            row = conn.execute(
                _SELECT_GENERATION_OR_NEWEST, (topic, header.file_id, header.generation)
            ).fetchone()
            nearest = None if row is None else _progress(row)
            if nearest is not None and nearest.generation == header.generation:
                if not _same_file(nearest, header):
                    return OpenedFile(OpenOutcome.CONFLICT, nearest)
                if nearest.state in FINISHED_STATES:
                    return OpenedFile(OpenOutcome.FINISHED, nearest)
                return OpenedFile(OpenOutcome.RESUMED, nearest)
            if nearest is not None and nearest.generation > header.generation:
                return OpenedFile(OpenOutcome.STALE, None)
            created = FileProgress(
                topic=topic,
                file_id=header.file_id,
                generation=header.generation,
                relpath=header.relpath,
                size=header.size,
                chunk_count=header.count,
                chunk_size=header.chunk_size,
                mtime_ns=header.mtime_ns,
                sha256=None,
                received=Bitmap(header.count).to_bytes(),
                received_count=0,
                staging_path=str(staging_path),
                state=ProgressState.RECEIVING,
                reason=None,
                updated_at=self._clock(),
            )
            if record_new:
                self._insert(conn, created)
            # Most files have one generation: only look for older ones when there are any.
            superseded = (
                ()
                if nearest is None
                else self._supersede(conn, topic, header.file_id, header.generation)
            )
        return OpenedFile(OpenOutcome.NEW, created, superseded)

    @staticmethod
    def _insert(conn: sqlite3.Connection, progress: FileProgress) -> None:
        conn.execute(_INSERT_ROW, _row_values(progress))

    def record_finished(self, progress: FileProgress) -> FileProgress:
        """Insert the row of a generation that was never recorded and is now finished.

        For a file written in one go (see ``record_new`` of :meth:`open_file`): its only
        row says how it ended, written in the same transaction as the batch that delivered
        or rejected it.

        Args:
            progress: The generation, in a finished state (COMPLETE, REJECTED, ABORTED).

        Returns:
            The row as stored (``updated_at`` set now).

        Raises:
            ValueError: If the state is not a finished one.
            sqlite3.IntegrityError: If the generation already has a row.
        """
        if progress.state not in FINISHED_STATES:
            raise ValueError(f"{progress.state.value} is not a finished state")
        stored = progress.updated(updated_at=self._clock())
        with self._transaction() as conn:
            self._insert(conn, stored)
        return stored

    def _supersede(
        self, conn: sqlite3.Connection, topic: str, file_id: str, below_generation: int
    ) -> tuple[FileProgress, ...]:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM progress WHERE topic = ? AND file_id = ?"
            " AND generation < ? AND state = ? ORDER BY generation",
            (topic, file_id, below_generation, ProgressState.RECEIVING.value),
        ).fetchall()
        if not rows:
            return ()
        now = self._clock()
        reason = f"superseded by generation {below_generation}"
        conn.execute(
            "UPDATE progress SET state = ?, reason = ?, updated_at = ?"
            " WHERE topic = ? AND file_id = ? AND generation < ? AND state = ?",
            (
                ProgressState.ABORTED.value,
                reason,
                now,
                topic,
                file_id,
                below_generation,
                ProgressState.RECEIVING.value,
            ),
        )
        return tuple(
            _progress(row).updated(state=ProgressState.ABORTED, reason=reason, updated_at=now)
            for row in rows
        )

    def supersede(
        self, topic: str, file_id: str, below_generation: int
    ) -> tuple[FileProgress, ...]:
        """Abort every RECEIVING generation of a file older than ``below_generation``.

        :meth:`open_file` does this for each new generation; this method is for callers
        that learn of a newer generation another way.

        Returns:
            The generations that were aborted (their staging files can be deleted).
        """
        with self._transaction() as conn:
            return self._supersede(conn, topic, file_id, below_generation)

    def restart_file(
        self, topic: str, file_id: str, generation: int, staging_path: str | Path
    ) -> FileProgress | None:
        """Forget the chunks recorded for a RECEIVING generation; use a new staging file.

        For a staging file that is gone although chunks were recorded in it (a crash after
        its delivery, before that was recorded). The new path, in the same transaction as
        the reset, keeps the rule that every recorded chunk is in the file the row names.

        Returns:
            The updated row, or ``None`` if the generation is not RECEIVING.
        """
        with self._transaction() as conn:
            existing = self._select(conn, topic, file_id, generation)
            if existing is None or existing.state is not ProgressState.RECEIVING:
                return None
            conn.execute(
                "UPDATE progress SET received = ?, received_count = 0, sha256 = NULL,"
                f" staging_path = ?, updated_at = ? WHERE {_KEY_WHERE}",
                (
                    Bitmap(existing.chunk_count).to_bytes(),
                    str(staging_path),
                    self._clock(),
                    topic,
                    file_id,
                    generation,
                ),
            )
            return self._select(conn, topic, file_id, generation)

    def record_chunks(self, receipts: Iterable[ChunkReceipt]) -> list[FileProgress]:
        """Mark many chunks as durably written, in one transaction.

        Call it after the staging files are fsynced and before committing Kafka offsets.
        Recording a chunk twice changes nothing. Receipts for generations that are unknown
        or no longer RECEIVING are ignored. A last-chunk digest that contradicts one
        already recorded rejects the generation.

        Args:
            receipts: The chunks written since the last call.

        Returns:
            The updated rows of the generations the receipts touched, in first-seen order.

        Raises:
            IndexError: If a receipt's index is outside its file's chunk count.
        """
        with self._transaction() as conn:
            touched: dict[tuple[str, str, int], tuple[FileProgress, Bitmap]] = {}
            digests: dict[tuple[str, str, int], str] = {}
            skipped: set[tuple[str, str, int]] = set()
            for receipt in receipts:
                key = (receipt.topic, receipt.file_id, receipt.generation)
                if key in skipped:
                    continue
                if key not in touched:
                    progress = self._select(conn, *key)
                    if progress is None or progress.state is not ProgressState.RECEIVING:
                        skipped.add(key)
                        continue
                    touched[key] = (progress, progress.bitmap())
                    if progress.sha256 is not None:
                        digests[key] = progress.sha256
                touched[key][1].set(receipt.index)
                if receipt.sha256 is not None:
                    known = digests.setdefault(key, receipt.sha256)
                    if known != receipt.sha256:
                        skipped.add(key)
                        self._set_state(
                            conn,
                            key,
                            ProgressState.REJECTED,
                            "the last chunk arrived twice with different SHA-256 values",
                        )
            now = self._clock()
            results = []
            for key, (_, bitmap) in touched.items():
                if key in skipped:
                    results.append(self._select(conn, *key))
                    continue
                updated = touched[key][0].updated(
                    received=bitmap.to_bytes(),
                    received_count=bitmap.count(),
                    sha256=digests.get(key),
                    updated_at=now,
                )
                conn.execute(
                    "UPDATE progress SET received = ?, received_count = ?, sha256 = ?,"
                    f" updated_at = ? WHERE {_KEY_WHERE}",
                    (updated.received, updated.received_count, updated.sha256, now, *key),
                )
                results.append(updated)
        return [progress for progress in results if progress is not None]

    def _set_state(
        self,
        conn: sqlite3.Connection,
        key: tuple[str, str, int],
        state: ProgressState,
        reason: str | None,
        current: FileProgress | None = None,
    ) -> FileProgress | None:
        """Move a RECEIVING row to `state`; `current` (the row as read in this transaction)
        spares reading it back."""
        now = self._clock()
        cursor = conn.execute(
            f"UPDATE progress SET state = ?, reason = ?, updated_at = ? WHERE {_KEY_WHERE}"
            " AND state = ?",
            (state.value, reason, now, *key, ProgressState.RECEIVING.value),
        )
        if cursor.rowcount != 1:
            return None
        if current is None:
            return self._select(conn, *key)
        return current.updated(state=state, reason=reason, updated_at=now)

    def get(self, topic: str, file_id: str, generation: int) -> FileProgress | None:
        """Return the row of one generation, or ``None``."""
        with self._db.reading() as conn:
            return self._select(conn, topic, file_id, generation)

    def is_finished(self, topic: str, file_id: str, generation: int) -> bool:
        """Whether this generation already ended (complete, rejected or aborted)."""
        progress = self.get(topic, file_id, generation)
        return progress is not None and progress.state in FINISHED_STATES

    def receiving(self, topic: str) -> list[FileProgress]:
        """Return the generations of a topic still being received (e.g. after a restart)."""
        with self._db.reading() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM progress WHERE topic = ? AND state = ?"
                " ORDER BY relpath, generation",
                (topic, ProgressState.RECEIVING.value),
            ).fetchall()
        return [_progress(row) for row in rows]

    def completed(self, topic: str | None = None) -> list[FileProgress]:
        """Return the delivered version of every path: its newest COMPLETE generation.

        This is what the destination holds (e.g. for a backup audit). Generations still
        being received, rejected or aborted are left out; a path whose newest generation
        failed is listed with the last one that completed. Should two topics deliver the
        same path (``topic`` None), the version completed last is the one listed.

        Args:
            topic: Only this topic's files; every topic when ``None``.

        Returns:
            One row per relative path, ordered by path.
        """
        where = "state = ?" + ("" if topic is None else " AND topic = ?")
        params: tuple[str, ...] = (ProgressState.COMPLETE.value,)
        if topic is not None:
            params += (topic,)
        with self._db.reading() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM ("
                f" SELECT {_COLUMNS}, ROW_NUMBER() OVER ("
                "  PARTITION BY relpath ORDER BY updated_at DESC, generation DESC) AS newest"
                f" FROM progress WHERE {where})"
                " WHERE newest = 1 ORDER BY relpath",
                params,
            ).fetchall()
        return [_progress(row) for row in rows]

    def mark_complete(
        self,
        topic: str,
        file_id: str,
        generation: int,
        verified: tuple[int, str] | None = None,
    ) -> FileProgress | None:
        """Record that a generation was verified and moved into place.

        Args:
            topic: Kafka topic.
            file_id: File id.
            generation: File generation.
            verified: The verified ``(size, sha256)`` to store, for formats whose chunks did
                not announce them (OpenMSIStream's: no size, a SHA-512), so a completed row
                always holds the delivered file's size and SHA-256.

        Returns:
            The updated row, or ``None`` if the generation was not RECEIVING.

        Raises:
            ValueError: If not every chunk was recorded.
        """
        size, sha256 = verified if verified is not None else (None, None)
        with self._transaction() as conn:
            # One guarded UPDATE, then the row as it now is.
            cursor = conn.execute(
                "UPDATE progress SET state = ?, reason = NULL, updated_at = ?,"
                " size = COALESCE(?, size), sha256 = COALESCE(?, sha256)"
                f" WHERE {_KEY_WHERE} AND state = ? AND received_count = chunk_count",
                (
                    ProgressState.COMPLETE.value,
                    self._clock(),
                    size,
                    sha256,
                    topic,
                    file_id,
                    generation,
                    ProgressState.RECEIVING.value,
                ),
            )
            progress = self._select(conn, topic, file_id, generation)
        if cursor.rowcount == 1:
            return progress
        if progress is None or progress.state is not ProgressState.RECEIVING:
            return None
        raise ValueError(
            f"{progress.relpath!r} generation {generation} has "
            f"{progress.received_count} of {progress.chunk_count} chunks"
        )

    def mark_rejected(
        self, topic: str, file_id: str, generation: int, reason: str
    ) -> FileProgress | None:
        """Record that a generation was refused (bad checksum, conflicting chunks ...).

        Returns:
            The updated row, or ``None`` if the generation was not RECEIVING.
        """
        with self._transaction() as conn:
            return self._set_state(
                conn, (topic, file_id, generation), ProgressState.REJECTED, reason
            )

    def mark_aborted(
        self,
        topic: str,
        file_id: str,
        generation: int,
        reason: str = "aborted by the producer",
    ) -> FileProgress | None:
        """Record that a generation was dropped (the producer sent an abort).

        Returns:
            The updated row (the caller deletes its staging file), or ``None`` if the
            generation was not RECEIVING.
        """
        with self._transaction() as conn:
            return self._set_state(
                conn, (topic, file_id, generation), ProgressState.ABORTED, reason
            )

    def count_since(self, topic: str, since: float) -> dict[ProgressState, int]:
        """How many generations of a topic reached each state at or after ``since``.

        Args:
            topic: Kafka topic.
            since: Unix time.

        Returns:
            A count for every state (zero included).
        """
        result = dict.fromkeys(ProgressState, 0)
        with self._db.reading() as conn:
            rows = conn.execute(
                "SELECT state, COUNT(*) FROM progress WHERE topic = ? AND updated_at >= ?"
                " GROUP BY state",
                (topic, since),
            ).fetchall()
        for state, count in rows:
            result[ProgressState(state)] = int(count)
        return result

    def count_receiving(self, topic: str) -> int:
        """How many generations of a topic are being received (in flight)."""
        with self._db.reading() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM progress WHERE topic = ? AND state = ?",
                (topic, ProgressState.RECEIVING.value),
            ).fetchone()
        return int(row[0])

    def last_finished(self, topic: str, state: ProgressState) -> FileProgress | None:
        """The generation of a topic that last reached ``state`` (e.g. COMPLETE), or None."""
        with self._db.reading() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM progress WHERE topic = ? AND state = ?"
                " ORDER BY updated_at DESC LIMIT 1",
                (topic, state.value),
            ).fetchone()
        return None if row is None else _progress(row)

    def prune_finished(self, older_than_seconds: float) -> int:
        """Delete finished generations last changed more than ``older_than_seconds`` ago.

        Only prune well past the time Kafka offsets move beyond a file: a pruned generation
        whose chunks are replayed would be received again.

        Returns:
            How many rows were deleted.
        """
        cutoff = self._clock() - older_than_seconds
        finished = sorted(state.value for state in FINISHED_STATES)
        placeholders = ", ".join("?" * len(finished))
        with self._transaction() as conn:
            cursor = conn.execute(
                f"DELETE FROM progress WHERE updated_at < ? AND state IN ({placeholders})",
                (cutoff, *finished),
            )
            return cursor.rowcount
