"""One rebuilder per work and staging folder (msi_prefect/transfer/work_lock.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.reassembler import Reassembler, ReassemblerSettings
from msi_prefect.transfer.work_lock import LOCK_FILE_NAME, FolderInUseError, FolderLock

NO_BROKER = KafkaConnection(bootstrap_servers="127.0.0.1:1")
HOLD_TIMEOUT_S = 30.0

# A child that takes the lock, says so, and holds it until killed.
HOLDER = """
import sys, time
from pathlib import Path
from msi_prefect.transfer.work_lock import FolderLock
lock = FolderLock(Path(sys.argv[1]), "work folder", "flow run 'rebuild on storage-2' (abc)")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_lock_on_a_folder_fails_naming_the_holder_until_it_is_released(
    tmp_path: Path,
) -> None:
    first = FolderLock(tmp_path, "work folder", "flow run 'rebuild on storage-1' (id-1)")
    with pytest.raises(FolderInUseError) as taken:
        FolderLock(tmp_path, "work folder", "the second")
    message = str(taken.value)
    assert f"the work folder {tmp_path} is in use by another rebuilder" in message
    assert f"flow run 'rebuild on storage-1' (id-1) (pid {os.getpid()} on " in message
    assert "give each its own work directory" in message
    first.release()
    first.release()  # idempotent
    FolderLock(tmp_path, "work folder").release()


def test_the_lock_of_a_killed_rebuilder_is_free_at_once(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        named = rf"rebuild on storage-2' \(abc\) \(pid {holder.pid} on "
        with pytest.raises(FolderInUseError, match=named):
            FolderLock(tmp_path, "work folder")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=HOLD_TIMEOUT_S)
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    lock = None
    while lock is None:  # the kernel drops the lock with the process
        try:
            lock = FolderLock(tmp_path, "work folder")
        except FolderInUseError:
            assert time.monotonic() < deadline, "the killed holder's lock was never freed"
            time.sleep(0.05)
    lock.release()
    assert (tmp_path / LOCK_FILE_NAME).exists()


def test_two_reassemblers_never_share_a_progress_store_or_a_staging_folder(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "dest"
    first = Reassembler(NO_BROKER, ReassemblerSettings(topic="t", destination=str(dest)))
    try:
        # The same destination: the same progress store (DEST/.msi-state).
        with pytest.raises(FolderInUseError, match=r"work folder .*/dest/\.msi-state is in use"):
            Reassembler(NO_BROKER, ReassemblerSettings(topic="t", destination=str(dest)))
        # Its own work folder, but a local destination stages in DEST/.msi-staging.
        with pytest.raises(FolderInUseError, match=r"the staging folder .*/dest/\.msi-staging"):
            Reassembler(
                NO_BROKER,
                ReassemblerSettings(topic="t", destination=str(dest), work_dir=tmp_path / "w2"),
            )
        # A remote destination stages below the work folder: only that is shared here.
        remote = ReassemblerSettings(
            topic="t", destination="s3://b/p", work_dir=dest / ".msi-state"
        )
        with pytest.raises(FolderInUseError, match="work folder"):
            Reassembler(NO_BROKER, remote)
    finally:
        first.close()
    # Closed (or killed): the next one takes over; a second close changes nothing.
    first.close()
    again = Reassembler(NO_BROKER, ReassemblerSettings(topic="t", destination=str(dest)))
    again.close()
