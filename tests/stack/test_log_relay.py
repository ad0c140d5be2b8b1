"""The rotating log relay that bounds the stack parts' logs (no server needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msi_prefect.stack.log_relay import (
    READ_BYTES,
    RotatingLog,
    RotationPolicy,
    log_files_oldest_first,
    relay,
    rotated_name,
)
from msi_prefect.stack.processes import ManagedProcess, ProcessSpec, pid_alive

SMALL = RotationPolicy(max_bytes=READ_BYTES, backups=3)


def _lines(count: int, start: int = 0) -> bytes:
    return b"".join(b"line %08d of the part's output\n" % n for n in range(start, start + count))


def test_a_log_rotates_by_size_and_keeps_only_its_backups(tmp_path: Path) -> None:
    log_file = tmp_path / "part.log"
    written = _lines(20_000)  # 640 KiB: ten times the limit
    log = RotatingLog(log_file, SMALL)
    try:
        for start in range(0, len(written), 4096):
            log.write(written[start : start + 4096])
    finally:
        log.close()
    kept = sorted(path.name for path in tmp_path.iterdir())
    assert kept == ["part.log", "part.log.1", "part.log.2", "part.log.3"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size < SMALL.max_bytes + 4096
    # What is kept is the newest output, in order, without a gap.
    files = log_files_oldest_first(log_file, SMALL.backups)
    assert files == [rotated_name(log_file, n) for n in (3, 2, 1)] + [log_file]
    tail = b"".join(path.read_bytes() for path in files)
    assert written.endswith(tail)
    assert len(tail) >= SMALL.backups * SMALL.max_bytes


def test_no_backups_empties_the_file_instead(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "part.log", RotationPolicy(max_bytes=READ_BYTES, backups=0))
    try:
        log.write(b"x" * READ_BYTES)
        log.write(b"after\n")
    finally:
        log.close()
    assert [path.name for path in tmp_path.iterdir()] == ["part.log"]
    assert (tmp_path / "part.log").read_bytes() == b"after\n"


@pytest.mark.parametrize(
    ("max_bytes", "backups", "message"),
    [(100, 2, "max_bytes must be at least"), (READ_BYTES, -1, "backups must be >= 0")],
)
def test_a_policy_that_cannot_work_is_refused(max_bytes: int, backups: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RotationPolicy(max_bytes=max_bytes, backups=backups)


def test_a_full_disk_drops_output_but_the_relay_reads_on() -> None:
    """A relay that stopped reading would block the part on a full pipe."""
    log = RotatingLog(Path("/dev/full"), SMALL)  # every write fails with ENOSPC
    read_end, write_end = os.pipe()
    output = _lines(1000)
    os.write(write_end, output)  # 32 KiB: fits the pipe's buffer
    os.close(write_end)
    try:
        dropped = relay(read_end, log)
    finally:
        os.close(read_end)
        log.close()
    assert dropped == len(output)


def test_the_relay_process_outlives_a_stop_signal_and_ends_with_its_pipe(tmp_path: Path) -> None:
    log_file = tmp_path / "part.log"
    relay_process = subprocess.Popen(
        [sys.executable, "-m", "msi_prefect.stack.log_relay", str(log_file)],
        stdin=subprocess.PIPE,
    )
    assert relay_process.stdin is not None
    relay_process.stdin.write(b"before the signal\n")
    relay_process.stdin.flush()
    # Once the first line is in the file the relay is in its loop: its handlers are set.
    deadline = time.monotonic() + 30
    while not (log_file.exists() and log_file.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    relay_process.send_signal(signal.SIGTERM)
    relay_process.stdin.write(b"the part's last words\n")
    relay_process.stdin.close()
    assert relay_process.wait(timeout=10) == 0
    assert log_file.read_bytes() == b"before the signal\nthe part's last words\n"


def test_a_part_writes_through_its_relay_which_ends_with_the_part(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="talker",
        argv=[sys.executable, "-c", "import time; print('hello', flush=True); time.sleep(60)"],
        env={},
        ports={},
        cwd=tmp_path,
    )
    process = ManagedProcess(spec, tmp_path / "run", tmp_path / "logs")
    (tmp_path / "run").mkdir()
    process.start()
    record = process.read_pid()
    assert record is not None and record.log_relay_pid is not None
    try:
        process.wait_healthy(lambda: "hello" in process.log_file.read_text(), timeout_s=15)
    finally:
        assert process.stop(timeout_s=5)
    deadline = time.monotonic() + 10
    while pid_alive(record.log_relay_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(record.log_relay_pid)


def test_a_part_that_dies_at_start_shows_its_last_lines(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="crasher",
        argv=[sys.executable, "-c", "import sys; print('bad config: no port'); sys.exit(3)"],
        env={},
        ports={},
        cwd=tmp_path,
    )
    process = ManagedProcess(spec, tmp_path, tmp_path)
    process.start()
    with pytest.raises(Exception, match="bad config: no port"):
        process.wait_healthy(lambda: False, timeout_s=15)
