"""Batch dispatch: the outbox, the batcher and the batch event (no server needed)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from msi_prefect.prefect_layer.dispatch.batcher import (
    BACKLOG_ACTIVE_S,
    BACKLOG_FAST_S,
    BACKLOG_POLL_S,
    BACKLOG_SLOW_POLL_S,
    BACKLOG_STALE_S,
    TRIGGER_LAG_S,
    AdaptiveGate,
    DownstreamRunCounts,
    FileBatcher,
    RunBacklogReading,
    ServerRunBacklog,
    batch_outbox,
)
from msi_prefect.prefect_layer.events import (
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
        path=relpath,
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
        self.batches.append([f.path for f in files])


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


class FakeBacklog:
    """Run counts as a test sets them, read 'now' on the shared clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.reading: RunBacklogReading | None = None
        self.wakes = 0

    def set(self, waiting: int, running: int = 0) -> None:
        self.reading = RunBacklogReading(DownstreamRunCounts(waiting, running), self.clock.now)

    def latest(self) -> RunBacklogReading | None:
        return self.reading

    def wake(self) -> None:
        self.wakes += 1


@dataclass
class AdaptiveRig:
    """An adaptive batcher with its fake clock, run counts and recorded batches."""

    batcher: FileBatcher
    backlog: FakeBacklog
    clock: FakeClock
    sent: Recorder


MAX_HOLD_S = 30.0


def adaptive(outbox: DurableQueue, max_files: int = 50, max_wait_s: float = 5.0) -> AdaptiveRig:
    clock = FakeClock()
    backlog = FakeBacklog(clock)
    sent = Recorder()
    gate = AdaptiveGate(
        backlog,
        min_gap_s=1.0,
        max_running=6,
        overload_running=12,
        max_hold_s=MAX_HOLD_S,
        clock=clock,
    )
    batcher = FileBatcher(outbox, max_files, max_wait_s, sent, clock=clock, gate=gate)
    return AdaptiveRig(batcher, backlog, clock, sent)


def test_adaptive_sends_a_file_alone_when_quiet_and_batches_the_rest(
    outbox: DurableQueue,
) -> None:
    rig = adaptive(outbox)
    rig.backlog.set(waiting=0)
    assert rig.batcher.dispatch_alone()  # an idle stack: the first file goes on its own
    # Files rebuilt right after it wait: its runs are not even visible on the server yet.
    for name in "abc":
        rig.clock.now += 0.1
        assert not rig.batcher.dispatch_alone()
        rig.batcher.add(facts(name))
    rig.clock.now += 1.0
    rig.backlog.set(waiting=3)  # the first file's three runs wait for the worker
    assert rig.batcher.send_due() == 0
    rig.clock.now += 1.0
    rig.backlog.set(waiting=0, running=3)  # ...and have started: everything waiting goes
    assert rig.batcher.send_due() == 1
    assert rig.sent.batches == [["a", "b", "c"]]
    assert not rig.batcher.dispatch_alone()  # the batch was a dispatch too
    assert rig.backlog.wakes >= 2


def test_adaptive_waits_for_a_reading_taken_after_the_dispatch(outbox: DurableQueue) -> None:
    rig = adaptive(outbox)
    assert rig.batcher.dispatch_alone()  # no reading at all yet: time alone decides
    rig.batcher.add(facts("a"))
    rig.clock.now += TRIGGER_LAG_S / 2
    rig.backlog.set(waiting=0)  # too soon after the dispatch to show its runs
    rig.clock.now += 1.0
    assert rig.batcher.send_due() == 0
    rig.backlog.set(waiting=0)  # taken well after the dispatch: its runs have started
    assert rig.batcher.send_due() == 1


def test_adaptive_full_batches_go_at_once_whatever_the_backlog(outbox: DurableQueue) -> None:
    rig = adaptive(outbox, max_files=2)
    rig.backlog.set(waiting=10)
    rig.clock.now += 2
    for name in "abcde":
        assert not rig.batcher.dispatch_alone()
        rig.batcher.add(facts(name))
    assert rig.sent.batches == [["a", "b"], ["c", "d"]]
    assert rig.batcher.waiting == 1


def test_adaptive_without_a_fresh_reading_batches_and_holds(outbox: DurableQueue) -> None:
    rig = adaptive(outbox, max_wait_s=5.0)
    rig.backlog.set(waiting=0)  # quiet, then the server stops answering (or is too slow)
    rig.clock.now += BACKLOG_STALE_S + 0.1
    for name in "ab":  # no file goes alone into a server that cannot answer in time
        assert not rig.batcher.dispatch_alone()
        rig.batcher.add(facts(name))
    assert rig.batcher.send_due() == 0
    rig.clock.now += 5.0  # max_wait_s, but a server this slow could not start its runs
    assert rig.batcher.send_due() == 0
    rig.clock.now += MAX_HOLD_S - 5.0  # the longest hold: the batch goes all the same
    assert rig.batcher.send_due() == 1
    assert rig.sent.batches == [["a", "b"]]


