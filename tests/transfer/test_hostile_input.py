"""Hostile and malformed messages on a real topic: rejected with a reason, nothing escapes.

The messages are crafted by hand with confluent-kafka, as an attacker with write access to
the topic would. After them, a valid file must still arrive: the consumer keeps going.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from confluent_kafka import Producer

from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.reassembler import (
    FileEvent,
    FileEventKind,
    Reassembler,
    ReassemblerSettings,
)
from msi_prefect.transfer.stopping import StopConditions
from msi_prefect.transfer.wire import FORMAT_VERSION, DecodeLimits, file_id_for
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack
from tests.transfer_helpers import make_tree, send

pytestmark = pytest.mark.stack

MAX_FILE_SIZE = 1024 * 1024


def chunk_headers(relpath: str, data: bytes, **overrides: str | None) -> list[tuple[str, bytes]]:
    """Headers of a one-chunk file, with any field overridden (None drops the header)."""
    fields: dict[str, str | None] = {
        "msi.v": FORMAT_VERSION,
        "msi.kind": "chunk",
        "msi.fid": file_id_for(relpath) if _plain(relpath) else "0" * 32,
        "msi.path": relpath,
        "msi.size": str(len(data)),
        "msi.csz": str(max(1, len(data))),
        "msi.idx": "0",
        "msi.n": "1",
        "msi.off": "0",
        "msi.mtime": "1700000000000000000",
        "msi.pid": "attacker",
        "msi.gen": "1",
        "msi.sha256": hashlib.sha256(data).hexdigest(),
    }
    fields.update(overrides)
    return [(name, value.encode()) for name, value in fields.items() if value is not None]


def _plain(relpath: str) -> bool:
    try:
        file_id_for(relpath)
    except Exception:
        return False
    return True


def test_hostile_messages_are_rejected_and_the_consumer_keeps_going(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    # A symlink planted inside the destination that points outside it.
    (dest / "escape").symlink_to(outside, target_is_directory=True)
    payload = b"evil"
    key = file_id_for("x.txt").encode()

    # (expected rejection code, case) -> (key, value, headers)
    Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]
    hostile: dict[tuple[str, str], Message] = {
        ("unsafe-path", "absolute path"): (
            key,
            payload,
            chunk_headers(f"{outside}/abs.txt", payload),
        ),
        ("unsafe-path", "parent segments"): (
            key,
            payload,
            chunk_headers("../outside/up.txt", payload),
        ),
        ("unsafe-path", "nested parents"): (
            key,
            payload,
            chunk_headers("a/../../outside/up2.txt", payload),
        ),
        ("unsafe-path", "nul byte"): (key, payload, chunk_headers("a\x00b.txt", payload)),
        ("unsafe-path", "drive letter"): (key, payload, chunk_headers("C:/windows/x.txt", payload)),
        ("unsafe-path", "backslashes"): (
            key,
            payload,
            chunk_headers("..\\..\\outside\\bs.txt", payload),
        ),
        ("unsafe-path", "symlink escape"): (
            file_id_for("escape/link.txt").encode(),
            payload,
            chunk_headers("escape/link.txt", payload),
        ),
        ("too-large", "oversized claim"): (
            file_id_for("big.bin").encode(),
            payload,
            chunk_headers("big.bin", payload, **{"msi.size": str(MAX_FILE_SIZE * 10)}),
        ),
        ("inconsistent-chunk", "inconsistent count"): (
            file_id_for("count.bin").encode(),
            payload,
            chunk_headers("count.bin", payload, **{"msi.n": "7"}),
        ),
        ("inconsistent-chunk", "offset disagrees"): (
            file_id_for("off.bin").encode(),
            payload,
            chunk_headers("off.bin", payload, **{"msi.off": "3"}),
        ),
        ("unknown-version", "unknown major version"): (
            file_id_for("v9.bin").encode(),
            payload,
            chunk_headers("v9.bin", payload, **{"msi.v": "9.0"}),
        ),
        ("not-msi", "not an msi message"): (b"some-key", b"plain text from another app", None),
        ("missing-header", "truncated headers"): (
            file_id_for("trunc.bin").encode(),
            payload,
            chunk_headers("trunc.bin", payload, **{"msi.size": None, "msi.n": None}),
        ),
        ("bad-header-value", "garbage header values"): (
            file_id_for("garbage.bin").encode(),
            payload,
            chunk_headers("garbage.bin", payload, **{"msi.idx": "-1", "msi.gen": "\xff\xfe"}),
        ),
        ("key-mismatch", "key does not match"): (
            b"f" * 32,
            payload,
            chunk_headers("keyed.bin", payload),
        ),
        ("verification-failed", "wrong sha256"): (
            file_id_for("hash.bin").encode(),
            payload,
            chunk_headers("hash.bin", payload, **{"msi.sha256": "0" * 64}),
        ),
    }
    producer = Producer({"bootstrap.servers": kafka_stack.bootstrap_servers})
    for key_bytes, value, headers in hostile.values():
        producer.produce(topic, key=key_bytes, value=value, headers=headers)
    assert producer.flush(30) == 0
    del producer

    # Then a good file, sent the normal way.
    src = tmp_path / "src"
    expected = make_tree(src, {"good/after.txt": 1000})
    send(kafka_stack, topic, src, tmp_path / "reg.sqlite", ["good/after.txt"])

    # Every outcome, not a number of files: the not-msi message names no file, so it is a
    # rejected message, not a file, and --stop-after-files would not wait for it.
    events: list[FileEvent] = []
    stop = threading.Event()

    def on_event(event: FileEvent) -> None:
        events.append(event)
        if len(events) == len(hostile) + 1:
            stop.set()

    reassembler = Reassembler(
        KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers),
        ReassemblerSettings(
            topic=topic,
            destination=str(dest),
            group_id=f"hostile-{topic}",
            session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
            limits=DecodeLimits(max_file_size=MAX_FILE_SIZE),
        ),
        on_event,
    )
    reassembler.run(stop, StopConditions(idle_timeout_s=60))

    rejected = [e for e in events if e.kind is FileEventKind.REJECTED]
    rebuilt = [e for e in events if e.kind is FileEventKind.RECONSTRUCTED]
    assert [e.relpath for e in rebuilt] == ["good/after.txt"]
    assert (
        hashlib.sha256((dest / "good/after.txt").read_bytes()).hexdigest()
        == (expected["good/after.txt"])
    )
    assert len(rejected) == len(hostile)
    assert all(e.reason for e in rejected)
    assert sorted(e.reason_code or "" for e in rejected) == sorted(code for code, _ in hostile)
    # Nothing was written outside the destination, nor through the planted symlink.
    assert list(outside.iterdir()) == []
    assert reassembler.stats.files_rejected == len(hostile) - 1
    assert reassembler.stats.messages_rejected == 1
    # The wrong-hash file is quarantined, not delivered.
    assert not (dest / "hash.bin").exists()
    assert list((dest / ".msi-state" / "quarantine").iterdir())
