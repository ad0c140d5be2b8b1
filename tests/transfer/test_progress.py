"""Tests of the consumer's persisted reassembly progress."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import pytest

from msi_prefect.transfer.progress import (
    Bitmap,
    ChunkReceipt,
    OpenOutcome,
    ProgressState,
    ProgressStore,
)
from msi_prefect.transfer.wire import UNKNOWN_SIZE, ChunkHeader

TOPIC = "lab.raw"
DIGEST = "ab" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def header(
    relpath: str = "run/a.tif",
    size: int = 25,
    chunk_size: int = 10,
    index: int = 0,
    generation: int = 1,
    mtime_ns: int = 5,
) -> ChunkHeader:
    count = max(1, -(-size // chunk_size))
    return ChunkHeader.for_chunk(
        relpath=relpath,
        size=size,
        chunk_size=chunk_size,
        index=index,
        mtime_ns=mtime_ns,
        producer_id="p",
        generation=generation,
        sha256=DIGEST if index == count - 1 else None,
    )


def receipts(h: ChunkHeader, *indices: int) -> list[ChunkReceipt]:
    return [
        ChunkReceipt(TOPIC, h.file_id, h.generation, i, DIGEST if i == h.count - 1 else None)
        for i in indices
    ]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "progress.sqlite"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(db: Path, clock: FakeClock) -> Iterator[ProgressStore]:
    with ProgressStore(db, clock=clock) as opened:
        yield opened


# --- Bitmap ---


def test_bitmap_set_count_and_membership() -> None:
    bitmap = Bitmap(10)
    assert bitmap.count() == 0
    assert bitmap.set(0)
    assert bitmap.set(9)
    assert not bitmap.set(9)  # already set: not a new chunk
    assert 0 in bitmap and 9 in bitmap
    assert 1 not in bitmap
    assert 10 not in bitmap and -1 not in bitmap and "x" not in bitmap
    assert bitmap.count() == 2
    assert list(bitmap.missing()) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert not bitmap.all_set()
    for index in bitmap.missing():
        bitmap.set(index)
    assert bitmap.all_set()
    assert repr(bitmap) == "Bitmap(size=10, set=10)"


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 16, 17])
def test_a_full_bitmap_equals_one_with_every_bit_set(size: int) -> None:
    by_hand = Bitmap(size)
    for index in range(size):
        by_hand.set(index)
    assert Bitmap.full(size) == by_hand
    assert Bitmap.from_bytes(size, Bitmap.full(size).to_bytes()).all_set()


def test_bitmap_layout_and_round_trip() -> None:
    bitmap = Bitmap(12)
    bitmap.set(0)
    bitmap.set(9)
    assert bitmap.to_bytes() == bytes([0b0000_0001, 0b0000_0010])
    restored = Bitmap.from_bytes(12, bitmap.to_bytes())
    assert restored == bitmap
    assert restored is not bitmap


@pytest.mark.parametrize("index", [-1, 8])
def test_bitmap_refuses_out_of_range(index: int) -> None:
    with pytest.raises(IndexError):
        Bitmap(8).set(index)


def test_bitmap_from_bytes_validates() -> None:
    with pytest.raises(ValueError, match="needs 2 bytes"):
        Bitmap.from_bytes(12, b"\x00")
    with pytest.raises(ValueError, match="beyond"):
        Bitmap.from_bytes(12, b"\x00\x10")  # bit 12 set in a 12-bit map
    with pytest.raises(ValueError):
        Bitmap(-1)
    assert Bitmap.from_bytes(16, b"\xff\xff").all_set()
    assert Bitmap(0).all_set()


def test_bitmap_is_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(Bitmap(3))


# --- open / record / complete ---


def test_new_file_then_resume(store: ProgressStore, tmp_path: Path) -> None:
    h = header()
    opened = store.open_file(TOPIC, h, tmp_path / "staging" / "a.part")
    assert opened.outcome is OpenOutcome.NEW
    assert opened.superseded == ()
    progress = opened.progress
    assert progress is not None
    assert progress.state is ProgressState.RECEIVING
    assert (progress.relpath, progress.size, progress.chunk_count) == ("run/a.tif", 25, 3)
    assert progress.staging_path == str(tmp_path / "staging" / "a.part")
    assert progress.received_count == 0
    assert not any(progress.has_chunk(index) for index in range(-1, 4))
    again = store.open_file(TOPIC, header(index=1), "ignored")
    assert again.outcome is OpenOutcome.RESUMED
    assert again.progress is not None
    assert again.progress.staging_path == str(tmp_path / "staging" / "a.part")


def test_record_chunks_is_batched_and_idempotent(store: ProgressStore) -> None:
    h = header()
    store.open_file(TOPIC, h, "s")
    (after,) = store.record_chunks(receipts(h, 0, 0, 2))
    assert after.received_count == 2
    assert after.has_chunk(0) and after.has_chunk(2)
    assert not after.has_chunk(1)
    assert not after.is_complete
    assert after.sha256 == DIGEST  # came with the last chunk
    # A replay of the same chunks changes nothing.
    (replayed,) = store.record_chunks(receipts(h, 2, 0))
    assert replayed.received_count == 2
    (done,) = store.record_chunks(receipts(h, 1))
    assert done.is_complete
    assert list(done.bitmap().missing()) == []


def test_record_chunks_for_several_files_in_one_call(store: ProgressStore) -> None:
    a, b = header("a.dat"), header("b.dat", size=5)
    store.open_file(TOPIC, a, "sa")
    store.open_file(TOPIC, b, "sb")
    results = store.record_chunks([*receipts(a, 0), *receipts(b, 0), *receipts(a, 1)])
    assert [(p.relpath, p.received_count, p.is_complete) for p in results] == [
        ("a.dat", 2, False),
        ("b.dat", 1, True),
    ]


def test_receipts_for_unknown_or_finished_files_are_ignored(store: ProgressStore) -> None:
    h = header(size=5)
    assert store.record_chunks(receipts(h, 0)) == []
    store.open_file(TOPIC, h, "s")
    store.record_chunks(receipts(h, 0))
    store.mark_complete(TOPIC, h.file_id, 1)
    assert store.record_chunks(receipts(h, 0)) == []


def test_record_chunks_out_of_range_rolls_back(store: ProgressStore) -> None:
    h = header()
    store.open_file(TOPIC, h, "s")
    with pytest.raises(IndexError):
        store.record_chunks([*receipts(h, 0), ChunkReceipt(TOPIC, h.file_id, 1, 7)])
    assert store.get(TOPIC, h.file_id, 1).received_count == 0  # type: ignore[union-attr]


def test_conflicting_last_chunk_digest_rejects(store: ProgressStore) -> None:
    h = header(size=5)
    store.open_file(TOPIC, h, "s")
    store.record_chunks(receipts(h, 0))
    (after,) = store.record_chunks([ChunkReceipt(TOPIC, h.file_id, 1, 0, "cd" * 32)])
    assert after.state is ProgressState.REJECTED
    assert after.reason is not None and "SHA-256" in after.reason


def test_mark_complete_needs_every_chunk(store: ProgressStore) -> None:
    h = header()
    store.open_file(TOPIC, h, "s")
    store.record_chunks(receipts(h, 0, 1))
    with pytest.raises(ValueError, match="2 of 3"):
        store.mark_complete(TOPIC, h.file_id, 1)
    store.record_chunks(receipts(h, 2))
    done = store.mark_complete(TOPIC, h.file_id, 1)
    assert done is not None and done.state is ProgressState.COMPLETE
    assert store.is_finished(TOPIC, h.file_id, 1)
    assert store.mark_complete(TOPIC, h.file_id, 1) is None  # only once


def test_mark_complete_keeps_the_announced_digest_or_stores_the_verified_one(
    store: ProgressStore,
) -> None:
    announced, unannounced = header("a.dat", size=5), header("b.dat", size=5)
    for h in (announced, unannounced):
        store.open_file(TOPIC, h, "s")
        store.record_chunks(receipts(h, 0))
    kept = store.mark_complete(TOPIC, announced.file_id, 1)
    assert kept is not None and (kept.size, kept.sha256) == (5, DIGEST)
    # Formats without a size or SHA-256 in their chunks (OpenMSIStream's) store the verified.
    verified = store.mark_complete(TOPIC, unannounced.file_id, 1, verified=(4, "ab" * 32))
    assert verified is not None
    assert (verified.size, verified.sha256, verified.state) == (
        4,
        "ab" * 32,
        ProgressState.COMPLETE,
    )
    assert store.get(TOPIC, unannounced.file_id, 1) == verified


def test_empty_file_is_one_chunk(store: ProgressStore) -> None:
    h = header(size=0)
    assert h.count == 1
    store.open_file(TOPIC, h, "s")
    (after,) = store.record_chunks(receipts(h, 0))
    assert after.is_complete


def test_reject_and_abort(store: ProgressStore) -> None:
    a, b = header("a"), header("b")
    store.open_file(TOPIC, a, "sa")
    store.open_file(TOPIC, b, "sb")
    rejected = store.mark_rejected(TOPIC, a.file_id, 1, "checksum mismatch")
    assert rejected is not None
    assert (rejected.state, rejected.reason) == (ProgressState.REJECTED, "checksum mismatch")
    aborted = store.mark_aborted(TOPIC, b.file_id, 1)
    assert aborted is not None and aborted.state is ProgressState.ABORTED
    assert aborted.staging_path == "sb"
    assert store.mark_aborted(TOPIC, b.file_id, 1) is None
    assert store.mark_aborted(TOPIC, "0" * 32, 1) is None
    assert store.is_finished(TOPIC, a.file_id, 1)
    assert store.is_finished(TOPIC, b.file_id, 1)
    assert not store.is_finished(TOPIC, "0" * 32, 1)
    assert store.open_file(TOPIC, a, "x").outcome is OpenOutcome.FINISHED


def test_a_header_of_unknown_size_matches_the_delivered_row(store: ProgressStore) -> None:
    """OpenMSIStream's chunks carry no size; the row learns it when the file is verified."""
    unsized = replace(header(size=25), size=UNKNOWN_SIZE)
    assert store.open_file(TOPIC, unsized, "s").outcome is OpenOutcome.NEW
    store.record_chunks(receipts(unsized, 0, 1, 2))
    store.mark_complete(TOPIC, unsized.file_id, 1, verified=(25, DIGEST))
    assert store.open_file(TOPIC, unsized, "s").outcome is OpenOutcome.FINISHED
    # A known size must still agree.
    assert store.open_file(TOPIC, header(size=30), "s").outcome is OpenOutcome.CONFLICT


