"""Batch dispatch: the outbox, the batcher and the batch event (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msi_prefect.dispatch import FileBatcher, batch_outbox
from msi_prefect.events import (
    DISPATCH_LABEL,
    DownstreamDispatch,
    EventName,
    FileFacts,
    batch_event,
    facts_of,
    from_reassembler,
)
from msi_prefect.transfer.reassembler import FileEvent, FileEventKind
from msi_prefect.transfer.sqlite_db import DurableQueue
from msi_prefect.transfer.wire import file_id_for

TOPIC = "lab.raw"


def facts(relpath: str, generation: int = 1) -> FileFacts:
    return FileFacts(
        topic=TOPIC,
        file_id=file_id_for(relpath),
        relpath=relpath,
        generation=generation,
        size=3,
        sha256="ab" * 32,
        url=f"file:///data/{relpath}",
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, files: list[FileFacts]) -> None:
        self.batches.append([f.relpath for f in files])


@pytest.fixture
def outbox(tmp_path: Path) -> DurableQueue:
    return batch_outbox(tmp_path / "outbox.sqlite")


def test_a_full_batch_goes_at_once_and_the_rest_waits(outbox: DurableQueue) -> None:
    sent, clock = Recorder(), FakeClock()
    batcher = FileBatcher(outbox, max_files=2, max_wait_s=5, send=sent, clock=clock)
    for name in ("a", "b", "c"):
        batcher.add(facts(name))
    assert sent.batches == [["a", "b"]]
    assert batcher.waiting == 1 and outbox.count() == 1
    clock.now += 4.9
    assert batcher.send_due() == 0
    clock.now += 0.2
    assert batcher.send_due() == 1
    assert sent.batches == [["a", "b"], ["c"]]
    assert batcher.waiting == 0 and outbox.count() == 0


def test_force_sends_everything_in_batches_of_max_files(outbox: DurableQueue) -> None:
    sent = Recorder()
    batcher = FileBatcher(outbox, max_files=3, max_wait_s=60, send=sent, clock=FakeClock())
    for name in "abcde":
        batcher.add(facts(name))
    batcher.send_due(force=True)
    assert sent.batches == [["a", "b", "c"], ["d", "e"]]


def test_the_same_generation_is_queued_once_and_a_new_one_again(outbox: DurableQueue) -> None:
    sent = Recorder()
    batcher = FileBatcher(outbox, max_files=10, max_wait_s=1, send=sent, clock=FakeClock())
    batcher.add(facts("a", 1))
    batcher.add(facts("a", 1))  # a replayed file
    batcher.add(facts("a", 2))
    batcher.send_due(force=True)
    assert sent.batches == [["a", "a"]]


def test_leftovers_of_a_crash_go_first_as_the_same_batch(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    emitted: list[object] = []

    def crash(files: list[FileFacts]) -> None:
        emitted.append(batch_event(TOPIC, files).event_id)
        raise RuntimeError("killed after sending, before forgetting")

    with batch_outbox(path) as first_outbox:
        batcher = FileBatcher(first_outbox, max_files=5, max_wait_s=60, send=crash)
        batcher.add(facts("x"))
        batcher.add(facts("y"))
        with pytest.raises(RuntimeError):
            batcher.send_due(force=True)

    with batch_outbox(path) as second_outbox:

        def record(files: list[FileFacts]) -> None:
            emitted.append(batch_event(TOPIC, files).event_id)

        restarted = FileBatcher(second_outbox, max_files=5, max_wait_s=60, send=record)
        assert restarted.waiting == 2
        assert restarted.send_due() == 1  # due at once, without waiting max_wait_s
        assert second_outbox.count() == 0
    # The same members give the same event id, which the server keeps once.
    assert len(emitted) == 2 and emitted[0] == emitted[1]


@pytest.mark.parametrize(("max_files", "max_wait_s"), [(0, 1.0), (5, 0.0), (5, -1.0)])
def test_nonsense_limits_are_refused(
    outbox: DurableQueue, max_files: int, max_wait_s: float
) -> None:
    with pytest.raises(ValueError, match="must be"):
        FileBatcher(outbox, max_files, max_wait_s, send=Recorder())


def test_batch_event_lists_every_file_with_its_flow_parameters() -> None:
    files = [facts("run1/a.tif"), facts("b.csv", 3)]
    spec = batch_event(TOPIC, files)
    assert spec.name is EventName.BATCH_READY
    assert spec.resource["prefect.resource.id"].startswith(f"msi.batch.{TOPIC}.")
    assert spec.resource[DISPATCH_LABEL] == "batch"
    assert spec.resource["msi.files"] == "2"
    assert spec.payload["files"][1] == {
        "topic": TOPIC,
        "file_id": file_id_for("b.csv"),
        "generation": 3,
        "path": "b.csv",
        "url": "file:///data/b.csv",
        "size": 3,
        "sha256": "ab" * 32,
    }
    # The id depends on the members, not on their order or the time.
    assert batch_event(TOPIC, list(reversed(files))).event_id == spec.event_id
    assert batch_event(TOPIC, files[:1]).event_id != spec.event_id
    with pytest.raises(ValueError, match="at least one file"):
        batch_event(TOPIC, [])


@pytest.mark.parametrize("dispatch", list(DownstreamDispatch))
def test_reconstructed_events_carry_the_dispatch_label(dispatch: DownstreamDispatch) -> None:
    event = FileEvent(
        kind=FileEventKind.RECONSTRUCTED,
        topic=TOPIC,
        file_id=file_id_for("a"),
        relpath="a",
        generation=1,
        size=3,
        sha256="ab" * 32,
        url="file:///data/a",
    )
    spec = from_reassembler(event, dispatch)
    assert spec.resource[DISPATCH_LABEL] == dispatch.value
    assert facts_of(spec) == facts("a")
    rejected = FileEvent(
        kind=FileEventKind.REJECTED, topic=TOPIC, file_id=None, relpath=None, reason="bad"
    )
    assert DISPATCH_LABEL not in from_reassembler(rejected, dispatch).resource
