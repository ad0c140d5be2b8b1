"""What the fault-injection runs share: processes tracked by PID, workloads, verdicts.

Every run ends with the same check: the destination holds exactly the expected files,
byte-identical (nothing lost, corrupted or extra), and every file's ``reconstructed``
outcome was reported at least once (counted from the ``reconstruct`` output, which is
flushed line by line, so a ``kill -9`` loses no reported line).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from msi_prefect.stack.components import Component
from msi_prefect.stack.config import BrokerStorage, StackConfig, StateDir
from msi_prefect.stack.manager import StackManager
from tests.conftest import TEST_SESSION_TIMEOUT_MS

KIB = 1024
MIB = 1024 * KIB
RESULTS_ENV = "MSI_CHAOS_RESULTS"
STATE_PREFIXES = (".msi-staging", ".msi-state")
RECONSTRUCTED_LINE = re.compile(r"^reconstructed (.+) \(\d+ bytes\) -> ", re.MULTILINE)
REJECTED_LINE = re.compile(r"^rejected ", re.MULTILINE)


def env_int(name: str, default: int) -> int:
    """An integer setting from the environment (iteration counts of the long runs)."""
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    """A float setting from the environment."""
    return float(os.environ.get(name, default))


def cli(*args: str) -> list[str]:
    """The ``msi-prefect`` command line, run with this interpreter."""
    return [sys.executable, "-m", "msi_prefect.cli", *args]


class Processes:
    """Processes a run starts; whatever is still alive at the end is killed by its PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a command with stdout in ``name.out`` and stderr in ``name.err``.

        Files, not pipes: a pipe nobody reads would block the process, and a killed
        process's flushed lines stay readable.
        """
        with (
            (self.log_dir / f"{name}.out").open("ab") as out,
            (self.log_dir / f"{name}.err").open("ab") as err,
        ):
            process = subprocess.Popen(
                list(command), stdout=out, stderr=err, stdin=subprocess.DEVNULL, **kwargs
            )  # type: ignore[call-overload]
        self.started.append(process)
        return process

    @staticmethod
    def kill9(process: subprocess.Popen[bytes]) -> None:
        """``kill -9`` by PID, and reap it."""
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    @staticmethod
    def terminate(process: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
        """SIGTERM by PID (the clean stop); SIGKILL if it does not exit in time."""
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                return process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
        return process.wait(timeout=30)

    def output(self, prefix: str = "") -> str:
        """Everything the processes whose log name starts with ``prefix`` printed."""
        return "".join(
            path.read_text(errors="replace") for path in sorted(self.log_dir.glob(f"{prefix}*.out"))
        )

    def errors(self, prefix: str = "") -> str:
        """Everything they wrote to stderr."""
        return "".join(
            path.read_text(errors="replace") for path in sorted(self.log_dir.glob(f"{prefix}*.err"))
        )

    def stop_all(self) -> None:
        """Kill, by PID, every started process still running."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """A :class:`Processes` logging under ``tmp_path/logs``; stops the leftovers."""
    tracked = Processes(tmp_path / "logs")
    try:
        yield tracked
    finally:
        tracked.stop_all()


# ----------------------------------------------------------------------------- workloads


def mixed_sizes(count: int, large: Sequence[int], seed: int, prefix: str = "run") -> dict[str, int]:
    """``count`` files: the ``large`` sizes, the rest small (1 KiB to 1 MiB, log-uniform)."""
    rng = random.Random(seed)
    sizes = {}
    for i in range(count):
        size = large[i] if i < len(large) else int(2 ** rng.uniform(10, 20))  # 1 KiB..1 MiB
        sizes[f"{prefix}/d{i % 7}/file-{i:04d}.bin"] = size
    return sizes


def write_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes (in 4 MiB pieces); return their SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        left = size
        while left:
            piece = os.urandom(min(left, 4 * MIB))
            digest.update(piece)
            handle.write(piece)
            left -= len(piece)
    return digest.hexdigest()


def make_workload(root: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Write the files; return relpath -> SHA-256."""
    return {rel: write_file(root / rel, size) for rel, size in sizes.items()}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(4 * MIB):
            digest.update(block)
    return digest.hexdigest()


def delivered_names(dest: Path) -> set[str]:
    """Relative paths of the regular files in the destination, our state dirs excluded."""
    if not dest.is_dir():
        return set()
    found = set()
    for path in dest.rglob("*"):
        rel = path.relative_to(dest).as_posix()
        if not rel.startswith(STATE_PREFIXES) and not path.is_dir():
            found.add(rel)
    return found


# ------------------------------------------------------------------------------- verdict


@dataclass
class Verdict:
    """How the destination compares with what was sent."""

    files: int
    lost: list[str]
    corrupted: list[str]
    extra: list[str]
    never_reported: list[str]
    reported_twice: int
    rejected_lines: int

    @property
    def clean(self) -> bool:
        """Nothing lost, corrupted, extra, or unreported, and nothing rejected."""
        return not (
            self.lost or self.corrupted or self.extra or self.never_reported or self.rejected_lines
        )


