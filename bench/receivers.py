"""Receiving side only: msi-prefect's reassembler against the raw receiver, on filled topics.

`bench.compare` times whole pipelines, where sender, receiver and broker share the cores.
This harness isolates the receiving side, the bottleneck for many small files: each
pipeline's sender fills its own topic once, then the receivers are run round after round
(msi-prefect, then raw) on those topics, each with a new consumer group, into a fresh
destination.

Per round it reports the receiver's *span* (first file or message to the last file complete
on disk, so start-up and the group join are left out) and the CPU time of the receiving
process (user + system, all threads, start-up included).

Usage (data sets are generated on first use, as for `bench.compare`)::

    .venv/bin/python -m bench.receivers --set small10k --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    KAFKA_SESSION_TIMEOUT_MS,
    MemoryBroker,
    create_topic,
    list_tree,
    unique_suffix,
)
from bench.datasets import PRESETS, make_dataset

# Generous: a receiver that takes longer than this is broken, not slow.
RECEIVER_TIMEOUT_S = 600.0
PARTITIONS = 2


@dataclass(frozen=True)
class ReceiverRound:
    """One receiver run.

    Attributes:
        pipeline: ``msi`` or ``raw``.
        span_s: First file (msi) or message (raw) to the last file complete.
        cpu_s: User + system CPU seconds of the receiving process.
    """

    pipeline: str
    span_s: float
    cpu_s: float


def _python_module(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


def fill_topics(bootstrap: str, src: Path, work: Path) -> tuple[str, str]:
    """Send the data set once with each pipeline's sender; return (msi topic, raw topic)."""
    msi_topic, raw_topic = f"recv-msi-{unique_suffix()}", f"recv-raw-{unique_suffix()}"
    for topic in (msi_topic, raw_topic):
        create_topic(bootstrap, topic, PARTITIONS)
    subprocess.run(
        _python_module(
            "msi_prefect.cli", "upload", str(src), "--topic", msi_topic,
            "--bootstrap", bootstrap, "--registry", str(work / "registry.sqlite"),
        ),
        check=True, stdout=subprocess.DEVNULL, timeout=RECEIVER_TIMEOUT_S,
    )  # fmt: skip
    subprocess.run(
        _python_module(
            "bench.raw_pipeline", "send", "--bootstrap", bootstrap, "--topic", raw_topic,
            "--src", str(src),
        ),
        check=True, stdout=subprocess.DEVNULL, timeout=RECEIVER_TIMEOUT_S,
    )  # fmt: skip
    return msi_topic, raw_topic


def receive_msi(bootstrap: str, topic: str, files: int, dst: Path, work: Path) -> ReceiverRound:
    """Run `msi-prefect reconstruct` until every file is delivered."""
    summary = work / "receiver.json"
    cpu_before = _children_cpu_s()
    subprocess.run(
        _python_module(
            "msi_prefect.cli", "reconstruct", str(dst), "--topic", topic,
            "--bootstrap", bootstrap, "--group", f"recv-{unique_suffix()}",
            "--stop-after-files", str(files),
            "--session-timeout-ms", str(KAFKA_SESSION_TIMEOUT_MS),
            "--summary-json", str(summary),
        ),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=RECEIVER_TIMEOUT_S,
    )  # fmt: skip
    cpu = _children_cpu_s() - cpu_before
    report = json.loads(summary.read_text())
    if report["reconstructed"] != files:
        raise RuntimeError(f"msi-prefect rebuilt {report['reconstructed']} of {files} files")
    return ReceiverRound("msi", report["last_file_at"] - report["first_file_at"], cpu)


def receive_raw(bootstrap: str, topic: str, files: int, dst: Path) -> ReceiverRound:
    """Run the raw pipeline's receiver until every file is fsynced."""
    cpu_before = _children_cpu_s()
    out = subprocess.run(
        _python_module(
            "bench.raw_pipeline", "receive", "--bootstrap", bootstrap, "--topic", topic,
            "--group", f"recv-{unique_suffix()}", "--dst", str(dst),
            "--expect-files", str(files),
        ),
        check=True, capture_output=True, text=True, timeout=RECEIVER_TIMEOUT_S,
    ).stdout  # fmt: skip
    cpu = _children_cpu_s() - cpu_before
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    done = next(event for event in events if event["event"] == "done")
    if done["completed"] != files:
        raise RuntimeError(f"the raw receiver completed {done['completed']} of {files} files")
    return ReceiverRound("raw", done["last_complete"] - done["first_message"], cpu)


def main(argv: list[str] | None = None) -> int:
    """Fill the topics, run the receivers round by round, print rounds and medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", default="small10k", choices=PRESETS, dest="data_set")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR / "data")
    args = parser.parse_args(argv)
    src = args.data_dir / args.data_set
    make_dataset(PRESETS[args.data_set], src)
    files = len(list_tree(src))
    work = Path(tempfile.mkdtemp(prefix="bench-receivers-"))
    print(f"# bench.receivers {' '.join(argv or sys.argv[1:])}  ({time.ctime()})", flush=True)
    rounds: list[ReceiverRound] = []
    try:
        with MemoryBroker(log_dir=work) as broker:
            msi_topic, raw_topic = fill_topics(broker.bootstrap, src, work)
            for number in range(args.rounds):
                for pipeline in ("msi", "raw"):
                    dst = work / f"dst-{pipeline}-{number}"
                    if pipeline == "msi":
                        result = receive_msi(broker.bootstrap, msi_topic, files, dst, work)
                    else:
                        result = receive_raw(broker.bootstrap, raw_topic, files, dst)
                    rounds.append(result)
                    print(json.dumps(result.__dict__), flush=True)
                    # Destinations stay until the end (see bench.compare.run_round).
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n### receivers only, {args.data_set} ({files} files)\n")
    print("| receiver | rounds | median span s | files/s | median CPU s | CPU ms per file |")
    print("| --- | --- | --- | --- | --- | --- |")
    medians = {}
    for pipeline in ("msi", "raw"):
        mine = [r for r in rounds if r.pipeline == pipeline]
        span = statistics.median(r.span_s for r in mine)
        cpu = statistics.median(r.cpu_s for r in mine)
        medians[pipeline] = span
        print(
            f"| {pipeline} | {len(mine)} | {span:.2f} | {files / span:.0f} | {cpu:.2f} | "
            f"{cpu / files * 1000:.2f} |"
        )
    print(f"\nmsi-prefect receiver speed / raw: **{medians['raw'] / medians['msi']:.2f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
