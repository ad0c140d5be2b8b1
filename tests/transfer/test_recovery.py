"""Consumer groups and crash recovery against the real broker.

- two reassemblers in one group share the partitions and each rebuilds whole files;
- a partition handed over in the middle of a file is rebuilt from the file's start;
- `kill -9` of the reassembler or of the uploader loses nothing and re-sends nothing done.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.reassembler import (
    FileEventKind,
    Reassembler,
    ReassemblerSettings,
)
from msi_prefect.transfer.stopping import StopConditions
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack
from tests.transfer_helpers import make_tree, send, sqlite_rows, tree_digests, wait_until

pytestmark = pytest.mark.stack

KILL_WAIT_S = 60


def test_two_reassemblers_in_one_group_each_rebuild_whole_files(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    sizes = {f"batch/file-{i:02d}.bin": 1000 + i * 70_000 for i in range(16)}
    expected = make_tree(tmp_path / "src", sizes)
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", sorted(sizes))

    connection = KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers)
    members = []
    for name in ("a", "b"):
        settings = ReassemblerSettings(
            topic=topic,
            destination=str(tmp_path / name),
            group_id=f"shared-{topic}",
            session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
            batch_messages=3,  # small batches: the rebalance lands while files are open
        )
        members.append(Reassembler(connection, settings))
    stop = threading.Event()
    threads = [threading.Thread(target=m.run, args=(stop, StopConditions())) for m in members]
    threads[0].start()
    time.sleep(1.0)  # let the first one start alone, so the second joins mid-stream
    threads[1].start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not set(expected) <= (
        _delivered(tmp_path / "a") | _delivered(tmp_path / "b")
    ):
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()

    found_a, found_b = tree_digests(tmp_path / "a"), tree_digests(tmp_path / "b")
    # Every file arrived somewhere, and every file that arrived anywhere is whole and right.
    assert set(found_a) | set(found_b) == set(expected)
    for found in (found_a, found_b):
        assert all(found[rel] == expected[rel] for rel in found)
    assert sum(m.stats.files_rejected for m in members) == 0


def _delivered(root: Path) -> set[str]:
    """Files renamed into place below root (staging and state excluded)."""
    return {path.relative_to(root).as_posix() for path in root.glob("batch/*") if path.is_file()}


def test_partition_handed_over_mid_file_is_rebuilt_from_the_file_start(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    chunk = 64 * 1024
    expected = make_tree(tmp_path / "src", {"big.bin": 160 * chunk + 5})
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", ["big.bin"])
    connection = KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers)

    def member(dest: Path) -> Reassembler:
        return Reassembler(
            connection,
            ReassemblerSettings(
                topic=topic,
                destination=str(dest),
                group_id=f"handover-{topic}",
                session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
                batch_messages=4,
            ),
        )

    first = member(tmp_path / "first")
    stop = threading.Event()

    def stop_when_partway() -> None:
        while first.stats.chunks_written < 8 and not stop.is_set():
            time.sleep(0.01)
        stop.set()

    watcher = threading.Thread(target=stop_when_partway)
    watcher.start()
    first.run(stop, StopConditions(idle_timeout_s=60))
    watcher.join()
    assert 0 < first.stats.chunks_written < 160
    assert not (tmp_path / "first" / "big.bin").exists()

    # Another member, with its own destination, takes the partition over.
    second = member(tmp_path / "second")
    events: list = []
    second._on_event = events.append
    second.run(None, StopConditions(stop_after_files=1, idle_timeout_s=60))
    assert [e.kind for e in events] == [FileEventKind.RECONSTRUCTED]
    assert tree_digests(tmp_path / "second") == expected


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "msi_prefect.cli", *args]


def test_reassembler_killed_mid_file_resumes_without_starting_over(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    size = 64 * 1024 * 1024
    expected = make_tree(tmp_path / "src", {"run/big.bin": size})
    send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", ["run/big.bin"])
    dest = tmp_path / "dest"
    common = [
        "--topic", topic, "--bootstrap", kafka_stack.bootstrap_servers,
        "--group", f"kill-{topic}", "--session-timeout-ms", str(TEST_SESSION_TIMEOUT_MS),
    ]  # fmt: skip
    victim = subprocess.Popen(_cli("reconstruct", str(dest), *common), stdout=subprocess.PIPE)
    db = dest / ".msi-state" / "progress.sqlite"
    counts_sql = "SELECT received_count, chunk_count FROM progress"
    wait_until(
        lambda: any(0 < n < c // 2 for n, c in sqlite_rows(db, counts_sql)),
        "the first chunks to be recorded",
        KILL_WAIT_S,
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    received_before = sqlite_rows(db, counts_sql)[0]
    assert received_before[0] < received_before[1]

    survivor = subprocess.run(
        _cli("reconstruct", str(dest), *common, "--stop-after-files", "1", "--idle-timeout", "60"),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "reconstructed run/big.bin" in survivor.stdout
    assert tree_digests(dest) == expected
    written = int(survivor.stdout.rsplit(", ", 1)[1].split()[0])
    assert written < size, "the restart rewrote the whole file instead of resuming"


def test_uploader_killed_mid_file_resends_only_what_was_not_acknowledged(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    expected = make_tree(src, {"a-small.txt": 100, "b-big.bin": 96 * 1024 * 1024})
    registry = tmp_path / "reg.sqlite"
    upload = _cli(
        "upload", str(src / "a-small.txt"), str(src / "b-big.bin"), "--topic", topic,
        "--bootstrap", kafka_stack.bootstrap_servers, "--registry", str(registry),
        "--chunk-size", str(256 * 1024),
    )  # fmt: skip
    victim = subprocess.Popen(upload, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(
        lambda: (
            ("b-big.bin", "sending") in sqlite_rows(registry, "SELECT relpath, state FROM files")
            and ("a-small.txt", "sent") in sqlite_rows(registry, "SELECT relpath, state FROM files")
        ),
        "the small file to be sent and the big one to be in flight",
        KILL_WAIT_S,
    )
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)

    again = subprocess.run(upload, capture_output=True, text=True, timeout=300, check=True)
    assert "1 already-sent" in again.stdout and "1 sent" in again.stdout
    states = dict(sqlite_rows(registry, "SELECT relpath, generation FROM files"))
    assert states == {"a-small.txt": 1, "b-big.bin": 1}  # the retry reused the generation

    dest = tmp_path / "dest"
    rebuilt = Reassembler(
        KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers),
        ReassemblerSettings(
            topic=topic,
            destination=str(dest),
            group_id=f"after-kill-{topic}",
            session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        ),
    )
    rebuilt.run(None, StopConditions(stop_after_files=2, idle_timeout_s=60))
    assert tree_digests(dest) == {k: v for k, v in expected.items()}
    assert rebuilt.stats.files_rejected == 0
    assert hashlib.sha256((dest / "b-big.bin").read_bytes()).hexdigest() == expected["b-big.bin"]
