"""The minimal raw confluent-kafka file pipeline: the floor any file transfer is measured against.

Two child processes, no framework:

* the **receiver** (started first, measured once its group assignment arrives) consumes in
  batches with ``Consumer.consume(num_messages=..., timeout=...)``, writes each chunk with
  ``os.pwrite`` at its offset into ``DST/<relative path>``, and calls ``fsync`` on a file
  and closes it when all of its bytes are in;
* the **sender** reads each source file once and produces 512 KiB messages keyed by the file's
  relative path, with headers ``name`` (relative POSIX path), ``offset`` and ``size`` (decimal
  ASCII), then flushes.

The clock starts just before the sender process is spawned and stops when the receiver has
fsynced the last file, so the sender's interpreter start-up is counted (as it is for the other
pipelines). Afterwards every file is compared by SHA-256. Nothing here hashes during transfer,
resumes, or guards against hostile input beyond refusing paths that leave the destination:
it is a baseline, not a product.

Usage::

    python -m bench.raw_pipeline run --src DATA --dst OUT                # own Tansu broker
    python -m bench.raw_pipeline run --src DATA --dst OUT --bootstrap 127.0.0.1:29092

From Python::

    result = run_raw("127.0.0.1:29092", Path("DATA"), Path("OUT"), "bench-raw")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import IO, Any

from bench.common import (
    KAFKA_SESSION_TIMEOUT_MS,
    BenchResult,
    MemoryBroker,
    compare_trees,
    create_topic,
    delete_topic,
    list_tree,
    self_peak_rss_mb,
    stop_process,
    unique_suffix,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "raw-confluent-kafka"
"""Pipeline name in results."""

CHUNK_SIZE = 512 * 1024
"""Bytes per message value (OpenMSIStream's default chunk size, for a like-for-like run)."""

CONSUME_BATCH = 64
"""``num_messages`` per ``Consumer.consume`` call (64 x 512 KiB = 32 MiB in hand at most)."""

CONSUMER_QUEUE_KBYTES = 32 * 1024
"""librdkafka's per-partition pre-fetch queue cap (KiB); the default is 64 MiB per partition."""

PRODUCER_QUEUE_KBYTES = 64 * 1024
"""librdkafka's in-memory produce queue cap (KiB). The default (1 GiB) would let the sender
read a whole data set into RAM ahead of the broker; 64 MiB keeps memory flat."""


# --------------------------------------------------------------------------- child: receiver


def _emit(event: str, **fields: Any) -> None:
    """Print one JSON status line for the parent process."""
    print(json.dumps({"event": event, **fields}), flush=True)


def _safe_target(dst: Path, name: str) -> Path:
    """Map a message's relative path onto ``dst``, refusing anything that leaves it.

    Args:
        dst: Destination root.
        name: Relative POSIX path from the message header.

    Returns:
        The target path.

    Raises:
        ValueError: For absolute paths, ``..`` segments or NUL bytes.
    """
    rel = PurePosixPath(name)
    if not name or "\x00" in name or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"refusing path {name!r}")
    return dst.joinpath(*rel.parts)


def _headers(msg: Any) -> dict[str, str]:
    """Return a message's headers as text."""
    result: dict[str, str] = {}
    for key, value in msg.headers() or []:
        if isinstance(value, bytes):
            result[key] = value.decode()
        elif value is not None:
            result[key] = str(value)
    return result


