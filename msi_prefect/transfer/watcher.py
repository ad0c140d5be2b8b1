"""Decide *when* a file in a watched directory is ready to upload.

A file is ready once its identity, ``(size, mtime_ns, inode)``, has stayed the same for
``stability_window_s`` seconds, measured from the last time the watcher *saw* it change and
confirmed by a fresh ``stat`` at the end of the window. Watching "3 s of silence from
watchdog" instead (OpenMSIStream) uploads slowly written files many times.

How changes are seen:

* A full polling scan (:func:`os.scandir`, recursive, one directory at a time) runs every
  ``poll_interval_s``, always, because network shares often deliver no inotify events.
* With ``use_native_events``, watchdog events only *nudge* the watcher to re-``stat`` the
  named path right away, so a file is reported about one stability window after its last
  write instead of a window plus a poll interval. New or moved directories trigger an early
  full scan (their files may have arrived before any watch existed).

Rules (see :class:`DirectoryWatcher` for the details):

* A file that keeps changing (a growing log) is never ready until it stops changing.
* A reported file is not reported again unless its identity changes afterwards; then it is a
  candidate again and is reported once more when stable (the producer's registry decides
  what a new generation is).
* A file deleted before it becomes ready is dropped silently (debug log).
* A file that cannot be read is reported once as a warning, then left alone until its
  ``stat`` (including ``ctime``, so ``chmod`` counts) changes or ``unreadable_retry_s``
  passes; retries that fail the same way only log at debug level.
* Directories, symlinks (unless ``follow_symlinks``) and special files are never reported.
* Files present at the initial scan are "seen" but not reported unless ``include_existing``.
  "Present" means found by that scan: a file created while the watcher starts may count as
  existing. A later change to any of them makes it a candidate.

Known limits: a same-size rewrite that also keeps ``mtime_ns`` and the inode is invisible
(filesystems with coarse timestamps, such as FAT's 2 s, make that likelier); a share that is
unmounted and remounted looks like every file was deleted and recreated, so its files are
reported again (the registry recognises unchanged versions).

Memory: only candidates, a compact ``relpath -> identity`` map of files already reported (or
present at start), and the few unreadable paths are kept. Entries are dropped when their
file is gone, so memory follows the number of files on disk, not the number ever seen. A
full scan costs one ``stat`` per included file: raise ``poll_interval_s`` for huge trees.
"""

from __future__ import annotations

import enum
import heapq
import logging
import os
import stat as stat_mode
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from msi_prefect.transfer.filters import FileFilter
from msi_prefect.transfer.registry import FileIdentity, SkippedFile, SkipReason

logger = logging.getLogger(__name__)

# Smallest pause between two passes of `run`: a file written thousands of times a second
# sends as many events, and each pass re-stats; 20 ms keeps that cheap and latency low.
_MIN_PASS_GAP_S: Final = 0.02
# How often `run` checks its stop event while it waits for events or deadlines.
_STOP_CHECK_S: Final = 0.1
# Beyond this many distinct nudged paths per pass, one full scan is cheaper than a set
# that grows with an event storm.
_MAX_PENDING_NUDGES: Final = 10_000
_OBSERVER_JOIN_TIMEOUT_S: Final = 5.0
# Reading the file is not needed to know we may: opening it is enough, and O_NONBLOCK
# keeps a FIFO swapped in after the stat from blocking us.
_READ_CHECK_FLAGS: Final = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
# Paths whose skip was told, kept to tell each (path, reason) once. When full, new skips
# are not told until the next reset (at most hourly, which also forgets deleted files):
# a folder of many excluded files costs no steady stream of re-told skips.
_MAX_SKIPS_TOLD: Final = 10_000
_SKIPS_TOLD_RESET_S: Final = 3600.0
# A path that vanished, or one of whose parents is no longer a directory.
_GONE_ERRORS: Final = (FileNotFoundError, NotADirectoryError)


