"""Latency of the transfer core: from "stable in a watched folder" to "complete at the destination".

Target: a file that becomes stable in a watched folder is complete at the destination within
(stability window + 1 s), median.

Method (one Tansu memory broker on 127.0.0.1, a 2-partition topic):

1. ``msi-prefect reconstruct DEST`` starts first; the harness waits until its consumer group
   is STABLE.
2. For each stability window ``W``: ``msi-prefect watch SRC --stability-window W
   --poll-interval 1`` starts, the harness waits 2 s, sends one warm-up file (reported
   separately: it carries the producer's start-up), then writes ``N`` files, one every
   ``--interval`` seconds, sizes alternating 8 KiB and 4 MiB, in two variants:

   * ``replace``: the file is written under a temporary name outside the watched folder,
     then ``os.replace``-d into it, so it is complete at one instant ``t0`` (just after the
     rename returns);
   * ``in-place``: the file is written inside the watched folder in 3 pieces 0.1 s apart;
     ``t0`` is just after the last write returns.

3. A poller thread stats every outstanding file at the destination every 5 ms. Arrival is the
   time of the first stat that shows the full size; the file's SHA-256 is then checked (the
   reconstructor renames verified files into place, so a full-size file is complete).
   ``latency = arrival - t0``, ``excess = latency - W``.

The children's stdout lines (``sent NAME`` when the broker acknowledged the last chunk,
``reconstructed NAME`` when the file was renamed into place) are timestamped as they are
read, which splits the latency into watcher + producer and consumer parts. The watch loop
serves delivery reports only every 0.2 s when idle, so ``sent`` times lag by up to 0.2 s.

Every process started here is stopped by PID (SIGTERM, then SIGKILL after 10 s) and the
topic is deleted. Results go to stdout and to ``bench/LATENCY.md``.

Usage::

    .venv/bin/python -m bench.latency
    .venv/bin/python -m bench.latency --files 10 --windows 0.5 --no-write
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from bench.common import (
    BENCH_DIR,
    KAFKA_SESSION_TIMEOUT_MS,
    MemoryBroker,
    create_topic,
    delete_topic,
    stop_process,
    unique_suffix,
    wait_for_other_bench,
    wait_group_stable,
    write_replace,
)
from bench.report import (
    fmt_seconds,
    machine_lines,
    median_or_none,
    minus,
    p90,
)

REPO_DIR = BENCH_DIR.parent
REPORT_PATH = BENCH_DIR / "LATENCY.md"
COMMAND = "cd /work/main && .venv/bin/python -m bench.latency"

KIB = 1024
MIB = 1024 * KIB
SIZES = (8 * KIB, 4 * MIB)
"""File sizes, alternated."""
VARIANTS = ("replace", "in-place")
IN_PLACE_PIECES = 3
IN_PLACE_GAP_S = 0.1
PARTITIONS = 2
POLL_S = 0.005
"""Period of the destination poller."""
WATCHER_START_S = 2.0
"""Pause between starting the watcher and writing the first file."""
JOIN_TIMEOUT_S = 60.0
FILE_TIMEOUT_S = 30.0
"""A file not at the destination this long after ``W`` has elapsed counts as lost."""
STOP_GRACE_S = 10.0
LINE_PATTERN = re.compile(r"^(sent|reconstructed) (\S+) \(")


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class Sample:
    """One file's journey.

    Attributes:
        window: Stability window in seconds.
        variant: ``replace`` or ``in-place``.
        name: File name (relative path in SRC and DEST).
        size: Size in bytes.
        sha256: Expected hex SHA-256.
        t0: ``time.time()`` at which the file was complete in SRC.
        arrival: ``time.time()`` of the poll that found it complete in DEST, if it did.
        sent_at: When the watcher printed ``sent NAME``.
        rebuilt_at: When the reconstructor printed ``reconstructed NAME``.
        warmup: The first file after the watcher started (not in the statistics).
    """

    window: float
    variant: str
    name: str
    size: int
    sha256: str
    t0: float
    arrival: float | None = None
    sent_at: float | None = None
    rebuilt_at: float | None = None
    warmup: bool = False

    @property
    def latency(self) -> float | None:
        """``arrival - t0`` in seconds, or ``None`` if the file never arrived."""
        return None if self.arrival is None else self.arrival - self.t0

    @property
    def excess(self) -> float | None:
        """Latency beyond the stability window, in seconds."""
        latency = self.latency
        return None if latency is None else latency - self.window

    @property
    def to_sent(self) -> float | None:
        """Seconds from ``t0`` to the watcher's ``sent`` line."""
        return None if self.sent_at is None else self.sent_at - self.t0

    @property
    def to_rebuilt(self) -> float | None:
        """Seconds from ``t0`` to the reconstructor's ``reconstructed`` line."""
        return None if self.rebuilt_at is None else self.rebuilt_at - self.t0


