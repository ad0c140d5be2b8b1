"""Helpers for tests that drive a whole ``msi-prefect up`` stack the way a lab does.

Files are dropped into the watched folder; the verdict comes only from what a user can
check: the rebuilt files on disk, the per-file events on the Prefect server
(``msi.file.reconstructed``, ``msi.file.backed-up``, ``msi.file.metadata-extracted``,
``msi.file.analyzed``) and the backup objects in the S3 store. Never from flow-run names:
how rebuilt files are dispatched to the downstream flows (a run per file, or batches) is
not what these tests judge.

Double backups are counted by the store itself: the tests turn on S3 versioning for the
backup bucket (SeaweedFS keeps every PUT as a version), so a file copied twice has two
versions even though the second copy overwrote the first and its ``backed-up`` event has
the same id (the server keeps one).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from msi_prefect.prefect_layer.event_queries import event_pages
from msi_prefect.prefect_layer.events import EventName
from msi_prefect.stack.components import Component
from msi_prefect.stack.config import BACKUP_BUCKET, StateDir, free_port_map
from msi_prefect.stack.manager import StackManager
from msi_prefect.stack.processes import flow_run_processes, live_flow_runs
from msi_prefect.stack.runs import TRANSFER_DEPLOYMENTS
from tests.flow_helpers import s3_client

#: The three downstream steps of a rebuilt file, each announced by its own event.
DONE_EVENTS = (EventName.BACKED_UP, EventName.METADATA_EXTRACTED, EventName.ANALYZED)
FILE_EVENTS = (EventName.RECONSTRUCTED, *DONE_EVENTS)
# The embedded server on SQLite answers slowly while many flow runs start.
API_TIMEOUT_S = 30.0
#: The states a flow run ends in.
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# Reading every event costs the busy server too: not more often than this.
EVENT_POLL_S = 3.0
KIB = 1024
MIB = 1024 * KIB


# A CLI command, `up` included: about a minute on a quiet machine, over 5 when two stacks
# start at once on a machine shared with other work (load average 15-20).
CLI_TIMEOUT_S = 600


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msi_prefect.cli", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def kill_everything(state_dir: Path, api: str) -> None:
    """SIGKILL every process of the stack at once, as a power cut would.

    That is the servers, the worker with its warm server, and every flow-run process: the
    launchers and the children forked for them, all of which carry the stack's API URL.
    """
    manager = StackManager.open(StateDir(state_dir))
    victims = {record.pid for c in Component if (record := manager.process(c).read_pid())}
    wanted = f"PREFECT_API_URL={api}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    victims.add(int(entry.name))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass
class UserStack:
    """A private embedded stack driven through the CLI (``up``, ``down``), as a user does.

    Attributes:
        root: Folder holding ``state/``, ``inbox/`` (watched) and ``received/``.
        ports: The stack's loopback ports, by server name.
    """

    root: Path
    ports: dict[str, int]

    @property
    def state_dir(self) -> Path:
        """The stack's state directory."""
        return self.root / "state"

    @property
    def inbox(self) -> Path:
        """The watched folder."""
        return self.root / "inbox"

    @property
    def received(self) -> Path:
        """Where the rebuilt files go."""
        return self.root / "received"

    @property
    def api(self) -> str:
        """The Prefect API URL."""
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    def manager(self) -> StackManager:
        """A stack manager on the state directory (reads the PID files)."""
        return StackManager.open(StateDir(self.state_dir))

    def up(self, *args: str) -> float:
        """``msi-prefect up``; return how long it took.

        Raises:
            AssertionError: ``up`` failed (with its output).
        """
        started = time.monotonic()
        result = cli(self.state_dir, "up", *args)
        self._log("up", result.stdout + result.stderr)
        assert result.returncode == 0, result.stdout + result.stderr
        return time.monotonic() - started

    def down(self) -> float:
        """``msi-prefect down``; return how long it took.

        Raises:
            AssertionError: ``down`` failed (with its output).
        """
        started = time.monotonic()
        result = cli(self.state_dir, "down")
        self._log("down", result.stdout + result.stderr)
        assert result.returncode == 0, result.stdout + result.stderr
        return time.monotonic() - started

    def _log(self, command: str, output: str) -> None:
        """Keep what ``up`` and ``down`` said, for a run that needs explaining."""
        with (self.root / "cli.log").open("a") as log:
            log.write(f"--- {command} at {time.strftime('%H:%M:%S')}\n{output}\n")

    def s3(self) -> Any:
        """A boto3 S3 client on the stack's store."""
        return s3_client(self.manager().client_env())

    def pid(self, component: Component) -> int | None:
        """The PID of a part of the stack, or None when it is not running."""
        record = self.manager().process(component).read_pid()
        return record.pid if record and pid_alive(record.pid) else None


