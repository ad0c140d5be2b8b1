"""`msi-prefect watch` as a user runs it: settled files go once; a restart misses nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from msi_prefect.transfer.watch_loop import TIMESTAMP_SLACK_NS
from tests.conftest import RunningStack
from tests.transfer_helpers import rebuild, sqlite_rows, tree_digests, wait_until

pytestmark = pytest.mark.stack

# Generous: the writer below pauses 0.2 s, and a loaded CI machine can stretch pauses.
WINDOW_S = "2.0"


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still running at the end is killed by its PID."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _watch(
    started: list[subprocess.Popen[str]],
    stack: RunningStack,
    topic: str,
    folder: Path,
    registry: Path,
    *extra: str,
) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "msi_prefect.cli", "watch", str(folder), "--topic", topic,
        "--bootstrap", stack.bootstrap_servers, "--registry", str(registry),
        "--stability-window", WINDOW_S, "--poll-interval", "0.5", *extra,
    ]  # fmt: skip
    # stderr to a file: a full pipe nobody reads would block the watcher.
    log = (folder.parent / "watch-stderr.log").open("a")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    started.append(process)
    return process


def _states(registry: Path) -> dict[str, tuple[str, int]]:
    rows = sqlite_rows(registry, "SELECT relpath, state, generation FROM files")
    return {relpath: (state, generation) for relpath, state, generation in rows}


def test_watch_sends_each_settled_file_once_and_catches_up_after_a_restart(
    kafka_stack: RunningStack,
    topic: str,
    tmp_path: Path,
    started: list[subprocess.Popen[str]],
) -> None:
    folder = tmp_path / "instrument"
    (folder / "sub").mkdir(parents=True)
    (folder / "old.dat").write_bytes(b"present before the first start: not sent")
    # Files up to TIMESTAMP_SLACK_NS older than the first start count as new; this one is not.
    time.sleep(TIMESTAMP_SLACK_NS / 1e9 + 0.2)
    registry = tmp_path / "registry.sqlite"

    first = _watch(started, kafka_stack, topic, folder, registry)
    wait_until(
        lambda: sqlite_rows(registry, "SELECT COUNT(*) FROM watched_folders") == [(1,)], "start"
    )
    (folder / "a.txt").write_text("first version")
    with (folder / "sub" / "slow.log").open("w") as slow:
        for piece in range(6):  # written in pieces with pauses shorter than the window
            slow.write(f"line {piece}\n")
            slow.flush()
            time.sleep(0.2)
    wait_until(
        lambda: (
            _states(registry).get("sub/slow.log") == ("sent", 1)
            and _states(registry).get("a.txt") == ("sent", 1)
        ),
        "both files to be sent",
    )
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 0
    assert out.count("sent sub/slow.log") == 1, out  # not re-sent while it was growing

    # While the watcher is down: one file changes, one appears.
    (folder / "a.txt").write_text("second version")
    (folder / "new.txt").write_text("created while the watcher was down")
    second = _watch(
        started, kafka_stack, topic, folder, registry, "--stop-after-files", "2",
        "--idle-timeout", "30",
    )  # fmt: skip
    second.communicate(timeout=120)
    assert second.returncode == 0
    assert _states(registry) == {
        "a.txt": ("sent", 2),
        "sub/slow.log": ("sent", 1),
        "new.txt": ("sent", 1),
    }

    dest = tmp_path / "dest"
    events, _ = rebuild(kafka_stack, topic, dest, files=4)
    assert [(e.relpath, e.generation) for e in events if e.relpath == "a.txt"] == [
        ("a.txt", 1),
        ("a.txt", 2),
    ]
    assert sorted(tree_digests(dest)) == ["a.txt", "new.txt", "sub/slow.log"]
    assert (dest / "a.txt").read_text() == "second version"
    assert (dest / "sub" / "slow.log").read_text() == "".join(f"line {i}\n" for i in range(6))


def test_watch_stops_with_an_error_when_its_folder_disappears(
    kafka_stack: RunningStack,
    topic: str,
    tmp_path: Path,
    started: list[subprocess.Popen[str]],
) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    watcher = _watch(started, kafka_stack, topic, folder, tmp_path / "registry.sqlite")
    wait_until(lambda: (tmp_path / "registry.sqlite").exists(), "start")
    folder.rmdir()
    watcher.wait(timeout=30)
    assert watcher.returncode == 1
    assert "is gone" in (tmp_path / "watch-stderr.log").read_text()
