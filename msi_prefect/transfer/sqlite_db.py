"""The SQLite plumbing shared by the producer registry and the consumer progress store."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

# Waiting this long for a lock held by another process beats failing at once.
BUSY_TIMEOUT_S = 5.0


class Durability(StrEnum):
    """SQLite's `synchronous` setting, by what a commit promises after a power cut."""

    FULL = "FULL"  # every commit is on disk when it returns (one fsync per commit)
    NORMAL = "NORMAL"  # with WAL: never corrupt, but the last commits may be lost


class SqliteDatabase:
    """One WAL-mode connection, shared by the threads of one process, with a versioned schema.

    Transactions nest: a `transaction()` opened inside another joins it, so a caller can
    group many small operations into one commit with `batch()`.

    Args:
        path: Database file; its parent directory is created if needed.
        schema: `CREATE ... IF NOT EXISTS` statements, run on every open.
        schema_version: Stored in `PRAGMA user_version`; a newer one on disk is refused.
        durability: What a commit promises (see `Durability`).
        name: What the database is, for error messages.

    Raises:
        RuntimeError: If the file was written by a newer schema version.
    """

    def __init__(
        self,
        path: str | Path,
        schema: Sequence[str],
        schema_version: int,
        durability: Durability,
        name: str,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._depth = 0
        self._durability = durability
        self._durable_commit_requested = False
        # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE below.
        self.connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
        )
        self.connection.row_factory = sqlite3.Row
        self.connection.execute("PRAGMA journal_mode = WAL")
        self.connection.execute(f"PRAGMA synchronous = {durability.value}")
        with self.transaction() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > schema_version:
                raise RuntimeError(
                    f"{self.path} has {name} schema {found}; this code knows {schema_version}"
                )
            for statement in schema:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {schema_version}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and an IMMEDIATE (write) transaction, or join the one already open."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.connection
                finally:
                    self._depth -= 1
                return
            self.connection.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.connection
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            try:
                self.connection.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (disk full, I/O error) may leave the transaction open;
                # end it, or every later BEGIN would fail.
                if self.connection.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.connection.execute("ROLLBACK")
                raise
            if self._durable_commit_requested:
                self._durable_commit_requested = False
                self._sync_wal()

    def request_durable_commit(self) -> None:
        """Make the commit of the current transaction durable, whatever `durability` says.

        For the rare writes whose loss in a power cut would do harm. SQLite refuses to
        change `synchronous` inside a transaction, so the WAL file is fsynced after COMMIT.
        """
        if self._durability is not Durability.FULL:
            self._durable_commit_requested = True

    def _sync_wal(self) -> None:
        fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run every operation inside in one transaction: one commit for all of them.

        An exception that leaves the block rolls the whole batch back.
        """
        with self.transaction():
            yield

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads (under the lock; no write transaction)."""
        with self._lock:
            yield self.connection

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.connection.close()


class SqliteStore:
    """Base of the project's SQLite stores: batching, closing, use as a context manager.

    Args:
        db: The store's database.
    """

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._transaction = db.transaction

    def batch(self) -> AbstractContextManager[None]:
        """Group every call inside into one transaction (one commit). See SqliteDatabase."""
        return self._db.batch()

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_QUEUE_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS items (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        item_key TEXT NOT NULL UNIQUE,
        body TEXT NOT NULL
    )
    """,
)
QUEUE_SCHEMA_VERSION = 1


class DurableQueue(SqliteStore):
    """A first-in first-out queue of JSON objects on disk, each with a unique key.

    Every commit is durable (`synchronous=FULL`): an item added before a Kafka offset
    commit survives a power cut. Readers take a bounded number of items at a time, so
    memory stays flat however long the queue grows.

    Args:
        path: Database file.
        name: What the queue is, for error messages.
    """

    def __init__(self, path: str | Path, name: str) -> None:
        super().__init__(
            SqliteDatabase(path, _QUEUE_SCHEMA, QUEUE_SCHEMA_VERSION, Durability.FULL, name)
        )

    def add(self, key: str, body: dict[str, Any]) -> bool:
        """Queue one item; False if an item with this key is queued already."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO items (item_key, body) VALUES (?, ?)",
                (key, json.dumps(body)),
            )
            return cursor.rowcount == 1

    def add_many(self, items: list[tuple[str, dict[str, Any]]]) -> int:
        """Queue several items in one durable commit; return how many were new."""
        with self._transaction() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO items (item_key, body) VALUES (?, ?)",
                [(key, json.dumps(body)) for key, body in items],
            )
            return conn.total_changes - before

    def remove_keys(self, keys: list[str]) -> None:
        """Forget the items with these keys (wherever they are in the queue)."""
        with self._transaction() as conn:
            conn.executemany("DELETE FROM items WHERE item_key = ?", [(key,) for key in keys])

    def oldest(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` items, oldest first, with their queue positions."""
        with self._db.reading() as conn:
            rows = conn.execute(
                "SELECT seq, body FROM items ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(row["seq"], json.loads(row["body"])) for row in rows]

    def count(self) -> int:
        """How many items wait."""
        with self._db.reading() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def remove_through(self, seq: int) -> None:
        """Forget every item up to and including queue position ``seq``."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM items WHERE seq <= ?", (seq,))