@contextlib.contextmanager
def user_stack(root: Path, *up_args: str) -> Iterator[UserStack]:
    """Start a private stack on free ports with ``msi-prefect up``; stop it by PID after.

    The broker keeps its topics in the S3 store (the default, durable storage): a power
    cut must not lose what the broker acknowledged. The backup bucket gets versioning, so
    that :func:`backup_versions` sees every copy ever stored.

    Args:
        root: An empty folder for the stack's state, inbox and destination.
        up_args: More ``up`` options.
    """
    ports = free_port_map()
    port_args = [arg for name, port in ports.items() for arg in ("--port", f"{name}={port}")]
    stack = UserStack(root, ports)
    try:
        stack.up(*port_args, *up_args)
        stack.s3().put_bucket_versioning(
            Bucket=BACKUP_BUCKET, VersioningConfiguration={"Status": "Enabled"}
        )
        yield stack
    finally:
        stopped, said = False, "`down` did not finish"
        try:
            down = cli(stack.state_dir, "down")
            stopped, said = down.returncode == 0, down.stdout + down.stderr
        finally:
            # `down` stops every process it knows by PID; if it could not (a test left the
            # stack half-dead, or the test's timeout cut `down` short on a busy machine),
            # kill what is left of this stack by PID, as a power cut would.
            leftovers = flow_run_processes(stack.api)
            if not stopped or leftovers:
                kill_everything(stack.state_dir, stack.api)
    # Only when the test passed: a failure in it stays the error reported.
    assert stopped, said
    assert leftovers == []


# ------------------------------------------------------------------------------- files in


def workload(prefix: str, count: int, seed: int, large_every: int = 10) -> dict[str, int]:
    """``count`` file names and sizes: mostly 2-64 KiB, every ``large_every``-th 1-3 MiB.

    The large ones take long enough to send and rebuild that a fault can land mid-file.
    """
    rng = random.Random(seed)
    sizes = {}
    for i in range(count):
        large = large_every and i % large_every == large_every - 1
        size = rng.randint(1 * MIB, 3 * MIB) if large else rng.randint(2 * KIB, 64 * KIB)
        sizes[f"{prefix}-{i:04d}.bin"] = size
    return sizes


class FileDropper:
    """Drops files into the watched folder, as an instrument does, and remembers them.

    Each file is written beside the folder and renamed in (a file appears whole). The
    steady drops run in a thread of their own, so files keep arriving while the test
    kills, stops and starts the stack.

    Args:
        inbox: The watched folder.
        staging: A folder outside it, on the same file system.
        seed: Seed of the file contents.
    """

    def __init__(self, inbox: Path, staging: Path, seed: int = 0) -> None:
        self.inbox = inbox
        self.staging = staging
        staging.mkdir(parents=True, exist_ok=True)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._plan_only = threading.Event()
        self._thread: threading.Thread | None = None
        self.sha256: dict[str, str] = {}
        self.dropped_at: dict[str, float] = {}

    def drop(self, name: str, size: int) -> None:
        """Drop one file now."""
        data = self._rng.randbytes(size)
        temp = self.staging / f".{name}.tmp"
        temp.write_bytes(data)
        os.replace(temp, self.inbox / name)
        with self._lock:
            self.sha256[name] = hashlib.sha256(data).hexdigest()
            self.dropped_at[name] = time.time()

    def drop_all(self, sizes: dict[str, int]) -> None:
        """Drop files now, one after the other (a burst)."""
        for name, size in sizes.items():
            self.drop(name, size)

    def start(self, sizes: dict[str, int], rate: float, more: str | None = None) -> None:
        """Drop ``sizes`` at ``rate`` files per second in the background.

        Args:
            sizes: name -> size of the files, in the order to drop them.
            rate: Files per second.
            more: Once ``sizes`` are all dropped, keep dropping small files named
                ``<more>-NNNN.bin`` at the same rate until :meth:`wait`
                (files keep arriving however long the test's faults take).
        """

        def run() -> None:
            plan = iter(sizes.items())
            next_at = time.monotonic()
            extra = 0
            while True:
                item = next(plan, None)
                if item is None:
                    if more is None or self._plan_only.is_set():
                        return
                    item = (f"{more}-{extra:04d}.bin", self._rng.randint(2 * KIB, 64 * KIB))
                    extra += 1
                time.sleep(max(0.0, next_at - time.monotonic()))
                self.drop(*item)
                next_at += 1.0 / rate

        self._plan_only.clear()
        self._thread = threading.Thread(target=run, name="file-dropper", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether background drops are still to come."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait until the planned background drops are done (no more extra files)."""
        self._plan_only.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), "the file dropper did not finish"

    @property
    def expected(self) -> dict[str, str]:
        """name -> SHA-256 of every file dropped so far."""
        with self._lock:
            return dict(self.sha256)