def test_conflicting_header_for_same_generation(store: ProgressStore) -> None:
    store.open_file(TOPIC, header(size=25), "s")
    opened = store.open_file(TOPIC, header(size=30), "s")
    assert opened.outcome is OpenOutcome.CONFLICT
    assert opened.progress is not None and opened.progress.size == 25
    assert store.open_file(TOPIC, header(mtime_ns=6), "s").outcome is OpenOutcome.CONFLICT


# --- generations ---


def test_newer_generation_supersedes_older_receiving_ones(store: ProgressStore) -> None:
    store.open_file(TOPIC, header(generation=1), "s1")
    store.open_file(TOPIC, header(generation=2), "s2")
    done = header(generation=3, size=5)
    store.open_file(TOPIC, done, "s3")
    store.record_chunks(receipts(done, 0))
    store.mark_complete(TOPIC, done.file_id, 3)
    opened = store.open_file(TOPIC, header(generation=5), "s5")
    assert opened.outcome is OpenOutcome.NEW
    # 1 and 2 were superseded by 2 and 3 already; nothing RECEIVING is left below 5.
    assert opened.superseded == ()
    states = {
        g: store.get(TOPIC, done.file_id, g).state  # type: ignore[union-attr]
        for g in (1, 2, 3, 5)
    }
    assert states == {
        1: ProgressState.ABORTED,
        2: ProgressState.ABORTED,
        3: ProgressState.COMPLETE,
        5: ProgressState.RECEIVING,
    }