@dataclass(frozen=True)
class WatchSettings:
    """How a directory is watched.

    Attributes:
        root: The watched directory; reported paths are relative to it.
        filter: Which files are considered at all.
        stability_window_s: How long a file's size, mtime and inode must stay unchanged.
        poll_interval_s: Period of the full polling scan, which always runs.
        use_native_events: Also use watchdog (inotify, FSEvents, ...) to notice changes
            sooner; polling stays on because network shares often send no events.
        include_existing: Report files already present at start (once stable) instead of
            only files created or changed afterwards.
        follow_symlinks: Report symlinked files and descend into symlinked directories
            (loops are skipped). Off: symlinks are ignored entirely.
        unreadable_retry_s: How long an unreadable file whose stat does not change is left
            alone before it is tried again (quietly). Covers permissions granted without a
            ``chmod`` of the file itself (group membership, ACLs, a Windows share lock).
        existing_needs_upload: With ``include_existing`` off, still treat an existing file
            as a candidate when this returns True for its relpath and stat. The producer
            passes its registry here, so files that changed, or whose send was cut short,
            while the watcher was down are sent after all.
        on_skipped: Told once per file and reason when a file is skipped: excluded by
            the filter (seen by a scan), changed again within its stability window, or
            unreadable. Runs on the watcher's thread, so it must be quick (the watch loop
            queues it for the registry).
    """

    root: Path
    filter: FileFilter = field(default_factory=FileFilter)
    stability_window_s: float = 2.0
    poll_interval_s: float = 1.0
    use_native_events: bool = True
    include_existing: bool = False
    follow_symlinks: bool = False
    unreadable_retry_s: float = 60.0
    existing_needs_upload: Callable[[str, FileStat], bool] | None = None
    on_skipped: Callable[[SkippedFile], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        for name in ("stability_window_s", "poll_interval_s", "unreadable_retry_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"WatchSettings.{name} must be > 0, got {value!r}")

    @property
    def wake_interval_s(self) -> float:
        """Longest sleep of the watcher loop: ``min(poll_interval, stability_window / 4)``."""
        return min(self.poll_interval_s, self.stability_window_s / 4)


@dataclass(frozen=True)
class ReadyFile:
    """A file that has stopped changing and can be uploaded.

    Attributes:
        path: Absolute path on this machine.
        relpath: Path relative to the watched root, POSIX separators (``sub/dir/f.dat``).
        size: Size in bytes when it was found stable.
        mtime_ns: Modification time in nanoseconds.
        inode: Inode number (file id on Windows).
    """

    path: Path
    relpath: str
    size: int
    mtime_ns: int
    inode: int

    @property
    def identity(self) -> FileIdentity:
        """The version of the file that was found stable, as the registry records it."""
        return FileIdentity(size=self.size, mtime_ns=self.mtime_ns, inode=self.inode)


class EntryKind(enum.StrEnum):
    """What a path is, as far as the watcher cares."""

    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"
    """FIFOs, sockets, devices: never opened, never reported."""


@dataclass(frozen=True, slots=True)
class FileStat:
    """The part of a ``stat`` result the watcher uses.

    Attributes:
        size: Size in bytes.
        mtime_ns: Modification time in nanoseconds.
        inode: Inode number.
        ctime_ns: Status change time; changes on ``chmod`` too, so an unreadable file is
            tried again after its permissions change.
        kind: Regular file, directory, symlink or other.
    """

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int
    kind: EntryKind

    @classmethod
    def from_os(cls, result: os.stat_result) -> FileStat:
        """Convert an :func:`os.stat` / :func:`os.lstat` result."""
        mode = result.st_mode
        if stat_mode.S_ISREG(mode):
            kind = EntryKind.FILE
        elif stat_mode.S_ISDIR(mode):
            kind = EntryKind.DIRECTORY
        elif stat_mode.S_ISLNK(mode):
            kind = EntryKind.SYMLINK
        else:
            kind = EntryKind.OTHER
        return cls(result.st_size, result.st_mtime_ns, result.st_ino, result.st_ctime_ns, kind)

    @property
    def identity(self) -> FileIdentity:
        """Size, mtime and inode: what must stay unchanged for a file to be ready."""
        return FileIdentity(size=self.size, mtime_ns=self.mtime_ns, inode=self.inode)


@dataclass(frozen=True, slots=True)
class FileSeen:
    """A walk found an included regular file.

    Attributes:
        relpath: Relative POSIX path.
        stat: Its stat at that moment.
    """

    relpath: str
    stat: FileStat


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """A walk could not list a directory or stat a file.

    Attributes:
        relpath: Relative POSIX path (``"."`` for the root itself).
        kind: ``DIRECTORY`` when a listing failed, ``FILE`` when a stat failed.
        error: The error.
    """

    relpath: str
    kind: EntryKind
    error: OSError


class FileSystemView(Protocol):
    """What the watcher needs from a filesystem; tests substitute a fake."""

    def walk(self, accept: Callable[[str], bool]) -> Iterator[FileSeen | ScanProblem]:
        """Yield every regular file under the root whose relpath ``accept`` allows.

        ``accept`` is called before the file is stat-ed, so excluded files cost no ``stat``.
        Paths that vanish during the walk are skipped silently.
        """
        ...

    def stat(self, relpath: str) -> FileStat:
        """Stat one path (not following a final symlink unless the view follows links).

        Raises:
            OSError: ``FileNotFoundError`` when it is gone, others when it is unreachable.
        """
        ...

    def check_readable(self, relpath: str) -> None:
        """Raise ``OSError`` unless the file can be opened for reading."""
        ...


@dataclass(frozen=True, slots=True)
class _DirChain:
    """Identity of a directory and its ancestors: symlink loop detection in O(depth)."""

    dev: int
    ino: int
    parent: _DirChain | None

    def contains(self, dev: int, ino: int) -> bool:
        node: _DirChain | None = self
        while node is not None:
            if node.dev == dev and node.ino == ino:
                return True
            node = node.parent
        return False


class LocalFileSystem:
    """:class:`FileSystemView` of a local (or mounted network) directory."""

    def __init__(self, root: Path, *, follow_symlinks: bool = False) -> None:
        """Create a view.

        Args:
            root: Directory whose files are walked.
            follow_symlinks: Report symlinked files and descend into symlinked directories.
        """
        self._root = os.fspath(root)
        self._follow = follow_symlinks

    def _abspath(self, relpath: str) -> str:
        return os.path.join(self._root, *relpath.split("/"))

    def stat(self, relpath: str) -> FileStat:
        """See :meth:`FileSystemView.stat`."""
        return FileStat.from_os(os.stat(self._abspath(relpath), follow_symlinks=self._follow))

    def check_readable(self, relpath: str) -> None:
        """See :meth:`FileSystemView.check_readable`."""
        os.close(os.open(self._abspath(relpath), _READ_CHECK_FLAGS))

    def walk(self, accept: Callable[[str], bool]) -> Iterator[FileSeen | ScanProblem]:
        """See :meth:`FileSystemView.walk`. Depth-first; one open directory at a time."""
        chain: _DirChain | None = None
        if self._follow:
            try:
                top = os.stat(self._root)
            except OSError as exc:
                yield ScanProblem(".", EntryKind.DIRECTORY, exc)
                return
            chain = _DirChain(top.st_dev, top.st_ino, None)
        pending: list[tuple[str, _DirChain | None]] = [("", chain)]
        while pending:
            reldir, chain = pending.pop()
            try:
                with os.scandir(self._abspath(reldir) if reldir else self._root) as entries:
                    for entry in entries:
                        relpath = f"{reldir}/{entry.name}" if reldir else entry.name
                        yield from self._visit(entry, relpath, chain, pending, accept)
            except _GONE_ERRORS:
                continue  # removed while we walked: the sweep drops what it held
            except OSError as exc:
                yield ScanProblem(reldir or ".", EntryKind.DIRECTORY, exc)

    def _visit(
        self,
        entry: os.DirEntry[str],
        relpath: str,
        chain: _DirChain | None,
        pending: list[tuple[str, _DirChain | None]],
        accept: Callable[[str], bool],
    ) -> Iterator[FileSeen | ScanProblem]:
        try:
            if entry.is_symlink() and not self._follow:
                return
            if entry.is_dir(follow_symlinks=self._follow):
                if chain is None:
                    pending.append((relpath, None))
                    return
                info = entry.stat(follow_symlinks=True)
                if chain.contains(info.st_dev, info.st_ino):
                    logger.debug("Not descending into %s: symlink loop", relpath)
                    return
                pending.append((relpath, _DirChain(info.st_dev, info.st_ino, chain)))
            elif entry.is_file(follow_symlinks=self._follow) and accept(relpath):
                seen = FileStat.from_os(entry.stat(follow_symlinks=self._follow))
                yield FileSeen(relpath, seen)
        except _GONE_ERRORS:
            return  # deleted between listing and stat, or a dangling symlink
        except OSError as exc:
            yield ScanProblem(relpath, EntryKind.FILE, exc)


@dataclass(frozen=True)
class WatchCounts:
    """How much the watcher is holding, for logs, the CLI and memory checks.

    Attributes:
        candidates: Files waiting to become stable.
        reported: Files reported (or present at start) whose version is remembered.
        unreadable: Files that could not be read and wait for a change.
    """

    candidates: int
    reported: int
    unreadable: int


@dataclass(slots=True)
class _Candidate:
    identity: FileIdentity
    changed_at: float
    seq: int
    scan_id: int


@dataclass(slots=True)
class _Known:
    # One per file on disk: flat fields instead of a FileIdentity save ~80 bytes each.
    size: int
    mtime_ns: int
    inode: int
    scan_id: int

    @classmethod
    def of(cls, current: FileStat, scan_id: int) -> _Known:
        return cls(current.size, current.mtime_ns, current.inode, scan_id)

    def same_version(self, current: FileStat) -> bool:
        return (self.size, self.mtime_ns, self.inode) == (
            current.size,
            current.mtime_ns,
            current.inode,
        )


@dataclass(slots=True)
class _Unreadable:
    # None when not even a stat worked.
    identity: FileIdentity | None
    ctime_ns: int | None
    retry_at: float
    scan_id: int


class DirectoryWatcher:
    """Watch a directory tree and report each file once it has stopped changing.

    The core is :meth:`poll_ready`, a single pass driven by an explicit ``now`` (monotonic
    seconds); :meth:`run` is the blocking loop around it with watchdog events.

    Latency after a file's last write: about ``stability_window_s`` plus a few tens of
    milliseconds with native events; at most ``stability_window_s + poll_interval_s`` plus
    one wake-up when only polling sees the change (network shares).
    """

    def __init__(
        self,
        settings: WatchSettings,
        *,
        fs: FileSystemView | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a watcher; nothing is read before the first pass.

        Args:
            settings: What to watch and how.
            fs: Filesystem access; a :class:`LocalFileSystem` of ``settings.root`` by default.
            clock: Monotonic seconds, used by :meth:`run` only.
        """
        self._settings = settings
        self._root = Path(os.path.abspath(settings.root))
        self._fs: FileSystemView = fs or LocalFileSystem(
            self._root, follow_symlinks=settings.follow_symlinks
        )
        self._clock = clock
        self._window = settings.stability_window_s
        self._candidates: dict[str, _Candidate] = {}
        # Min-heap of (due time, candidate seq, relpath); entries of dropped candidates are
        # skipped when they surface, so the heap never needs searching.
        self._due: list[tuple[float, int, str]] = []
        self._known: dict[str, _Known] = {}
        self._unreadable: dict[str, _Unreadable] = {}
        self._dir_problems: dict[str, str] = {}
        self._skips_told: dict[str, SkipReason] = {}
        self._skips_told_reset_at = clock()
        self._seq = 0
        self._scan_id = 0
        self._next_scan_at: float | None = None  # None until the initial scan ran
        self._lock = threading.Lock()
        self._nudges: set[str] = set()
        self._scan_requested = False
        self._wakeup = threading.Event()

    @property
    def settings(self) -> WatchSettings:
        """The settings this watcher was made with."""
        return self._settings

    @property
    def root(self) -> Path:
        """Absolute path of the watched root."""
        return self._root

    def counts(self) -> WatchCounts:
        """How many paths the watcher currently remembers, by kind."""
        return WatchCounts(len(self._candidates), len(self._known), len(self._unreadable))

    def nudge(self, relpath: str) -> None:
        """Ask for ``relpath`` to be re-stat-ed at the next pass (thread-safe).

        Args:
            relpath: Relative POSIX path under the root.
        """
        with self._lock:
            if self._scan_requested:
                pass  # the pending full scan looks at every path anyway
            elif len(self._nudges) >= _MAX_PENDING_NUDGES:
                self._nudges.clear()
                self._scan_requested = True
            else:
                self._nudges.add(relpath)
        self._wakeup.set()

    def request_scan(self) -> None:
        """Ask for a full scan at the next pass (thread-safe)."""
        with self._lock:
            self._scan_requested = True
        self._wakeup.set()

    def seconds_until_next_check(self, now: float) -> float:
        """How long :meth:`run` may sleep before the next pass has something to do.

        Never more than ``settings.wake_interval_s``; 0 before the initial scan.
        """
        if self._next_scan_at is None:
            return 0.0
        deadline = min(self._next_scan_at, now + self._settings.wake_interval_s)
        if self._due:
            deadline = min(deadline, self._due[0][0])
        return max(0.0, deadline - now)

    def poll_ready(self, now: float) -> list[ReadyFile]:
        """Run one pass and return the files that became ready in it.

        A pass re-stats nudged paths, runs the full scan when it is due (or requested; the
        very first pass always runs the initial scan), then re-stats every candidate whose
        window has elapsed: an unchanged, readable one is ready.

        Args:
            now: Monotonic time in seconds; must not go backwards between calls.

        Returns:
            Ready files, earliest deadline first. Each is remembered as reported.
        """
        with self._lock:
            nudges, self._nudges = self._nudges, set()
            scan_requested, self._scan_requested = self._scan_requested, False
        if self._next_scan_at is None:
            # The initial scan decides what "existing" means; nudges add nothing to it.
            self._full_scan(now, initial=True)
        else:
            for relpath in nudges:
                self._recheck(relpath, now)
            if scan_requested or now >= self._next_scan_at:
                self._full_scan(now, initial=False)
        return self._collect_ready(now)

    def run(self, on_ready: Callable[[ReadyFile], None], stop: threading.Event) -> None:
        """Watch until ``stop`` is set, calling ``on_ready`` for each ready file (blocking).

        ``on_ready`` runs on this thread. If it raises, the files of that pass not yet
        delivered are forgotten (they will be found and reported again) and the exception
        propagates. ``stop`` is noticed within about 0.1 s.

        Args:
            on_ready: Receives each ready file once per version.
            stop: Set it (from any thread) to return.

        Raises:
            NotADirectoryError: The root is not an existing directory.
        """
        if not self._root.is_dir():
            raise NotADirectoryError(f"Watched root {self._root} is not an existing directory")
        # Started before the initial scan so no change falls between the two.
        observer = self._start_observer() if self._settings.use_native_events else None
        try:
            while not stop.is_set():
                self._wakeup.clear()
                self._deliver(self.poll_ready(self._clock()), on_ready)
                delay = self.seconds_until_next_check(self._clock())
                # Always pause a little, so an event storm or a slow scan cannot spin the loop.
                if stop.wait(_MIN_PASS_GAP_S):
                    break
                waited = _MIN_PASS_GAP_S
                while waited < delay and not stop.is_set():
                    step = min(delay - waited, _STOP_CHECK_S)
                    if self._wakeup.wait(step):
                        break
                    waited += step
        finally:
            if observer is not None:
                observer.stop()
                observer.join(_OBSERVER_JOIN_TIMEOUT_S)

    # -- internals -------------------------------------------------------------------------

    def _deliver(self, batch: list[ReadyFile], on_ready: Callable[[ReadyFile], None]) -> None:
        for index, ready in enumerate(batch):
            try:
                on_ready(ready)
            except BaseException:
                # Not delivered, so not reported: the next scan finds them as new candidates.
                for undelivered in batch[index:]:
                    self._known.pop(undelivered.relpath, None)
                raise

    def _start_observer(self) -> BaseObserver | None:
        observer = Observer()
        observer.schedule(
            _EventNudger(self),
            os.fspath(self._root),
            recursive=True,
            follow_symlink=self._settings.follow_symlinks,
        )
        try:
            observer.start()
        except OSError as exc:
            # e.g. the inotify watch limit: polling still finds everything, only later.
            logger.warning(
                "Native file events unavailable for %s (%s); polling only.", self._root, exc
            )
            return None
        return observer

    def _full_scan(self, now: float, *, initial: bool) -> None:
        self._scan_id += 1
        scan_id = self._scan_id
        baseline = initial and not self._settings.include_existing
        dir_problems: dict[str, str] = {}
        telling = self._settings.on_skipped is not None
        accept = self._accept if telling else self._settings.filter.matches
        for item in self._fs.walk(accept):
            if isinstance(item, ScanProblem):
                if item.kind is EntryKind.DIRECTORY:
                    dir_problems[item.relpath] = str(item.error)
                else:
                    self._stat_failed(item.relpath, item.error, now, scan_id)
            elif baseline and not self._existing_needs_upload(item):
                if item.stat.kind is EntryKind.FILE:
                    self._known[item.relpath] = _Known.of(item.stat, scan_id)
            else:
                self._observe(item.relpath, item.stat, now, scan_id)
        self._report_dir_problems(dir_problems)
        if not initial:
            self._sweep(scan_id, now)
        self._next_scan_at = now + self._settings.poll_interval_s

    def _accept(self, relpath: str) -> bool:
        """The filter, telling ``on_skipped`` about each excluded file once."""
        if self._settings.filter.matches(relpath):
            return True
        if self._should_tell(relpath, SkipReason.EXCLUDED):
            self._tell_skipped(relpath, SkipReason.EXCLUDED, self._settings.filter.explain(relpath))
        return False

    def _should_tell(self, relpath: str, reason: SkipReason) -> bool:
        if self._settings.on_skipped is None or self._skips_told.get(relpath) is reason:
            return False
        if len(self._skips_told) < _MAX_SKIPS_TOLD:
            return True
        now = self._clock()
        if now - self._skips_told_reset_at < _SKIPS_TOLD_RESET_S:
            return False
        self._skips_told.clear()
        self._skips_told_reset_at = now
        return True

    def _tell_skipped(self, relpath: str, reason: SkipReason, detail: str) -> None:
        on_skipped = self._settings.on_skipped
        if on_skipped is None or not self._should_tell(relpath, reason):
            return
        self._skips_told[relpath] = reason
        on_skipped(SkippedFile(relpath, reason, detail, time.time()))

    def _tell_changing(self, relpath: str) -> None:
        if self._should_tell(relpath, SkipReason.STILL_CHANGING):
            self._tell_skipped(
                relpath,
                SkipReason.STILL_CHANGING,
                f"changed within its stability window ({self._window:g} s); sent once it "
                "stops changing",
            )

    def _existing_needs_upload(self, item: FileSeen) -> bool:
        check = self._settings.existing_needs_upload
        return (
            check is not None
            and item.stat.kind is EntryKind.FILE
            and check(item.relpath, item.stat)
        )

    def _recheck(self, relpath: str, now: float) -> None:
        """Re-stat one nudged path."""
        if not relpath or relpath.startswith("/") or not self._settings.filter.matches(relpath):
            return
        try:
            current = self._fs.stat(relpath)
        except _GONE_ERRORS:
            self._forget_missing(relpath)
            return
        except OSError as exc:
            self._stat_failed(relpath, exc, now, self._scan_id)
            return
        self._observe(relpath, current, now, self._scan_id)

    def _observe(self, relpath: str, current: FileStat, now: float, scan_id: int) -> None:
        """Fold one stat of an included path into the state."""
        if current.kind is not EntryKind.FILE:
            # Replaced by a directory, a symlink or a FIFO: nothing to upload under this name.
            self._forget_missing(relpath)
            return
        identity = current.identity
        candidate = self._candidates.get(relpath)
        if candidate is not None:
            candidate.scan_id = scan_id
            if candidate.identity != identity:
                # Its heap entry is moved on lazily when it surfaces.
                candidate.identity = identity
                candidate.changed_at = now
                self._tell_changing(relpath)
            return
        known = self._known.get(relpath)
        if known is not None:
            known.scan_id = scan_id
            if known.same_version(current):
                return
            del self._known[relpath]
            logger.debug("%s changed after it was reported; watching it again", relpath)
        unreadable = self._unreadable.get(relpath)
        if unreadable is not None:
            unreadable.scan_id = scan_id
            unchanged = unreadable.identity == identity and unreadable.ctime_ns == current.ctime_ns
            if unchanged and now < unreadable.retry_at:
                return
            # Kept until the file is read successfully, so an unchanged failure is not
            # warned about twice.
        self._seq += 1
        self._candidates[relpath] = _Candidate(identity, now, self._seq, scan_id)
        heapq.heappush(self._due, (now + self._window, self._seq, relpath))

    def _collect_ready(self, now: float) -> list[ReadyFile]:
        ready: list[ReadyFile] = []
        while self._due and self._due[0][0] <= now:
            _, seq, relpath = heapq.heappop(self._due)
            candidate = self._candidates.get(relpath)
            if candidate is None or candidate.seq != seq:
                continue  # dropped or replaced since it was scheduled
            due_at = candidate.changed_at + self._window
            if due_at > now:
                heapq.heappush(self._due, (due_at, seq, relpath))
                continue
            found = self._confirm(relpath, candidate, now)
            if found is not None:
                ready.append(found)
        return ready

    def _confirm(self, relpath: str, candidate: _Candidate, now: float) -> ReadyFile | None:
        """Final stat and read check of a candidate whose window elapsed."""
        try:
            current = self._fs.stat(relpath)
        except _GONE_ERRORS:
            self._forget_missing(relpath)
            return None
        except OSError as exc:
            del self._candidates[relpath]
            self._stat_failed(relpath, exc, now, candidate.scan_id)
            return None
        if current.kind is not EntryKind.FILE:
            self._forget_missing(relpath)
            return None
        if current.identity != candidate.identity:
            # Changed after the last time we looked: the window starts again now.
            self._tell_changing(relpath)
            candidate.identity = current.identity
            candidate.changed_at = now
            heapq.heappush(self._due, (now + self._window, candidate.seq, relpath))
            return None
        try:
            self._fs.check_readable(relpath)
        except _GONE_ERRORS:
            self._forget_missing(relpath)
            return None
        except OSError as exc:
            del self._candidates[relpath]
            self._note_unreadable(relpath, current, exc, now, candidate.scan_id)
            return None
        del self._candidates[relpath]
        self._skips_told.pop(relpath, None)
        if self._unreadable.pop(relpath, None) is not None:
            logger.info("%s is readable now", relpath)
        self._known[relpath] = _Known.of(current, candidate.scan_id)
        return ReadyFile(
            path=self._root.joinpath(*relpath.split("/")),
            relpath=relpath,
            size=current.size,
            mtime_ns=current.mtime_ns,
            inode=current.inode,
        )

    def _stat_failed(self, relpath: str, error: OSError, now: float, scan_id: int) -> None:
        previous = self._unreadable.get(relpath)
        if previous is not None and previous.identity is None and now < previous.retry_at:
            previous.scan_id = scan_id  # the failing stat is the (cheap) retry; stay quiet
            return
        self._candidates.pop(relpath, None)
        self._note_unreadable(relpath, None, error, now, scan_id)

    def _note_unreadable(
        self, relpath: str, current: FileStat | None, error: OSError, now: float, scan_id: int
    ) -> None:
        identity = current.identity if current is not None else None
        ctime_ns = current.ctime_ns if current is not None else None
        previous = self._unreadable.get(relpath)
        retry_s = self._settings.unreadable_retry_s
        if previous is not None and (previous.identity, previous.ctime_ns) == (identity, ctime_ns):
            logger.debug("Still cannot read %s: %s", relpath, error)
        else:
            logger.warning(
                "Cannot read %s (%s); skipping it until it changes (or for %.0f s).",
                relpath,
                error,
                retry_s,
            )
            self._tell_skipped(relpath, SkipReason.UNREADABLE, str(error))
        self._unreadable[relpath] = _Unreadable(identity, ctime_ns, now + retry_s, scan_id)

    def _forget_missing(self, relpath: str) -> None:
        if self._candidates.pop(relpath, None) is not None:
            logger.debug("%s disappeared before it became ready; dropped", relpath)
        self._skips_told.pop(relpath, None)
        self._known.pop(relpath, None)
        self._unreadable.pop(relpath, None)

    def _sweep(self, scan_id: int, now: float) -> None:
        """Drop state of files the scan did not see, once a stat confirms they are gone."""
        unseen = {rel for rel, c in self._candidates.items() if c.scan_id != scan_id}
        unseen.update(rel for rel, k in self._known.items() if k.scan_id != scan_id)
        unseen.update(rel for rel, u in self._unreadable.items() if u.scan_id != scan_id)
        for relpath in unseen:
            # A stat, not the missing listing, decides: an unreadable directory or a flaky
            # share must not make us forget (and later re-report) everything below it.
            try:
                current = self._fs.stat(relpath)
            except _GONE_ERRORS:
                self._forget_missing(relpath)
                continue
            except OSError:
                continue
            self._observe(relpath, current, now, scan_id)

    def _report_dir_problems(self, problems: dict[str, str]) -> None:
        for reldir, message in problems.items():
            if self._dir_problems.get(reldir) != message:
                logger.warning(
                    "Cannot list directory %s (%s); its files are skipped until it can be read.",
                    reldir,
                    message,
                )
        for reldir in self._dir_problems.keys() - problems.keys():
            logger.info("Directory %s can be listed again", reldir)
        self._dir_problems = problems


class _EventNudger(FileSystemEventHandler):
    """Turns watchdog events into nudges; runs on watchdog's thread."""

    def __init__(self, watcher: DirectoryWatcher) -> None:
        super().__init__()
        self._watcher = watcher
        self._prefix = os.path.join(os.fspath(watcher.root), "")

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Opens and read-only closes change nothing (and our own read check makes them).
        if event.event_type in (EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE):
            return
        if event.is_directory:
            # A directory's "modified" only means an entry inside changed: its file has
            # an event of its own. Created or moved directories may hold files that
            # arrived before any watch existed.
            if event.event_type != EVENT_TYPE_MODIFIED:
                self._watcher.request_scan()
            return
        for raw in (event.src_path, event.dest_path):
            relpath = self._relpath(os.fsdecode(raw)) if raw else None
            if relpath:
                self._watcher.nudge(relpath)

    def _relpath(self, path: str) -> str | None:
        if not path.startswith(self._prefix):
            return None
        relpath = path[len(self._prefix) :]
        return relpath.replace(os.sep, "/") if os.sep != "/" else relpath
