"""The transfer counts of `msi-prefect status`, from real stores on disk (no server)."""

from __future__ import annotations

import os
from pathlib import Path

from msi_prefect.stack.transfer_status import (
    WINDOW_S,
    TransferStatus,
    _read_consumer,
    _read_producer,
)
from msi_prefect.transfer.layout import DestinationLayout
from msi_prefect.transfer.progress import ChunkReceipt, ProgressState, ProgressStore
from msi_prefect.transfer.registry import Registry, SkippedFile, SkipReason
from msi_prefect.transfer.wire import ChunkHeader

TOPIC = "lab"
NOW = 100_000.0
DIGEST = "ab" * 32


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _status() -> TransferStatus:
    return TransferStatus(topic=TOPIC, consumer_group="g", watch_dir=None, destination_dir=None)


def _write(root: Path, relpath: str, data: bytes) -> os.stat_result:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.stat()


def test_producer_counts_the_last_hour_and_what_waits_in_the_folder(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    sent = {"a.dat": b"a", "run/b.dat": b"bb", "old.dat": b"o"}
    stats = {relpath: _write(inbox, relpath, data) for relpath, data in sent.items()}
    clock = Clock(NOW - 2 * WINDOW_S)
    with Registry(tmp_path / ".msi-producer-registry.sqlite", clock=clock) as registry:
        for relpath, info in stats.items():
            if relpath == "old.dat":
                clock.now = NOW - 2 * WINDOW_S  # sent long ago: not in the last hour
            else:
                clock.now = NOW - 60 if relpath == "a.dat" else NOW - 30
            claim = registry.begin(TOPIC, relpath, info.st_size, info.st_mtime_ns, info.st_ino)
            assert claim is not None
            registry.mark_sent(TOPIC, relpath, claim.generation, DIGEST)
        registry.record_skipped(
            TOPIC, [SkippedFile("x.log", SkipReason.EXCLUDED, "matches exclude glob", NOW)]
        )
    _write(inbox, "new.dat", b"not sent yet")
    _write(inbox, "a.dat", b"changed since it was sent")
    _write(inbox, "x.log", b"excluded")
    _write(inbox, "scratch.tmp", b"excluded by default")

    status = _status()
    _read_producer(status, inbox, {"exclude": ["*.log"]}, since=NOW - WINDOW_S)
    producer = status.producer
    assert producer.sent_last_hour == 2
    assert producer.last_sent is not None and producer.last_sent.path == "run/b.dat"
    assert producer.waiting_in_folder == 2  # new.dat and the changed a.dat
    assert producer.skipped == 1 and not producer.folder_scan_cut
    assert status.notes == []


def test_producer_without_a_registry_is_a_note(tmp_path: Path) -> None:
    status = _status()
    _read_producer(status, tmp_path / "inbox", {}, since=0.0)
    assert status.producer.sent_last_hour is None
    assert "no registry" in status.notes[0]


def _header(relpath: str, generation: int = 1) -> ChunkHeader:
    return ChunkHeader.for_chunk(
        relpath=relpath,
        size=5,
        chunk_size=10,
        index=0,
        mtime_ns=1,
        producer_id="p",
        generation=generation,
        sha256=DIGEST,
    )


def test_consumer_counts_rebuilt_rejected_and_receiving(tmp_path: Path) -> None:
    destination = tmp_path / "received"
    layout = DestinationLayout.of_local(destination)
    clock = Clock(NOW - 2 * WINDOW_S)
    with ProgressStore(layout.progress_store, clock=clock) as store:
        for relpath, at in (
            ("old.dat", NOW - 2 * WINDOW_S),
            ("a.dat", NOW - 90),
            ("b.dat", NOW - 5),
        ):
            clock.now = at
            header = _header(relpath)
            store.open_file(TOPIC, header, "s")
            store.record_chunks([ChunkReceipt(TOPIC, header.file_id, 1, 0, DIGEST)])
            store.mark_complete(TOPIC, header.file_id, 1)
        clock.now = NOW - 10
        bad = _header("bad.dat")
        store.open_file(TOPIC, bad, "s")
        store.mark_rejected(TOPIC, bad.file_id, 1, "checksum mismatch")
        store.open_file(TOPIC, ChunkHeader.for_chunk(
            relpath="big.dat", size=50, chunk_size=10, index=0, mtime_ns=1, producer_id="p",
            generation=1, sha256=None,
        ), "s")  # fmt: skip
        assert store.count_since(TOPIC, NOW - WINDOW_S)[ProgressState.COMPLETE] == 2

    status = _status()
    _read_consumer(status, destination, since=NOW - WINDOW_S)
    consumer = status.consumer
    assert (consumer.rebuilt_last_hour, consumer.rejected_last_hour, consumer.receiving) == (
        2,
        1,
        1,
    )
    assert consumer.last_rebuilt is not None and consumer.last_rebuilt.path == "b.dat"
    assert status.downstream.files_waiting_for_batch == 0
    assert status.notes == []
