"""Directory watcher: when a file is ready, and that it is reported exactly once per version.

Most tests drive ``DirectoryWatcher.poll_ready`` with explicit times, either on a fake
filesystem or on a real temporary directory, so they run in milliseconds. Two tests run the
real loop with watchdog / polling and a 0.3 s window.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from msi_prefect.transfer.filters import FileFilter
from msi_prefect.transfer.registry import FileIdentity
from msi_prefect.transfer.watcher import (
    DirectoryWatcher,
    EntryKind,
    FileSeen,
    FileStat,
    ReadyFile,
    ScanProblem,
    WatchCounts,
    WatchSettings,
)

WATCHER_LOG = "msi_prefect.transfer.watcher"


@dataclass
class FakeFS:
    """In-memory FileSystemView: files, their stats, and injected failures."""

    entries: dict[str, FileStat] = field(default_factory=dict)
    unreadable: dict[str, OSError] = field(default_factory=dict)
    stat_errors: dict[str, OSError] = field(default_factory=dict)
    unlistable_dirs: dict[str, OSError] = field(default_factory=dict)
    stat_calls: list[str] = field(default_factory=list)
    read_checks: list[str] = field(default_factory=list)
    _next_inode: int = 1000
    _tick: int = 1_700_000_000_000_000_000

    def _stamp(self) -> int:
        self._tick += 1_000_000
        return self._tick

    def write(self, relpath: str, size: int) -> None:
        """Create or modify in place: new size and mtime, same inode."""
        old = self.entries.get(relpath)
        inode = old.inode if old else self._new_inode()
        now = self._stamp()
        self.entries[relpath] = FileStat(size, now, inode, now, EntryKind.FILE)

    def replace_file(self, relpath: str, size: int, mtime_ns: int) -> None:
        """Atomic replace by rename: new inode, caller-chosen size and mtime."""
        self.entries[relpath] = FileStat(
            size, mtime_ns, self._new_inode(), self._stamp(), EntryKind.FILE
        )

    def chmod(self, relpath: str) -> None:
        """Only ctime changes, as with chmod."""
        self.entries[relpath] = replace(self.entries[relpath], ctime_ns=self._stamp())

    def add(self, relpath: str, kind: EntryKind) -> None:
        self.entries[relpath] = FileStat(0, self._stamp(), self._new_inode(), 0, kind)

    def remove(self, relpath: str) -> None:
        del self.entries[relpath]

    def _new_inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _unlistable(self, relpath: str) -> bool:
        return any(relpath.startswith(d + "/") for d in self.unlistable_dirs)

    def walk(self, accept: Callable[[str], bool]) -> Iterator[FileSeen | ScanProblem]:
        for reldir, error in self.unlistable_dirs.items():
            yield ScanProblem(reldir, EntryKind.DIRECTORY, error)
        for relpath, info in sorted(self.entries.items()):
            if info.kind is not EntryKind.FILE or self._unlistable(relpath):
                continue
            if not accept(relpath):
                continue
            if relpath in self.stat_errors:
                yield ScanProblem(relpath, EntryKind.FILE, self.stat_errors[relpath])
                continue
            self.stat_calls.append(relpath)
            yield FileSeen(relpath, info)

    def stat(self, relpath: str) -> FileStat:
        self.stat_calls.append(relpath)
        if relpath in self.stat_errors:
            raise self.stat_errors[relpath]
        if self._unlistable(relpath):
            raise PermissionError(errno.EACCES, "Permission denied", relpath)
        try:
            return self.entries[relpath]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "No such file", relpath) from None

    def check_readable(self, relpath: str) -> None:
        self.read_checks.append(relpath)
        if relpath in self.unreadable:
            raise self.unreadable[relpath]


def fake_watcher(fs: FakeFS, **overrides: object) -> DirectoryWatcher:
    """Window 2 s and polling every 1 s unless overridden."""
    options: dict[str, object] = {"stability_window_s": 2.0, "poll_interval_s": 1.0}
    options.update(overrides)
    settings = WatchSettings(root=Path("/watched"), **options)  # type: ignore[arg-type]
    return DirectoryWatcher(settings, fs=fs)


def drive(
    watcher: DirectoryWatcher, start: float, stop: float, step: float = 0.25
) -> list[tuple[float, ReadyFile]]:
    """Call poll_ready at start, start+step, ... up to stop; return (time, file) reports."""
    reports: list[tuple[float, ReadyFile]] = []
    ticks = round((stop - start) / step)
    for i in range(ticks + 1):
        now = start + i * step
        reports.extend((now, ready) for ready in watcher.poll_ready(now))
    return reports


def names(reports: list[tuple[float, ReadyFile]]) -> list[str]:
    return [ready.relpath for _, ready in reports]


PERMISSION_DENIED = PermissionError(errno.EACCES, "Permission denied")


# -- the stability rule ----------------------------------------------------------------------


def test_new_file_is_ready_one_window_after_it_was_seen_and_only_once() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs)
    assert watcher.poll_ready(0.0) == []  # initial scan: empty
    fs.write("a.dat", 10)
    assert drive(watcher, 0.25, 2.75) == []  # seen by the scan at t=1.0, window until 3.0
    reports = drive(watcher, 3.0, 30.0)
    assert [(t, r.relpath, r.size) for t, r in reports] == [(3.0, "a.dat", 10)]
    ready = reports[0][1]
    assert ready.path == Path("/watched/a.dat")
    assert ready.identity == FileIdentity(
        10, fs.entries["a.dat"].mtime_ns, fs.entries["a.dat"].inode
    )
    assert watcher.counts().candidates == 0
    assert watcher.counts().reported == 1


def test_growing_file_is_never_ready_while_it_grows_and_once_after_it_stops() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    reports: list[tuple[float, ReadyFile]] = []
    last_write = 0.0
    for i in range(40):  # poll every 0.25 s, write every 1.5 s (< the 2 s window) until t=9
        now = 0.25 * (i + 1)
        if now <= 9.0 and now % 1.5 == 0:
            fs.write("run.log.dat", int(now * 100))
            last_write = now
        reports.extend((now, r) for r in watcher.poll_ready(now))
    assert reports == []
    reports = drive(watcher, 10.25, 30.0)
    assert len(reports) == 1
    when, ready = reports[0]
    assert ready.size == 900
    # Seen by the next scan after the last write, then one full window of quiet.
    assert last_write + 2.0 <= when <= last_write + 2.0 + 1.0 + 0.25


def test_change_missed_by_every_look_is_caught_by_the_final_stat() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs, poll_interval_s=100.0)
    watcher.poll_ready(0.0)
    fs.write("a.dat", 1)
    watcher.nudge("a.dat")
    assert watcher.poll_ready(0.1) == []  # candidate since 0.1
    fs.write("a.dat", 2)  # no event, no scan sees this
    assert watcher.poll_ready(2.1) == []  # the due re-stat finds a new version: window restarts
    assert watcher.poll_ready(4.0) == []
    assert [r.size for r in watcher.poll_ready(4.2)] == [2]


def test_nudges_make_latency_one_window_not_window_plus_poll() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs, poll_interval_s=100.0)
    watcher.poll_ready(0.0)
    fs.write("evented.dat", 1)
    fs.write("silent.dat", 1)
    watcher.nudge("evented.dat")
    reports = drive(watcher, 5.0, 50.0)
    assert [(t, r.relpath) for t, r in reports] == [(7.0, "evented.dat")]
    # The polling fallback finds the other one at the next scan (t=100) + the window.
    assert [(t, r.relpath) for t, r in drive(watcher, 100.0, 103.0)] == [(102.0, "silent.dat")]


def test_reported_file_is_reported_again_only_when_its_identity_changes() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    fs.write("a.dat", 5)
    assert names(drive(watcher, 1.0, 10.0)) == ["a.dat"]
    fs.chmod("a.dat")  # ctime only: same version
    watcher.nudge("a.dat")
    assert drive(watcher, 10.25, 20.0) == []
    fs.write("a.dat", 7)  # rewritten: a new version
    again = drive(watcher, 20.25, 30.0)
    assert [r.size for _, r in again] == [7]
    old = fs.entries["a.dat"]
    fs.replace_file("a.dat", old.size, old.mtime_ns)  # same size and mtime, new inode
    assert [r.inode for _, r in drive(watcher, 30.25, 40.0)] == [fs.entries["a.dat"].inode]


def test_file_deleted_before_ready_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=WATCHER_LOG)
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    fs.write("gone.dat", 3)
    watcher.poll_ready(1.0)
    assert watcher.counts().candidates == 1
    fs.remove("gone.dat")
    assert drive(watcher, 1.25, 10.0) == []
    assert watcher.counts().candidates == 0
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert "gone.dat disappeared before it became ready" in caplog.text


def test_deleted_files_are_forgotten_so_memory_follows_the_disk() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    for i in range(200):
        fs.write(f"d/{i}.dat", i)
    assert len(drive(watcher, 1.0, 4.0)) == 200
    assert watcher.counts().reported == 200
    for i in range(200):
        fs.remove(f"d/{i}.dat")
    watcher.poll_ready(5.0)
    assert watcher.counts() == WatchCounts(candidates=0, reported=0, unreadable=0)


# -- files present at start --------------------------------------------------------------------


def test_existing_files_are_seen_but_not_reported_until_they_change() -> None:
    fs = FakeFS()
    fs.write("old.dat", 1)
    watcher = fake_watcher(fs)
    assert drive(watcher, 0.0, 10.0) == []
    assert watcher.counts().reported == 1  # remembered as seen
    fs.write("old.dat", 2)
    assert [r.size for _, r in drive(watcher, 10.25, 20.0)] == [2]


def test_include_existing_reports_files_present_at_start_once_stable() -> None:
    fs = FakeFS()
    fs.write("old.dat", 1)
    fs.write("sub/older.dat", 1)
    watcher = fake_watcher(fs, include_existing=True)
    reports = drive(watcher, 0.0, 10.0)
    assert sorted(names(reports)) == ["old.dat", "sub/older.dat"]
    assert {t for t, _ in reports} == {2.0}


# -- unreadable paths --------------------------------------------------------------------------


def test_unreadable_file_warns_once_and_is_retried_only_after_its_stat_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=WATCHER_LOG)
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    fs.write("locked.dat", 4)
    fs.unreadable["locked.dat"] = PERMISSION_DENIED
    assert drive(watcher, 1.0, 30.0) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "locked.dat" in warnings[0].getMessage()
    assert fs.read_checks == ["locked.dat"]  # no tight retry loop
    assert watcher.counts().unreadable == 1
    del fs.unreadable["locked.dat"]
    fs.chmod("locked.dat")  # the fix changes ctime
    reports = drive(watcher, 30.25, 40.0)
    assert names(reports) == ["locked.dat"]
    assert watcher.counts().unreadable == 0
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_unreadable_file_is_retried_quietly_after_the_retry_period() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs, unreadable_retry_s=10.0)
    watcher.poll_ready(0.0)
    fs.write("locked.dat", 4)
    fs.unreadable["locked.dat"] = PERMISSION_DENIED
    drive(watcher, 1.0, 12.75)
    assert fs.read_checks == ["locked.dat"]  # failed at 3.0, next try not before 13.0
    drive(watcher, 13.0, 15.0)
    assert fs.read_checks == ["locked.dat", "locked.dat"]  # tried again at 15.0 (13 + window)
    del fs.unreadable["locked.dat"]  # e.g. the user was added to the right group
    assert names(drive(watcher, 15.25, 40.0)) == ["locked.dat"]


def test_file_that_cannot_be_stat_ed_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=WATCHER_LOG)
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    fs.write("odd.dat", 1)
    fs.stat_errors["odd.dat"] = OSError(errno.EIO, "I/O error")
    assert drive(watcher, 1.0, 20.0) == []
    assert len(caplog.records) == 1
    assert "odd.dat" in caplog.records[0].getMessage()
    del fs.stat_errors["odd.dat"]
    # A stat that works again is a change: a candidate, ready one window after the next scan.
    assert [(t, r.relpath) for t, r in drive(watcher, 20.25, 30.0)] == [(23.0, "odd.dat")]
    assert len(caplog.records) == 1


def test_unlistable_directory_warns_once_and_does_not_forget_its_files(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=WATCHER_LOG)
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    fs.write("sub/a.dat", 1)
    assert names(drive(watcher, 1.0, 4.0)) == ["sub/a.dat"]
    fs.unlistable_dirs["sub"] = PERMISSION_DENIED
    assert drive(watcher, 4.25, 10.0) == []
    assert len(caplog.records) == 1
    assert "sub" in caplog.records[0].getMessage()
    assert watcher.counts().reported == 1
    del fs.unlistable_dirs["sub"]
    assert drive(watcher, 10.25, 20.0) == []  # listing again: not a new file


# -- what is considered at all ---------------------------------------------------------------


def test_excluded_files_are_never_stat_ed_or_reported() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs, filter=FileFilter(include=("*.dat",)))
    watcher.poll_ready(0.0)
    fs.write("x.log", 1)
    fs.write("y.dat", 1)
    fs.write(".msi-state/registry.dat", 1)  # default exclude
    watcher.nudge("x.log")
    assert names(drive(watcher, 1.0, 10.0)) == ["y.dat"]
    assert "x.log" not in fs.stat_calls
    assert ".msi-state/registry.dat" not in fs.stat_calls


@pytest.mark.parametrize("kind", [EntryKind.DIRECTORY, EntryKind.SYMLINK, EntryKind.OTHER])
def test_nudged_non_files_are_never_reported(kind: EntryKind) -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    fs.add("thing", kind)
    watcher.nudge("thing")
    assert drive(watcher, 0.25, 10.0) == []
    assert watcher.counts().candidates == 0


def test_candidate_replaced_by_a_directory_is_dropped() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs)
    watcher.poll_ready(0.0)
    fs.write("x", 1)
    watcher.poll_ready(1.0)
    fs.remove("x")
    fs.add("x", EntryKind.DIRECTORY)
    assert drive(watcher, 1.25, 10.0) == []
    assert watcher.counts().candidates == 0


# -- the loop's plumbing ------------------------------------------------------------------------


def test_sleep_is_bounded_by_the_wake_interval_and_the_next_deadline() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs, stability_window_s=2.0, poll_interval_s=10.0)
    assert watcher.settings.wake_interval_s == 0.5
    assert watcher.seconds_until_next_check(0.0) == 0.0  # initial scan pending
    watcher.poll_ready(0.0)
    assert watcher.seconds_until_next_check(0.0) == 0.5
    fs.write("a.dat", 1)
    watcher.nudge("a.dat")
    watcher.poll_ready(1.0)
    assert watcher.seconds_until_next_check(2.8) == pytest.approx(0.2)  # due at 3.0


def test_event_storm_is_capped_by_one_full_scan() -> None:
    fs = FakeFS()
    watcher = fake_watcher(fs, poll_interval_s=1000.0)
    watcher.poll_ready(0.0)
    fs.write("late.dat", 1)
    for i in range(20_000):
        watcher.nudge(f"noise/{i}")
    fs.stat_calls.clear()
    watcher.poll_ready(1.0)
    assert len(fs.stat_calls) < 100  # a full scan instead of 20,000 stats
    assert watcher.counts().candidates == 1


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="stability_window_s"):
        WatchSettings(root=Path("."), stability_window_s=0)
    with pytest.raises(ValueError, match="poll_interval_s"):
        WatchSettings(root=Path("."), poll_interval_s=-1)
    assert WatchSettings(root="x").root == Path("x")  # type: ignore[arg-type]


def test_run_rejects_a_missing_root(tmp_path: Path) -> None:
    watcher = DirectoryWatcher(WatchSettings(root=tmp_path / "nope"))
    with pytest.raises(NotADirectoryError, match="nope"):
        watcher.run(lambda _: None, threading.Event())


def test_run_forgets_undelivered_files_when_the_callback_fails(tmp_path: Path) -> None:
    fs = FakeFS()
    fs.write("a.dat", 1)
    fs.write("b.dat", 1)
    fake_now = iter(float(i) for i in range(10_000))
    # Windows of milliseconds keep the real waits of run() short; the fake clock jumps 1 s.
    settings = WatchSettings(
        root=tmp_path,  # run() checks that the root exists; the fake FS is what is read
        stability_window_s=0.004,
        poll_interval_s=0.004,
        include_existing=True,
        use_native_events=False,
    )
    watcher = DirectoryWatcher(settings, fs=fs, clock=lambda: next(fake_now))
    with pytest.raises(RuntimeError, match="broker down"):
        watcher.run(_fail_on("a.dat"), threading.Event())
    delivered: list[str] = []
    stop = threading.Event()

    def collect(ready: ReadyFile) -> None:
        delivered.append(ready.relpath)
        if len(delivered) == 2:
            stop.set()

    watcher.run(collect, stop)
    assert sorted(delivered) == ["a.dat", "b.dat"]


def _fail_on(relpath: str) -> Callable[[ReadyFile], None]:
    def on_ready(ready: ReadyFile) -> None:
        if ready.relpath == relpath:
            raise RuntimeError("broker down")

    return on_ready


# -- a real directory, explicit times ----------------------------------------------------------


def local_watcher(root: Path, **overrides: object) -> DirectoryWatcher:
    options: dict[str, object] = {"stability_window_s": 2.0, "poll_interval_s": 1.0}
    options.update(overrides)
    return DirectoryWatcher(WatchSettings(root=root, **options))  # type: ignore[arg-type]


def test_subdirectories_are_walked_and_relpaths_keep_them(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    watcher = local_watcher(tmp_path)
    watcher.poll_ready(0.0)
    (tmp_path / "sub" / "dir").mkdir()  # created after start
    (tmp_path / "sub" / "dir" / "f.dat").write_bytes(b"12345")
    (tmp_path / "top.dat").write_bytes(b"1")
    (tmp_path / "sub" / "empty-dir").mkdir()
    reports = drive(watcher, 1.0, 5.0)
    assert sorted(names(reports)) == ["sub/dir/f.dat", "top.dat"]
    nested = next(r for _, r in reports if r.relpath == "sub/dir/f.dat")
    assert nested.path == tmp_path / "sub" / "dir" / "f.dat"
    info = os.stat(nested.path)
    assert (nested.size, nested.mtime_ns, nested.inode) == (5, info.st_mtime_ns, info.st_ino)


@pytest.mark.parametrize("include_existing", [False, True])
def test_include_existing_on_a_real_directory(tmp_path: Path, include_existing: bool) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "old.dat").write_bytes(b"old")
    watcher = local_watcher(tmp_path, include_existing=include_existing)
    watcher.poll_ready(0.0)
    (tmp_path / "new.dat").write_bytes(b"new")
    expected = ["a/old.dat", "new.dat"] if include_existing else ["new.dat"]
    assert sorted(names(drive(watcher, 1.0, 10.0))) == expected


def test_symlinks_are_ignored_unless_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.dat").write_bytes(b"t")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.dat").symlink_to(outside / "target.dat")
    (root / "linkdir").symlink_to(outside)
    (root / "loop").symlink_to(root)  # must not hang when followed
    (root / "dangling").symlink_to(tmp_path / "missing")

    plain = local_watcher(root, include_existing=True)
    assert drive(plain, 0.0, 5.0) == []

    followed = local_watcher(root, include_existing=True, follow_symlinks=True)
    # "loop" leads back to the root, which is already being walked: not entered.
    assert sorted(names(drive(followed, 0.0, 5.0))) == ["link.dat", "linkdir/target.dat"]


def test_default_excludes_on_a_real_directory(tmp_path: Path) -> None:
    watcher = local_watcher(tmp_path)
    watcher.poll_ready(0.0)
    (tmp_path / ".msi-state").mkdir()
    (tmp_path / ".msi-state" / "registry.sqlite").write_bytes(b"x")
    (tmp_path / "copy.tmp").write_bytes(b"x")
    (tmp_path / "data.h5").write_bytes(b"x")
    assert names(drive(watcher, 1.0, 5.0)) == ["data.h5"]


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root can open a chmod 000 file, so it is not unreadable (the fake-FS tests cover it)",
)
def test_chmod_000_file_warns_once_then_is_reported_after_chmod(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=WATCHER_LOG)
    watcher = local_watcher(tmp_path)
    watcher.poll_ready(0.0)
    locked = tmp_path / "locked.dat"
    locked.write_bytes(b"secret")
    locked.chmod(0)
    try:
        assert drive(watcher, 1.0, 20.0) == []
        assert len(caplog.records) == 1
        assert "locked.dat" in caplog.records[0].getMessage()
    finally:
        locked.chmod(0o644)
    assert names(drive(watcher, 20.25, 30.0)) == ["locked.dat"]
    assert len(caplog.records) == 1


# -- real time -----------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Collects reports from run() with the time they arrived."""

    reports: list[tuple[float, ReadyFile]] = field(default_factory=list)

    def __call__(self, ready: ReadyFile) -> None:
        self.reports.append((time.monotonic(), ready))

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.reports) < count and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture
def running() -> Iterator[Callable[[WatchSettings], tuple[DirectoryWatcher, Recorder]]]:
    threads: list[tuple[threading.Thread, threading.Event]] = []

    def start(settings: WatchSettings) -> tuple[DirectoryWatcher, Recorder]:
        watcher = DirectoryWatcher(settings)
        recorder = Recorder()
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(recorder, stop), daemon=True)
        thread.start()
        threads.append((thread, stop))
        return watcher, recorder

    yield start
    for thread, stop in threads:
        stop.set()
        thread.join(5)
        assert not thread.is_alive()


