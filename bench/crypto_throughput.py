"""Throughput of encrypted (KafkaCrypto) versus plaintext msi transfer, side by side.

One Tansu memory broker, the same files, both modes in every round (alternating, so load
changes on the shared machine hit both alike). Per round and mode, on a fresh topic:

* **send**: ``FileProducer.upload_all`` of every file until the broker acknowledged all;
* **rebuild**: a fresh ``Reassembler`` (new consumer group, and in encrypted mode a fresh
  consumer node, so the key exchange is included) from its start until the last file is
  verified and in place;
* **rebuild after first file**: from the first file in place to the last, which leaves out
  the group join and the key exchange.

The producer node stays open for the whole run (it answers the consumers' key requests).
Every rebuilt tree is checked against the source by SHA-256.

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

from pydantic import SecretStr

from bench.common import MB, TansuBroker, compare_trees, unique_suffix
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
SESSION_TIMEOUT_MS = 6000
PARTITIONS = 4
SECRETS = ProvisioningSecrets(SecretStr("bench-root-of-trust-pw"), SecretStr("bench-prov-pw"))


@dataclass
class Sample:
    """Seconds of one round of one mode on one data set."""

    send_s: float
    rebuild_s: float
    rebuild_after_first_s: float


@dataclass
class Series:
    """All rounds of one mode on one data set."""

    samples: list[Sample] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        """Median seconds of one phase."""
        return statistics.median(getattr(s, attribute) for s in self.samples)


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
    consumer_node: NodeFiles,
) -> Sample:
    """Send the tree to a fresh topic and rebuild it; return the timings."""
    topic = f"bench-crypto-{mode}-{unique_suffix()}"
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

    with contextlib.ExitStack() as stack:
        consumer_codec = None
        started = time.perf_counter()
        if mode == "encrypted":
            consumer_codec = CryptoCodec.open(consumer_node.config, connection, key_wait_s=60)
            stack.callback(consumer_codec.close)
        settings = ReassemblerSettings(
            topic=topic,
            destination=str(dest),
            group_id=f"g-{topic}",
            session_timeout_ms=SESSION_TIMEOUT_MS,
        )
        reassembler = Reassembler(connection, settings, on_event, codec=consumer_codec)
        reassembler.run(
            threading.Event(), StopConditions(stop_after_files=len(files), idle_timeout_s=120)
        )
    if rejected or len(times) != len(files):
        raise RuntimeError(f"{mode}: {len(times)} of {len(files)} rebuilt, rejected {rejected[:3]}")
    comparison = compare_trees(src, dest, exclude_dirs=(".msi-staging", ".msi-state"))
    if comparison.problems:
        raise RuntimeError(f"{mode}: rebuilt tree differs: {comparison.problems[:5]}")
    return Sample(send_s, times[-1] - started, times[-1] - times[0])


@contextlib.contextmanager
def _producer_codec(connection: KafkaConnection, node: NodeFiles) -> Iterator[CryptoCodec]:
    codec = CryptoCodec.open(node.config, connection)
    try:
        yield codec
    finally:
        codec.close()


def _row(name: str, total: int, count: int, plain: Series, crypto: Series, attr: str) -> str:
    p, c = plain.median(attr), crypto.median(attr)
    return (
        f"| {name} | {attr.removesuffix('_s').replace('_', ' ')} | "
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
        broker = stack.enter_context(TansuBroker(log_dir=work))
        connection = KafkaConnection(bootstrap_servers=broker.bootstrap)
        codec = stack.enter_context(_producer_codec(connection, producer_node))
        results: dict[tuple[str, str], Series] = {}
        for spec in DATASETS:
            src = work / spec.name
            make_dataset(spec, src)
            for round_no in range(args.rounds):
                for mode in MODES:
                    sample = run_once(
                        connection,
                        src,
                        work,
                        mode,
                        codec if mode == "encrypted" else None,
                        consumer_node,
                    )
                    results.setdefault((spec.name, mode), Series()).samples.append(sample)
                    print(
                        f"{spec.name} round {round_no + 1} {mode}: send {sample.send_s:.2f} s, "
                        f"rebuild {sample.rebuild_s:.2f} s "
                        f"(after first file {sample.rebuild_after_first_s:.2f} s)",
                        flush=True,
                    )
        print()
        print(f"Medians of {args.rounds} rounds; ratio = encrypted / plaintext throughput.")
        print()
        print("| data set | phase | plaintext | encrypted | ratio |")
        print("| --- | --- | --- | --- | --- |")
        for spec in DATASETS:
            plain, crypto = results[(spec.name, "plaintext")], results[(spec.name, "encrypted")]
            label = (
                f"{spec.files} x {spec.size // KIB} KiB"
                if spec.size < MIB
                else (f"{spec.files} x {spec.size // MIB} MiB")
            )
            for attr in ("send_s", "rebuild_s", "rebuild_after_first_s"):
                print(_row(label, spec.total_bytes, spec.files, plain, crypto, attr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
