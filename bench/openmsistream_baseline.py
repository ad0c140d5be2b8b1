"""OpenMSIStream 1.8 as a benchmark baseline: its directory uploader into its download directory.

OpenMSIStream pins old dependencies, so it lives in a virtual environment of its own
(``bench/openmsistream_venv.py`` creates it: ``python -m bench.openmsistream_venv``); this
module only starts its programs there, as child processes, and watches the file system:

1. ``DataFileDownloadDirectory DST`` is started first, with an explicit consumer group id; the
   run waits until the broker reports that group STABLE (Tansu answers DescribeGroups with the
   state but no members), plus a short margin for the second consumer thread's SyncGroup.
2. The source is mirrored with hard links into ``WORKDIR/upload`` (OpenMSIStream writes
   ``LOGS/`` with ``UploadDataFile.log`` and its CSV registries into the directory it uploads,
   so it never touches the real source), and ``DataFileUploadDirectory WORKDIR/upload
   --upload_existing`` is started. The clock starts just before this spawn.
3. The destination is polled. OpenMSIStream rebuilds a file at the same relative path under
   ``DST`` (subdirectories preserved, no topic or upload-directory prefix) and also writes its
   own ``DataFileDownloadDirectory.log`` into ``DST``. Chunks of one file travel under
   different keys, so they land on different partitions and are written out of order: a file
   at full size is not necessarily complete. A file counts as done when it has its full size
   and its SHA-256 matches the source; its completion time is when its final (size, mtime) was
   first seen.
4. Both programs are stopped the way their documentation says: ``q`` and a newline on stdin
   (they poll stdin once a second, and have no SIGTERM handling), then SIGTERM and SIGKILL
   by PID if they are still running after a grace period.

The configuration file is OpenMSIStream's own ``local_broker_test.config`` (lz4, 2 MB batches,
``linger.ms`` 100, manual commits, ``fetch.min.bytes`` 100000) with the bootstrap address filled
in and ``session.timeout.ms = 6000`` added, which the Tansu broker needs for a quick group join.

Usage::

    python -m bench.openmsistream_baseline --src DATA --dst OUT                # own Tansu
    python -m bench.openmsistream_baseline --src DATA --dst OUT --bootstrap 127.0.0.1:29092

From Python::

    result = run_openmsistream("127.0.0.1:29092", Path("DATA"), Path("OUT"), "bench-omsi")
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench.common import (
    KAFKA_SESSION_TIMEOUT_MS,
    BenchResult,
    MemoryBroker,
    RssSampler,
    SourceFile,
    compare_trees,
    create_topic,
    delete_topic,
    link_or_copy_tree,
    list_tree,
    sha256_file,
    unique_suffix,
    wait_group_stable,
)
from bench.openmsistream_venv import OMSI_PYTHON_ENV, OMSI_VENV

NAME = "openmsistream-1.8"
"""Pipeline name in results."""

DEFAULT_OMSI_PYTHON = OMSI_VENV / "bin" / "python"
"""Interpreter used when ``$MSI_BENCH_OMSI_PYTHON`` is not set."""

UPLOAD_MODULE = "openmsistream.data_file_io.actor.data_file_upload_directory"
DOWNLOAD_MODULE = "openmsistream.data_file_io.actor.data_file_download_directory"

OMSI_LOG_NAMES = ("LOGS",)
"""Directories OpenMSIStream creates that are not data (ignored when listing extras)."""

CHUNK_SIZE = 512 * 1024
"""OpenMSIStream's default chunk size (passed explicitly so the figure is on record)."""

CONFIG_TEMPLATE = """\
# OpenMSIStream's kafka_wrapper/config_files/local_broker_test.config, with the bootstrap
# address filled in and session.timeout.ms added for the Tansu broker.
[broker]
bootstrap.servers = {bootstrap}

[producer]
batch.size       = 2000000
linger.ms        = 100
compression.type = lz4
key.serializer   = StringSerializer
value.serializer = DataFileChunkSerializer

[consumer]
group.id           = create_new
auto.offset.reset  = earliest
enable.auto.commit = False
fetch.min.bytes    = 100000
session.timeout.ms = {session_timeout_ms}
key.deserializer   = StringDeserializer
value.deserializer = DataFileChunkDeserializer
"""


def omsi_python() -> Path:
    """Return the OpenMSIStream interpreter (``$MSI_BENCH_OMSI_PYTHON`` or the default).

    Raises:
        FileNotFoundError: If the interpreter does not exist.
    """
    path = Path(os.environ.get(OMSI_PYTHON_ENV) or DEFAULT_OMSI_PYTHON)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: create it with `python -m bench.openmsistream_venv` "
            f"or set ${OMSI_PYTHON_ENV}"
        )
    return path