def test_adaptive_holds_a_due_batch_while_runs_wait_to_start(outbox: DurableQueue) -> None:
    rig = adaptive(outbox, max_wait_s=5.0)
    rig.backlog.set(waiting=0)
    assert rig.batcher.dispatch_alone()
    rig.batcher.add(facts("a"))
    rig.clock.now += 5.0
    assert rig.batcher.send_due() == 0  # no reading since the dispatch: its runs wait
    rig.backlog.set(waiting=3, running=5)
    rig.clock.now += 10.0
    rig.backlog.set(waiting=3, running=5)
    assert rig.batcher.send_due() == 0  # held past max_wait_s: the runs before it wait
    assert rig.backlog.wakes >= 2  # ...and the readings keep coming
    rig.clock.now += 1.0
    rig.backlog.set(waiting=0, running=8)  # started: busy (not quiet) but not overloaded
    assert rig.batcher.send_due() == 1


@pytest.mark.parametrize(
    ("running", "longest_wait_s"),
    [
        (6, 5.0),  # busy (not quiet), not overloaded: the batch goes after max_wait_s
        (12, MAX_HOLD_S),  # overloaded (a run left Running for good): held, not for longer
    ],
)
def test_adaptive_holds_while_runs_run_and_honours_the_longest_wait(
    outbox: DurableQueue, running: int, longest_wait_s: float
) -> None:
    rig = adaptive(outbox, max_wait_s=5.0)
    rig.backlog.set(waiting=0, running=running)
    rig.clock.now += 2
    rig.backlog.set(waiting=0, running=running)
    assert not rig.batcher.dispatch_alone()
    rig.batcher.add(facts("a"))
    rig.clock.now += longest_wait_s - 0.1
    rig.backlog.set(waiting=0, running=running)
    assert rig.batcher.send_due() == 0
    rig.clock.now += 0.1
    rig.backlog.set(waiting=0, running=running)
    assert rig.batcher.send_due() == 1


def test_adaptive_before_any_reading_spaces_dispatches_by_time(outbox: DurableQueue) -> None:
    rig = adaptive(outbox)
    assert rig.batcher.dispatch_alone()
    rig.clock.now += 0.5
    assert not rig.batcher.dispatch_alone()
    rig.clock.now += 0.5
    assert rig.batcher.dispatch_alone()


def test_server_backlog_reads_in_its_thread_only_while_files_move() -> None:
    calls: list[float] = []

    def count() -> DownstreamRunCounts:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise OSError("server away")  # a failed read keeps the previous one
        return DownstreamRunCounts(waiting=len(calls), running=0)

    backlog = ServerRunBacklog(count)
    try:
        time.sleep(0.3)
        assert calls == [] and backlog.latest() is None  # nothing moves: no load
        backlog.wake()
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        reading = backlog.latest()
        assert reading is not None and reading.counts.waiting in (1, 3)
    finally:
        backlog.close()


def test_server_backlog_reads_fast_after_a_wake_then_slowly_then_rests() -> None:
    clock = FakeClock()
    backlog = ServerRunBacklog(lambda: DownstreamRunCounts(waiting=0, running=0), clock)
    try:
        assert backlog.read_pause_s() is None  # never woken: no reads at all
        backlog.wake()
        assert backlog.read_pause_s() == BACKLOG_POLL_S
        clock.now += BACKLOG_FAST_S
        # Slower, but a reading never gets stale while the transfer is active.
        assert backlog.read_pause_s() == BACKLOG_SLOW_POLL_S < BACKLOG_STALE_S
        backlog.wake()  # a file waits, or a dispatch: fast again
        assert backlog.read_pause_s() == BACKLOG_POLL_S
        clock.now += BACKLOG_ACTIVE_S
        assert backlog.read_pause_s() is None
    finally:
        backlog.close()


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


@pytest.mark.parametrize("dispatch", [DownstreamDispatch.PER_FILE, DownstreamDispatch.BATCH])
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


def test_adaptive_is_a_mode_not_a_label() -> None:
    event = FileEvent(
        kind=FileEventKind.RECONSTRUCTED, topic=TOPIC, file_id=file_id_for("a"), relpath="a"
    )
    with pytest.raises(ValueError, match="not a label"):
        from_reassembler(event, DownstreamDispatch.ADAPTIVE)
