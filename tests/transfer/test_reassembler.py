"""The reassembler's unit-level behaviour, without a broker.

Its outcomes (``FileEvent``, ``ReassemblerStats``), its positional writes into staging
files, and the rule that a format spreading a file over partitions needs one member to
read them all. Rebuilding files from a real topic is tested in ``test_roundtrip.py``,
``test_recovery.py`` and ``test_hostile_input.py`` beside this file.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from msi_prefect.errors import MsiError
from msi_prefect.transfer import reassembler as reassembler_module
from msi_prefect.transfer.formats import WireFormat
from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.openmsistream_format import encode_omsi_chunk
from msi_prefect.transfer.reassembler import (
    FileEvent,
    FileEventKind,
    Reassembler,
    ReassemblerSettings,
    ReassemblerStats,
)

# Nothing listens there: these tests never reach a broker.
NO_BROKER = KafkaConnection(bootstrap_servers="127.0.0.1:1")
TOPIC_PARTITIONS = 4
SESSION_TIMEOUT_MS = 6000

# --------------------------------------------------------------------------- outcomes


def test_an_outcome_names_a_file_by_path_or_file_id() -> None:
    by_path = FileEvent(FileEventKind.RECONSTRUCTED, "lab", "run1/a.tif", file_id="ab" * 16)
    by_id = FileEvent(FileEventKind.REJECTED, "lab", None, file_id="cd" * 16)
    garbage = FileEvent(FileEventKind.REJECTED, "lab", None, partition=2, offset=17)
    assert by_path.names_file and by_id.names_file
    assert not garbage.names_file
    assert by_path.where() == "'run1/a.tif'"
    assert by_id.where() == f"file id {'cd' * 16}"
    assert garbage.where() == "message at partition 2 offset 17"


def test_files_done_counts_rebuilt_and_rejected_files_not_rejected_messages() -> None:
    stats = ReassemblerStats(files_reconstructed=3, files_rejected=2, messages_rejected=5)
    assert stats.files_done == 5


# ----------------------------------------------------------------------- staging writes


def test_a_short_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite
    calls: list[int] = []

    def short_first(fd: int, data: memoryview, offset: int) -> int:
        calls.append(len(data))
        return real_pwrite(fd, data[: max(1, len(data) // 3)] if len(calls) == 1 else data, offset)

    monkeypatch.setattr(reassembler_module.os, "pwrite", short_first)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        reassembler_module._pwrite_all(fd, b"0123456789" * 10, 5)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"\0" * 5 + b"0123456789" * 10
    assert len(calls) == 2


def test_a_write_that_makes_no_progress_is_a_disk_full_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reassembler_module.os, "pwrite", lambda fd, data, offset: 0)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as caught:
            reassembler_module._pwrite_all(fd, b"abc", 0)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC


# -------------------------------------------------------------------- partition rules


class _FakeMetadata:
    def __init__(self, topic: str, partitions: int) -> None:
        self.topics = {topic: type("T", (), {"partitions": dict.fromkeys(range(partitions))})()}


class _FakeConsumer:
    def list_topics(self, topic: str, timeout: float) -> _FakeMetadata:
        return _FakeMetadata(topic, TOPIC_PARTITIONS)


def test_a_partial_assignment_is_tolerated_for_a_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ReassemblerSettings(
        topic="t",
        destination=str(tmp_path),
        session_timeout_ms=SESSION_TIMEOUT_MS,
        wire_format=WireFormat.OPENMSISTREAM,
    )
    member = Reassembler(NO_BROKER, settings)
    now = [1000.0]
    monkeypatch.setattr(reassembler_module.time, "monotonic", lambda: now[0])
    try:
        member._on_assign(_FakeConsumer(), [0, 1])  # a stale member holds partitions 2 and 3
        now[0] += 15  # within 2 x 6 s + 5 s
        member._check_assignment()
        member._on_assign(_FakeConsumer(), [0, 1, 2, 3])  # its session timed out: all ours
        now[0] += 100
        member._check_assignment()
        member._on_assign(_FakeConsumer(), [0])  # a second reassembler joined and stays
        now[0] += 18
        with pytest.raises(MsiError, match="one reassembler must read all 4 partitions"):
            member._check_assignment()
    finally:
        member.close()


def test_native_format_allows_partial_assignments(tmp_path: Path) -> None:
    settings = ReassemblerSettings(topic="t", destination=str(tmp_path))
    member = Reassembler(NO_BROKER, settings)
    try:
        member._on_assign(_FakeConsumer(), [0])
        assert member._partial_assignment is None
    finally:
        member.close()


# ------------------------------------------------------------------ replays after a crash


class _Message:
    """One consumed message, as confluent-kafka hands it over."""

    def __init__(self, key: bytes, value: bytes, offset: int) -> None:
        self._key, self._value, self._offset = key, value, offset

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None


class _CommittingConsumer:
    def commit(self, offsets: list[object], asynchronous: bool) -> None:
        """Offsets go nowhere: these tests replay the same messages on purpose."""


def _omsi_messages(content: bytes, relpath: str, chunk_size: int) -> list[_Message]:
    sha512 = hashlib.sha512(content).digest()
    count = -(-len(content) // chunk_size)
    messages = []
    for index in range(1, count + 1):
        offset = (index - 1) * chunk_size
        key, value = encode_omsi_chunk(
            relpath=relpath,
            file_sha512=sha512,
            index=index,
            count=count,
            offset=offset,
            data=content[offset : offset + chunk_size],
            mtime=1700000000.0,
        )
        messages.append(_Message(key, value, offset=index - 1))
    return messages


def test_a_replayed_openmsistream_file_is_recognised_as_delivered(tmp_path: Path) -> None:
    """A crash after a file was delivered and before its offsets were committed replays its
    chunks to the next member. OpenMSIStream's chunks do not carry the file size, so the
    delivered row (which holds the verified size) must still match them: the replay is
    skipped, not rejected as a conflicting version of the file."""
    content = os.urandom(2500)
    messages = _omsi_messages(content, "run1/scan.bin", chunk_size=1000)
    settings = ReassemblerSettings(
        topic="lab", destination=str(tmp_path / "dest"), wire_format=WireFormat.OPENMSISTREAM
    )
    outcomes: list[FileEvent] = []
    for member_life in range(2):  # the first member delivers, the second gets the replay
        member = Reassembler(NO_BROKER, settings, on_event=outcomes.append)
        member._consumer = _CommittingConsumer()
        try:
            member._handle_batch(messages)
        finally:
            member.close()
        assert member.stats.messages_rejected == 0, f"member {member_life} rejected the replay"
    assert [event.kind for event in outcomes] == [FileEventKind.RECONSTRUCTED]
    assert (tmp_path / "dest" / "run1" / "scan.bin").read_bytes() == content