def test_superseded_generations_are_returned_for_cleanup(store: ProgressStore) -> None:
    store.open_file(TOPIC, header(generation=1), "s1")
    opened = store.open_file(TOPIC, header(generation=2), "s2")
    assert [(p.generation, p.staging_path, p.state) for p in opened.superseded] == [
        (1, "s1", ProgressState.ABORTED)
    ]
    assert opened.superseded[0].reason == "superseded by generation 2"
    assert store.get(TOPIC, header().file_id, 1).state is ProgressState.ABORTED  # type: ignore[union-attr]
    other = header("other.tif")
    store.open_file(TOPIC, other, "so")
    assert store.get(TOPIC, other.file_id, 1).state is ProgressState.RECEIVING  # type: ignore[union-attr]


def test_explicit_supersede(store: ProgressStore) -> None:
    h = header(generation=1)
    store.open_file(TOPIC, h, "s1")
    (dropped,) = store.supersede(TOPIC, h.file_id, 4)
    assert (dropped.generation, dropped.state) == (1, ProgressState.ABORTED)
    assert store.supersede(TOPIC, h.file_id, 4) == ()


def test_chunks_of_an_older_generation_are_stale(store: ProgressStore) -> None:
    store.open_file(TOPIC, header(generation=3), "s3")
    opened = store.open_file(TOPIC, header(generation=2), "s2")
    assert opened.outcome is OpenOutcome.STALE
    assert opened.progress is None
    assert store.get(TOPIC, header().file_id, 2) is None