def judge(dest: Path, expected: dict[str, str], reconstruct_output: str) -> Verdict:
    """Compare the destination with the expected digests and the reported outcomes."""
    found = delivered_names(dest)
    lost = sorted(set(expected) - found)
    extra = sorted(found - set(expected))
    corrupted = sorted(
        rel for rel in set(expected) & found if sha256_file(dest / rel) != expected[rel]
    )
    reported = Counter(RECONSTRUCTED_LINE.findall(reconstruct_output))
    return Verdict(
        files=len(expected),
        lost=lost,
        corrupted=corrupted,
        extra=extra,
        never_reported=sorted(rel for rel in expected if reported[rel] == 0),
        reported_twice=sum(1 for rel in expected if reported[rel] > 1),
        rejected_lines=len(REJECTED_LINE.findall(reconstruct_output)),
    )


@dataclass
class ChaosRecord:
    """One run's figures, for the table in docs/reliability.md."""

    fault: str
    injected: str
    runs: int
    files: int
    bytes: int
    lost: int
    corrupted: int
    duplicated: int
    recover_s: dict[str, float]
    seconds: float
    notes: dict[str, object] = field(default_factory=dict)


def record(entry: ChaosRecord) -> None:
    """Print a run's figures, and append them to ``$MSI_CHAOS_RESULTS`` (JSON lines) if set."""
    line = json.dumps(asdict(entry), sort_keys=True)
    print(f"CHAOS {line}")
    target = os.environ.get(RESULTS_ENV)
    if target:
        with Path(target).open("a") as handle:
            handle.write(line + "\n")


def assert_clean(verdict: Verdict) -> None:
    """The verdict every fault must end with."""
    assert not verdict.lost, f"lost: {verdict.lost[:10]}"
    assert not verdict.corrupted, f"corrupted: {verdict.corrupted[:10]}"
    assert not verdict.extra, f"extra (duplicated or partial) files: {verdict.extra[:10]}"
    assert not verdict.never_reported, f"never reported: {verdict.never_reported[:10]}"
    assert verdict.rejected_lines == 0, "some files or messages were rejected"


# -------------------------------------------------------------------------------- probes


def wait_for(
    predicate: Callable[[], bool], what: str, timeout_s: float, step_s: float = 0.01
) -> float:
    """Poll until ``predicate`` holds; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def query(db: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    """Read a SQLite file another process is writing; [] while it is not there or locked."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return []


def progress_mark(dest: Path) -> int:
    """A number that grows with every chunk the reassembler records durably."""
    rows = query(
        dest / ".msi-state" / "progress.sqlite",
        "SELECT COALESCE(SUM(received_count), 0) + COUNT(*) FROM progress",
    )
    return int(rows[0][0]) if rows else 0


def partly_received(dest: Path) -> bool:
    """Whether a file has some of its chunks durably written, but not all."""
    rows = query(
        dest / ".msi-state" / "progress.sqlite",
        "SELECT COUNT(*) FROM progress WHERE received_count > 0 AND received_count < chunk_count",
    )
    return bool(rows and rows[0][0])


def registry_states(registry: Path) -> dict[str, str]:
    """relpath -> state in the producer registry."""
    return dict(query(registry, "SELECT relpath, state FROM files"))  # type: ignore[arg-type]


def reconstruct_command(
    dest: Path, topic: str, bootstrap: str, group: str, *extra: str
) -> list[str]:
    """``msi-prefect reconstruct`` with the test session timeout."""
    return cli(
        "reconstruct", str(dest), "--topic", topic, "--bootstrap", bootstrap, "--group", group,
        "--session-timeout-ms", str(TEST_SESSION_TIMEOUT_MS), *extra,
    )  # fmt: skip


def watch_command(
    folder: Path, topic: str, bootstrap: str, registry: Path, window_s: float, *extra: str
) -> list[str]:
    """``msi-prefect watch`` with a short poll interval."""
    return cli(
        "watch", str(folder), "--topic", topic, "--bootstrap", bootstrap, "--registry",
        str(registry), "--stability-window", str(window_s), "--poll-interval", "0.5", *extra,
    )  # fmt: skip


def upload_command(src: Path, topic: str, bootstrap: str, registry: Path) -> list[str]:
    """``msi-prefect upload`` of a folder's contents."""
    return cli(
        "upload", str(src), "--root", str(src), "--topic", topic, "--bootstrap", bootstrap,
        "--registry", str(registry), "--no-progress",
    )  # fmt: skip


def wait_complete(
    dest: Path, expected: dict[str, str], timeout_s: float, alive: Callable[[], bool]
) -> float:
    """Wait until every expected name is in the destination; return the seconds it took.

    Delivery is an atomic rename of a verified file, so a name present is a file complete.
    """
    want = set(expected)

    def done() -> bool:
        if not alive():
            raise AssertionError("the reassembler exited before the transfer completed")
        return want <= delivered_names(dest)

    return wait_for(done, f"{len(want)} files in {dest}", timeout_s, step_s=0.2)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackManager]:
    """An S3 store and a broker with S3-backed (durable) storage, for this module alone.

    The broker faults restart and pause it; the session's stack stays untouched.
    """
    from msi_prefect.stack.config import free_port_map

    state = StateDir(tmp_path_factory.mktemp("chaos-stack"))
    manager = StackManager(
        state, StackConfig(ports=free_port_map(), broker_storage=BrokerStorage.S3)
    )
    try:
        manager.up([Component.S3, Component.BROKER])
        yield manager
    finally:
        manager.down()


def create_topic(bootstrap: str, partitions: int = 4) -> str:
    """A fresh topic on a broker."""
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"chaos-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions)]).values():
        future.result(timeout=30)
    return name


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs (needs root and permission to mount); unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
