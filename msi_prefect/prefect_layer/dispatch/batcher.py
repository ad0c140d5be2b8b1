"""Batch and adaptive dispatch: group rebuilt files into ``msi.files.batch-ready`` events.

A process worker needs about a second to start each flow run, so one run per file and per
downstream deployment cannot keep up with a fast instrument. The reconstruct flow therefore
groups rebuilt files and emits one batch event per group; the batch deployment of
``prefect.yaml`` (``process-batch``) then runs once per batch, with the task runs and the
usual per-file events of each file's three steps.

``batch`` mode sends a batch per ``max_files`` files or ``max_wait_s`` seconds. ``adaptive``
mode (the default) sends a file on its own while the downstream runs keep up, and lets files
gather while they do not (:class:`AdaptiveGate`): a file rebuilt when the last dispatch is
at least ``min_gap_s`` old and the Prefect server holds no downstream run that has not
started yet goes alone (lowest latency); otherwise it waits, and everything waiting goes as
one batch as soon as the runs have started (or when the batch is full, or its oldest file
has waited ``max_wait_s``). The batch size follows the backlog with no setting to tune.
When the stack is overloaded (runs wait to start, many run, or the server answers too slowly
to tell), a batch past ``max_wait_s`` is held until it is not, for at most
:data:`DEFAULT_MAX_HOLD_S`: sending small batches on time into an overloaded server adds a
batch's fixed cost each time and overloads it more.

Files waiting for their batch are kept in a small SQLite outbox next to the reassembler's
progress store, written before the file's offsets are committed. After a crash the
leftovers are sent first, as the same batch as before (same members, same deterministic
event id, which the server deduplicates), so no file misses its downstream work and none
gets it twice. Memory holds only a count and a time; the files themselves stay on disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, cast

from msi_prefect.prefect_layer.dispatch.mode import (
    BATCH_FLOW,
    EARLIER_BATCH_FLOWS,
    FILE_FLOWS,
    PER_FILE_FLOWS,
)
from msi_prefect.prefect_layer.events import FileFacts
from msi_prefect.transfer import DurableQueue

logger = logging.getLogger(__name__)

#: After a dispatch, the next waits at least this long: the server needs a moment to turn
#: the event into runs, and until then its run counts do not show them.
DEFAULT_MIN_GAP_S = 1.0
#: A reading of the run counts taken sooner than this after a dispatch may predate its runs.
TRIGGER_LAG_S = 0.5
#: Files wait while this many downstream runs run (a file dispatched on its own makes 3; a
#: batch run counts as 3, the per-step runs it does the work of): on 2 cores, fewer and
#: larger batches do more per second than many small ones.
DEFAULT_MAX_RUNNING = 3
#: What a running batch run counts as: the per-file runs whose work it does.
RUNS_PER_BATCH_RUN = len(PER_FILE_FLOWS)
#: Running downstream runs at which the stack counts as overloaded (two dispatches' worth):
#: a batch due by its age is then held (see :meth:`AdaptiveGate.holds`).
DEFAULT_OVERLOAD_RUNNING = 2 * DEFAULT_MAX_RUNNING
#: The longest an adaptive batch is held past ``max_wait_s`` for an overloaded stack: a run
#: left Running or Scheduled for good (its worker died, a concurrency limit) delays each
#: batch by at most this.
DEFAULT_MAX_HOLD_S = 30.0
#: How often the run counts are read while files wait for the gate, and just after a
#: dispatch (whose runs the next decision must see).
BACKLOG_POLL_S = 0.5
#: After a dispatch or a file's wait, reads come every BACKLOG_POLL_S for this long...
BACKLOG_FAST_S = 2.0
#: ...then every BACKLOG_SLOW_POLL_S: the reading stays fresher than BACKLOG_STALE_S, so
#: the next file can go on its own at once (files one every 10 s: 24 count queries per
#: file instead of 58, each about 3 ms of the server's CPU).
BACKLOG_SLOW_POLL_S = 2.0
#: The poller rests after this long without a dispatch or a waiting file.
BACKLOG_ACTIVE_S = 30.0
#: A reading older than this is no view of the server (it is unreachable or slow): files
#: then gather into batches. (Per-file dispatch there, spaced by time, sent 3 runs per file
#: into an overloaded server: 400 runs waited in a soak at 1.2 files/s, bench/RESULTS.md.)
BACKLOG_STALE_S = 5.0


def batch_outbox(path: str | Path) -> DurableQueue:
    """The durable queue of rebuilt files waiting for their batch event."""
    return DurableQueue(path, name="dispatch outbox")


def _queue_key(facts: FileFacts) -> str:
    # One entry per generation of a file: a replayed file is not queued twice.
    return f"{facts.topic}/{facts.file_id}/{facts.generation or 0}"


@dataclass(frozen=True)
class RunBacklogReading:
    """The downstream runs the Prefect server held at one moment.

    Attributes:
        counts: Runs created but not started yet (Scheduled, Pending), and running.
        taken_at: When it was read (monotonic seconds).
    """

    counts: DownstreamRunCounts
    taken_at: float


class RunBacklog(Protocol):
    """A source of :class:`RunBacklogReading` (the server, or a fake in tests)."""

    def latest(self) -> RunBacklogReading | None:
        """The newest reading, or None before the first."""

    def wake(self) -> None:
        """Files are moving: read often for a while."""


@dataclass(frozen=True)
class DownstreamRunCounts:
    """How many downstream runs wait to start, and how many run.

    Attributes:
        waiting: Runs created but not started (Scheduled, Pending).
        running: Runs running, a batch run counted as :data:`RUNS_PER_BATCH_RUN` (it does
            a file's three steps, each of which a per-file dispatch gives a run).
    """

    waiting: int
    running: int


class ReadingGap(Enum):
    """Why the gate has no run counts to go by."""

    NONE_YET = "no reading yet"
    STALE = "the newest reading is stale"
    BEFORE_LAST_DISPATCH = "the newest reading predates the last dispatch's runs"


class PrefectRunCounter:
    """Counts the downstream runs on the Prefect server the context points at.

    One client is kept for the reading thread's life (a client costs a TLS context and a
    connection); it is replaced after a failure.
    """

    def __init__(self) -> None:
        self._client: Any = None

    def __call__(self) -> DownstreamRunCounts:
        """Three ``flow_runs/count`` queries: Scheduled or Pending, and Running per-file
        and batch runs.

        Raises:
            Exception: The server did not answer (the client is then dropped).
        """
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        if self._client is None:
            self._client = get_client(sync_client=True)
            self._client.__enter__()

        def count(names: tuple[str, ...], *types: StateType) -> int:
            flows = FlowFilter(name=FlowFilterName(any_=list(names)))
            state = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(types)))
            runs = FlowRunFilter(state=state)
            return int(self._client.count_flow_runs(flow_filter=flows, flow_run_filter=runs))

        try:
            running_batches = count((BATCH_FLOW,), StateType.RUNNING)
            return DownstreamRunCounts(
                waiting=count(FILE_FLOWS, StateType.SCHEDULED, StateType.PENDING),
                running=count((*PER_FILE_FLOWS, *EARLIER_BATCH_FLOWS), StateType.RUNNING)
                + RUNS_PER_BATCH_RUN * running_batches,
            )
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Close the client (the next count opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.__exit__(None, None, None)


class ServerRunBacklog:
    """Reads the downstream run counts from the Prefect server, in a thread of its own.

    The thread runs in the caller's context (the flow run's Prefect settings). It reads
    every :data:`BACKLOG_POLL_S` while files wait or a dispatch is recent, every
    :data:`BACKLOG_SLOW_POLL_S` for a while after, and rests otherwise, so an idle transfer
    puts no load on the server. A failed read keeps the previous reading (which then grows
    stale); the transfer never waits for the server.

    Args:
        count: Reads the counts; a :class:`PrefectRunCounter` by default.
        clock: Monotonic time source.
    """

    def __init__(
        self,
        count: Callable[[], DownstreamRunCounts] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counter = PrefectRunCounter() if count is None else None
        self._count: Callable[[], DownstreamRunCounts] = count or cast(
            PrefectRunCounter, self._counter
        )
        self._clock = clock
        self._reading: RunBacklogReading | None = None
        self._active_until = 0.0
        self._fast_until = 0.0
        self._wakeup = threading.Event()
        self._closing = False
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._loop,), name="msi-run-backlog", daemon=True
        )
        self._thread.start()

    def latest(self) -> RunBacklogReading | None:
        """The newest reading, or None before the first."""
        return self._reading

    def wake(self) -> None:
        """Read often for the next :data:`BACKLOG_FAST_S` seconds, and keep reading for
        :data:`BACKLOG_ACTIVE_S`."""
        now = self._clock()
        slow = now >= self._fast_until
        self._fast_until = now + BACKLOG_FAST_S
        self._active_until = now + BACKLOG_ACTIVE_S
        if slow:  # a resting or slow poller reads now; a fast one keeps its pace
            self._wakeup.set()

    def read_pause_s(self) -> float | None:
        """How long the thread waits before its next read now; None: it rests until woken."""
        now = self._clock()
        if now >= self._active_until:
            return None
        return BACKLOG_POLL_S if now < self._fast_until else BACKLOG_SLOW_POLL_S

    def close(self) -> None:
        """Stop the thread (it ends within one read)."""
        self._closing = True
        self._wakeup.set()
        self._thread.join(BACKLOG_STALE_S)
        if self._counter is not None:
            self._counter.close()

    def _loop(self) -> None:
        while not self._closing:
            if self.read_pause_s() is None:
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                self._reading = RunBacklogReading(self._count(), self._clock())
            except Exception as exc:  # the server is away: the reading grows stale
                logger.debug("could not read the downstream run counts: %r", exc)
            pause_s = self.read_pause_s()
            if pause_s is not None:
                self._wakeup.wait(pause_s)
                self._wakeup.clear()


class AdaptiveGate:
    """Tells whether a file may start its downstream work now, or should join a batch.

    Quiet means: the last dispatch is at least ``min_gap_s`` old, and a reading of the
    server taken after its runs could show shows no run waiting to start and fewer than
    ``max_running`` running. Before the first reading only the time gap counts; a
    reading gone stale (the server is unreachable or slow) is never quiet, so files gather
    into batches (sent when full or when the oldest has waited ``max_wait_s``).

    Overloaded means more than not quiet: the newest reading shows runs waiting to start
    or at least ``overload_running`` running, or it predates the last dispatch's runs, or
    it is stale. A batch due by its age is then held, for at most ``max_hold_s`` in all.

    Args:
        backlog: Where the run counts come from.
        min_gap_s: Shortest time between two dispatches.
        max_running: Running downstream runs at which files wait.
        overload_running: Running downstream runs at which a batch due by its age waits.
        max_hold_s: The longest wait of a batch's oldest file while the stack is
            overloaded.
        clock: Monotonic time source (the backlog's).
    """

    def __init__(
        self,
        backlog: RunBacklog,
        min_gap_s: float = DEFAULT_MIN_GAP_S,
        max_running: int = DEFAULT_MAX_RUNNING,
        overload_running: int = DEFAULT_OVERLOAD_RUNNING,
        max_hold_s: float = DEFAULT_MAX_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backlog = backlog
        self._min_gap_s = min_gap_s
        self._max_running = max_running
        self._overload_running = overload_running
        self._max_hold_s = max_hold_s
        self._clock = clock
        self._last_dispatch = float("-inf")

    def _counts_now(self) -> DownstreamRunCounts | ReadingGap:
        """The newest reading's counts, or why there is none to go by."""
        reading = self._backlog.latest()
        if reading is None:
            return ReadingGap.NONE_YET
        if self._clock() - reading.taken_at > BACKLOG_STALE_S:
            return ReadingGap.STALE
        if reading.taken_at < self._last_dispatch + TRIGGER_LAG_S:
            return ReadingGap.BEFORE_LAST_DISPATCH
        return reading.counts

    def is_quiet(self) -> bool:
        """Whether a dispatch now would find the downstream runs keeping up."""
        if self._clock() - self._last_dispatch < self._min_gap_s:
            return False
        counts = self._counts_now()
        if counts is ReadingGap.NONE_YET:
            return True  # the stack is starting: time alone decides
        if isinstance(counts, ReadingGap):
            # Stale: the server answers slowly or not at all; files gather into batches
            # (one run per deployment for many files), never three runs per file into an
            # overloaded server, where a slow answer would make every file look quiet.
            # Before the last dispatch: its runs are not in the reading yet.
            return False
        return counts.waiting == 0 and counts.running < self._max_running

    def holds(self, waited_s: float) -> bool:
        """Whether a batch due by its age (its oldest file waited ``waited_s``) waits on.

        It does while the stack is overloaded and the oldest file has waited less than
        ``max_hold_s``: its runs would only queue behind the runs not started yet, and a
        later, larger batch costs the server less per file. An idle or merely busy stack
        (runs running, none waiting) takes it at once.
        """
        if waited_s >= self._max_hold_s:
            return False
        counts = self._counts_now()
        if counts is ReadingGap.NONE_YET:
            return False  # the stack is starting: nothing is known to be waiting
        if isinstance(counts, ReadingGap):
            # Stale: too slow to answer (or away), its runs could not start sooner. Before
            # the last dispatch: that dispatch's runs are waiting.
            return True
        return counts.waiting > 0 or counts.running >= self._overload_running

    def dispatched(self) -> None:
        """A file or a batch was just dispatched."""
        self._last_dispatch = self._clock()
        self._backlog.wake()

    def holding(self) -> None:
        """Files are waiting for the gate: keep the readings coming."""
        self._backlog.wake()


class FileBatcher:
    """Groups rebuilt files into batches of at most ``max_files``.

    A batch goes out when it is full, or ``max_wait_s`` after its first file arrived (for
    the files left over after a full batch: after the batch before them was sent) unless
    the ``gate`` holds it for an overloaded stack, or, with a ``gate``, as soon as the gate
    is quiet.

    Args:
        outbox: Where waiting files are kept.
        max_files: A batch is sent as soon as it has this many files.
        max_wait_s: ...or when its oldest file has waited this long.
        send: Emits one batch (called with 1..max_files files, in arrival order).
        clock: Monotonic time source (tests inject a fake).
        gate: Adaptive dispatch: waiting files go as soon as it is quiet, and it is told
            of every batch sent.
    """

    def __init__(
        self,
        outbox: DurableQueue,
        max_files: int,
        max_wait_s: float,
        send: Callable[[list[FileFacts]], None],
        clock: Callable[[], float] = time.monotonic,
        gate: AdaptiveGate | None = None,
    ) -> None:
        if max_files < 1:
            raise ValueError(f"max_files must be at least 1, not {max_files}")
        if max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be positive, not {max_wait_s}")
        self._outbox = outbox
        self._max_files = max_files
        self._max_wait_s = max_wait_s
        self._send = send
        self._clock = clock
        self._gate = gate
        self._waiting = outbox.count()
        # Leftovers of an earlier run are due at once.
        self._oldest_at: float | None = clock() - max_wait_s if self._waiting else None

    @property
    def waiting(self) -> int:
        """Files queued for a batch not sent yet."""
        return self._waiting

    def add(self, facts: FileFacts) -> None:
        """Queue one rebuilt file; send a batch if it is full."""
        if not self._outbox.add(_queue_key(facts), dataclasses.asdict(facts)):
            return
        self._waiting += 1
        if self._oldest_at is None:
            self._oldest_at = self._clock()
        if self._waiting >= self._max_files:
            self.send_due()

    def dispatch_alone(self) -> bool:
        """Adaptive dispatch: whether a file rebuilt now should go on its own.

        True (and the gate is told of the dispatch) when nothing waits for a batch and the
        gate is quiet; False when the file should be :meth:`add`-ed to the next batch.
        """
        if self._gate is None or self._waiting or not self._gate.is_quiet():
            return False
        self._gate.dispatched()
        return True

    def _due(self) -> bool:
        if self._waiting >= self._max_files:
            return True
        if self._oldest_at is not None:
            waited_s = self._clock() - self._oldest_at
            if waited_s >= self._max_wait_s and (
                self._gate is None or not self._gate.holds(waited_s)
            ):
                return True
        if self._gate is not None:
            if self._gate.is_quiet():
                return True
            self._gate.holding()
        return False

    def send_due(self, force: bool = False) -> int:
        """Send the batches that are due (every waiting file if ``force``).

        Returns:
            How many batches were sent.
        """
        sent = 0
        while self._waiting and (force or self._due()):
            batch = self._outbox.oldest(self._max_files)
            if not batch:  # the count drifted (cannot happen in one process): resync
                self._waiting = 0
                break
            self._send([FileFacts(**record) for _, record in batch])
            # Removed only after sending: a crash in between sends the same batch again.
            self._outbox.remove_through(batch[-1][0])
            self._waiting = max(0, self._waiting - len(batch))
            sent += 1
            if self._gate is not None:
                self._gate.dispatched()
        if not self._waiting:
            self._oldest_at = None
        elif sent:
            self._oldest_at = self._clock()
        return sent
