"""Helpers of the tests that move files through the real broker: trees, sends, rebuilds.

Used by the transfer, CLI and integration tests alike; they start nothing themselves (the
broker is the session's, from ``tests/conftest.py``).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.producer import FileProducer, ProducerSettings
from msi_prefect.transfer.reassembler import FileEvent, Reassembler, ReassemblerSettings
from msi_prefect.transfer.registry import Registry
from msi_prefect.transfer.stopping import StopConditions
from msi_prefect.transfer.work_lock import LOCK_FILE_NAME
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack

#: Chunk size of the test sends: small, so modest files span several chunks.
CHUNK = 64 * 1024
#: A rebuild ends when nothing arrives for this long (a test's files are all sent by then).
REBUILD_IDLE_TIMEOUT_S = 60
#: How long a read-only look into a progress or registry database waits for a lock.
SQLITE_READ_TIMEOUT_S = 1


def make_tree(root: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Write files of the given sizes; return relpath -> sha256."""
    digests = {}
    for relpath, size in sizes.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        path.write_bytes(data)
        digests[relpath] = hashlib.sha256(data).hexdigest()
    return digests


def staging_leftovers(dest: Path) -> list[Path]:
    """What is left in a local destination's staging folder besides the rebuilder's lock."""
    staging = dest / ".msi-staging"
    return [path for path in staging.iterdir() if path.name != LOCK_FILE_NAME]


def tree_digests(root: Path) -> dict[str, str]:
    """relpath -> sha256 of every regular file below root, our state dirs excluded."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith((".msi-staging", ".msi-state")):
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def send(stack: RunningStack, topic: str, src: Path, registry: Path, relpaths: list[str]):  # type: ignore[no-untyped-def]
    """Send ``relpaths`` below ``src`` to ``topic`` with the producer; return its outcomes."""
    connection = KafkaConnection(bootstrap_servers=stack.bootstrap_servers)
    settings = ProducerSettings(topic=topic, chunk_size=CHUNK)
    with Registry(registry) as reg:
        producer = FileProducer(connection, settings, reg)
        return producer.upload_all([(src / rel, rel) for rel in relpaths])


def rebuild(
    stack: RunningStack, topic: str, dest: Path, files: int, group: str = "g", **kwargs: Any
) -> tuple[list[FileEvent], Reassembler]:
    """Rebuild ``files`` files of ``topic`` into ``dest``; return the events and the member."""
    events: list[FileEvent] = []
    settings = ReassemblerSettings(
        topic=topic,
        destination=str(dest),
        group_id=f"{group}-{topic}",
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        **kwargs,
    )
    reassembler = Reassembler(
        KafkaConnection(bootstrap_servers=stack.bootstrap_servers), settings, events.append
    )
    stop = StopConditions(stop_after_files=files, idle_timeout_s=REBUILD_IDLE_TIMEOUT_S)
    reassembler.run(threading.Event(), stop)
    return events, reassembler


#: How long :func:`wait_until` waits by default (a process start and a group join).
WAIT_TIMEOUT_S = 60
#: Poll often: the tests catch short-lived states (a file half received).
WAIT_POLL_S = 0.005


def wait_until(
    predicate: Callable[[], bool],
    what: str,
    timeout_s: float = WAIT_TIMEOUT_S,
    poll_s: float = WAIT_POLL_S,
) -> None:
    """Poll ``predicate`` every ``poll_s`` until it is true.

    Raises:
        AssertionError: It was still false after ``timeout_s`` (naming ``what``).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def sqlite_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """The rows of a read-only query, or none while the database is missing or locked."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=SQLITE_READ_TIMEOUT_S) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