# ---------------------------------------------------------------------------- events out


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def file_events(
    api: str, since: float, names: tuple[str, ...] = FILE_EVENTS
) -> list[dict[str, Any]]:
    """Every event called one of ``names`` that occurred since ``since`` (paged, oldest first).

    Raises:
        httpx.HTTPError: The server did not answer (callers that poll try again).
    """
    body = {
        "filter": {
            "occurred": {"since": _iso(since), "until": _iso(time.time() + 3600)},
            "event": {"name": list(names)},
            "order": "ASC",
        },
        "limit": 50,
    }
    with httpx.Client(timeout=API_TIMEOUT_S) as client:
        return [event for page in event_pages(client, body, api) for event in page]


def done_times(events: list[dict[str, Any]], names: set[str]) -> dict[str, float]:
    """name -> when its last downstream step was announced, for files with all three."""
    seen: dict[str, dict[str, float]] = {}
    for event in events:
        path = (event.get("payload") or {}).get("path")
        if path in names and event["event"] in DONE_EVENTS:
            seen.setdefault(path, {})[event["event"]] = _epoch(event["occurred"])
    return {path: max(steps.values()) for path, steps in seen.items() if len(steps) == 3}


def rebuilt(received: Path, names: set[str]) -> set[str]:
    """The names among ``names`` that are in the destination (a rename: whole files)."""
    return {name for name in names if (received / name).is_file()}


def wait_until_done(
    api: str,
    since: float,
    names: Callable[[], set[str]],
    timeout_s: float,
) -> tuple[bool, dict[str, float]]:
    """Poll the server's events until every file has its three downstream steps.

    Args:
        api: The Prefect API URL.
        since: Read events that occurred since then (``time.time()``).
        names: The files to wait for (read again on every poll: files may still arrive).
        timeout_s: Give up after this long.

    Returns:
        Whether all were done in time, and name -> time done.
    """
    deadline = time.monotonic() + timeout_s
    done: dict[str, float] = {}
    while True:
        wanted = names()
        with contextlib.suppress(httpx.HTTPError):
            done = done_times(file_events(api, since, DONE_EVENTS), wanted)
        if wanted and set(done) >= wanted:
            return True, done
        if time.monotonic() > deadline:
            return False, done
        time.sleep(EVENT_POLL_S)


# ------------------------------------------------------------------------------- verdict


def backup_versions(stack: UserStack, names: set[str]) -> Counter[str]:
    """name -> how many copies of it the backup store ever stored (S3 object versions).

    Raises:
        AssertionError: Versioning is not on for the bucket, so copies cannot be counted.
    """
    s3 = stack.s3()
    assert s3.get_bucket_versioning(Bucket=BACKUP_BUCKET).get("Status") == "Enabled"
    counts: Counter[str] = Counter()
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=BACKUP_BUCKET):
        for version in page.get("Versions", []):
            name = version["Key"].rsplit("/", 1)[-1]
            if name in names:
                counts[name] += 1
    return counts


@dataclass
class StackVerdict:
    """Every dropped file, as the destination, the server's events and the store see it.

    Attributes:
        files: How many files were dropped.
        lost: Not in the destination.
        corrupted: In the destination with other bytes.
        not_done: name -> the downstream steps without their event.
        reconstructed: name -> its ``msi.file.reconstructed`` events (one expected: each
            file was written once, so it has one generation).
        backups: name -> copies the backup store holds (S3 versions; one expected).
        done_at: name -> when its last downstream step was announced (files done only).
        notes: Anything else worth reporting.
    """

    files: int
    lost: list[str]
    corrupted: list[str]
    not_done: dict[str, list[str]]
    reconstructed: dict[str, int]
    backups: dict[str, int]
    done_at: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def duplicated(self) -> list[str]:
        """Files announced rebuilt more than once, or backed up more than once."""
        twice = {n for n, c in self.reconstructed.items() if c > 1}
        twice |= {n for n, c in self.backups.items() if c > 1}
        return sorted(twice)

    @property
    def unannounced(self) -> list[str]:
        """Files without any ``msi.file.reconstructed`` event."""
        return sorted(n for n, c in self.reconstructed.items() if c == 0)

    def summary(self) -> str:
        """One line for a failed assertion."""
        return (
            f"{self.files} files: lost {self.lost[:5]}, corrupted {self.corrupted[:5]}, "
            f"not done {dict(list(self.not_done.items())[:5])} ({len(self.not_done)}), "
            f"no reconstructed event {self.unannounced[:5]}, duplicated "
            f"{[(n, self.reconstructed[n], self.backups.get(n)) for n in self.duplicated[:5]]}"
        )