def write_config(path: Path, bootstrap: str) -> Path:
    """Write the OpenMSIStream configuration file used by both programs.

    Args:
        path: File to write.
        bootstrap: Broker address ``host:port``.

    Returns:
        ``path``.
    """
    path.write_text(
        CONFIG_TEMPLATE.format(bootstrap=bootstrap, session_timeout_ms=KAFKA_SESSION_TIMEOUT_MS)
    )
    return path


# --------------------------------------------------------------------------- waiting


@dataclasses.dataclass
class _Seen:
    """Last observed (size, mtime) of a destination file and when it was first observed."""

    size: int
    mtime_ns: int
    since: float


# Seconds before a file whose (size, mtime) has not changed since it failed to match is
# hashed again.
RECHECK_S = 1.0
# No file changed and none completed for this long: the run is stuck. OpenMSIStream was seen
# leaving a 64 MiB file at full size with wrong content and never rewriting it.
STALL_TIMEOUT_S = 120.0


class PipelineStalled(RuntimeError):
    """A baseline run stopped making progress; the round is reported as failed."""


class CompletionWatcher:
    """Decide when every source file exists, complete and byte-identical, under a destination.

    Polls with ``os.scandir`` (only files not yet done are stat-ed). Once every pending file
    has its full size, each is hashed; a file whose SHA-256 matches and whose (size, mtime) did
    not change while it was hashed is done, with its completion time set to when that final
    (size, mtime) was first seen. Hashing is therefore not part of the measured time.

    Args:
        src: Source root (hashed lazily for comparison).
        dst: Destination root where files are expected at their relative paths.
        files: Source files to wait for.
    """

    def __init__(self, src: Path, dst: Path, files: list[SourceFile]) -> None:
        self._src = src
        self._dst = dst
        self._expected = {f.rel: f.size for f in files}
        self._pending = set(self._expected)
        self._seen: dict[str, _Seen] = {}
        self._rejected: dict[str, tuple[tuple[int, int], float]] = {}
        self._src_digest: dict[str, str] = {}
        self.done_at: dict[str, float] = {}
        #: When a file last changed or completed (``time.time()`` scale).
        self.last_progress_at = time.time()

    @property
    def pending(self) -> int:
        """Number of files not yet complete."""
        return len(self._pending)

    def poll(self) -> bool:
        """Observe the destination once.

        Returns:
            Whether every file is complete.
        """
        now = time.time()
        self._scan(self._dst, "", now)
        ready = [
            rel
            for rel in self._pending
            if rel in self._seen and self._seen[rel].size == self._expected[rel]
        ]
        if len(ready) < len(self._pending):
            return False
        for rel in ready:
            seen = self._seen[rel]
            key = (seen.size, seen.mtime_ns)
            rejected = self._rejected.get(rel)
            # OpenMSIStream writes chunks out of order, so a file can reach its full size
            # before it is whole. If its last write fell in the same mtime tick as a
            # rejected look, the key never changes again: look again after a while.
            if rejected is not None and rejected[0] == key and now - rejected[1] < RECHECK_S:
                continue
            target = self._dst / rel
            matches = sha256_file(target) == self._source_digest(rel)
            stat = target.stat()
            if matches and (stat.st_size, stat.st_mtime_ns) == key:
                self.done_at[rel] = seen.since
                self._pending.discard(rel)
                self.last_progress_at = now
            else:
                self._rejected[rel] = (key, now)
        return not self._pending

    def last_completion(self) -> float:
        """Return the completion time of the last file (``time.time()`` scale)."""
        return max(self.done_at.values())

    def first_completion(self) -> float:
        """Return the completion time of the first file (``time.time()`` scale)."""
        return min(self.done_at.values())

    def _source_digest(self, rel: str) -> str:
        if rel not in self._src_digest:
            self._src_digest[rel] = sha256_file(self._src / rel)
        return self._src_digest[rel]

    def _scan(self, directory: Path, prefix: str, now: float) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                self._scan(Path(entry.path), rel + "/", now)
            elif rel in self._pending:
                try:
                    stat = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                seen = self._seen.get(rel)
                if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                    self._seen[rel] = _Seen(stat.st_size, stat.st_mtime_ns, now)
                    self.last_progress_at = now

    def stuck_files(self) -> list[str]:
        """The pending files, each with what is wrong with it (for error messages)."""
        described = []
        for rel in sorted(self._pending):
            seen = self._seen.get(rel)
            if seen is None:
                described.append(f"{rel}: missing")
            elif seen.size != self._expected[rel]:
                described.append(f"{rel}: {seen.size} of {self._expected[rel]} bytes")
            else:
                described.append(f"{rel}: full size, wrong content")
        return described