def test_topics_are_independent(store: ProgressStore) -> None:
    h = header(generation=3)
    store.open_file("t1", h, "s")
    assert store.open_file("t2", header(generation=1), "s").outcome is OpenOutcome.NEW


# --- restart ---


def test_progress_survives_a_crash_and_replays_are_recognised(db: Path) -> None:
    h = header()
    small = header("small.txt", size=3)
    first = ProgressStore(db)
    first.open_file(TOPIC, h, "staging/a")
    first.record_chunks(receipts(h, 0, 2))
    first.open_file(TOPIC, small, "staging/s")
    first.record_chunks(receipts(small, 0))
    first.mark_complete(TOPIC, small.file_id, 1)
    # No close(): the process "dies"; a new one opens the same file.
    second = ProgressStore(db)
    opened = second.open_file(TOPIC, header(index=1), "other")
    assert opened.outcome is OpenOutcome.RESUMED
    assert opened.progress is not None
    assert opened.progress.staging_path == "staging/a"
    assert [opened.progress.has_chunk(i) for i in range(3)] == [True, False, True]
    assert opened.progress.sha256 == DIGEST
    assert [p.relpath for p in second.receiving(TOPIC)] == ["run/a.tif"]
    # The finished file's chunks replayed from Kafka are skipped.
    assert second.is_finished(TOPIC, small.file_id, 1)
    assert second.open_file(TOPIC, small, "x").outcome is OpenOutcome.FINISHED
    first.close()
    second.close()


def test_prune_finished_keeps_recent_and_receiving(store: ProgressStore, clock: FakeClock) -> None:
    old, recent, receiving = header("old", size=1), header("recent", size=1), header("r")
    for h in (old, recent, receiving):
        store.open_file(TOPIC, h, "s")
    store.record_chunks([*receipts(old, 0), *receipts(recent, 0)])
    store.mark_complete(TOPIC, old.file_id, 1)
    clock.now += 3600
    store.mark_complete(TOPIC, recent.file_id, 1)
    clock.now += 3600
    assert store.prune_finished(older_than_seconds=5000) == 1
    assert store.get(TOPIC, old.file_id, 1) is None
    assert store.is_finished(TOPIC, recent.file_id, 1)
    assert store.get(TOPIC, receiving.file_id, 1) is not None
    assert store.prune_finished(older_than_seconds=0) == 1
    assert store.get(TOPIC, receiving.file_id, 1) is not None


def test_large_bitmap(store: ProgressStore) -> None:
    h = header("big.bin", size=2**20, chunk_size=1)
    store.open_file(TOPIC, h, "s")
    batch = [ChunkReceipt(TOPIC, h.file_id, 1, i) for i in range(0, 2**20, 3)]
    (after,) = store.record_chunks(batch)
    assert after.received_count == len(batch)
    assert len(after.received) == 2**20 // 8


def test_database_uses_wal_and_refuses_newer_schema(db: Path) -> None:
    ProgressStore(db).close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("PRAGMA user_version = 42")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="schema 42"):
        ProgressStore(db)


def test_completed_lists_the_delivered_generation_of_each_path(
    store: ProgressStore, clock: FakeClock
) -> None:
    def deliver(h: ChunkHeader, topic: str = TOPIC) -> None:
        store.open_file(topic, h, "/staging/x")
        store.record_chunks(
            ChunkReceipt(topic, h.file_id, h.generation, i, DIGEST if i == h.count - 1 else None)
            for i in range(h.count)
        )
        store.mark_complete(topic, h.file_id, h.generation)

    deliver(header("run/a.tif", generation=1))
    clock.now += 1
    deliver(header("run/a.tif", generation=2, size=30, mtime_ns=6))
    clock.now += 1
    deliver(header("run/b.tif", generation=1))
    clock.now += 1
    # A newer generation of b still being received, and a rejected newer one of c.
    store.open_file(TOPIC, header("run/b.tif", generation=2, mtime_ns=9), "/staging/b2")
    deliver(header("run/c.tif", generation=1))
    c2 = header("run/c.tif", generation=2, mtime_ns=9)
    store.open_file(TOPIC, c2, "/staging/c2")
    store.mark_rejected(TOPIC, c2.file_id, 2, "bad checksum")
    clock.now += 1
    deliver(header("other/d.tif"), topic="other.topic")

    completed = store.completed(TOPIC)

    assert [(p.relpath, p.generation, p.size) for p in completed] == [
        ("run/a.tif", 2, 30),
        ("run/b.tif", 1, 25),
        ("run/c.tif", 1, 25),
    ]
    assert all(p.state is ProgressState.COMPLETE and p.sha256 == DIGEST for p in completed)
    assert [p.relpath for p in store.completed()] == [
        "other/d.tif",
        "run/a.tif",
        "run/b.tif",
        "run/c.tif",
    ]
    assert store.completed("no.such.topic") == []


