"""Local write errors on the consumer side (disk full): retried, never half-recorded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from msi_prefect.transfer import reassembler as reassembler_module
from msi_prefect.transfer.progress import ProgressStore
from msi_prefect.transfer.sinks import LocalDirectorySink
from tests.conftest import RunningStack
from tests.transfer_helpers import make_tree, rebuild, send, staging_leftovers, tree_digests


@pytest.mark.stack
def test_a_full_progress_store_is_retried_not_fatal(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite says "database or disk is full" in its own exception type: still a retry."""
    expected = make_tree(tmp_path / "src", {"a.bin": 300_000, "b.bin": 10})
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", sorted(expected))
    monkeypatch.setattr(reassembler_module, "LOCAL_ERROR_BACKOFF_S", 0.2)
    real_record = ProgressStore.record_chunks
    failures = []

    def full_once(self: ProgressStore, receipts):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database or disk is full")
        return real_record(self, receipts)

    monkeypatch.setattr(ProgressStore, "record_chunks", full_once)
    events, reassembler = rebuild(kafka_stack, topic, tmp_path / "dest", files=2)
    assert failures == [1]
    assert sorted(e.relpath for e in events) == ["a.bin", "b.bin"]
    assert tree_digests(tmp_path / "dest") == expected
    assert reassembler.stats.files_rejected == 0


class _Crash(BaseException):
    """Stands for kill -9: nothing after it runs, the open SQLite transaction is lost."""


@pytest.mark.stack
def test_a_crash_between_delivery_and_commit_does_not_reject_the_file(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file was renamed into place, then the process died before recording it.

    The restart re-reads the file from its first chunk; its earlier chunks are recorded as
    written, but their staging file is gone (it was delivered): the file must be rebuilt
    again, not rejected as corrupt.
    """
    expected = make_tree(tmp_path / "src", {"big.bin": 40 * 64 * 1024 + 7, "small.bin": 5})
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", sorted(expected))
    dest = tmp_path / "dest"
    real_flush = LocalDirectorySink.flush

    def crash_after_a_delivery(self: LocalDirectorySink) -> None:
        if self._unsynced_dirs:  # something was renamed into the destination in this batch
            raise _Crash
        real_flush(self)

    monkeypatch.setattr(LocalDirectorySink, "flush", crash_after_a_delivery)
    with pytest.raises(_Crash):
        rebuild(kafka_stack, topic, dest, files=2, batch_messages=8)
    assert (dest / "big.bin").exists() or (dest / "small.bin").exists()
    monkeypatch.setattr(LocalDirectorySink, "flush", real_flush)

    events, reassembler = rebuild(kafka_stack, topic, dest, files=2, batch_messages=8)
    assert sorted((e.kind.value, e.relpath) for e in events) == [
        ("reconstructed", "big.bin"),
        ("reconstructed", "small.bin"),
    ]
    assert tree_digests(dest) == expected
    assert reassembler.stats.files_rejected == 0


@pytest.mark.stack
def test_one_chunk_files_delivered_by_a_batch_that_never_committed_come_again_once(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-chunk file has no progress row until its batch records it as delivered.

    The process dies after the renames and before the batch commits: nothing is recorded,
    so the replay writes and delivers those files again, and each ends with one row.
    """
    sizes = {f"f{i}.txt": 10 + i for i in range(6)}
    expected = make_tree(tmp_path / "src", sizes)
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", sorted(expected))
    dest = tmp_path / "dest"
    real_flush = LocalDirectorySink.flush

    def crash_after_deliveries(self: LocalDirectorySink) -> None:
        if self._unsynced_dirs:
            raise _Crash
        real_flush(self)

    monkeypatch.setattr(LocalDirectorySink, "flush", crash_after_deliveries)
    with pytest.raises(_Crash):
        rebuild(kafka_stack, topic, dest, files=len(sizes))
    assert any(path.is_file() for path in dest.iterdir())  # renamed into place already
    with ProgressStore(dest / ".msi-state" / "progress.sqlite") as store:
        assert store.completed(topic) == []  # ... but never recorded
    monkeypatch.setattr(LocalDirectorySink, "flush", real_flush)

    events, reassembler = rebuild(kafka_stack, topic, dest, files=len(sizes))
    assert sorted((e.kind.value, e.relpath) for e in events) == [
        ("reconstructed", name) for name in sorted(sizes)
    ]
    assert tree_digests(dest) == expected
    assert reassembler.stats.files_rejected == 0
    with ProgressStore(dest / ".msi-state" / "progress.sqlite") as store:
        rows = store.completed(topic)
    assert [(row.relpath, row.received_count, row.sha256 is not None) for row in rows] == [
        (name, 1, True) for name in sorted(sizes)
    ]
    assert staging_leftovers(dest) == []