class _OpenFile:
    """A file being rebuilt: its descriptor, expected size and the chunk offsets written."""

    __slots__ = ("fd", "offsets", "received", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.offsets: set[int] = set()
        self.received = 0


def receive(
    bootstrap: str, topic: str, group: str, dst: Path, expect_files: int, idle_timeout: float
) -> int:
    """Consume chunks and rebuild files until ``expect_files`` files are complete.

    Emits JSON lines on stdout: ``assigned`` once partitions are assigned, ``done`` at the end.

    Args:
        bootstrap: Broker address.
        topic: Topic to consume.
        group: Consumer group id.
        dst: Destination directory.
        expect_files: Number of files to wait for.
        idle_timeout: Give up after this many seconds without a message.

    Returns:
        Process exit code (0 when every expected file was completed).
    """
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": KAFKA_SESSION_TIMEOUT_MS,
            "queued.max.messages.kbytes": CONSUMER_QUEUE_KBYTES,
        }
    )

    def on_assign(_consumer: Any, partitions: list[Any]) -> None:
        _emit("assigned", t=time.time(), partitions=len(partitions))

    consumer.subscribe([topic], on_assign=on_assign)
    dst.mkdir(parents=True, exist_ok=True)
    open_files: dict[str, _OpenFile] = {}
    completed = 0
    first_message: float | None = None
    last_complete: float | None = None
    last_activity = time.monotonic()
    messages = 0
    try:
        while completed < expect_files:
            batch = consumer.consume(num_messages=CONSUME_BATCH, timeout=0.5)
            if not batch:
                if time.monotonic() - last_activity > idle_timeout:
                    break
                continue
            last_activity = time.monotonic()
            if first_message is None:
                first_message = time.time()
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"consume error: {err}")
                messages += 1
                headers = _headers(msg)
                name = headers["name"]
                offset = int(headers["offset"])
                size = int(headers["size"])
                entry = open_files.get(name)
                if entry is None:
                    target = _safe_target(dst, name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
                    entry = open_files[name] = _OpenFile(fd, size)
                value = msg.value() or b""
                if offset not in entry.offsets:
                    os.pwrite(entry.fd, value, offset)
                    entry.offsets.add(offset)
                    entry.received += len(value)
                if entry.received >= entry.size:
                    os.fsync(entry.fd)
                    os.close(entry.fd)
                    del open_files[name]
                    completed += 1
                    last_complete = time.time()
    finally:
        for entry in open_files.values():
            os.close(entry.fd)
        _emit(
            "done",
            completed=completed,
            messages=messages,
            first_message=first_message,
            last_complete=last_complete,
            peak_rss_mb=self_peak_rss_mb(),
        )
        consumer.close()
    return 0 if completed >= expect_files else 1


# --------------------------------------------------------------------------- child: sender


def send(bootstrap: str, topic: str, src: Path, chunk_size: int) -> int:
    """Produce every file under ``src`` as chunks keyed by relative path, then flush.

    Emits one JSON line ``sent`` on stdout at the end.

    Args:
        bootstrap: Broker address.
        topic: Topic to produce to.
        src: Source directory.
        chunk_size: Bytes per message value.

    Returns:
        Process exit code (0 when every message was delivered).
    """
    from confluent_kafka import Producer

    started = time.time()
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "queue.buffering.max.kbytes": PRODUCER_QUEUE_KBYTES,
        }
    )
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    def produce(key: bytes, value: bytes, headers: list[tuple[str, str | bytes | None]]) -> None:
        while True:
            try:
                producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)

    messages = 0
    nbytes = 0
    for item in list_tree(src):
        key = item.rel.encode()
        size_h = str(item.size).encode()
        with (src / item.rel).open("rb", buffering=0) as handle:
            offset = 0
            while True:
                chunk = handle.read(chunk_size)
                if not chunk and (offset > 0 or item.size > 0):
                    break
                headers: list[tuple[str, str | bytes | None]] = [
                    ("name", key),
                    ("offset", str(offset).encode()),
                    ("size", size_h),
                ]
                produce(key, chunk, headers)
                messages += 1
                offset += len(chunk)
                nbytes += len(chunk)
                if not chunk:  # an empty file is one empty message
                    break
    left = producer.flush(120)
    _emit(
        "sent",
        started=started,
        flushed=time.time(),
        messages=messages,
        bytes=nbytes,
        undelivered=left,
        failures=len(failures),
        peak_rss_mb=self_peak_rss_mb(),
    )
    return 0 if left == 0 and not failures else 1


# --------------------------------------------------------------------------- parent