def test_row_values_follow_the_column_order(store: ProgressStore) -> None:
    # New rows are inserted from _row_values: it must list the columns in order.
    from msi_prefect.transfer.progress import _COLUMNS, _row_values

    opened = store.open_file(TOPIC, header(), "s")
    assert opened.progress is not None
    progress = opened.progress.updated(sha256=DIGEST, reason="why")
    by_field = {f.name: getattr(progress, f.name) for f in fields(progress)}
    by_field["state"] = progress.state.value
    assert _row_values(progress) == tuple(by_field[c.strip()] for c in _COLUMNS.split(","))


def test_updated_copies_like_dataclasses_replace(store: ProgressStore) -> None:
    opened = store.open_file(TOPIC, header(), "s")
    assert opened.progress is not None
    original = opened.progress
    changed = original.updated(state=ProgressState.COMPLETE, sha256=DIGEST)
    assert changed == replace(original, state=ProgressState.COMPLETE, sha256=DIGEST)
    assert original.state is ProgressState.RECEIVING  # the original is left as it was
    with pytest.raises(TypeError, match="no field colour"):
        original.updated(colour="red")


@pytest.mark.parametrize("count", [1, 7, 8, 9, 16, 17])
def test_fully_received_sets_every_bit(store: ProgressStore, count: int) -> None:
    opened = store.open_file(TOPIC, header(size=count * 10), "s")
    assert opened.progress is not None
    full = opened.progress.fully_received(DIGEST)
    assert full.bitmap().all_set() and full.bitmap().size == count
    assert (full.received_count, full.sha256, full.is_complete) == (count, DIGEST, True)


# --- files recorded once finished ---


def test_a_new_file_can_be_opened_without_a_row_and_recorded_once_finished(
    store: ProgressStore,
) -> None:
    h = header(size=5)
    opened = store.open_file(TOPIC, h, "s", record_new=False)
    assert opened.outcome is OpenOutcome.NEW and opened.progress is not None
    assert store.get(TOPIC, h.file_id, 1) is None  # nothing to resume after a crash
    assert store.record_chunks(receipts(h, 0)) == []  # and no chunk bookkeeping
    done = replace(opened.progress.fully_received(DIGEST), state=ProgressState.COMPLETE)
    stored = store.record_finished(done)
    assert store.get(TOPIC, h.file_id, 1) == stored
    assert (stored.state, stored.received_count, stored.sha256) == (
        ProgressState.COMPLETE,
        1,
        DIGEST,
    )
    # A replay of the chunk is recognised as finished, like any completed file.
    assert store.open_file(TOPIC, h, "s", record_new=False).outcome is OpenOutcome.FINISHED


def test_an_unrecorded_new_generation_still_supersedes_older_ones(store: ProgressStore) -> None:
    store.open_file(TOPIC, header(generation=1), "s1")
    opened = store.open_file(TOPIC, header(generation=2, size=5), "s2", record_new=False)
    assert [(p.generation, p.state) for p in opened.superseded] == [(1, ProgressState.ABORTED)]


def test_only_finished_states_are_recorded_at_once(store: ProgressStore) -> None:
    opened = store.open_file(TOPIC, header(size=5), "s", record_new=False)
    assert opened.progress is not None
    with pytest.raises(ValueError, match="receiving is not a finished state"):
        store.record_finished(opened.progress)
    rejected = replace(opened.progress, state=ProgressState.REJECTED, reason="bad checksum")
    store.record_finished(rejected)
    with pytest.raises(sqlite3.IntegrityError):
        store.record_finished(rejected)  # a generation has one row
