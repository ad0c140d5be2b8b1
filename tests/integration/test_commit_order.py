"""Events are part of the commit order: no file's offsets are committed before its event.

The long-running reconstruct flow records every outcome in a durable outbox
(``msi_prefect.prefect_layer.event_outbox``) from the reassembler's event callback. When that write
fails (its disk is full), the batch must not commit: it is rewound and retried, and once
the write goes through every file is delivered and has its event exactly once. These tests
wire the reassembler to a real ``EventChannel`` the way
``msi_prefect.prefect_layer.transfers.streaming`` does, against the real broker.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.prefect_layer.event_outbox import EventChannel, event_outbox
from msi_prefect.prefect_layer.events import from_reassembler
from msi_prefect.transfer import reassembler as reassembler_module
from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.reassembler import FileEvent, Reassembler, ReassemblerSettings
from msi_prefect.transfer.sqlite_db import DurableQueue
from msi_prefect.transfer.stopping import StopConditions
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack
from tests.transfer_helpers import CHUNK, make_tree, send, tree_digests

pytestmark = pytest.mark.stack

DISK_FULL = "database or disk is full"
# One-chunk files and files of several chunks, in batches of a few messages: a failure
# lands in the middle of a batch, after some of its events were recorded.
SIZES = {f"run/small-{i}.txt": 100 + i for i in range(6)} | {
    "run/big-a.bin": 3 * CHUNK + 5,
    "run/big-b.bin": 2 * CHUNK,
}
BATCH_MESSAGES = 4


class RecordingServer:
    """Stands for the Prefect server's ``POST /api/events``: keeps every event posted."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    def __call__(self, events: list[dict[str, Any]]) -> None:
        self.received.extend(events)


def _reassembler(stack: RunningStack, topic: str, dest: Path, on_event: Any) -> Reassembler:
    settings = ReassemblerSettings(
        topic=topic,
        destination=str(dest),
        group_id=f"order-{topic}",
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        batch_messages=BATCH_MESSAGES,
    )
    connection = KafkaConnection(bootstrap_servers=stack.bootstrap_servers)
    return Reassembler(connection, settings, on_event=on_event)


def _recording_callback(
    channel: EventChannel, recorded: list[FileEvent], on_failure: Callable[[Exception], None]
) -> Callable[[FileEvent], None]:
    """The reconstruct flow's callback (an outbox write per outcome), with a record of it."""

    def on_event(event: FileEvent) -> None:
        try:
            channel.emit(from_reassembler(event))
        except sqlite3.OperationalError as exc:
            on_failure(exc)
            raise
        recorded.append(event)

    return on_event


