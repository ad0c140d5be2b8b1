"""Wake the worker's poll when a flow run is scheduled, instead of waiting for the next one.

Prefect's worker finds new flow runs only by polling (every ``PREFECT_WORKER_QUERY_SECONDS``):
on an idle stack a run waits half an interval on average before it is even seen. The
server announces every new run with a ``prefect.flow-run.Scheduled`` event (related to the
run's work pool), which the worker can follow over the events websocket it already uses
for cancellations. :class:`RunWakeUps` turns those announcements into polls: one poll per
burst of announcements, and a few short retries when the announced run is not there yet
(the server sends the event from inside the transaction that creates the run, so a poll can
get there first). Polls are spaced by a few times the last poll's duration: on an idle
server (a poll answered in about 20 ms) the runs that one file's automations create
0.1-0.2 s apart are each taken within tens of milliseconds, while a busy server, whose
polls take longer, gets fewer of them (one per burst of announcements; a gap never
exceeds :attr:`WakeUpPolicy.max_gap_s`). Polling on the interval goes on as before:
a missed event costs at most that interval, as without wake-ups.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from uuid import UUID

import anyio

logger = logging.getLogger("msi_prefect.warm_start")

#: The event that announces a new flow run (its first state).
SCHEDULED_EVENT = "prefect.flow-run.Scheduled"
_FLOW_RUN_PREFIX = "prefect.flow-run."


@dataclass(frozen=True)
class WakeUpPolicy:
    """How announcements become polls.

    Attributes:
        gap_in_poll_times: Seconds between the starts of two polls this starts, in
            durations of the last poll (2: polls in flight at most half the time).
        min_gap_s: The shortest gap between the starts of two polls.
        max_gap_s: The longest gap: a slow server's polls are never spaced more widely.
        retry_delays_s: Waits before polling again while an announced run was not found
            yet (nor submitted by another poll); after the last one the interval poll
            takes over.
    """

    gap_in_poll_times: float = 2.0
    min_gap_s: float = 0.05
    max_gap_s: float = 0.5
    retry_delays_s: tuple[float, ...] = (0.05, 0.2, 0.5)

    def __post_init__(self) -> None:
        if (
            self.gap_in_poll_times < 0
            or not 0 <= self.min_gap_s <= self.max_gap_s
            or any(delay <= 0 for delay in self.retry_delays_s)
        ):
            raise ValueError(
                "wake-up gaps must be non-negative with min_gap_s <= max_gap_s, and retry "
                "delays positive"
            )

    def gap_after(self, poll_s: float) -> float:
        """Seconds from the start of a poll that took ``poll_s`` to the next poll's start."""
        return min(self.max_gap_s, max(self.min_gap_s, self.gap_in_poll_times * poll_s))


def flow_run_id_of(resource_id: str) -> UUID | None:
    """The flow run id in an event's resource id (``prefect.flow-run.<uuid>``), else None."""
    if not resource_id.startswith(_FLOW_RUN_PREFIX):
        return None
    try:
        return UUID(resource_id.removeprefix(_FLOW_RUN_PREFIX))
    except ValueError:
        return None


class RecentRuns:
    """The ids of the last ``capacity`` flow runs this worker took (bounded memory)."""

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._ids: OrderedDict[UUID, None] = OrderedDict()

    def add(self, flow_run_id: UUID) -> None:
        """Remember ``flow_run_id``, forgetting the oldest beyond the capacity."""
        self._ids[flow_run_id] = None
        self._ids.move_to_end(flow_run_id)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def __contains__(self, flow_run_id: object) -> bool:
        return flow_run_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class RunWakeUps:
    """Polls for flow runs when runs are announced (see the module docstring).

    Args:
        poll: The worker's poll; returns the ids of the runs it found and submits.
        is_taken: Whether a run was taken already (by this poll or another one).
        policy: Spacing and retries.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        poll: Callable[[], Awaitable[Iterable[UUID]]],
        is_taken: Callable[[UUID], bool],
        policy: WakeUpPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._poll = poll
        self._is_taken = is_taken
        self._policy = policy or WakeUpPolicy()
        self._clock = clock
        self._announced: set[UUID] = set()
        self._wake = anyio.Event()
        self._next_poll_at: float | None = None
        self.polls = 0

    def announce(self, flow_run_id: UUID) -> None:
        """A run was scheduled: poll soon (callable from the event loop's thread only)."""
        if self._is_taken(flow_run_id):
            return
        self._announced.add(flow_run_id)
        self._wake.set()

    async def serve(self) -> None:
        """Poll for each burst of announcements, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if self._announced:  # else a burst already served took them
                await self._serve_burst()

    async def _serve_burst(self) -> None:
        if self._next_poll_at is not None:
            await anyio.sleep(max(0.0, self._next_poll_at - self._clock()))
        waiting, self._announced = self._announced, set()
        for delay in (0.0, *self._policy.retry_delays_s):
            if delay:
                await anyio.sleep(delay)
            waiting.update(self._announced)  # announced meanwhile: this poll serves them too
            self._announced.clear()
            started = self._clock()
            self.polls += 1
            try:
                found = set(await self._poll())
            except Exception:
                self._next_poll_at = started + self._policy.max_gap_s
                logger.warning(
                    "warm start: a woken poll failed; polling on the interval", exc_info=True
                )
                return
            self._next_poll_at = started + self._policy.gap_after(self._clock() - started)
            waiting = {run for run in waiting if run not in found and not self._is_taken(run)}
            if not waiting:
                return
        logger.debug(
            "warm start: %d announced run(s) not found; the interval poll takes them", len(waiting)
        )
