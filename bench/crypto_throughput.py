"""Throughput of encrypted (KafkaCrypto) versus plaintext msi transfer, side by side.

One Tansu memory broker, the same files, both modes in every round (alternating, so load
changes on the shared machine hit both alike). Per round and mode, on a fresh topic:

* **send**: ``FileProducer.upload_all`` of every file until the broker acknowledged all;
* **rebuild**: a fresh ``Reassembler`` (new consumer group, so both modes pay the same
  group join, about 3 s on Tansu) from its start until the last file is verified and in
  place;
* **consume**: the same rebuild from its first batch of messages on, which leaves out the
  group join (decryption and everything after it included).

All topics share one KafkaCrypto topic root (``benchcrypto``), so one key exchange serves
the whole run; the producer and consumer nodes stay open throughout. A warm-up round of
each mode per data set (not in the medians) pays for the key exchange; its times are
printed as "first contact". Every rebuilt tree is checked by SHA-256.

Usage::

    .venv/bin/python -m bench.crypto_throughput --rounds 3

Prints a Markdown table of medians (MB/s = 10**6 bytes per second) and the
encrypted / plaintext ratios, for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench.common import MB, MemoryBroker, compare_trees, unique_suffix
from bench.datasets import KIB, MIB, DatasetSpec, make_dataset
from msi_prefect.transfer.crypto import (
    CryptoCodec,
    NodeFiles,
    NodeRole,
    ProvisioningSecrets,
    provision_node,
)
from msi_prefect.transfer.kafka import KafkaConnection, ensure_topic
from msi_prefect.transfer.producer import FileProducer, ProducerSettings, UploadOutcome
from msi_prefect.transfer.reassembler import (
    FileEvent,
    FileEventKind,
    Reassembler,
    ReassemblerSettings,
)
from msi_prefect.transfer.registry import Registry
from msi_prefect.transfer.stopping import StopConditions

DATASETS = (DatasetSpec("crypto16m", 8, 16 * MIB), DatasetSpec("crypto8k", 500, 8 * KIB))
MODES = ("plaintext", "encrypted")
PHASES = {
    "send_s": "send",
    "consume_s": "consume",
    "rebuild_s": "rebuild",
    "total_s": "send + rebuild",
}
SESSION_TIMEOUT_MS = 6000
PARTITIONS = 4
TOPIC_ROOT = "benchcrypto"
SECRETS = ProvisioningSecrets(SecretStr("bench-root-of-trust-pw"), SecretStr("bench-prov-pw"))


@dataclass
class Sample:
    """Seconds of one round of one mode on one data set."""

    send_s: float
    rebuild_s: float
    consume_s: float

    @property
    def total_s(self) -> float:
        """Send plus rebuild."""
        return self.send_s + self.rebuild_s


@dataclass
class Series:
    """All rounds of one mode on one data set."""

    samples: list[Sample] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        """Median seconds of one phase."""
        return float(statistics.median(getattr(s, attribute) for s in self.samples))


class _TimedReassembler(Reassembler):
    """Notes when the first batch of messages arrived (bench only)."""

    first_batch_at: float | None = None

    def _handle_batch_with_retry(self, messages: list[Any], stop: threading.Event) -> None:
        if self.first_batch_at is None:
            self.first_batch_at = time.perf_counter()
        super()._handle_batch_with_retry(messages, stop)


def _files(root: Path) -> list[tuple[Path, str]]:
    return sorted(
        (path, path.relative_to(root).as_posix()) for path in root.rglob("*") if path.is_file()
    )


def run_once(
    connection: KafkaConnection,
    src: Path,
    work: Path,
    mode: str,
    producer_codec: CryptoCodec | None,
    consumer_codec: CryptoCodec | None,
) -> Sample:
    """Send the tree to a fresh topic and rebuild it; return the timings."""
    topic = f"{TOPIC_ROOT}.{mode}-{unique_suffix()}"
    ensure_topic(connection, topic, partitions=PARTITIONS)
    if producer_codec is not None:
        producer_codec.prepare_topic(topic)
    files = _files(src)
    dest = work / f"dest-{topic}"
    with Registry(work / f"registry-{topic}.sqlite") as registry:
        producer = FileProducer(
            connection, ProducerSettings(topic=topic), registry, codec=producer_codec
        )
        started = time.perf_counter()
        results = producer.upload_all(files)
        send_s = time.perf_counter() - started
    bad = [r for r in results if r.outcome is not UploadOutcome.SENT]
    if bad:
        raise RuntimeError(f"{len(bad)} files not sent: {bad[:3]}")

    times: list[float] = []
    rejected: list[FileEvent] = []

    def on_event(event: FileEvent) -> None:
        if event.kind is FileEventKind.RECONSTRUCTED:
            times.append(time.perf_counter())
        else:
            rejected.append(event)

    started = time.perf_counter()
    settings = ReassemblerSettings(
        topic=topic,
        destination=str(dest),
        group_id=f"g-{topic}",
        session_timeout_ms=SESSION_TIMEOUT_MS,
    )
    reassembler = _TimedReassembler(connection, settings, on_event, codec=consumer_codec)
    reassembler.run(
        threading.Event(), StopConditions(stop_after_files=len(files), idle_timeout_s=120)
    )
    if rejected or len(times) != len(files):
        raise RuntimeError(f"{mode}: {len(times)} of {len(files)} rebuilt, rejected {rejected[:3]}")
    comparison = compare_trees(src, dest, exclude_dirs=(".msi-staging", ".msi-state"))
    if comparison.problems:
        raise RuntimeError(f"{mode}: rebuilt tree differs: {comparison.problems[:5]}")
    assert reassembler.first_batch_at is not None
    return Sample(send_s, times[-1] - started, times[-1] - reassembler.first_batch_at)


@contextlib.contextmanager
def _open_codec(connection: KafkaConnection, node: NodeFiles) -> Iterator[CryptoCodec]:
    codec = CryptoCodec.open(node.config, connection, key_wait_s=60, topics=[TOPIC_ROOT])
    try:
        yield codec
    finally:
        codec.close()


def _row(name: str, total: int, count: int, plain: Series, crypto: Series, attr: str) -> str:
    p, c = plain.median(attr), crypto.median(attr)
    return (
        f"| {name} | {PHASES[attr]} | "
        f"{total / MB / p:.1f} MB/s ({count / p:.0f} files/s) | "
        f"{total / MB / c:.1f} MB/s ({count / c:.0f} files/s) | {p / c:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        nodes = work / "nodes"
        producer_node = provision_node(
            NodeFiles(nodes, "bench-producer"), NodeRole.PRODUCER, SECRETS
        )
        consumer_node = provision_node(
            NodeFiles(nodes, "bench-consumer"), NodeRole.CONSUMER, SECRETS
        )
        broker = stack.enter_context(MemoryBroker(log_dir=work))
        connection = KafkaConnection(bootstrap_servers=broker.bootstrap)
        producer_codec = stack.enter_context(_open_codec(connection, producer_node))
        consumer_codec = stack.enter_context(_open_codec(connection, consumer_node))
        codecs = {"plaintext": (None, None), "encrypted": (producer_codec, consumer_codec)}
        results: dict[tuple[str, str], Series] = {}
        for spec in DATASETS:
            src = work / spec.name
            make_dataset(spec, src)
            for round_no in range(args.rounds + 1):
                for mode in MODES:
                    sample = run_once(connection, src, work, mode, *codecs[mode])
                    label = "first contact" if round_no == 0 else f"round {round_no}"
                    if round_no:
                        results.setdefault((spec.name, mode), Series()).samples.append(sample)
                    print(
                        f"{spec.name} {label} {mode}: send {sample.send_s:.2f} s, "
                        f"rebuild {sample.rebuild_s:.2f} s (consume {sample.consume_s:.2f} s)",
                        flush=True,
                    )
        print()
        print(f"Medians of {args.rounds} rounds; ratio = encrypted / plaintext throughput.")
        print()
        print("| data set | phase | plaintext | encrypted | ratio |")
        print("| --- | --- | --- | --- | --- |")
        for spec in DATASETS:
            plain, crypto = results[(spec.name, "plaintext")], results[(spec.name, "encrypted")]
            size = f"{spec.size // MIB} MiB" if spec.size >= MIB else f"{spec.size // KIB} KiB"
            for attr in PHASES:
                label = f"{spec.files} x {size}"
                print(_row(label, spec.total_bytes, spec.files, plain, crypto, attr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