def _write_slowly(path: Path, pieces: int, pause: float) -> float:
    """Append in pieces with pauses; return the monotonic time right after the last write."""
    with path.open("wb") as handle:
        for i in range(pieces):
            if i:
                time.sleep(pause)
            handle.write(b"x" * 1000)
            handle.flush()
            last = time.monotonic()
    return last


def test_native_events_report_a_slow_write_once_within_window_plus_half_a_second(
    tmp_path: Path,
    running: Callable[[WatchSettings], tuple[DirectoryWatcher, Recorder]],
) -> None:
    window = 0.3
    # Polling every 30 s: only watchdog events can make the latency this short.
    settings = WatchSettings(root=tmp_path, stability_window_s=window, poll_interval_s=30.0)
    _, recorder = running(settings)
    time.sleep(0.2)  # the initial scan and the inotify watches

    last_write = _write_slowly(tmp_path / "slow.dat", pieces=6, pause=0.2)  # pauses < window
    (tmp_path / "gone.dat").write_bytes(b"short-lived")
    time.sleep(0.05)
    (tmp_path / "gone.dat").unlink()
    recorder.wait_for(1, timeout=5)
    time.sleep(window + 0.3)  # room for a wrong second report

    assert [(r.relpath, r.size) for _, r in recorder.reports] == [("slow.dat", 6000)]
    latency = recorder.reports[0][0] - last_write
    assert window - 0.02 <= latency <= window + 0.5

    # A rewrite after the report is a new version: reported again, once.
    rewritten = time.monotonic()
    (tmp_path / "slow.dat").write_bytes(b"y" * 10)
    recorder.wait_for(2, timeout=5)
    time.sleep(window + 0.2)
    assert [(r.relpath, r.size) for _, r in recorder.reports] == [
        ("slow.dat", 6000),
        ("slow.dat", 10),
    ]
    assert recorder.reports[1][0] - rewritten <= window + 0.5


def test_polling_alone_finds_new_files_in_new_subdirectories(
    tmp_path: Path,
    running: Callable[[WatchSettings], tuple[DirectoryWatcher, Recorder]],
) -> None:
    (tmp_path / "old.dat").write_bytes(b"present at start")
    settings = WatchSettings(
        root=tmp_path, stability_window_s=0.3, poll_interval_s=0.1, use_native_events=False
    )
    _, recorder = running(settings)
    time.sleep(0.2)
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    last_write = _write_slowly(tmp_path / "sub" / "dir" / "f.dat", pieces=4, pause=0.2)
    recorder.wait_for(1, timeout=5)
    time.sleep(0.5)
    assert [r.relpath for _, r in recorder.reports] == ["sub/dir/f.dat"]
    assert recorder.reports[0][1].size == 4000
    # Polling adds up to one poll interval (and a wake-up) to the window.
    assert 0.3 - 0.02 <= recorder.reports[0][0] - last_write <= 0.3 + 0.1 + 0.5
