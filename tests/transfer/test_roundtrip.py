"""Round trips through the real broker: files sent by the producer come back byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.producer import FileProducer, ProducerSettings, UploadOutcome
from msi_prefect.transfer.reassembler import (
    MAX_OPEN_STAGING_FILES,
    FileEventKind,
)
from msi_prefect.transfer.registry import Registry
from tests.conftest import RunningStack
from tests.transfer_helpers import CHUNK, make_tree, rebuild, send, staging_leftovers, tree_digests

pytestmark = pytest.mark.stack


def test_files_of_mixed_sizes_round_trip(kafka_stack: RunningStack, topic: str, tmp_path: Path):
    sizes = {
        "empty.dat": 0,
        "one-byte.bin": 1,
        "exact-chunk.bin": CHUNK,
        "chunk-plus-one.bin": CHUNK + 1,
        "sub/dir/big.tif": 5 * CHUNK + 123,
        "names/a;b c'd\"e.csv": 10,
        "names/ünïcödé.txt": 20,
    }
    src, dest = tmp_path / "src", tmp_path / "dest"
    expected = make_tree(src, sizes)
    results = send(kafka_stack, topic, src, tmp_path / "reg.sqlite", sorted(sizes))
    assert {r.relpath: r.outcome for r in results} == dict.fromkeys(sizes, UploadOutcome.SENT)
    assert {r.relpath: r.sha256 for r in results} == expected

    events, reassembler = rebuild(kafka_stack, topic, dest, len(sizes))
    assert tree_digests(dest) == expected
    assert sorted(e.relpath for e in events if e.kind is FileEventKind.RECONSTRUCTED) == sorted(
        sizes
    )
    assert reassembler.stats.files_rejected == 0
    assert staging_leftovers(dest) == []


def test_sending_again_is_a_no_op_and_a_change_is_a_new_generation(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
):
    src, dest, reg = tmp_path / "src", tmp_path / "dest", tmp_path / "reg.sqlite"
    make_tree(src, {"data.bin": 3 * CHUNK})
    first = send(kafka_stack, topic, src, reg, ["data.bin"])
    again = send(kafka_stack, topic, src, reg, ["data.bin"])
    assert [r.outcome for r in again] == [UploadOutcome.ALREADY_SENT]
    # Rewrite it shorter: the new generation must replace the old one with no stale bytes.
    (src / "data.bin").write_bytes(b"short")
    second = send(kafka_stack, topic, src, reg, ["data.bin"])
    assert second[0].generation == first[0].generation + 1

    events, _ = rebuild(kafka_stack, topic, dest, 2)
    assert [e.generation for e in events] == [1, 2]
    assert (dest / "data.bin").read_bytes() == b"short"


def test_more_files_in_flight_than_open_staging_files(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
):
    """Hundreds of one-chunk files in one batch: the open-file cap must not drop writes."""
    sizes = {f"many/{i:04d}.dat": 100 + i for i in range(MAX_OPEN_STAGING_FILES * 2 + 10)}
    src, dest = tmp_path / "src", tmp_path / "dest"
    expected = make_tree(src, sizes)
    send(kafka_stack, topic, src, tmp_path / "reg.sqlite", sorted(sizes))
    events, reassembler = rebuild(kafka_stack, topic, dest, len(sizes))
    assert reassembler.stats.files_rejected == 0
    assert len(events) == len(sizes)
    assert tree_digests(dest) == expected


def test_a_file_changed_while_read_is_aborted_and_sent_again_whole(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
):
    src, dest, reg = tmp_path / "src", tmp_path / "dest", tmp_path / "reg.sqlite"
    make_tree(src, {"growing.log": 3 * CHUNK})
    connection = KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers)

    def append_after_first_chunk(relpath: str, done: int, size: int) -> None:
        if done == CHUNK:  # the instrument writes more while the file is being read
            with (src / relpath).open("ab") as handle:
                handle.write(b"more lines\n")

    with Registry(reg) as registry:
        producer = FileProducer(
            connection, ProducerSettings(topic=topic, chunk_size=CHUNK), registry
        )
        first = producer.upload_all(
            [(src / "growing.log", "growing.log")], append_after_first_chunk
        )
        assert [r.outcome for r in first] == [UploadOutcome.CHANGED_WHILE_READING]
        again = producer.upload_all([(src / "growing.log", "growing.log")])
        assert [(r.outcome, r.generation) for r in again] == [(UploadOutcome.SENT, 2)]

    events, reassembler = rebuild(kafka_stack, topic, dest, 1)
    assert [(e.kind, e.generation) for e in events] == [(FileEventKind.RECONSTRUCTED, 2)]
    assert reassembler.stats.files_rejected == 0
    assert (dest / "growing.log").read_bytes() == (src / "growing.log").read_bytes()
    assert staging_leftovers(dest) == []  # the aborted generation is gone
