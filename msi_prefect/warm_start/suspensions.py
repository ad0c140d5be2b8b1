"""Suspensions reach warm runs through their worker, not through a websocket per run.

Prefect 3.9 lets a user suspend a running deployment run (from the UI, with
``suspend_flow_run``, or by an automation). The run learns of it through an observer it
starts before it asks for RUNNING: a thread with an event loop of its own, a read of the run
and an events websocket. Profiled in forked runs (2026-12-06) that was about 35 ms of the
run's CPU, and a websocket, an events query and a read on the server, for every run, while
a file's three runs start together on two cores and mostly last a second.

Here the worker watches all its runs at once, with Prefect's own observer
(:class:`SuspensionRelay`: one websocket, polling while it is down). When a run it started
is suspended, it sends :data:`~msi_prefect.warm_start.launch.SUSPENSION_SIGNAL` to the run's
launcher, which passes it on to the run's process. There :func:`observe_relayed_suspension`,
put in place of Prefect's observer by the warm server (:func:`relay_suspensions`), reads the
run's state on that signal and marks the suspension as Prefect's observer does, so the run
stops at its next task, as before.

A run learns from its environment (:data:`RELAY_ENV`, set by the worker only while its relay
is up) that suspensions are relayed; any other run starts Prefect's own observer, as does a
run whose flow the engine does not run in the main thread (a signal handler needs it). No
signal comes before the run's handler: the server accepts a suspension only of a RUNNING run,
and the handler is set before the run asks for RUNNING.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio

from msi_prefect.warm_start.launch import SUSPENSION_SIGNAL
from msi_prefect.warm_start.patching import library_original, put_in_place

if TYPE_CHECKING:
    from prefect._flow_run_suspension import FlowRunSuspensionRequest
    from prefect._internal.observers import FlowRunSuspendingObserver
    from prefect.client.schemas.objects import State

logger = logging.getLogger("msi_prefect.warm_start")

#: Set in a run's environment by a worker whose relay is up.
RELAY_ENV = "MSI_WARM_START_SUSPENSIONS"
RELAYED = "relayed"

#: Seconds the worker's shutdown waits for the relay's observer to stop.
RELAY_STOP_TIMEOUT_S = 2.0

#: Reads a flow run's current state (the server's answer is what a suspension is checked by).
StateReader = Callable[[UUID], "State | None"]


def _read_state(flow_run_id: UUID) -> State | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


@contextlib.contextmanager
def observe_relayed_suspension(
    flow_run_id: UUID,
    suspension_request: FlowRunSuspensionRequest,
    read_state: StateReader = _read_state,
) -> Iterator[None]:
    """In a run's process: on :data:`SUSPENSION_SIGNAL`, check the run and mark its suspension.

    Must be entered in the main thread. The signal only says "look": the run is marked
    suspended only if the server shows it so (a read in a thread of its own, with the run's
    context, so the handler returns at once).
    """
    from prefect._flow_run_suspension import (
        is_suspended_flow_run_state,
        mark_flow_run_suspension_requested,
    )

    context = contextvars.copy_context()

    def confirm() -> None:
        try:
            # A copy per check: two signals in a row start two checks at once.
            state = context.copy().run(read_state, flow_run_id)
        except Exception:
            logger.warning(
                "warm start: flow run %s was reported suspended, but its state could not be "
                "read; it runs on",
                flow_run_id,
                exc_info=True,
            )
            return
        if is_suspended_flow_run_state(state):
            assert state is not None
            # As Prefect's observer: the innermost run registered under this id, or this one.
            if not mark_flow_run_suspension_requested(flow_run_id, state):
                suspension_request.mark_requested(state)

    def on_signal(_signum: int, _frame: object) -> None:
        threading.Thread(target=confirm, name="msi-suspension-check", daemon=True).start()

    previous = signal.signal(SUSPENSION_SIGNAL, on_signal)
    try:
        yield
    finally:
        signal.signal(SUSPENSION_SIGNAL, previous)


def relay_suspensions() -> bool:
    """Put the relayed observer in place of Prefect's, for runs whose worker relays.

    Patches ``prefect.flow_engine.observe_flow_run_suspension``; a run without
    :data:`RELAY_ENV` (or not in the main thread) gets Prefect's own observer. Returns False,
    changing nothing, when Prefect's engine has no such observer.
    """
    from prefect import flow_engine

    prefects = library_original(flow_engine, "observe_flow_run_suspension")
    if prefects is None:
        return False

    @contextlib.contextmanager
    def observe(
        flow_run_id: UUID, suspension_request: FlowRunSuspensionRequest, *args: Any, **kwargs: Any
    ) -> Iterator[None]:
        relayed = (
            os.environ.get(RELAY_ENV) == RELAYED
            and threading.current_thread() is threading.main_thread()
        )
        if relayed:
            observer = observe_relayed_suspension(flow_run_id, suspension_request)
        else:
            observer = prefects(flow_run_id, suspension_request, *args, **kwargs)
        with observer:
            yield

    put_in_place(flow_engine, "observe_flow_run_suspension", observe, prefects)
    return True


class SuspensionRelay:
    """In the worker: one observer of suspensions for all its runs, passed on by signal.

    Use as an async context manager; while it is up (:attr:`active`), :meth:`watching` a
    run's process makes a suspension of that run reach it. If the observer cannot start,
    the relay stays inactive and runs observe for themselves, as Prefect's do.
    """

    def __init__(self) -> None:
        self._observer: FlowRunSuspendingObserver | None = None
        self._processes: dict[UUID, int] = {}

    @property
    def active(self) -> bool:
        """Whether suspensions are relayed (runs then need not observe for themselves)."""
        return self._observer is not None

    async def __aenter__(self) -> SuspensionRelay:
        from prefect._internal.observers import FlowRunSuspendingObserver

        observer = FlowRunSuspendingObserver(on_suspended=self._relay)
        try:
            await observer.__aenter__()
        except Exception:
            logger.warning(
                "warm start: no suspension relay; each run observes its own", exc_info=True
            )
        else:
            self._observer = observer
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        # Bounded, as Prefect bounds its observer's stop in a run (its thread is joined for
        # 2 s): a busy server must not hold up the worker's shutdown.
        with anyio.move_on_after(RELAY_STOP_TIMEOUT_S) as stopping:
            await observer.__aexit__(*exc_info)
        if stopping.cancelled_caught:
            logger.warning(
                "warm start: the suspension relay did not stop within %.0f s; left to the "
                "process's exit",
                RELAY_STOP_TIMEOUT_S,
            )

    @contextlib.contextmanager
    def watching(self, flow_run_id: UUID, pid: int) -> Iterator[None]:
        """Pass a suspension of ``flow_run_id`` on to process ``pid`` while this lasts."""
        observer = self._observer
        if observer is None:
            yield
            return
        self._processes[flow_run_id] = pid
        observer.add_in_flight_flow_run_id(flow_run_id)
        try:
            yield
        finally:
            self._processes.pop(flow_run_id, None)
            if self._observer is observer:
                observer.remove_in_flight_flow_run_id(flow_run_id)

    def _relay(self, flow_run_id: UUID, state: State) -> None:
        # The state is the observer's confirmation; the run's process reads it again itself.
        pid = self._processes.get(flow_run_id)
        if pid is None:
            return
        logger.info("warm start: flow run %s was suspended; telling its process", flow_run_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, SUSPENSION_SIGNAL)
