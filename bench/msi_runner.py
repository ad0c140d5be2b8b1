"""Run msi_prefect's own pipeline the way the baselines are run, for a side-by-side figure.

The receiver (`msi-prefect reconstruct`) starts first and joins its consumer group; then the
clock starts and the sender (`msi-prefect upload`) is spawned, so its interpreter start-up is
counted as it is for the other pipelines. The clock stops at the moment the receiver
delivered its last file (verified, fsynced and renamed into place), which it records in its
`--summary-json`. Both children report their own peak RSS there. Afterwards every file is
compared by SHA-256.

Usage::

    python -m bench.msi_runner --src DATA --dst OUT --bootstrap 127.0.0.1:29092
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    KAFKA_SESSION_TIMEOUT_MS,
    BenchResult,
    compare_trees,
    create_topic,
    delete_topic,
    list_tree,
    stop_process,
    unique_suffix,
    wait_group_stable,
)
from msi_prefect.transfer.wire import DEFAULT_CHUNK_SIZE

NAME = "msi-prefect"
JOIN_TIMEOUT_S = 120.0
# Our state dirs inside the destination are not part of the data set.
STATE_DIRS = (".msi-staging", ".msi-state")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "msi_prefect.cli", *args]


def run_msi(
    bootstrap: str,
    src_dir: Path,
    dst_dir: Path,
    topic: str,
    *,
    partitions: int = 2,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    manage_topic: bool = True,
    timeout: float = 3600.0,
    log_dir: Path | None = None,
) -> BenchResult:
    """Run msi_prefect once from ``src_dir`` to ``dst_dir`` and verify the result.

    Args:
        bootstrap: Broker address ``host:port``.
        src_dir: Directory with the data set.
        dst_dir: Empty (or absent) directory to rebuild files into.
        topic: Topic to use.
        partitions: Partitions when the topic is created here.
        chunk_size: Bytes per message.
        manage_topic: Create the topic before and delete it after the run.
        timeout: Seconds allowed for the whole transfer.
        log_dir: Where the children's logs, registry and summaries go.

    Returns:
        The measured result (``seconds`` from sender spawn to last file delivered).

    Raises:
        ValueError: If ``dst_dir`` is not empty.
        RuntimeError: If a child process fails.
    """
    if dst_dir.exists() and any(dst_dir.iterdir()):
        raise ValueError(f"destination {dst_dir} is not empty")
    dst_dir.mkdir(parents=True, exist_ok=True)
    files = list_tree(src_dir)
    nbytes = sum(f.size for f in files)
    group = f"bench-msi-{unique_suffix()}"
    work = Path(log_dir or tempfile.mkdtemp(prefix="bench-msi-"))
    work.mkdir(parents=True, exist_ok=True)
    receiver_summary, sender_summary = work / "receiver.json", work / "sender.json"
    common = ["--topic", topic, "--bootstrap", bootstrap]
    if manage_topic:
        create_topic(bootstrap, topic, partitions)
    receiver = sender = None
    try:
        with (work / "receiver.log").open("wb") as rlog, (work / "sender.log").open("wb") as slog:
            receiver = subprocess.Popen(
                _cli(
                    "reconstruct", str(dst_dir), *common, "--group", group,
                    "--stop-after-files", str(len(files)),
                    "--session-timeout-ms", str(KAFKA_SESSION_TIMEOUT_MS),
                    "--summary-json", str(receiver_summary),
                ),
                stdout=subprocess.DEVNULL, stderr=rlog, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if wait_group_stable(bootstrap, group, JOIN_TIMEOUT_S) is None:
                raise RuntimeError("the receiver did not join its consumer group")
            started = time.time()
            sender = subprocess.Popen(
                _cli(
                    "upload", str(src_dir), "--root", str(src_dir), *common,
                    "--chunk-size", str(chunk_size), "--no-progress",
                    "--registry", str(work / "registry.sqlite"),
                    "--summary-json", str(sender_summary),
                ),
                stdout=slog, stderr=slog, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if sender.wait(timeout=timeout) != 0:
                raise RuntimeError(f"sender failed, see {work / 'sender.log'}")
            if receiver.wait(timeout=timeout) != 0:
                raise RuntimeError(f"receiver failed, see {work / 'receiver.log'}")
        received: dict[str, Any] = json.loads(receiver_summary.read_text())
        sent: dict[str, Any] = json.loads(sender_summary.read_text())
        if received["reconstructed"] != len(files) or received["last_file_at"] is None:
            raise RuntimeError(f"receiver rebuilt {received['reconstructed']} of {len(files)}")
        comparison = compare_trees(src_dir, dst_dir, files=files, exclude_dirs=STATE_DIRS)
        return BenchResult.build(
            name=NAME,
            files=len(files),
            nbytes=nbytes,
            seconds=float(received["last_file_at"]) - started,
            comparison=comparison,
            rss_by_role={"sender": sent["peak_rss_mb"], "receiver": received["peak_rss_mb"]},
            extra={
                "sender_finished_s": round(float(sent["finished_at"]) - started, 3),
                "first_file_s": round(float(received["first_file_at"]) - started, 3),
                "partitions": partitions,
                "chunk_size": chunk_size,
            },
        )
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                stop_process(proc)
        if manage_topic:
            delete_topic(bootstrap, topic)


def main(argv: list[str] | None = None) -> int:
    """Run once and print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--dst", type=Path, required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", default=f"bench-msi-{unique_suffix()}")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    args = parser.parse_args(argv)
    result = run_msi(
        args.bootstrap,
        args.src,
        args.dst,
        args.topic,
        partitions=args.partitions,
        chunk_size=args.chunk_size,
    )
    print(result.to_json())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
