"""Shared pieces of the benchmark harness (the reports' formatting is in ``bench.report``).

* :class:`BenchResult`: the one result shape every runner returns.
* :class:`MemoryBroker`: the embedded stack's Tansu broker in memory mode, alone, started
  and stopped by the project's own stack manager (free loopback ports, stop by PID).
* :func:`create_topic` (the project's ``ensure_topic``) / :func:`delete_topic`: Tansu
  memory storage keeps every byte in RAM until the topic is deleted, so runners always
  delete what they create.
* :func:`compare_trees`: SHA-256 comparison of a source tree with a rebuilt tree.
* :class:`RssSampler` and :func:`read_peak_rss_mb`: peak resident memory of child processes
  read from ``/proc`` (``VmHWM``), no psutil needed.

The project's modules are imported where they are used, so the child processes of the
raw pipeline (which import this module) start as fast as before.

Throughput figures use decimal megabytes (1 MB = 10**6 bytes), as ``MB/s`` usually means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
"""This folder: data sets default to ``BENCH_DIR / "data"``, reports are written here."""

MB = 1_000_000
"""Bytes in one (decimal) megabyte, the unit of every ``MB/s`` figure."""

HASH_BLOCK = 4 * 1024 * 1024
"""Read size used when hashing files."""

KAFKA_SESSION_TIMEOUT_MS = 6000
"""Consumer session timeout used with Tansu (a group join takes about half of it)."""


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """Outcome of one benchmark run.

    Attributes:
        name: Which pipeline ran (``raw-confluent-kafka``, ``openmsistream-1.8``, ...).
        files: Number of files moved.
        bytes: Total payload bytes moved.
        seconds: Wall-clock seconds from the start of the sending side until the last file was
            complete on disk at the destination.
        mb_per_s: ``bytes / 1e6 / seconds``.
        files_per_s: ``files / seconds``.
        peak_rss_mb: Sum over the child processes of each one's peak resident set size
            (``VmHWM``) in MB, or ``None`` if it could not be measured.
        verified_files: Files whose SHA-256 at the destination equals the source's.
        mismatched: Relative paths that are missing or differ at the destination.
        rss_by_role: Peak RSS in MB per child process role (e.g. ``sender``, ``receiver``).
        extra: Further measured figures (e.g. ``consumer_join_s``) and settings worth keeping.
    """

    name: str
    files: int
    bytes: int
    seconds: float
    mb_per_s: float
    files_per_s: float
    peak_rss_mb: float | None
    verified_files: int
    mismatched: tuple[str, ...] = ()
    rss_by_role: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every file arrived byte-identical."""
        return not self.mismatched and self.verified_files == self.files

    @classmethod
    def build(
        cls,
        *,
        name: str,
        files: int,
        nbytes: int,
        seconds: float,
        comparison: TreeComparison,
        rss_by_role: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> BenchResult:
        """Derive the rates and verification fields from raw measurements.

        Args:
            name: Pipeline name.
            files: Number of files moved.
            nbytes: Total payload bytes moved.
            seconds: Measured wall-clock seconds.
            comparison: Result of :func:`compare_trees` on source and destination.
            rss_by_role: Peak RSS in MB per child process role.
            extra: Further figures to keep with the result.

        Returns:
            The assembled result.
        """
        roles = dict(rss_by_role or {})
        seconds = max(seconds, 1e-9)
        return cls(
            name=name,
            files=files,
            bytes=nbytes,
            seconds=round(seconds, 3),
            mb_per_s=round(nbytes / MB / seconds, 2),
            files_per_s=round(files / seconds, 2),
            peak_rss_mb=round(sum(roles.values()), 1) if roles else None,
            verified_files=comparison.matched,
            mismatched=comparison.problems,
            rss_by_role=roles,
            extra=dict(extra or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary (with ``ok`` included)."""
        data = dataclasses.asdict(self)
        data["mismatched"] = list(self.mismatched)
        data["ok"] = self.ok
        return data

    def to_json(self) -> str:
        """Return the result as one line of JSON."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def summary(self) -> str:
        """Return a one-line human summary."""
        rss = "n/a" if self.peak_rss_mb is None else f"{self.peak_rss_mb:.0f} MB"
        state = "OK" if self.ok else f"FAILED ({len(self.mismatched)} bad)"
        return (
            f"{self.name}: {self.files} files, {self.bytes / MB:.1f} MB in {self.seconds:.2f} s"
            f" = {self.mb_per_s:.1f} MB/s, {self.files_per_s:.1f} files/s, peak RSS {rss},"
            f" verify {state}"
        )


# --------------------------------------------------------------------------- file trees


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file of a source tree.

    Attributes:
        rel: Relative POSIX path under the tree root.
        size: Size in bytes.
    """

    rel: str
    size: int


def list_tree(root: Path, exclude_dirs: Iterable[str] = ()) -> list[SourceFile]:
    """List the regular files under ``root`` in a stable order.

    Args:
        root: Directory to walk.
        exclude_dirs: Names of directories to skip anywhere in the tree.

    Returns:
        The files, sorted by relative path.
    """
    skip = set(exclude_dirs)
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        base = Path(dirpath)
        for fname in filenames:
            full = base / fname
            if full.is_file() and not full.is_symlink():
                found.append(SourceFile(full.relative_to(root).as_posix(), full.stat().st_size))
    found.sort(key=lambda f: f.rel)
    return found


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in blocks.

    Args:
        path: File to hash.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TreeComparison:
    """Result of comparing a source tree with its rebuilt copy.

    Attributes:
        matched: Number of source files present at the destination with equal SHA-256.
        missing: Source files absent at the destination.
        different: Source files present at the destination with other content.
        extra: Files at the destination that have no source counterpart (informational).
    """

    matched: int
    missing: tuple[str, ...]
    different: tuple[str, ...]
    extra: tuple[str, ...]

    @property
    def problems(self) -> tuple[str, ...]:
        """Missing and different files, each prefixed with the kind of problem."""
        return tuple(f"missing:{p}" for p in self.missing) + tuple(
            f"different:{p}" for p in self.different
        )


def compare_trees(
    src: Path,
    dst: Path,
    *,
    files: Iterable[SourceFile] | None = None,
    exclude_dirs: Iterable[str] = (),
) -> TreeComparison:
    """Compare every source file with the file at the same relative path under ``dst``.

    Sizes are compared first, so a short file costs no hashing.

    Args:
        src: Source root.
        dst: Destination root (where the relative paths are expected).
        files: Source files to check; defaults to every file under ``src``.
        exclude_dirs: Directory names ignored when listing ``dst`` for extra files.

    Returns:
        The comparison.
    """
    wanted = list(files) if files is not None else list_tree(src)
    missing: list[str] = []
    different: list[str] = []
    matched = 0
    for item in wanted:
        target = dst / item.rel
        if not target.is_file():
            missing.append(item.rel)
        elif target.stat().st_size != item.size or sha256_file(target) != sha256_file(
            src / item.rel
        ):
            different.append(item.rel)
        else:
            matched += 1
    known = {f.rel for f in wanted}
    extra = tuple(f.rel for f in list_tree(dst, exclude_dirs) if f.rel not in known)
    return TreeComparison(matched, tuple(missing), tuple(different), extra)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Mirror ``src`` into a new directory ``dst`` with hard links (copies across devices).

    A hard-linked mirror costs no time or space whatever the data set size, and programs that
    write log files beside the files they read (OpenMSIStream) write them into ``dst`` only.
    The files must not be modified through ``dst``.

    Args:
        src: Existing directory.
        dst: Directory to create; must not exist.
    """

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.copytree(src, dst, copy_function=link)


# --------------------------------------------------------------------------- memory


def read_peak_rss_mb(pid: int) -> float | None:
    """Return a process's peak resident set size (``VmHWM``) in MB.

    Args:
        pid: Process id.

    Returns:
        The peak RSS in MB, or ``None`` if the process is gone or ``/proc`` is unavailable.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    return None


def self_peak_rss_mb() -> float:
    """Return this process's own peak RSS in MB (``getrusage``, exact at any moment)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def _descendants(pid: int) -> list[int]:
    """Return the PIDs of all live descendants of ``pid`` (via ``/proc/*/task/*/children``)."""
    result: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{current}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in children:
                result.append(int(child))
                stack.append(int(child))
    return result


class RssSampler:
    """Track the peak RSS of named child processes (and their descendants) from ``/proc``.

    ``VmHWM`` is a per-process high-water mark, so sampling a few times a second and once more
    just before a process is stopped gives its true peak. A role's figure is the sum of its
    process tree's peaks.

    Args:
        interval: Seconds between samples.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self._interval = interval
        self._roles: dict[str, int] = {}
        self._peaks: dict[str, dict[int, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def watch(self, role: str, pid: int) -> None:
        """Start tracking a process under a role name.

        Args:
            role: Name to report the figure under.
            pid: Root process id of the role.
        """
        with self._lock:
            self._roles[role] = pid
            self._peaks.setdefault(role, {})
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def sample(self) -> None:
        """Read every watched process tree once now."""
        with self._lock:
            roles = dict(self._roles)
        for role, root in roles.items():
            for pid in [root, *_descendants(root)]:
                peak = read_peak_rss_mb(pid)
                if peak is not None:
                    with self._lock:
                        known = self._peaks[role].get(pid, 0.0)
                        self._peaks[role][pid] = max(known, peak)

    def peaks(self) -> dict[str, float]:
        """Return the peak RSS in MB per role (sum over each role's processes)."""
        with self._lock:
            return {role: round(sum(p.values()), 1) for role, p in self._peaks.items() if p}

    def stop(self) -> dict[str, float]:
        """Take a last sample, stop the sampling thread and return :meth:`peaks`."""
        self.sample()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return self.peaks()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()


# --------------------------------------------------------------------------- processes


def stop_process(proc: subprocess.Popen[Any], *, grace: float = 10.0) -> int | None:
    """Stop one child process by its PID: SIGTERM, then SIGKILL after ``grace`` seconds.

    The stack's own ``terminate`` stops processes the same way but reaps them itself, so
    their exit code is lost; the benchmarks report it (a clean stop exits 0).

    Args:
        proc: The child process.
        grace: Seconds to wait after SIGTERM.

    Returns:
        The exit code (negative for a signal), or ``None`` if it could not be reaped.
    """
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return None


# --------------------------------------------------------------------------- broker


class MemoryBroker:
    """The embedded stack's Tansu broker with memory storage, alone, on free loopback ports.

    Started and stopped by the project's own stack manager (``msi_prefect.stack``): the
    same command line, loopback binding, health check and stop by PID as ``msi-prefect
    up --storage memory --only broker``, in a state directory of its own. Use as a
    context manager::

        with MemoryBroker(log_dir=Path("/tmp/scratch")) as broker:
            run_raw(broker.bootstrap, src, dst, "bench-raw")

    Args:
        log_dir: Where the broker's state directory (and ``logs/broker.log``) goes; a new
            temporary directory when ``None``.
    """

    def __init__(self, log_dir: Path | None = None) -> None:
        from msi_prefect.stack.config import BrokerStorage, StackConfig, StateDir, free_port_map
        from msi_prefect.stack.manager import StackManager

        parent = Path(log_dir or tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        state = StateDir(Path(tempfile.mkdtemp(prefix="bench-broker-", dir=parent)))
        config = StackConfig(ports=free_port_map(), broker_storage=BrokerStorage.MEMORY)
        self._manager = StackManager(state, config)
        self.bootstrap = config.bootstrap_servers

    @property
    def pid(self) -> int | None:
        """PID of the broker process while it runs."""
        from msi_prefect.stack.config import Component

        record = self._manager.process(Component.BROKER).read_pid()
        return record.pid if record else None

    def start(self) -> None:
        """Start the broker and wait until it answers (the stack's health check).

        Raises:
            MsiError: The port is taken, the binary is missing, or it did not answer.
        """
        from msi_prefect.stack.config import Component

        self._manager.up([Component.BROKER])

    def stop(self) -> None:
        """Stop the broker by PID (SIGTERM, then SIGKILL)."""
        self._manager.down()

    def __enter__(self) -> MemoryBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- topics


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    """Create a topic with the project's ``ensure_topic``; an existing one is kept as it is.

    Args:
        bootstrap: Broker address ``host:port``.
        topic: Topic name.
        partitions: Number of partitions.

    Raises:
        MsiError: The broker cannot be reached or refuses to create the topic.
    """
    from msi_prefect.transfer.kafka import KafkaConnection, ensure_topic

    ensure_topic(KafkaConnection(bootstrap_servers=bootstrap), topic, partitions)


def delete_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> None:
    """Delete a topic; a topic that does not exist is not an error.

    Args:
        bootstrap: Broker address ``host:port``.
        topic: Topic name.
        timeout: Seconds to wait.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    future = admin.delete_topics([topic], operation_timeout=timeout)[topic]
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise


def unique_suffix() -> str:
    """Return a short suffix that makes topic and group names unique per run."""
    return f"{int(time.time())}-{os.getpid()}-{os.urandom(3).hex()}"


def wait_group_stable(bootstrap: str, group: str, timeout: float) -> float | None:
    """Wait until the broker reports a consumer group in state STABLE.

    Args:
        bootstrap: Broker address.
        group: Consumer group id.
        timeout: Seconds to wait.

    Returns:
        The ``time.time()`` at which STABLE was first seen, or ``None`` on timeout or if the
        broker cannot describe groups.
    """
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            desc = admin.describe_consumer_groups([group])[group].result(timeout=5)
        except Exception:
            desc = None
        if desc is not None and desc.state == ConsumerGroupState.STABLE:
            return time.time()
        time.sleep(0.1)
    return None


# --------------------------------------------------------------------------- runs

OTHER_BENCH_PATTERN = r"bench\."
OTHER_BENCH_POLL_S = 20.0
OTHER_BENCH_MAX_WAIT_S = 600.0


def _own_lineage() -> set[int]:
    """This process and its ancestors (their command lines name this benchmark too)."""
    pids: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def wait_for_other_bench() -> None:
    """Wait (up to 10 min, polling every 20 s) while another ``bench.*`` run is going."""
    mine = _own_lineage()
    waited = 0.0
    while waited < OTHER_BENCH_MAX_WAIT_S:
        found = subprocess.run(
            ["pgrep", "-f", OTHER_BENCH_PATTERN], capture_output=True, text=True, check=False
        )
        others = [p for p in found.stdout.split() if int(p) not in mine]
        if not others:
            return
        print(f"waiting for another benchmark (pids {others})", flush=True)
        time.sleep(OTHER_BENCH_POLL_S)
        waited += OTHER_BENCH_POLL_S
    print(f"another benchmark still running after {waited:.0f} s; going ahead", flush=True)


def write_replace(watch: Path, staging: Path, name: str, data: bytes) -> float:
    """Write a file outside the watched folder, then rename it in; return the time after."""
    temp = staging / f".{name}.tmp"
    temp.write_bytes(data)
    os.replace(temp, watch / name)
    return time.time()