def _assert_each_file_once(
    dest: Path,
    expected: dict[str, str],
    recorded: list[FileEvent],
    server: RecordingServer,
    reassembler: Reassembler,
) -> None:
    assert tree_digests(dest) == expected
    # The callback took each file's outcome once ...
    assert sorted(e.relpath or "" for e in recorded) == sorted(expected)
    assert {e.kind.value for e in recorded} == {"reconstructed"}
    # ... and the server got one event per file, each under its own deterministic id.
    ids = Counter(event["id"] for event in server.received)
    assert [n for n in ids.values() if n > 1] == []
    assert sorted(event["payload"]["path"] for event in server.received) == sorted(expected)
    assert {event["event"] for event in server.received} == {"msi.file.reconstructed"}
    assert reassembler.stats.files_reconstructed == len(expected)
    assert reassembler.stats.files_rejected == 0


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last page; return the filler file."""
    filler = folder / "filler.bin"
    with filler.open("wb", buffering=0) as handle:
        for block in (1024 * 1024, 64 * 1024, 4096, 512):
            try:
                while True:
                    handle.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def test_a_full_outbox_disk_holds_the_batch_back_until_it_is_freed(
    kafka_stack: RunningStack,
    topic: str,
    tmp_path: Path,
    tiny_tmpfs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The outbox lives on a small tmpfs that is full: SQLite's own disk-full error."""
    expected = make_tree(tmp_path / "src", SIZES)
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", sorted(SIZES))
    monkeypatch.setattr(reassembler_module, "LOCAL_ERROR_BACKOFF_S", 0.2)
    dest = tmp_path / "dest"
    server = RecordingServer()
    recorded: list[FileEvent] = []
    failures: list[str] = []
    filler: list[Path] = []

    def free_the_disk_after_three(exc: Exception) -> None:
        failures.append(str(exc))
        if len(failures) == 3:
            filler.pop().unlink()

    outbox = tiny_tmpfs / "event-outbox.sqlite"
    with EventChannel(outbox, post=server, run_related=[]) as channel:
        filler.append(_fill(tiny_tmpfs))
        reassembler = _reassembler(
            kafka_stack,
            topic,
            dest,
            _recording_callback(channel, recorded, free_the_disk_after_three),
        )
        reassembler.run(
            threading.Event(), StopConditions(stop_after_files=len(SIZES), idle_timeout_s=60)
        )
    assert len(failures) >= 3 and not filler, "the outbox's disk never filled up"
    assert all(DISK_FULL in failure for failure in failures), failures
    _assert_each_file_once(dest, expected, recorded, server, reassembler)
    with event_outbox(outbox) as left:
        assert left.count() == 0


def test_an_outbox_write_failing_mid_batch_is_retried_without_a_duplicate(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes 3 to 5 fail: the first two events of the batch are not handed over again."""
    expected = make_tree(tmp_path / "src", SIZES)
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", sorted(SIZES))
    monkeypatch.setattr(reassembler_module, "LOCAL_ERROR_BACKOFF_S", 0.2)
    real_add = DurableQueue.add
    writes: list[str] = []

    def full_for_a_while(self: DurableQueue, key: str, body: dict[str, Any]) -> bool:
        writes.append(key)
        if 3 <= len(writes) <= 5:
            raise sqlite3.OperationalError(DISK_FULL)
        return real_add(self, key, body)

    monkeypatch.setattr(DurableQueue, "add", full_for_a_while)
    dest = tmp_path / "dest"
    server = RecordingServer()
    recorded: list[FileEvent] = []
    failures: list[Exception] = []
    with EventChannel(tmp_path / "event-outbox.sqlite", post=server, run_related=[]) as channel:
        reassembler = _reassembler(
            kafka_stack, topic, dest, _recording_callback(channel, recorded, failures.append)
        )
        reassembler.run(
            threading.Event(), StopConditions(stop_after_files=len(SIZES), idle_timeout_s=60)
        )
    assert len(failures) == 3
    # Every event was written once; the failed ones were tried again, nothing else was.
    assert len(writes) == len(SIZES) + len(failures)
    assert len(set(writes)) == len(SIZES)
    _assert_each_file_once(dest, expected, recorded, server, reassembler)


def test_a_bug_in_the_event_callback_stops_the_run_without_committing(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    """Not a storage error: no endless retry, and no commit that would lose the event."""
    expected = make_tree(tmp_path / "src", SIZES)
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", sorted(SIZES))
    dest = tmp_path / "dest"

    def buggy(event: FileEvent) -> None:
        raise TypeError("a bug in the callback")

    crashed = _reassembler(kafka_stack, topic, dest, buggy)
    with pytest.raises(TypeError, match="a bug"):
        crashed.run(threading.Event(), StopConditions(idle_timeout_s=60))

    # Nothing was committed: the next run sees every file again, and reports each one.
    recorded: list[FileEvent] = []
    again = _reassembler(kafka_stack, topic, dest, recorded.append)
    again.run(threading.Event(), StopConditions(stop_after_files=len(SIZES), idle_timeout_s=60))
    assert sorted(e.relpath or "" for e in recorded) == sorted(expected)
    assert tree_digests(dest) == expected