class LineStamps:
    """Timestamps of the children's ``sent NAME`` / ``reconstructed NAME`` lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stamps: dict[tuple[str, str], float] = {}

    def record(self, line: str, when: float) -> None:
        """Remember the first time a ``sent`` or ``reconstructed`` line named a file.

        Args:
            line: One line of a child's stdout.
            when: ``time.time()`` at which it was read.
        """
        match = LINE_PATTERN.match(line)
        if match:
            with self._lock:
                self._stamps.setdefault((match.group(1), match.group(2)), when)

    def get(self, kind: str, name: str) -> float | None:
        """Return the time of a recorded line, if any.

        Args:
            kind: ``sent`` or ``reconstructed``.
            name: File name.

        Returns:
            The ``time.time()`` it was read at, or ``None``.
        """
        with self._lock:
            return self._stamps.get((kind, name))


class Child:
    """A child process whose stdout is timestamped line by line into a log file.

    Args:
        role: Name used for the log files.
        command: The command line.
        log_dir: Where ``ROLE.out`` (``<unix time> <line>``) and ``ROLE.err`` go.
        stamps: Receives every stdout line.
    """

    def __init__(self, role: str, command: list[str], log_dir: Path, stamps: LineStamps) -> None:
        self.role = role
        self.command = command
        self._err = (log_dir / f"{role}.err").open("wb")
        self._out = (log_dir / f"{role}.out").open("w", encoding="utf-8")
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            command,
            cwd=REPO_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
        )
        self._stamps = stamps
        self._reader = threading.Thread(target=self._read, name=f"{role}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream: IO[str] | None = self.proc.stdout
        if stream is None:
            return
        for line in stream:
            now = time.time()
            self._stamps.record(line, now)
            self._out.write(f"{now:.6f} {line}")
            self._out.flush()

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """Stop by PID (SIGTERM, then SIGKILL after 10 s) and close the logs.

        Returns:
            The exit code, or ``None`` if it could not be reaped.
        """
        code = stop_process(self.proc, grace=STOP_GRACE_S)
        if self._out.closed:
            return code
        self._reader.join(timeout=5)
        self._out.close()
        self._err.close()
        return code


class DestinationPoller:
    """Polls DEST every 5 ms for outstanding files and records their arrival.

    Args:
        dest: Destination folder.
        interval: Seconds between polls.
    """

    def __init__(self, dest: Path, interval: float = POLL_S) -> None:
        self._dest = dest
        self._interval = interval
        self._lock = threading.Lock()
        self._outstanding: dict[str, Sample] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dest-poller", daemon=True)
        self._thread.start()

    def expect(self, sample: Sample) -> None:
        """Start watching for a file.

        Args:
            sample: The file; its ``arrival`` is set when it is found complete.
        """
        with self._lock:
            self._outstanding[sample.name] = sample

    def pending(self) -> list[Sample]:
        """Files not yet found complete."""
        with self._lock:
            return list(self._outstanding.values())

    def give_up(self, sample: Sample) -> None:
        """Stop watching for a file (it stays without an arrival).

        Args:
            sample: The file.
        """
        with self._lock:
            self._outstanding.pop(sample.name, None)

    def close(self) -> None:
        """Stop the polling thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            for sample in self.pending():
                target = self._dest / sample.name
                try:
                    size = target.stat().st_size
                except OSError:
                    continue
                seen = time.time()
                if size == sample.size and _sha256(target) == sample.sha256:
                    sample.arrival = seen
                    self.give_up(sample)


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


# --------------------------------------------------------------------------- writing files