# --------------------------------------------------------------------------- processes


def _start(
    python: Path, module: str, args: list[str], log: IO[bytes], cwd: Path
) -> subprocess.Popen[bytes]:
    """Start one OpenMSIStream program with a pipe on stdin (its only stop control)."""
    return subprocess.Popen(
        [str(python), "-m", module, *args],
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )


def stop_with_q(proc: subprocess.Popen[bytes], grace: float = 60.0) -> tuple[str, float]:
    """Stop an OpenMSIStream program: ``q`` on stdin, then SIGTERM/SIGKILL by PID.

    Args:
        proc: The program's process.
        grace: Seconds to wait for a clean exit after ``q``.

    Returns:
        How it ended (``exited``, ``q``, ``sigterm`` or ``sigkill``) and the seconds it took.
    """
    started = time.monotonic()
    if proc.poll() is not None:
        return "exited", 0.0
    with contextlib.suppress(BrokenPipeError, OSError, ValueError):
        assert proc.stdin is not None
        proc.stdin.write(b"q\n")
        proc.stdin.flush()
    try:
        proc.wait(timeout=grace)
        return "q", time.monotonic() - started
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(timeout=10)
        return "sigterm", time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return "sigkill", time.monotonic() - started


def _locate(dst: Path, name: str) -> list[str]:
    """Return where files called ``name`` ended up under ``dst`` (for error messages)."""
    return [p.relative_to(dst).as_posix() for p in dst.rglob(name)][:5]


# --------------------------------------------------------------------------- runner


