"""Batch dispatch: group rebuilt files into one ``msi.files.batch-ready`` event per batch.

A process worker needs seconds to start each flow run, so one run per file and per
downstream deployment cannot keep up with a fast instrument. In batch mode the reconstruct
flow collects rebuilt files and emits one batch event per ``max_files`` files or
``max_wait_s`` seconds (whichever comes first); the batch deployments of ``prefect.yaml``
then run once per batch, with a task run and the usual per-file event for each file.

Files waiting for their batch are kept in a small SQLite outbox next to the reassembler's
progress store, written before the file's offsets are committed. After a crash the
leftovers are sent first, as the same batch as before (same members, same deterministic
event id, which the server deduplicates), so no file misses its downstream work and none
gets it twice. Memory holds only a count and a time; the files themselves stay on disk.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from msi_prefect.events import FileFacts
from msi_prefect.transfer.sqlite_db import DurableQueue

BATCH_OUTBOX_FILE = "dispatch-outbox.sqlite"


def batch_outbox(path: str | Path) -> DurableQueue:
    """The durable queue of rebuilt files waiting for their batch event."""
    return DurableQueue(path, name="dispatch outbox")


def _queue_key(facts: FileFacts) -> str:
    # One entry per generation of a file: a replayed file is not queued twice.
    return f"{facts.topic}/{facts.file_id}/{facts.generation or 0}"


class FileBatcher:
    """Groups rebuilt files into batches of at most ``max_files``.

    A batch goes out when it is full, or ``max_wait_s`` after its first file arrived (for
    the files left over after a full batch: after the batch before them was sent).

    Args:
        outbox: Where waiting files are kept.
        max_files: A batch is sent as soon as it has this many files.
        max_wait_s: ...or when its oldest file has waited this long.
        send: Emits one batch (called with 1..max_files files, in arrival order).
        clock: Monotonic time source (tests inject a fake).
    """

    def __init__(
        self,
        outbox: DurableQueue,
        max_files: int,
        max_wait_s: float,
        send: Callable[[list[FileFacts]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_files < 1:
            raise ValueError(f"max_files must be at least 1, not {max_files}")
        if max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be positive, not {max_wait_s}")
        self._outbox = outbox
        self._max_files = max_files
        self._max_wait_s = max_wait_s
        self._send = send
        self._clock = clock
        self._waiting = outbox.count()
        # Leftovers of an earlier run are due at once.
        self._oldest_at: float | None = clock() - max_wait_s if self._waiting else None

    @property
    def waiting(self) -> int:
        """Files queued for a batch not sent yet."""
        return self._waiting

    def add(self, facts: FileFacts) -> None:
        """Queue one rebuilt file; send a batch if it is full."""
        if not self._outbox.add(_queue_key(facts), dataclasses.asdict(facts)):
            return
        self._waiting += 1
        if self._oldest_at is None:
            self._oldest_at = self._clock()
        if self._waiting >= self._max_files:
            self.send_due()

    def send_due(self, force: bool = False) -> int:
        """Send the batches that are full or old enough (every waiting file if ``force``).

        Returns:
            How many batches were sent.
        """
        sent = 0
        while self._waiting and (
            force
            or self._waiting >= self._max_files
            or (self._oldest_at is not None and self._clock() - self._oldest_at >= self._max_wait_s)
        ):
            batch = self._outbox.oldest(self._max_files)
            if not batch:  # the count drifted (cannot happen in one process): resync
                self._waiting = 0
                break
            self._send([FileFacts(**record) for _, record in batch])
            # Removed only after sending: a crash in between sends the same batch again.
            self._outbox.remove_through(batch[-1][0])
            self._waiting = max(0, self._waiting - len(batch))
            sent += 1
        if not self._waiting:
            self._oldest_at = None
        elif sent:
            self._oldest_at = self._clock()
        return sent
