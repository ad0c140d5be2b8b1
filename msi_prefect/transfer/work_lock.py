"""One rebuilder per work and staging folder: an exclusive lock that names its holder.

Two rebuilders that share a progress store or a staging folder corrupt each other's
state: each believes the chunks the other recorded are its own, and both write staging
files of the same names (``FILE_ID.GENERATION.part``). A rebuilder therefore takes an
exclusive ``flock`` on a lock file in each folder it writes (its work folder, and its
staging folder when that lies elsewhere) for as long as it runs. The kernel drops the lock
when the process ends however it ends (``kill -9`` included), so a crash leaves nothing
to clean up. The holder writes who it is into the file (process, host, start, a label
such as a Prefect flow run's name), so a second rebuilder stops at once with an error
that names the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from msi_prefect.errors import MsiError

#: The lock file's name in a locked folder.
LOCK_FILE_NAME: Final = "rebuilder.lock"
#: At most this much of the holder's record is read back (it is a few hundred bytes).
MAX_RECORD_BYTES: Final = 4096
#: The default label's command line is cut to this many characters.
MAX_LABEL_CHARS: Final = 300


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder's lock, as the holder wrote it.

    Attributes:
        pid: The holder's process id.
        host: The machine it runs on.
        since: When it took the lock (seconds since the epoch).
        label: What it is (``msi-prefect reconstruct ...``, a flow run's name and id).
    """

    pid: int
    host: str
    since: float
    label: str

    def describe(self) -> str:
        """One line for an error message."""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"{self.label} (pid {self.pid} on {self.host}, since {started})"


def default_label() -> str:
    """This process's command line, shortened: what a user recognises in ``ps``."""
    return " ".join(sys.argv)[:MAX_LABEL_CHARS] or "a rebuilder"


class FolderInUseError(MsiError):
    """Another rebuilder holds the folder's lock."""


class FolderLock:
    """An exclusive lock on one folder, held until :meth:`release` (or the process ends).

    Args:
        folder: The folder to lock (it must exist).
        what: What the folder is, for the error (``work folder``, ``staging folder``).
        label: Who this rebuilder is, written for the one that finds the folder taken.

    Raises:
        FolderInUseError: Another process (or another rebuilder of this process) holds it.
        OSError: The lock file cannot be created.
    """

    def __init__(self, folder: Path, what: str, label: str | None = None) -> None:
        self.path = folder / LOCK_FILE_NAME
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            named = holder.describe() if holder else "a rebuilder that is still starting"
            raise FolderInUseError(
                f"the {what} {folder} is in use by another rebuilder: {named}. Two rebuilders "
                "must not share a progress store or a staging folder: give each its own work "
                "directory (--work-dir, or the work_dir parameter of reconstruct-files; a "
                "local destination stages in DEST/.msi-staging, so each needs its own "
                "destination folder)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        label = label or default_label()
        record = LockHolder(os.getpid(), socket.gethostname(), time.time(), label)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(record)).encode(), 0)

    def release(self) -> None:
        """Give the folder up (idempotent). The file stays: removing it would race a taker."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor drops the flock


def _read_holder(fd: int) -> LockHolder | None:
    """The record the holder wrote, or None while it has not written it yet."""
    try:
        data = json.loads(os.pread(fd, MAX_RECORD_BYTES, 0))
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["since"]),
                          str(data["label"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