def run_openmsistream(
    bootstrap: str,
    src_dir: Path,
    dst_dir: Path,
    topic: str,
    *,
    partitions: int = 2,
    workdir: Path | None = None,
    n_threads: int = 2,
    manage_topic: bool = True,
    timeout: float = 3600.0,
    stall_timeout: float = STALL_TIMEOUT_S,
    join_timeout: float = 60.0,
    join_margin: float = 1.0,
    poll_interval: float = 0.1,
    keep_workdir: bool = False,
) -> BenchResult:
    """Run OpenMSIStream's uploader into its download directory once and verify the result.

    Args:
        bootstrap: Broker address ``host:port``.
        src_dir: Directory with the data set (never written to).
        dst_dir: Empty (or absent) directory for the rebuilt files.
        topic: Topic to use.
        partitions: Partitions when the topic is created here.
        workdir: Where the config file, the hard-linked upload copy and the program logs go
            (a temporary directory when ``None``).
        n_threads: ``--n_threads`` for both programs (OpenMSIStream's default is 2).
        manage_topic: Create the topic before and delete it after the run.
        timeout: Seconds allowed for the transfer.
        stall_timeout: Give up once no file changed or completed for this long.
        join_timeout: Seconds to wait for the download directory's consumer group.
        join_margin: Extra seconds after the group is STABLE before the upload starts.
        poll_interval: Seconds between destination scans.
        keep_workdir: Keep the upload copy and logs afterwards.

    Returns:
        The measured result (``seconds`` from uploader spawn to the last file complete).

    Raises:
        ValueError: If ``dst_dir`` is not empty.
        PipelineStalled: If the transfer stopped making progress.
        RuntimeError: If a program dies or the transfer does not finish in time.
    """
    src_dir, dst_dir = Path(src_dir).resolve(), Path(dst_dir).resolve()
    if dst_dir.exists() and any(dst_dir.iterdir()):
        raise ValueError(f"destination {dst_dir} is not empty")
    dst_dir.mkdir(parents=True, exist_ok=True)
    python = omsi_python()
    files = list_tree(src_dir)
    nbytes = sum(f.size for f in files)
    made_workdir = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-omsi-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    upload_dir = work / f"upload-{unique_suffix()}"
    link_or_copy_tree(src_dir, upload_dir)
    config = write_config(work / "omsi.config", bootstrap)
    group = f"bench-omsi-{unique_suffix()}"
    if manage_topic:
        create_topic(bootstrap, topic, partitions)
    sampler = RssSampler()
    downloader: subprocess.Popen[bytes] | None = None
    uploader: subprocess.Popen[bytes] | None = None
    stops: dict[str, Any] = {}
    try:
        with (work / "download.out").open("wb") as dlog, (work / "upload.out").open("wb") as ulog:
            launched = time.time()
            downloader = _start(
                python,
                DOWNLOAD_MODULE,
                [
                    str(dst_dir),
                    "--config", str(config),
                    "--topic_name", topic,
                    "--consumer_group_id", group,
                    "--n_threads", str(n_threads),
                ],
                dlog,
                work,
            )  # fmt: skip
            sampler.watch("download", downloader.pid)
            stable = wait_group_stable(bootstrap, group, join_timeout)
            join_s = None if stable is None else round(stable - launched, 3)
            if stable is None:  # broker cannot tell: wait for a join to be certain
                time.sleep(2 * KAFKA_SESSION_TIMEOUT_MS / 1000)
            time.sleep(join_margin)
            if downloader.poll() is not None:
                raise RuntimeError(f"download directory exited early: {work / 'download.out'}")
            watcher = CompletionWatcher(src_dir, dst_dir, files)
            started = time.time()
            uploader = _start(
                python,
                UPLOAD_MODULE,
                [
                    str(upload_dir),
                    "--config", str(config),
                    "--topic_name", topic,
                    "--upload_existing",
                    "--chunk_size", str(CHUNK_SIZE),
                    "--n_threads", str(n_threads),
                ],
                ulog,
                work,
            )  # fmt: skip
            sampler.watch("upload", uploader.pid)
            deadline = time.monotonic() + timeout
            while not watcher.poll():
                for role, proc in (("download", downloader), ("upload", uploader)):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{role} program exited with {proc.returncode}")
                if time.time() - watcher.last_progress_at > stall_timeout:
                    stuck = watcher.stuck_files()
                    raise PipelineStalled(
                        f"no progress for {stall_timeout:.0f} s; {len(stuck)} of {len(files)} "
                        f"files incomplete: {'; '.join(stuck[:5])}"
                    )
                if time.monotonic() > deadline:
                    where = _locate(dst_dir, Path(files[0].rel).name) if files else []
                    raise RuntimeError(
                        f"{watcher.pending} of {len(files)} files incomplete after {timeout} s"
                        f" (first file found at: {where})"
                    )
                time.sleep(poll_interval)
            seconds = watcher.last_completion() - started
            first_file_s = watcher.first_completion() - started
            rss = sampler.stop()
            stops["upload"] = stop_with_q(uploader)
            stops["download"] = stop_with_q(downloader)
        comparison = compare_trees(src_dir, dst_dir, files=files, exclude_dirs=OMSI_LOG_NAMES)
        return BenchResult.build(
            name=NAME,
            files=len(files),
            nbytes=nbytes,
            seconds=seconds,
            comparison=comparison,
            rss_by_role=rss,
            extra={
                "consumer_join_s": join_s,
                "first_file_s": round(first_file_s, 3),
                "stop": {role: [how, round(took, 2)] for role, (how, took) in stops.items()},
                "dst_extra_files": list(comparison.extra),
                "partitions": partitions,
                "n_threads": n_threads,
                "chunk_size": CHUNK_SIZE,
                "workdir": str(work),
            },
        )
    finally:
        sampler.stop()
        for role, child in (("upload", uploader), ("download", downloader)):
            if child is not None and role not in stops:
                stop_with_q(child, grace=15.0)
        if manage_topic:
            with contextlib.suppress(Exception):
                delete_topic(bootstrap, topic)
        if not keep_workdir:
            shutil.rmtree(upload_dir, ignore_errors=True)
            if made_workdir:
                shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: Arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="data set directory")
    parser.add_argument("--dst", type=Path, required=True, help="empty destination directory")
    parser.add_argument("--bootstrap", help="broker host:port (default: start a Tansu broker)")
    parser.add_argument("--topic", help="topic name (default: a fresh unique name)")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--n-threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="config, upload copy and program logs")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    topic = args.topic or f"bench-omsi-{unique_suffix()}"
    with contextlib.ExitStack() as stack:
        bootstrap = args.bootstrap
        if not bootstrap:
            broker = stack.enter_context(MemoryBroker(log_dir=args.workdir))
            bootstrap = broker.bootstrap
        result = run_openmsistream(
            bootstrap,
            args.src,
            args.dst,
            topic,
            partitions=args.partitions,
            workdir=args.workdir,
            n_threads=args.n_threads,
            timeout=args.timeout,
            keep_workdir=args.keep_workdir,
        )
    print(result.summary(), file=sys.stderr)
    print(result.to_json())
    if args.json:
        args.json.write_text(result.to_json() + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