def judge(stack: UserStack, expected: dict[str, str], since: float) -> StackVerdict:
    """Compare the dropped files with the destination, the events and the backup store."""
    names = set(expected)
    found = rebuilt(stack.received, names)
    corrupted = sorted(
        name
        for name in found
        if hashlib.sha256((stack.received / name).read_bytes()).hexdigest() != expected[name]
    )
    events = file_events(stack.api, since)
    steps: dict[str, set[str]] = {name: set() for name in names}
    announced: Counter[str] = Counter()
    for event in events:
        path = (event.get("payload") or {}).get("path")
        if path not in names:
            continue
        if event["event"] == EventName.RECONSTRUCTED:
            announced[path] += 1
        else:
            steps[path].add(event["event"])
    not_done = {
        name: sorted(str(step) for step in set(DONE_EVENTS) - got)
        for name, got in steps.items()
        if len(got) < 3
    }
    versions = backup_versions(stack, names)
    return StackVerdict(
        files=len(names),
        lost=sorted(names - found),
        corrupted=corrupted,
        not_done=not_done,
        reconstructed={name: announced[name] for name in sorted(names)},
        backups={name: versions[name] for name in sorted(names)},
        done_at=done_times(events, names),
    )


# -------------------------------------------------------------------------------- faults


def flow_run_named(api: str, name: str) -> dict[str, Any] | None:
    """The flow run called `name`, as the API returns it, or None (also when the busy
    server did not answer in time: the caller polls again)."""
    try:
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"name": {"any_": [name]}}, "limit": 1},
            timeout=API_TIMEOUT_S,
        ).json()
    except httpx.TimeoutException:
        return None
    return runs[0] if runs else None


def transfer_run_ids(api: str, states: tuple[str, ...] = ("RUNNING", "PENDING")) -> set[str]:
    """Ids of the runs of the two long-running transfer deployments in one of ``states``."""
    with httpx.Client(timeout=API_TIMEOUT_S) as client:
        runs = client.post(
            f"{api}/flow_runs/filter",
            json={
                "flow_runs": {"state": {"type": {"any_": list(states)}}},
                "deployments": {"name": {"any_": list(TRANSFER_DEPLOYMENTS)}},
            },
        )
        runs.raise_for_status()
        return {run["id"] for run in runs.json()}


def downstream_run_pids(api: str, transfers: set[str]) -> set[int]:
    """PIDs of the downstream flow runs' processes: launchers and their forked children.

    A launcher carries its flow-run id in its environment; the child a warm server forked
    for it does not (its environment was replaced in memory), but it holds the launcher's
    standard streams, so the two share the pipe behind fd 1.
    """
    launchers = {p.pid for p in live_flow_runs(api) if p.flow_run_id not in transfers}
    pipes = {link for pid in launchers if (link := _fd_link(pid, 1)) and link.startswith("pipe:")}
    children = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in launchers:
            link = _fd_link(int(entry.name), 1)
            if link in pipes:
                children.add(int(entry.name))
    return launchers | children


def _fd_link(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(entry.path, "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
    return found


def kill9(pids: set[int], timeout_s: float = 10) -> None:
    """SIGKILL each PID at once; wait until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def kill_worker_and_its_runs(stack: UserStack, transfers: set[str]) -> int:
    """``kill -9`` the worker, its warm server and every downstream flow-run process.

    The two transfers keep running: this is a fault of the downstream side only.

    Returns:
        How many downstream flow-run processes were killed.
    """
    worker = stack.pid(Component.WORKER)
    assert worker is not None
    warm = {pid for pid in _children(worker) if not _is_launcher(pid)}
    runs = downstream_run_pids(stack.api, transfers)
    kill9({worker, *warm, *runs})
    return len(runs)


def _is_launcher(pid: int) -> bool:
    try:
        return b"PREFECT__FLOW_RUN_ID=" in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def kill_server(stack: UserStack) -> None:
    """``kill -9`` the Prefect server (only)."""
    server = stack.pid(Component.PREFECT)
    assert server is not None
    kill9({server})


def power_cut(stack: UserStack) -> None:
    """``kill -9`` every process of the stack at once: servers, worker, every flow run."""
    kill_everything(stack.state_dir, stack.api)
