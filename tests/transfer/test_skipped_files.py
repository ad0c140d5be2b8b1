"""The watcher's skip reasons: told once per file and reason, kept small in the registry."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from msi_prefect.transfer.filters import FileFilter
from msi_prefect.transfer.registry import (
    MAX_SKIPPED_FILES,
    Registry,
    SkippedFile,
    SkipReason,
)
from msi_prefect.transfer.watch_loop import SkipBuffer
from msi_prefect.transfer.watcher import DirectoryWatcher, WatchSettings
from tests.transfer.test_watcher import FakeFS


def _watcher(fs: FakeFS, told: list[SkippedFile], **options: object) -> DirectoryWatcher:
    settings = WatchSettings(
        root=Path("/watched"),
        stability_window_s=2.0,
        poll_interval_s=1.0,
        include_existing=True,
        on_skipped=told.append,
        **options,  # type: ignore[arg-type]
    )
    return DirectoryWatcher(settings, fs=fs)


def test_each_reason_is_told_once_per_file() -> None:
    fs = FakeFS()
    told: list[SkippedFile] = []
    watcher = _watcher(fs, told, filter=FileFilter(exclude=("*.log",)))
    fs.write("run.log", 10)
    fs.write("growing.dat", 1)
    fs.write("locked.dat", 5)
    fs.unreadable["locked.dat"] = PermissionError(errno.EACCES, "Permission denied")
    watcher.poll_ready(0.0)
    for step in range(1, 6):  # growing.dat keeps growing; every scan sees run.log again
        fs.write("growing.dat", step + 1)
        watcher.poll_ready(step * 1.0)
    watcher.poll_ready(10.0)
    reasons = {(s.relpath, s.reason) for s in told}
    assert reasons == {
        ("run.log", SkipReason.EXCLUDED),
        ("growing.dat", SkipReason.STILL_CHANGING),
        ("locked.dat", SkipReason.UNREADABLE),
    }
    assert len(told) == 3
    excluded = next(s for s in told if s.reason is SkipReason.EXCLUDED)
    assert "exclude glob '*.log'" in excluded.detail
    assert "Permission denied" in next(s for s in told if s.reason is SkipReason.UNREADABLE).detail


def test_a_file_that_settles_and_changes_again_is_told_again() -> None:
    fs = FakeFS()
    told: list[SkippedFile] = []
    watcher = _watcher(fs, told)
    fs.write("a.dat", 1)
    watcher.poll_ready(0.0)
    fs.write("a.dat", 2)
    watcher.poll_ready(1.0)
    assert [r.relpath for r in watcher.poll_ready(3.5)] == ["a.dat"]  # settled and reported
    fs.write("a.dat", 3)
    watcher.poll_ready(4.5)  # the next scan: a new version, a candidate again
    fs.write("a.dat", 4)
    watcher.poll_ready(5.5)
    assert [s.reason for s in told] == [SkipReason.STILL_CHANGING] * 2


def test_the_registry_keeps_the_newest_skips_and_hides_files_sent_since(tmp_path: Path) -> None:
    times = iter([100.0, 200.0, 300.0])
    with Registry(tmp_path / "registry.sqlite", clock=lambda: next(times)) as registry:
        registry.record_skipped(
            "lab",
            [
                SkippedFile("run.log", SkipReason.EXCLUDED, "matches exclude glob", 50.0),
                SkippedFile("big.dat", SkipReason.STILL_CHANGING, "changed", 60.0),
            ],
        )
        # big.dat settles and is claimed after it was skipped: no longer listed.
        claim = registry.begin("lab", "big.dat", size=3, mtime_ns=1, inode=2)
        assert claim is not None
        assert [(r.topic, r.skipped.relpath, r.skipped.reason) for r in registry.skipped()] == [
            ("lab", "run.log", SkipReason.EXCLUDED)
        ]
        many = [
            SkippedFile(f"x{i:05d}.tmp", SkipReason.EXCLUDED, "default", 1000.0 + i)
            for i in range(MAX_SKIPPED_FILES + 5)
        ]
        registry.record_skipped("lab", many)
        kept = registry.skipped()
        assert len(kept) == MAX_SKIPPED_FILES
        assert "run.log" not in {r.skipped.relpath for r in kept}  # the oldest went


def test_the_buffer_is_bounded_and_flushes_into_the_registry(tmp_path: Path) -> None:
    buffer = SkipBuffer(limit=2)
    for name in ("a.tmp", "b.tmp", "c.tmp"):
        buffer.add(SkippedFile(name, SkipReason.EXCLUDED, "default", 1.0))
    assert buffer.dropped == 1
    with Registry(tmp_path / "registry.sqlite") as registry:
        buffer.flush(registry, "lab")
        buffer.flush(registry, "lab")  # nothing left: no change
        assert [r.skipped.relpath for r in registry.skipped()] == ["a.tmp", "b.tmp"]


def test_many_excluded_files_are_told_up_to_a_bound_then_again_after_the_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from msi_prefect.transfer import watcher as watcher_module

    monkeypatch.setattr(watcher_module, "_MAX_SKIPS_TOLD", 3)
    fs = FakeFS()
    told: list[SkippedFile] = []
    clock = [0.0]
    settings = WatchSettings(
        root=Path("/watched"), filter=FileFilter(exclude=("*.log",)), on_skipped=told.append
    )
    watcher = DirectoryWatcher(settings, fs=fs, clock=lambda: clock[0])
    for index in range(5):
        fs.write(f"run{index}.log", 1)
    watcher.poll_ready(0.0)
    watcher.poll_ready(1.0)  # the next scan tells nothing new: the bound holds
    assert len(told) == 3
    clock[0] = watcher_module._SKIPS_TOLD_RESET_S + 1
    watcher.poll_ready(2.0)
    # Forgotten once an hour: the files never told are told now, still within the bound.
    assert [s.relpath for s in told[3:]] == ["run3.log", "run4.log"]
