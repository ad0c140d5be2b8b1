"""Tests of the producer registry: claims, generations, restarts and awkward names."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from msi_prefect.transfer.registry import Claim, FileIdentity, FileState, Registry

TOPIC = "lab.raw"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "registry.sqlite"


@pytest.fixture
def registry(db: Path) -> Iterator[Registry]:
    with Registry(db) as opened:
        yield opened


def test_first_claim_is_generation_one(registry: Registry) -> None:
    claim = registry.begin(TOPIC, "a.txt", 10, 111, 7)
    assert claim == Claim(TOPIC, "a.txt", 1)
    record = registry.get(TOPIC, "a.txt")
    assert record is not None
    assert record.state is FileState.SENDING
    assert record.identity == FileIdentity(size=10, mtime_ns=111, inode=7)
    assert record.generation == 1
    assert record.sha256 is None


def test_sent_version_is_never_claimed_again(registry: Registry) -> None:
    claim = registry.begin(TOPIC, "a.txt", 10, 111, 7)
    assert claim is not None
    assert registry.mark_sent(TOPIC, "a.txt", claim.generation, "ab" * 32)
    assert registry.begin(TOPIC, "a.txt", 10, 111, 7) is None
    record = registry.get(TOPIC, "a.txt")
    assert record is not None
    assert record.state is FileState.SENT
    assert record.sha256 == "ab" * 32


@pytest.mark.parametrize(
    "changed", [(11, 111, 7), (10, 112, 7), (10, 111, 8)], ids=["size", "mtime", "inode"]
)
def test_changed_file_after_sent_is_a_new_generation(
    registry: Registry, changed: tuple[int, int, int]
) -> None:
    registry.begin(TOPIC, "a.txt", 10, 111, 7)
    registry.mark_sent(TOPIC, "a.txt", 1, "ab" * 32)
    claim = registry.begin(TOPIC, "a.txt", *changed)
    assert claim == Claim(TOPIC, "a.txt", 2)
    record = registry.get(TOPIC, "a.txt")
    assert record is not None
    assert record.sha256 is None  # the digest belonged to generation 1


def test_retry_of_unfinished_send_reuses_the_generation(registry: Registry) -> None:
    assert registry.begin(TOPIC, "a.txt", 10, 111, 7) == Claim(TOPIC, "a.txt", 1)
    assert registry.begin(TOPIC, "a.txt", 10, 111, 7) == Claim(TOPIC, "a.txt", 1)


def test_changed_file_during_unfinished_send_bumps(registry: Registry) -> None:
    registry.begin(TOPIC, "a.txt", 10, 111, 7)
    assert registry.begin(TOPIC, "a.txt", 20, 222, 7) == Claim(TOPIC, "a.txt", 2)


def test_abort_goes_pending_and_next_claim_bumps(registry: Registry) -> None:
    registry.begin(TOPIC, "a.txt", 10, 111, 7)
    assert registry.mark_aborted(TOPIC, "a.txt", 1)
    record = registry.get(TOPIC, "a.txt")
    assert record is not None
    assert record.state is FileState.PENDING
    assert record.reason
    # Even with the very same stat the aborted generation number is never reused.
    assert registry.begin(TOPIC, "a.txt", 10, 111, 7) == Claim(TOPIC, "a.txt", 2)


def test_failed_send_is_retried_with_the_same_generation(registry: Registry) -> None:
    registry.begin(TOPIC, "a.txt", 10, 111, 7)
    assert registry.mark_failed(TOPIC, "a.txt", 1, "broker unreachable")
    record = registry.get(TOPIC, "a.txt")
    assert record is not None
    assert record.state is FileState.FAILED
    assert record.reason == "broker unreachable"
    assert registry.begin(TOPIC, "a.txt", 10, 111, 7) == Claim(TOPIC, "a.txt", 1)
    assert registry.get(TOPIC, "a.txt").reason is None  # type: ignore[union-attr]


def test_late_reports_about_old_generations_are_ignored(registry: Registry) -> None:
    registry.begin(TOPIC, "a.txt", 10, 111, 7)
    registry.begin(TOPIC, "a.txt", 20, 222, 7)  # generation 2 now in flight
    assert not registry.mark_sent(TOPIC, "a.txt", 1, "ab" * 32)
    assert not registry.mark_failed(TOPIC, "a.txt", 1, "late")
    assert not registry.mark_aborted(TOPIC, "a.txt", 1)
    record = registry.get(TOPIC, "a.txt")
    assert record is not None
    assert (record.generation, record.state) == (2, FileState.SENDING)


def test_reports_only_move_a_sending_generation(registry: Registry) -> None:
    registry.begin(TOPIC, "a.txt", 10, 111, 7)
    registry.mark_aborted(TOPIC, "a.txt", 1)
    assert not registry.mark_sent(TOPIC, "a.txt", 1, "ab" * 32)
    assert registry.get(TOPIC, "a.txt").state is FileState.PENDING  # type: ignore[union-attr]
    assert not registry.mark_sent(TOPIC, "never-claimed.txt", 1, "ab" * 32)


def test_topics_are_independent(registry: Registry) -> None:
    registry.begin("t1", "a.txt", 10, 111, 7)
    registry.mark_sent("t1", "a.txt", 1, "ab" * 32)
    assert registry.begin("t2", "a.txt", 10, 111, 7) == Claim("t2", "a.txt", 1)
    assert registry.get("t3", "a.txt") is None


AWKWARD_NAMES = [
    "a;b.csv",
    'it\'s "q".txt',
    "sp ace.dat",
    "ünï/cödé.tif",
    "line\nbreak.txt",
    "'; DROP TABLE files; --",
    "%_wildcards_%.txt",
]


def test_awkward_names_round_trip_through_a_restart(db: Path) -> None:
    with Registry(db) as registry:
        for number, name in enumerate(AWKWARD_NAMES):
            claim = registry.begin(TOPIC, name, number, number * 10, number + 1)
            assert claim == Claim(TOPIC, name, 1)
            registry.mark_sent(TOPIC, name, 1, f"{number:064x}")
    with Registry(db) as registry:
        for number, name in enumerate(AWKWARD_NAMES):
            record = registry.get(TOPIC, name)
            assert record is not None
            assert record.relpath == name
            assert record.sha256 == f"{number:064x}"
            assert registry.begin(TOPIC, name, number, number * 10, number + 1) is None
        assert registry.counts(TOPIC)[FileState.SENT] == len(AWKWARD_NAMES)
        assert registry.get(TOPIC, "a") is None  # no LIKE-style matching


def test_crash_recovery_resumes_exactly(db: Path) -> None:
    registry = Registry(db)
    registry.begin(TOPIC, "done.txt", 1, 1, 1)
    registry.mark_sent(TOPIC, "done.txt", 1, "00" * 32)
    registry.begin(TOPIC, "half.txt", 2, 2, 2)
    registry.begin(TOPIC, "aborted.txt", 3, 3, 3)
    registry.mark_aborted(TOPIC, "aborted.txt", 1)
    registry.begin(TOPIC, "failed.txt", 4, 4, 4)
    registry.mark_failed(TOPIC, "failed.txt", 1, "disk error")
    # No close(): the process "dies" and a new one opens the same file.
    reopened = Registry(db)
    unfinished = reopened.unfinished(TOPIC)
    assert [(r.relpath, r.state) for r in unfinished] == [
        ("aborted.txt", FileState.PENDING),
        ("half.txt", FileState.SENDING),
    ]
    assert reopened.begin(TOPIC, "done.txt", 1, 1, 1) is None
    assert reopened.begin(TOPIC, "half.txt", 2, 2, 2) == Claim(TOPIC, "half.txt", 1)
    assert reopened.begin(TOPIC, "aborted.txt", 3, 3, 3) == Claim(TOPIC, "aborted.txt", 2)
    # Changed while the watcher was down: sent again as a new generation.
    assert reopened.begin(TOPIC, "done.txt", 1, 99, 1) == Claim(TOPIC, "done.txt", 2)
    registry.close()
    reopened.close()


def test_counts_include_every_state(registry: Registry) -> None:
    assert registry.counts(TOPIC) == dict.fromkeys(FileState, 0)
    registry.begin(TOPIC, "a", 1, 1, 1)
    registry.begin(TOPIC, "b", 1, 1, 1)
    registry.mark_sent(TOPIC, "b", 1, "00" * 32)
    registry.begin(TOPIC, "c", 1, 1, 1)
    registry.mark_failed(TOPIC, "c", 1, "x")
    registry.begin(TOPIC, "d", 1, 1, 1)
    registry.mark_aborted(TOPIC, "d", 1)
    assert registry.counts(TOPIC) == {
        FileState.PENDING: 1,
        FileState.SENDING: 1,
        FileState.SENT: 1,
        FileState.FAILED: 1,
    }


def test_updated_at_comes_from_the_clock(db: Path) -> None:
    clock = FakeClock()
    with Registry(db, clock=clock) as registry:
        registry.begin(TOPIC, "a", 1, 1, 1)
        assert registry.get(TOPIC, "a").updated_at == 1001.0  # type: ignore[union-attr]
        registry.mark_sent(TOPIC, "a", 1, "00" * 32)
        assert registry.get(TOPIC, "a").updated_at == 1002.0  # type: ignore[union-attr]


def test_huge_inode_numbers_are_kept(registry: Registry) -> None:
    inode = 2**64 + 12345  # some filesystems report ids beyond 64 bits
    registry.begin(TOPIC, "a", 1, 1, inode)
    assert registry.get(TOPIC, "a").identity.inode == inode  # type: ignore[union-attr]
    registry.mark_sent(TOPIC, "a", 1, "00" * 32)
    assert registry.begin(TOPIC, "a", 1, 1, inode) is None


def test_database_uses_wal(db: Path) -> None:
    Registry(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(db: Path) -> None:
    Registry(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="schema 99"):
        Registry(db)


def test_concurrent_claims_from_threads_get_one_generation(registry: Registry) -> None:
    claims: list[Claim | None] = []
    barrier = threading.Barrier(8)

    def worker(number: int) -> None:
        barrier.wait()
        for index in range(20):
            claims.append(registry.begin(TOPIC, f"f{number}-{index}", 1, 1, 1))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claims) == 160
    assert all(claim is not None and claim.generation == 1 for claim in claims)
    assert registry.counts(TOPIC)[FileState.SENDING] == 160


def test_first_watched_is_recorded_once_per_topic_and_folder(tmp_path: Path) -> None:
    times = iter([100.0, 200.0, 300.0])
    with Registry(tmp_path / "reg.sqlite", clock=lambda: next(times)) as registry:
        assert registry.first_watched_ns("t", "/data") == 100_000_000_000
        assert registry.first_watched_ns("t", "/data") == 100_000_000_000
        assert registry.first_watched_ns("other", "/data") == 300_000_000_000