class _EventReader:
    """Collect the JSON status lines a child prints on stdout (other lines are kept as text)."""

    def __init__(self, stream: IO[str], role: str) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.text: list[str] = []
        self._role = role
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                self.text.append(line.rstrip())
                continue
            if isinstance(event, dict) and "event" in event:
                self.events.put(event)
            else:
                self.text.append(line.rstrip())

    def wait_for(self, name: str, timeout: float) -> dict[str, Any]:
        """Return the next event called ``name``.

        Args:
            name: Event name.
            timeout: Seconds to wait.

        Raises:
            TimeoutError: If it does not arrive in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self._role}: no {name!r} event in {timeout} s")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event["event"] == name:
                return event


def _child(args: list[str], log: IO[bytes]) -> subprocess.Popen[str]:
    """Start this module as a child process with a sub-command."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.raw_pipeline", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def run_raw(
    bootstrap: str,
    src_dir: Path,
    dst_dir: Path,
    topic: str,
    *,
    partitions: int = 2,
    chunk_size: int = CHUNK_SIZE,
    manage_topic: bool = True,
    timeout: float = 3600.0,
    log_dir: Path | None = None,
) -> BenchResult:
    """Run the raw pipeline once from ``src_dir`` to ``dst_dir`` and verify the result.

    Args:
        bootstrap: Broker address ``host:port``.
        src_dir: Directory with the data set.
        dst_dir: Empty (or absent) directory to rebuild files into.
        topic: Topic to use.
        partitions: Partitions when the topic is created here.
        chunk_size: Bytes per message.
        manage_topic: Create the topic before and delete it after the run.
        timeout: Seconds allowed for the whole transfer.
        log_dir: Where the children's stderr goes (a temporary directory when ``None``).

    Returns:
        The measured result (``seconds`` from sender spawn to last file fsynced).

    Raises:
        ValueError: If ``dst_dir`` is not empty.
        RuntimeError: If a child process fails.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if dst_dir.exists() and any(dst_dir.iterdir()):
        raise ValueError(f"destination {dst_dir} is not empty")
    dst_dir.mkdir(parents=True, exist_ok=True)
    files = list_tree(src_dir)
    nbytes = sum(f.size for f in files)
    group = f"bench-raw-{unique_suffix()}"
    logs = Path(log_dir or tempfile.mkdtemp(prefix="bench-raw-"))
    logs.mkdir(parents=True, exist_ok=True)
    if manage_topic:
        create_topic(bootstrap, topic, partitions)
    receiver: subprocess.Popen[str] | None = None
    sender: subprocess.Popen[str] | None = None
    try:
        with (
            (logs / "raw-receiver.err").open("wb") as rlog,
            (logs / "raw-sender.err").open("wb") as slog,
        ):
            launched = time.time()
            receiver = _child(
                [
                    "receive",
                    "--bootstrap", bootstrap,
                    "--topic", topic,
                    "--group", group,
                    "--dst", str(dst_dir),
                    "--expect-files", str(len(files)),
                ],
                rlog,
            )  # fmt: skip
            assert receiver.stdout is not None
            rx = _EventReader(receiver.stdout, "receiver")
            assigned = rx.wait_for("assigned", timeout=120)
            started = time.time()
            sender = _child(
                [
                    "send",
                    "--bootstrap", bootstrap,
                    "--topic", topic,
                    "--src", str(src_dir),
                    "--chunk-size", str(chunk_size),
                ],
                slog,
            )  # fmt: skip
            assert sender.stdout is not None
            tx = _EventReader(sender.stdout, "sender")
            done = rx.wait_for("done", timeout=timeout)
            sent = tx.wait_for("sent", timeout=120)
            receiver.wait(timeout=60)
            sender.wait(timeout=60)
        if done["completed"] < len(files) or done["last_complete"] is None:
            raise RuntimeError(f"receiver completed {done['completed']} of {len(files)} files")
        if sender.returncode != 0:
            raise RuntimeError(f"sender failed: {sent}")
        seconds = float(done["last_complete"]) - started
        comparison = compare_trees(src_dir, dst_dir, files=files)
        return BenchResult.build(
            name=NAME,
            files=len(files),
            nbytes=nbytes,
            seconds=seconds,
            comparison=comparison,
            rss_by_role={
                "sender": round(float(sent["peak_rss_mb"]), 1),
                "receiver": round(float(done["peak_rss_mb"]), 1),
            },
            extra={
                "consumer_join_s": round(float(assigned["t"]) - launched, 3),
                "sender_flushed_s": round(float(sent["flushed"]) - started, 3),
                "sender_startup_s": round(float(sent["started"]) - started, 3),
                "first_message_s": round(float(done["first_message"]) - started, 3),
                "messages": sent["messages"],
                "partitions": partitions,
                "chunk_size": chunk_size,
            },
        )
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                stop_process(proc)
        if manage_topic:
            with contextlib.suppress(Exception):
                delete_topic(bootstrap, topic)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``run``; ``receive`` and ``send`` are used internally).

    Args:
        argv: Arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmark once")
    run.add_argument("--src", type=Path, required=True, help="data set directory")
    run.add_argument("--dst", type=Path, required=True, help="empty destination directory")
    run.add_argument("--bootstrap", help="broker host:port (default: start a Tansu broker)")
    run.add_argument("--topic", help="topic name (default: a fresh unique name)")
    run.add_argument("--partitions", type=int, default=2)
    run.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    run.add_argument("--log-dir", type=Path, help="where child logs (and tansu's) go")
    run.add_argument("--json", type=Path, help="also write the result as JSON here")
    rcv = sub.add_parser("receive")
    rcv.add_argument("--bootstrap", required=True)
    rcv.add_argument("--topic", required=True)
    rcv.add_argument("--group", required=True)
    rcv.add_argument("--dst", type=Path, required=True)
    rcv.add_argument("--expect-files", type=int, required=True)
    rcv.add_argument("--idle-timeout", type=float, default=120.0)
    snd = sub.add_parser("send")
    snd.add_argument("--bootstrap", required=True)
    snd.add_argument("--topic", required=True)
    snd.add_argument("--src", type=Path, required=True)
    snd.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    args = parser.parse_args(argv)

    if args.command == "receive":
        return receive(
            args.bootstrap, args.topic, args.group, args.dst, args.expect_files, args.idle_timeout
        )
    if args.command == "send":
        return send(args.bootstrap, args.topic, args.src, args.chunk_size)

    topic = args.topic or f"bench-raw-{unique_suffix()}"
    with contextlib.ExitStack() as stack:
        bootstrap = args.bootstrap
        if not bootstrap:
            broker = stack.enter_context(MemoryBroker(log_dir=args.log_dir))
            bootstrap = broker.bootstrap
        result = run_raw(
            bootstrap,
            args.src,
            args.dst,
            topic,
            partitions=args.partitions,
            chunk_size=args.chunk_size,
            log_dir=args.log_dir,
        )
    print(result.summary(), file=sys.stderr)
    print(result.to_json())
    if args.json:
        args.json.write_text(result.to_json() + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
