"""The producer: its in-flight bound (settings logic, and held on a real send) and its claim
windows."""

from __future__ import annotations

from pathlib import Path

import pytest

from msi_prefect.errors import MsiError
from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.producer import (
    CLAIM_BATCH_FILES,
    HEADER_ALLOWANCE_BYTES,
    IDEMPOTENT_INFLIGHT_MESSAGES,
    FileProducer,
    ProducerSettings,
    UploadOutcome,
)
from msi_prefect.transfer.registry import FileRecord, FileState, Registry
from msi_prefect.transfer.wire import DEFAULT_CHUNK_SIZE
from tests.conftest import RunningStack
from tests.transfer_helpers import make_tree

CHUNK = 64 * 1024


def test_default_limit_is_librdkafkas_idempotent_window_of_chunks() -> None:
    settings = ProducerSettings(topic="t")
    window = IDEMPOTENT_INFLIGHT_MESSAGES
    # Five default chunks fit even when sealing makes each a little larger; a sixth does not.
    assert settings.inflight_limit >= window * (DEFAULT_CHUNK_SIZE + HEADER_ALLOWANCE_BYTES // 2)
    assert settings.inflight_limit < (window + 1) * DEFAULT_CHUNK_SIZE
    assert ProducerSettings(topic="t", chunk_size=CHUNK).inflight_limit < settings.inflight_limit


def test_an_explicit_limit_wins_and_must_hold_one_chunk() -> None:
    assert (
        ProducerSettings(topic="t", chunk_size=CHUNK, max_inflight_bytes=CHUNK).inflight_limit
        == CHUNK
    )
    with pytest.raises(MsiError, match="at least one chunk"):
        ProducerSettings(topic="t", chunk_size=CHUNK, max_inflight_bytes=CHUNK - 1)


@pytest.mark.stack
def test_unacknowledged_bytes_never_exceed_the_limit(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    make_tree(tmp_path / "src", {"big.bin": 40 * CHUNK + 7, "small.txt": 100})
    settings = ProducerSettings(topic=topic, chunk_size=CHUNK)
    connection = KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers)
    peaks: list[int] = []
    with Registry(tmp_path / "registry.sqlite") as registry:
        producer = FileProducer(connection, settings, registry)
        results = producer.upload_all(
            [(tmp_path / "src" / name, name) for name in ("big.bin", "small.txt")],
            on_progress=lambda _rel, _done, _size: peaks.append(producer.inflight_bytes),
        )
    assert {r.outcome for r in results} == {UploadOutcome.SENT}
    assert len(peaks) == 42  # called after every chunk
    assert max(peaks) <= settings.inflight_limit
    assert producer.inflight_bytes == 0  # everything acknowledged after the flush


@pytest.mark.stack
def test_a_window_of_files_is_claimed_in_one_commit_before_any_chunk_is_sent(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    names = [f"f{i:03d}.txt" for i in range(CLAIM_BATCH_FILES + 3)]
    make_tree(tmp_path / "src", dict.fromkeys(names, 10))
    files = [(tmp_path / "src" / name, name) for name in names]
    files.insert(5, (tmp_path / "src" / "gone.txt", "gone.txt"))
    registry_path = tmp_path / "registry.sqlite"
    claimed_at_first_chunk: dict[str, FileRecord | None] = {}

    def look_at_first_chunk(_relpath: str, _done: int, _size: int) -> None:
        if not claimed_at_first_chunk:
            # Another connection sees committed rows only: what a crash now would leave.
            with Registry(registry_path) as other:
                claimed_at_first_chunk.update({name: other.get(topic, name) for name in names})

    connection = KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers)
    with Registry(registry_path) as registry:
        producer = FileProducer(connection, ProducerSettings(topic=topic), registry)
        results = producer.upload_all(files, on_progress=look_at_first_chunk)
        final = {name: registry.get(topic, name) for name in names}

    first_window = names[: CLAIM_BATCH_FILES - 1]  # the window also held gone.txt
    assert all(claimed_at_first_chunk[name] is not None for name in first_window)
    assert all(claimed_at_first_chunk[name] is None for name in names[len(first_window) :])
    outcomes = {result.relpath: result.outcome for result in results}
    assert outcomes.pop("gone.txt") is UploadOutcome.VANISHED
    assert outcomes == dict.fromkeys(names, UploadOutcome.SENT)
    assert all(row is not None and row.state is FileState.SENT for row in final.values())
