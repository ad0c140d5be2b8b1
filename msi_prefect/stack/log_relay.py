"""Copy a stack part's output into its log file, rotating it so the logs stay bounded.

The stack's parts (broker, S3 store, Prefect server, worker) run for months and write
whatever their libraries log. Each part's stdout and stderr go into a pipe whose reading
end is this small process: it appends what arrives to ``logs/<part>.log`` and, once that
file reaches its size limit, renames it to ``<part>.log.1`` (shifting older ones up to
``<part>.log.<backups>``, dropping the oldest) and starts a new one. So a part's logs take
at most ``(backups + 1) * max_bytes`` on disk, with no logrotate set-up.

It lives exactly as long as its part: it exits when the pipe closes, that is when the
part and every child that inherited its output (the worker's flow runs) have exited. It
ignores the signals that stop a part (the part's stop is what ends it, once the last lines
are written), and it never stops reading because a write failed (a full disk): a part
writing into a pipe nobody reads would block or die.

Run as ``python -m msi_prefect.stack.log_relay LOG_FILE [--max-bytes N] [--backups K]``;
it imports nothing but the standard library, so it starts in a few milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

#: Rotate a part's log when it reaches this size.
DEFAULT_MAX_LOG_BYTES = 20 * 1024 * 1024
#: Rotated logs kept beside the current one (``<part>.log.1`` is the newest).
DEFAULT_LOG_BACKUPS = 5
#: Bytes read from the pipe at a time.
READ_BYTES = 64 * 1024
#: The signals a part's stop sends to its process group: the relay outlives them to write
#: the part's last lines, then ends when the pipe closes.
IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class RotationPolicy:
    """How large one log file may grow and how many rotated ones are kept.

    Attributes:
        max_bytes: Size at which the current file is rotated (a file may exceed it by the
            last read, at most ``READ_BYTES``).
        backups: Rotated files kept; 0 keeps none (the file is emptied instead).
    """

    max_bytes: int = DEFAULT_MAX_LOG_BYTES
    backups: int = DEFAULT_LOG_BACKUPS

    def __post_init__(self) -> None:
        if self.max_bytes < READ_BYTES:
            raise ValueError(f"max_bytes must be at least {READ_BYTES}, got {self.max_bytes}")
        if self.backups < 0:
            raise ValueError(f"backups must be >= 0, got {self.backups}")


def rotated_name(log_file: Path, number: int) -> Path:
    """The path of the ``number``-th rotated log (1 is the newest)."""
    return log_file.with_name(f"{log_file.name}.{number}")


def log_files_oldest_first(log_file: Path, backups: int = DEFAULT_LOG_BACKUPS) -> list[Path]:
    """A part's log files that exist, the oldest rotated one first, the current one last.

    For readers of a whole run's log (the benchmarks count a server's warnings): lines that
    were rotated out are in the ``.N`` files.
    """
    rotated = [rotated_name(log_file, number) for number in range(backups, 0, -1)]
    return [path for path in (*rotated, log_file) if path.exists()]


class RotatingLog:
    """An append-only log file that rotates itself by size.

    Args:
        log_file: The current log file (created if missing, appended to if present).
        policy: Size limit and number of rotated files.
    """

    def __init__(self, log_file: Path, policy: RotationPolicy) -> None:
        self.log_file = log_file
        self.policy = policy
        self._fd: int | None = self._open()

    def _open(self) -> int:
        return os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, data: bytes) -> None:
        """Append ``data``, then rotate if the file reached its size limit.

        Raises:
            OSError: The write or the rotation failed (the caller drops the data).
        """
        if self._fd is None:  # an earlier failure closed it: open it again
            self._fd = self._open()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if os.fstat(self._fd).st_size >= self.policy.max_bytes:
            self.rotate()

    def rotate(self) -> None:
        """Shift the rotated files up by one, make the current one ``.1``, start anew."""
        self.close()
        if self.policy.backups == 0:
            os.truncate(self.log_file, 0)
        else:
            for number in range(self.policy.backups - 1, 0, -1):
                older = rotated_name(self.log_file, number)
                if older.exists():
                    older.replace(rotated_name(self.log_file, number + 1))
            self.log_file.replace(rotated_name(self.log_file, 1))
        self._fd = self._open()

    def close(self) -> None:
        """Close the current file; the next write opens it again."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def relay(source_fd: int, log: RotatingLog) -> int:
    """Copy ``source_fd`` into ``log`` until end of file; return the bytes dropped.

    A failed write (a full disk, a removed directory) drops that block and tries the next
    one on a freshly opened file, so the part writing into the pipe is never blocked.
    """
    dropped = 0
    while block := os.read(source_fd, READ_BYTES):
        try:
            log.write(block)
        except OSError:
            dropped += len(block)
            log.close()
    return dropped


def main(argv: list[str] | None = None) -> int:
    """Entry point: relay stdin into the log file named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_file", type=Path)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_LOG_BYTES)
    parser.add_argument("--backups", type=int, default=DEFAULT_LOG_BACKUPS)
    args = parser.parse_args(argv)
    try:
        policy = RotationPolicy(max_bytes=args.max_bytes, backups=args.backups)
    except ValueError as exc:
        parser.error(str(exc))
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    log = RotatingLog(args.log_file, policy)
    try:
        relay(sys.stdin.fileno(), log)
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
