"""A power cut and a ``down``/``up`` with files in flight, on a real stack (the fast iteration).

One private stack (``msi-prefect up`` on free ports, S3-backed broker): files arrive at a
steady rate; once some are rebuilt and downstream runs are running, every process of the
stack is killed at once; ``up``; ``down`` and ``up`` again while the stack is catching up;
more files are dropped after each restart. The verdict is read from the destination, the
per-file events on the server and the backup store's object versions, never from flow-run
names. Then, on the same stack, a run crashed by a kill -9 of the server alone is run again
by the sweep `up` schedules, and a run the server was to start and never did is started by
it. The long runs (100 files, 5 cycles, a dead worker or server mid-burst) are in
tests/chaos/test_stack_faults.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from msi_prefect.prefect_layer.crashed_runs import RERUN_OF_TAG
from msi_prefect.prefect_layer.dispatch.mode import DownstreamDispatch
from msi_prefect.prefect_layer.events import DISPATCH_LABEL, EventName
from msi_prefect.prefect_layer.lost_dispatches import LOST_DISPATCH_TAG
from msi_prefect.stack.config import Component
from msi_prefect.stack.deploy import (
    SWEEP_AFTER_START_TAG,
    SWEEP_DELAYS_AFTER_SERVER_START_S,
    schedule_sweeps_after_server_start,
)
from msi_prefect.stack.processes import live_flow_runs
from tests.chaos.stack_scenarios import StackRun
from tests.stack_helpers import (
    EVENT_POLL_S,
    FILE_EVENTS,
    StackVerdict,
    file_events,
    kill_server,
    user_stack,
    workload,
)

# The stack's start, the cut, two restarts and the catch-up: minutes on a busy machine
# (over 8 at a load average of 15-20, `down` included).
pytestmark = [pytest.mark.stack, pytest.mark.own_stack, pytest.mark.timeout(720)]

FILES = 14
# Slow enough that files are still arriving when the first downstream runs start.
RATE = 1.5
SEED = 5
# Every file is done within this after the last drop (group join, re-runs of the runs the
# cut crashed, events the cut lost posted again).
SETTLE_S = 120.0


@dataclass(frozen=True)
class PowerCutRun:
    """The run every test of this module judges."""

    run: StackRun
    verdict: StackVerdict
    after_restarts: set[str]


@pytest.fixture(scope="module")
def power_cut_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PowerCutRun]:
    """Files through a power cut and a ``down``/``up`` cycle; the stack is stopped after."""
    with user_stack(tmp_path_factory.mktemp("power-cut")) as stack:
        run = StackRun(stack, SEED)
        run.dropper.start(workload("cut", FILES, SEED, large_every=5), RATE)
        caught = run.power_cut(min_dropped=4)
        run.restart(wait_for_files=False)
        run.dropper.wait(60)
        after = workload("after-cut", 2, SEED + 1, large_every=0)
        run.dropper.drop_all(after)
        # `down` while the restarted stack is still catching up, then `up` again.
        run.down_up(wait_for_files=False)
        after_cycle = workload("after-cycle", 2, SEED + 2, large_every=0)
        run.dropper.drop_all(after_cycle)
        after |= after_cycle
        verdict, recover = run.finish(SETTLE_S)
        injected = (
            f"kill -9 of every process of the stack with {caught.dropped} of {FILES} files "
            f"dropped, {caught.rebuilt} rebuilt, {caught.downstream_processes} downstream "
            "flow-run processes running; `up`; `down` and `up`; 4 files after"
        )
        run.report("power cut + down/up (fast)", injected, verdict, recover)
        yield PowerCutRun(run, verdict, set(after))


def test_power_cut_loses_no_file_and_duplicates_nothing(power_cut_run: PowerCutRun) -> None:
    verdict = power_cut_run.verdict
    caught = power_cut_run.run.faults[0]
    assert caught.rebuilt >= 1 and caught.downstream_processes >= 1, caught
    assert verdict.lost == [] and verdict.corrupted == [], verdict.summary()
    # One generation per file, announced at most once; at most one copy in the store.
    assert verdict.duplicated == [], verdict.summary()


def test_files_dropped_after_the_restarts_are_processed(power_cut_run: PowerCutRun) -> None:
    verdict = power_cut_run.verdict
    after = power_cut_run.after_restarts
    assert {n: verdict.reconstructed[n] for n in after} == dict.fromkeys(after, 1)
    assert {n for n in after if n in verdict.not_done} == set(), verdict.summary()
    assert {n: verdict.backups[n] for n in after} == dict.fromkeys(after, 1)


def test_every_file_in_flight_at_the_cut_is_announced_and_processed(
    power_cut_run: PowerCutRun,
) -> None:
    verdict = power_cut_run.verdict
    assert verdict.unannounced == [], verdict.summary()
    assert verdict.not_done == {}, verdict.summary()
    assert set(verdict.backups.values()) == {1}, verdict.summary()


# Past the first sweep `up` schedules after it started the server that can see the run
# crashed (the one at once may run before the crash is recorded), the worker picking it up
# and the sweep's run; far below the 15 minutes Prefect holds the Crashed event back.
RERUN_AFTER_RESTART_S = SWEEP_DELAYS_AFTER_SERVER_START_S[1] + 90.0
#: The server starts of this module's stack, all within the sweeps' window of 15 minutes.
SERVER_STARTS = 4
#: The triggers off while a file goes through: alone, the server stores its event and
#: starts only its backup and analysis runs, as one that dies between the actions does; in
#: a batch, it stores the batch's event and starts nothing.
LOST_AUTOMATIONS = ("extract-metadata__automation_1", "process-batch__automation_1")
LOST_ACTION_FILE = "lost-action.bin"
LOST_ACTION_BYTES = 20_000
# For that file's backup and analysis, on the stack that has caught up.
STEPS_TIMEOUT_S = 120.0


def _events_of(api: str, name: str, since: float) -> list[dict[str, Any]]:
    """The events of one file (by path, or in a batch's files) since ``since``; none while
    the server is busy."""
    try:
        events = file_events(api, since, (*FILE_EVENTS, EventName.BATCH_READY))
    except httpx.HTTPError:  # a restarted server that does not answer yet: asked again
        return []
    return [
        event
        for event in events
        if name == (payload := event.get("payload") or {}).get("path")
        or name in {entry.get("path") for entry in payload.get("files") or []}
    ]


def _steps_of(api: str, name: str, since: float) -> set[str]:
    """The names of the events of one file since ``since``."""
    return {event["event"] for event in _events_of(api, name, since)}


def _dispatch_of(api: str, name: str, since: float) -> str | None:
    """How the file's rebuilt event says it was dispatched (None before it is stored)."""
    for event in _events_of(api, name, since):
        if event["event"] == EventName.RECONSTRUCTED.value:
            return str(event["resource"].get(DISPATCH_LABEL))
    return None


@contextlib.contextmanager
def _automations_off(api: str, names: tuple[str, ...]) -> Iterator[None]:
    """Switch the named automations off, and on again after."""
    found = httpx.post(f"{api}/automations/filter", json={}, timeout=30)
    assert found.is_success, found.text
    ids = [automation["id"] for automation in found.json() if automation["name"] in names]
    assert len(ids) == len(names), found.json()

    def switch(enabled: bool) -> None:
        for automation_id in ids:
            patched = httpx.patch(
                f"{api}/automations/{automation_id}", json={"enabled": enabled}, timeout=30
            )
            assert patched.is_success, patched.text

    switch(False)
    try:
        yield
    finally:
        switch(True)


def _file_with_a_lost_action(run: StackRun) -> float:
    """Drop a file whose metadata run the server never starts; return since when to look.

    Its event is stored, its automation on again, and only the sweep after the next server
    start can start the run: its metadata run if it went alone (its backup and analysis
    are done), its batch run if it went in a batch.
    """
    api = run.stack.api
    since = time.time() - 60
    with _automations_off(api, LOST_AUTOMATIONS):
        run.dropper.drop(LOST_ACTION_FILE, LOST_ACTION_BYTES)
        deadline = time.monotonic() + STEPS_TIMEOUT_S
        while (dispatch := _dispatch_of(api, LOST_ACTION_FILE, since)) is None:
            assert time.monotonic() < deadline, f"{LOST_ACTION_FILE} was not rebuilt"
            time.sleep(EVENT_POLL_S)
        if dispatch == DownstreamDispatch.PER_FILE:
            wanted = {EventName.BACKED_UP.value, EventName.ANALYZED.value}
        else:
            wanted = {EventName.BATCH_READY.value}
        while not wanted <= (steps := _steps_of(api, LOST_ACTION_FILE, since)):
            assert time.monotonic() < deadline, f"{LOST_ACTION_FILE}: only {steps}"
            time.sleep(EVENT_POLL_S)
    assert EventName.METADATA_EXTRACTED.value not in steps
    return since


def test_a_run_crashed_by_a_server_restart_is_run_again_within_minutes(
    power_cut_run: PowerCutRun,
) -> None:
    # A downstream run whose process outlived the server's kill -9, and crashed once the
    # server was back (as the worker records it): its Crashed event follows a state event
    # only the dead server saw, so Prefect holds it back from `rerun-crashed` for 15
    # minutes. The sweep `up` schedules after starting the server runs it again sooner.
    # On the power cut's stack, once its verdict is in: a stack of its own would cost an
    # `up` and a `down` more (the module's tests only read the verdict).
    # And a file whose event the server stored and acted on only in part (as one that dies
    # between the actions of a trigger leaves it): the sweeps after the start (the first
    # at once) start the run it never started.
    stack = power_cut_run.run.stack
    api = stack.api
    lost_since = _file_with_a_lost_action(power_cut_run.run)
    audit = httpx.get(f"{api}/deployments/name/audit-backups/audit-backups", timeout=30)
    created = httpx.post(
        f"{api}/deployments/{audit.json()['id']}/create_flow_run",
        json={"state": {"type": "RUNNING"}},
        timeout=30,
    )
    assert created.is_success, created.text
    run_id = created.json()["id"]
    # Its process, as `up` sees processes: alive through the restart.
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, "PREFECT_API_URL": api, "PREFECT__FLOW_RUN_ID": run_id},
    )
    try:
        kill_server(stack)
        stack.up()
        assert run_id in {run.flow_run_id for run in live_flow_runs(api)}
    finally:
        stand_in.kill()
        stand_in.wait()
    crashed = httpx.post(
        f"{api}/flow_runs/{run_id}/set_state",
        json={"state": {"type": "CRASHED", "message": "lost the API"}, "force": True},
        timeout=30,
    )
    assert crashed.is_success, crashed.text
    marked = time.monotonic()

    def reruns() -> list[dict[str, Any]]:
        found = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"tags": {"all_": [f"{RERUN_OF_TAG}:{run_id}"]}}},
            timeout=30,
        )
        return list(found.json()) if found.is_success else []

    while not reruns():
        assert time.monotonic() - marked < RERUN_AFTER_RESTART_S, "no re-run came"
        time.sleep(2.0)
    print(f"re-run created {time.monotonic() - marked:.1f} s after the crash was recorded")
    assert len(reruns()) == 1
    # By a sweep: the trigger's run (its parameter the crashed run) has not come, as
    # Prefect holds the Crashed event back.
    sweeps = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"tags": {"all_": [SWEEP_AFTER_START_TAG]}}},
        timeout=30,
    ).json()
    # As many per start of the server as it has delays, for each start (the power
    # cut's: the first `up`, the `up` after the cut, `down` and `up`; and this test's).
    starts = Counter(sweep["idempotency_key"].split(":")[1] for sweep in sweeps)
    assert set(starts.values()) == {len(SWEEP_DELAYS_AFTER_SERVER_START_S)}, starts
    assert len(starts) == SERVER_STARTS, starts
    restarted = stack.manager().process(Component.PREFECT).read_pid()
    assert restarted is not None and str(restarted.started_at) in starts
    # An `up` run again (after a failure, say) schedules the same sweeps, not more.
    again = schedule_sweeps_after_server_start(stack.manager())
    assert set(again) <= {sweep["id"] for sweep in sweeps} and len(again) == len(
        SWEEP_DELAYS_AFTER_SERVER_START_S
    )
    triggered = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"name": {"like_": run_id}}},
        timeout=30,
    ).json()
    print(f"runs of the Crashed event's trigger so far: {len(triggered)}")
    while EventName.METADATA_EXTRACTED.value not in _steps_of(api, LOST_ACTION_FILE, lost_since):
        assert time.monotonic() - marked < RERUN_AFTER_RESTART_S, "the lost run never came"
        time.sleep(EVENT_POLL_S)
    print(f"lost run done {time.monotonic() - marked:.1f} s after the crash was recorded")
    started = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"tags": {"all_": [LOST_DISPATCH_TAG]}}},
        timeout=30,
    ).json()
    paths = {
        entry.get("path")
        for run in started
        for entry in run["parameters"].get("files") or [run["parameters"]]
    }
    assert LOST_ACTION_FILE in paths, started