def write_in_place(src: Path, name: str, data: bytes) -> float:
    """Write a file inside the watched folder in pieces, ``IN_PLACE_GAP_S`` apart.

    Args:
        src: Watched folder.
        name: File name.
        data: Content.

    Returns:
        ``t0``: the time just after the last write returned.
    """
    step = -(-len(data) // IN_PLACE_PIECES)
    fd = os.open(src / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    t0 = 0.0
    try:
        for index in range(IN_PLACE_PIECES):
            if index:
                time.sleep(IN_PLACE_GAP_S)
            view = memoryview(data)[index * step : (index + 1) * step]
            while view:
                written = os.write(fd, view)
                view = view[written:]
            t0 = time.time()
    finally:
        os.close(fd)
    return t0


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Options:
    """Settings of one benchmark run.

    Attributes:
        files: Files per window and variant.
        interval: Seconds between the starts of two file writes.
        windows: Stability windows to test.
        variants: Write variants to run.
        timeout: Overall time limit in seconds.
        write_report: Write ``bench/LATENCY.md``.
        keep: Keep the work directory (data included).
    """

    files: int
    interval: float
    windows: tuple[float, ...]
    variants: tuple[str, ...]
    timeout: float
    write_report: bool
    keep: bool


class Deadline:
    """An overall time limit.

    Args:
        seconds: Seconds from now.
    """

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    def passed(self) -> bool:
        """Whether the limit has passed."""
        return self.left() <= 0


def cli_command(*args: str) -> list[str]:
    """Return the command line running ``msi_prefect.cli`` with this interpreter.

    Args:
        *args: CLI arguments.

    Returns:
        The command.
    """
    return [sys.executable, "-m", "msi_prefect.cli", *args]


def wait_arrivals(poller: DestinationPoller, samples: Sequence[Sample], deadline: Deadline) -> None:
    """Wait until every sample arrived, or timed out, or the deadline passed.

    Args:
        poller: The destination poller.
        samples: Files to wait for.
        deadline: Overall limit.
    """
    names = {s.name for s in samples}
    while True:
        waiting = [s for s in poller.pending() if s.name in names]
        if not waiting:
            return
        now = time.time()
        for sample in waiting:
            if now - sample.t0 > sample.window + FILE_TIMEOUT_S or deadline.passed():
                poller.give_up(sample)
        time.sleep(0.05)


def run_window(
    window: float,
    opts: Options,
    *,
    work: Path,
    dest: Path,
    bootstrap: str,
    topic: str,
    stamps: LineStamps,
    poller: DestinationPoller,
    deadline: Deadline,
    children: list[Child],
) -> list[Sample]:
    """Start a watcher with one stability window, send the files, stop the watcher.

    Args:
        window: Stability window in seconds.
        opts: Run settings.
        work: Work directory.
        dest: Destination folder of the reconstructor.
        bootstrap: Broker address.
        topic: Topic name.
        stamps: Collects the children's stdout lines.
        poller: Destination poller.
        deadline: Overall limit.
        children: Every started child is appended here (so it is stopped on any error).

    Returns:
        The samples, warm-up file first.
    """
    tag = f"w{window:g}"
    src = work / f"src-{tag}"
    staging = work / f"staging-{tag}"
    src.mkdir()
    staging.mkdir()
    watcher = Child(
        f"watch-{tag}",
        cli_command(
            "watch",
            str(src),
            "--topic",
            topic,
            "--bootstrap",
            bootstrap,
            "--registry",
            str(work / "registry.sqlite"),
            "--stability-window",
            f"{window:g}",
            "--poll-interval",
            "1",
        ),
        work,
        stamps,
    )
    children.append(watcher)
    time.sleep(WATCHER_START_S)
    if not watcher.alive():
        raise RuntimeError(f"watcher exited with {watcher.proc.returncode}: see {work}")

    samples: list[Sample] = []

    def send(variant: str, index: int, size: int, warmup: bool = False) -> Sample:
        data = os.urandom(size)
        label = "warmup" if warmup else f"{index:03d}"
        name = f"{tag}-{variant}-{label}-{size // KIB}k.bin"
        if variant == "replace":
            t0 = write_replace(src, staging, name, data)
        else:
            t0 = write_in_place(src, name, data)
        sample = Sample(
            window, variant, name, size, hashlib.sha256(data).hexdigest(), t0, warmup=warmup
        )
        poller.expect(sample)
        samples.append(sample)
        return sample

    warm = send(opts.variants[0], 0, SIZES[0], warmup=True)
    wait_arrivals(poller, [warm], deadline)
    for variant in opts.variants:
        batch: list[Sample] = []
        start = time.monotonic()
        for index in range(opts.files):
            if deadline.passed():
                break
            pause = start + index * opts.interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            batch.append(send(variant, index, SIZES[index % len(SIZES)]))
        wait_arrivals(poller, batch, deadline)
        print(f"  W={window:g} {variant}: " + summary_line(batch), flush=True)
    watcher.stop()
    for sample in samples:
        sample.sent_at = stamps.get("sent", sample.name)
    return samples


def run(opts: Options) -> tuple[list[Sample], dict[str, Any]]:
    """Run the whole benchmark.

    Args:
        opts: Run settings.

    Returns:
        The samples and notes about the run (timings of set-up, load, paths).
    """
    deadline = Deadline(opts.timeout)
    work = Path(tempfile.mkdtemp(prefix="msi-latency-"))
    dest = work / "dest"
    dest.mkdir()
    notes: dict[str, Any] = {"work_dir": str(work)}
    stamps = LineStamps()
    children: list[Child] = []
    samples: list[Sample] = []
    broker = MemoryBroker(log_dir=work)
    poller: DestinationPoller | None = None
    topic = f"bench-latency-{unique_suffix()}"
    group = f"{topic}-group"
    topic_created = False
    try:
        broker.start()
        notes["broker_pid"] = broker.pid
        create_topic(broker.bootstrap, topic, PARTITIONS)
        topic_created = True
        started = time.time()
        reconstructor = Child(
            "reconstruct",
            cli_command(
                "reconstruct",
                str(dest),
                "--topic",
                topic,
                "--bootstrap",
                broker.bootstrap,
                "--group",
                group,
                "--session-timeout-ms",
                str(KAFKA_SESSION_TIMEOUT_MS),
            ),
            work,
            stamps,
        )
        children.append(reconstructor)
        stable = wait_group_stable(
            broker.bootstrap, group, min(JOIN_TIMEOUT_S, max(1.0, deadline.left()))
        )
        if stable is None:
            raise RuntimeError(f"consumer group {group} not STABLE in time: see {work}")
        notes["consumer_join_s"] = round(stable - started, 2)
        print(f"reconstructor joined its group in {notes['consumer_join_s']} s", flush=True)
        poller = DestinationPoller(dest)
        for window in opts.windows:
            if deadline.passed():
                print("overall timeout reached; skipping the remaining windows", flush=True)
                break
            samples += run_window(
                window,
                opts,
                work=work,
                dest=dest,
                bootstrap=broker.bootstrap,
                topic=topic,
                stamps=stamps,
                poller=poller,
                deadline=deadline,
                children=children,
            )
        notes["timed_out"] = deadline.passed()
    finally:
        if poller is not None:
            poller.close()
        for child in reversed(children):
            code = child.stop()
            notes[f"exit_{child.role}"] = code
        for sample in samples:
            sample.sent_at = stamps.get("sent", sample.name)
            sample.rebuilt_at = stamps.get("reconstructed", sample.name)
        if topic_created:
            try:
                delete_topic(broker.bootstrap, topic)
            except Exception as exc:
                print(f"could not delete topic {topic}: {exc}", file=sys.stderr)
        broker.stop()
        if not opts.keep:
            for entry in work.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
    return samples, notes


# --------------------------------------------------------------------------- statistics


def sample_record(sample: Sample) -> dict[str, Any]:
    """Return one sample as a JSON-ready dictionary, derived figures included.

    Args:
        sample: A measured file.

    Returns:
        Its fields plus ``latency``, ``excess``, ``to_sent`` and ``to_rebuilt``.
    """
    record = dataclasses.asdict(sample)
    for name in ("latency", "excess", "to_sent", "to_rebuilt"):
        record[name] = getattr(sample, name)
    return record


def summary_line(samples: Sequence[Sample]) -> str:
    """One-line summary of some samples.

    Args:
        samples: Measured files.

    Returns:
        Median, p90 and max latency in seconds plus the number lost.
    """
    latencies = [s.latency for s in samples if s.latency is not None]
    lost = len(samples) - len(latencies)
    if not latencies:
        return f"no file arrived ({lost} lost)"
    return (
        f"median {statistics.median(latencies):.3f} s, p90 {p90(latencies):.3f} s, "
        f"max {max(latencies):.3f} s, {lost} lost"
    )


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table.

    Attributes:
        label: What the row covers.
        window: Stability window in seconds.
        samples: Its measured files.
    """

    label: str
    window: float
    samples: tuple[Sample, ...]

    def cells(self) -> list[str]:
        """Return the markdown cells of this row."""
        latencies = [s.latency for s in self.samples if s.latency is not None]
        lost = len(self.samples) - len(latencies)
        if not latencies:
            return [self.label, f"0/{len(self.samples)}", *(["n/a"] * 8)]
        median = statistics.median(latencies)
        ok = "yes" if median <= self.window + 1.0 and not lost else "**no**"
        return [
            self.label,
            f"{len(latencies)}/{len(self.samples)}",
            f"{median:.3f}",
            f"{p90(latencies):.3f}",
            f"{max(latencies):.3f}",
            f"{median - self.window:+.3f}",
            ok,
            fmt_seconds(median_or_none([s.to_sent for s in self.samples])),
            fmt_seconds(median_or_none([s.to_rebuilt for s in self.samples])),
            fmt_seconds(median_or_none([minus(s.arrival, s.rebuilt_at) for s in self.samples])),
        ]


HEADER = (
    "| W (s) / subset | arrived | median (s) | p90 (s) | max (s) | median excess (s) "
    "| median <= W + 1 s | t0 -> `sent` (s) | t0 -> `reconstructed` (s) "
    "| `reconstructed` -> seen (s) |"
)


def rows_for(samples: Sequence[Sample], windows: Sequence[float]) -> list[Row]:
    """Group measured (non-warm-up) samples into table rows.

    Args:
        samples: Every sample.
        windows: Windows in run order.

    Returns:
        Per window: all files, then per variant, then per size.
    """
    rows: list[Row] = []
    for window in windows:
        mine = [s for s in samples if s.window == window and not s.warmup]
        if not mine:
            continue
        rows.append(Row(f"**W = {window:g}, all**", window, tuple(mine)))
        for variant in VARIANTS:
            subset = tuple(s for s in mine if s.variant == variant)
            if subset:
                rows.append(Row(f"W = {window:g}, {variant}", window, subset))
        for size in SIZES:
            subset = tuple(s for s in mine if s.size == size)
            if subset:
                label = f"{size // KIB} KiB" if size < MIB else f"{size // MIB} MiB"
                rows.append(Row(f"W = {window:g}, {label}", window, subset))
    return rows


def markdown_table(samples: Sequence[Sample], windows: Sequence[float]) -> str:
    """Return the results as a markdown table.

    Args:
        samples: Every sample.
        windows: Windows in run order.

    Returns:
        The table.
    """
    lines = [HEADER, "|" + "---|" * 10]
    for row in rows_for(samples, windows):
        lines.append("| " + " | ".join(row.cells()) + " |")
    return "\n".join(lines)


def warmup_lines(samples: Sequence[Sample]) -> list[str]:
    """Describe the warm-up files (first file after each watcher start).

    Args:
        samples: Every sample.

    Returns:
        One markdown bullet per warm-up file.
    """
    lines = []
    for s in samples:
        if s.warmup:
            lines.append(
                f"- W = {s.window:g}: first file ({s.size // KIB} KiB, {s.variant}) latency "
                f"{fmt_seconds(s.latency)} s (t0 -> `sent` {fmt_seconds(s.to_sent)} s, t0 -> "
                f"`reconstructed` {fmt_seconds(s.to_rebuilt)} s)"
            )
    return lines


# --------------------------------------------------------------------------- report


def machine_notes(load_start: tuple[float, float, float]) -> list[str]:
    """Describe the machine and the broker.

    Args:
        load_start: ``os.getloadavg()`` at start.

    Returns:
        Markdown bullets.
    """
    return [
        *machine_lines(load_start),
        "- Broker: Tansu, memory storage, 127.0.0.1; 2-partition topic; reconstructor "
        f"session timeout {KAFKA_SESSION_TIMEOUT_MS} ms; watcher poll interval 1 s "
        "(inotify nudges on).",
    ]


def report(
    samples: Sequence[Sample],
    opts: Options,
    notes: dict[str, Any],
    load_start: tuple[float, float, float],
    argv: Sequence[str],
    started: str,
) -> str:
    """Build the markdown report.

    Args:
        samples: Every sample.
        opts: Run settings.
        notes: Notes returned by :func:`run`.
        load_start: ``os.getloadavg()`` at start.
        argv: Command-line arguments given.
        started: Start date and time, human readable.

    Returns:
        The report text.
    """
    command = COMMAND + ("" if not argv else " " + " ".join(argv))
    verdicts = []
    for row in rows_for(samples, opts.windows):
        if row.label.endswith("all**"):
            verdict = row.cells()[6]
            verdicts.append(f"W = {row.window:g} s: median <= W + 1 s: {verdict}")
    parts = [
        "# Transfer-core latency: stable in the watched folder -> complete at the destination",
        "",
        'Target: "a file that becomes stable in a watched folder is complete at the '
        'destination within (stability window + 1 s), median".',
        "",
        f"- Command: `{command}`",
        f"- Date: {started}",
        *machine_notes(load_start),
        f"- {opts.files} files per window and variant, one every {opts.interval:g} s, sizes "
        "alternating 8 KiB and 4 MiB; variants: `replace` (written outside, `os.replace`d "
        "in; t0 = just after the rename) and `in-place` (written in the folder in 3 pieces "
        "0.1 s apart; t0 = just after the last write).",
        "- Arrival: first 5 ms poll of DEST whose `stat` shows the full size (SHA-256 then "
        "checked). Latency = arrival - t0; excess = latency - W.",
        f"- Consumer group join: {notes.get('consumer_join_s', 'n/a')} s"
        + ("; **overall timeout reached**" if notes.get("timed_out") else ""),
        "",
        "## Verdict",
        "",
        *(f"- {v}" for v in verdicts),
        "",
        "## Results",
        "",
        markdown_table(samples, opts.windows),
        "",
        "Stage columns (medians): `sent` is the watcher's line once the broker acknowledged "
        "the last chunk (the watch loop serves delivery reports every 0.2 s when idle, so it "
        "lags by up to 0.2 s); `reconstructed` is the reconstructor's line once the file "
        "was verified and renamed into place; `reconstructed -> seen` is the harness's own "
        "observation delay. Warm-up files are not in the table.",
        "",
        "## First file after each watcher start (producer start-up included)",
        "",
        *warmup_lines(samples),
        "",
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the latency benchmark, print the table and write ``bench/LATENCY.md``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0 when every file arrived and every median met the target, else 1.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=30, help="files per window and variant")
    parser.add_argument("--interval", type=float, default=1.5, help="seconds between files")
    parser.add_argument("--windows", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--timeout", type=float, default=300.0, help="overall limit, seconds")
    parser.add_argument("--no-write", action="store_true", help="do not write LATENCY.md")
    parser.add_argument("--keep", action="store_true", help="keep the data in the work dir")
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    opts = Options(
        files=args.files,
        interval=args.interval,
        windows=tuple(args.windows),
        variants=tuple(args.variants),
        timeout=args.timeout,
        write_report=not args.no_write,
        keep=args.keep,
    )

    wait_for_other_bench()
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"# bench.latency {' '.join(given)}  ({started})", flush=True)
    print(f"os.getloadavg() at start: {load_start}", flush=True)
    samples, notes = run(opts)
    raw = Path(notes["work_dir"]) / "samples.jsonl"
    raw.write_text("".join(json.dumps(sample_record(s)) + "\n" for s in samples))
    table = markdown_table(samples, opts.windows)
    print(table)
    for line in warmup_lines(samples):
        print(line)
    print(f"logs, samples.jsonl: {notes['work_dir']}; load at end {os.getloadavg()}", flush=True)
    if opts.write_report:
        REPORT_PATH.write_text(report(samples, opts, notes, load_start, given, started))
        print(f"wrote {REPORT_PATH}", flush=True)
    return 0 if _all_met(samples, opts.windows) else 1


def _all_met(samples: Sequence[Sample], windows: Sequence[float]) -> bool:
    rows = [r for r in rows_for(samples, windows) if r.label.endswith("all**")]
    return bool(rows) and all(r.cells()[6] == "yes" for r in rows)


if __name__ == "__main__":
    sys.exit(main())
