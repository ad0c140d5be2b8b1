"""Suspensions relayed by the worker (msi_prefect/warm_start/suspensions.py).

Unit tests of the run's side (no server), then a warm worker on the session's Prefect
server: a deployment run suspended from outside stops at its next task and its process
ends, as with Prefect's own observer in every run, and once resumed it runs to its end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect import flow_engine
from prefect._flow_run_suspension import FlowRunSuspensionRequest
from prefect.states import Running, Suspended

from msi_prefect.stack.components import work_pool_job_template
from msi_prefect.stack.processes import live_flow_runs, terminate
from msi_prefect.warm_start import WORKER_TYPE
from msi_prefect.warm_start.launch import SUSPENSION_SIGNAL
from msi_prefect.warm_start.suspensions import (
    RELAY_ENV,
    RELAYED,
    observe_relayed_suspension,
    relay_suspensions,
)
from tests.conftest import RunningStack
from tests.transfer_helpers import wait_until

API_TIMEOUT_S = 30.0
CHECK_TIMEOUT_S = 5.0
RUN_TIMEOUT_S = 90.0
POLL_S = 0.2
#: The test flow's length: far longer than a relayed suspension takes to stop it.
TICKS = 60
TICK_S = 1.0


class StateAnswers:
    """Stands in for the server's answer about a run's state."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.asked = threading.Event()

    def __call__(self, flow_run_id: UUID) -> Any:
        self.asked.set()
        return self.state


def _signal(answers: StateAnswers) -> None:
    os.kill(os.getpid(), SUSPENSION_SIGNAL)
    assert answers.asked.wait(CHECK_TIMEOUT_S), "the signal made no check of the run"


def test_a_relayed_suspension_marks_the_run_when_the_server_shows_it_suspended() -> None:
    request = FlowRunSuspensionRequest()
    suspended = Suspended(timeout_seconds=60)
    answers = StateAnswers(suspended)
    before = signal.getsignal(SUSPENSION_SIGNAL)
    with observe_relayed_suspension(uuid.uuid4(), request, read_state=answers):
        _signal(answers)
        wait_until(request.is_requested, "the run was marked suspended", CHECK_TIMEOUT_S)
        assert request.get_state() is suspended
    assert signal.getsignal(SUSPENSION_SIGNAL) == before


def test_a_signal_for_a_run_the_server_shows_running_marks_nothing() -> None:
    request = FlowRunSuspensionRequest()
    answers = StateAnswers(Running())
    with observe_relayed_suspension(uuid.uuid4(), request, read_state=answers):
        _signal(answers)
        time.sleep(POLL_S)  # the check marks right after its read, in its own thread
        assert not request.is_requested()


def test_two_signals_in_a_row_make_two_checks(caplog: pytest.LogCaptureFixture) -> None:
    request = FlowRunSuspensionRequest()
    suspended = Suspended(timeout_seconds=60)
    reads: list[UUID] = []
    both_asked = threading.Barrier(2, timeout=CHECK_TIMEOUT_S)

    def slow_read(flow_run_id: UUID) -> Any:
        reads.append(flow_run_id)
        both_asked.wait()  # the two checks read at the same time
        return suspended

    with observe_relayed_suspension(uuid.uuid4(), request, read_state=slow_read):
        os.kill(os.getpid(), SUSPENSION_SIGNAL)
        os.kill(os.getpid(), SUSPENSION_SIGNAL)
        wait_until(request.is_requested, "the run was marked suspended", CHECK_TIMEOUT_S)
    assert len(reads) == 2
    assert "could not be read" not in caplog.text


@pytest.fixture
def prefects_observer(monkeypatch: pytest.MonkeyPatch) -> list[UUID]:
    """Prefect's observer replaced by one that records the runs it observes."""
    observed: list[UUID] = []

    @contextlib.contextmanager
    def record(flow_run_id: UUID, _request: Any, *_args: Any, **_kwargs: Any) -> Iterator[None]:
        observed.append(flow_run_id)
        yield

    monkeypatch.setattr(flow_engine, "observe_flow_run_suspension", record)
    assert relay_suspensions()
    return observed


def test_a_run_whose_worker_relays_starts_no_observer_of_its_own(
    prefects_observer: list[UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RELAY_ENV, RELAYED)
    before = signal.getsignal(SUSPENSION_SIGNAL)
    with flow_engine.observe_flow_run_suspension(uuid.uuid4(), FlowRunSuspensionRequest()):
        assert signal.getsignal(SUSPENSION_SIGNAL) != before  # the relay's handler
    assert prefects_observer == []


def test_any_other_run_starts_prefects_observer(
    prefects_observer: list[UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RELAY_ENV, raising=False)
    run_id = uuid.uuid4()
    with flow_engine.observe_flow_run_suspension(run_id, FlowRunSuspensionRequest()):
        pass
    # ...and so does a run the engine does not run in the main thread (no signal handler).
    monkeypatch.setenv(RELAY_ENV, RELAYED)
    in_thread = uuid.uuid4()

    def observe() -> None:
        with flow_engine.observe_flow_run_suspension(in_thread, FlowRunSuspensionRequest()):
            pass

    thread = threading.Thread(target=observe)
    thread.start()
    thread.join(CHECK_TIMEOUT_S)
    assert prefects_observer == [run_id, in_thread]


def test_relaying_twice_wraps_prefects_observer_once(prefects_observer: list[UUID]) -> None:
    assert relay_suspensions()
    with flow_engine.observe_flow_run_suspension(uuid.uuid4(), FlowRunSuspensionRequest()):
        pass
    assert len(prefects_observer) == 1


# --------------------------------------------------------------------- on a real server

#: While this file is in the deployment's folder (the run's working directory), ticks take
#: TICK_S each; without it they are quick.
SLOW_MARKER = "slow"
SLOW_FLOW = textwrap.dedent(
    f"""
    import time
    from pathlib import Path
    from prefect import flow, task

    @task
    def tick(i: int) -> int:
        if Path("{SLOW_MARKER}").exists():
            time.sleep({TICK_S})
        return i

    @flow
    def slow(ticks: int = {TICKS}) -> None:
        for i in range(ticks):
            tick(i)
    """
)


@pytest.fixture
def slow_deployment(
    prefect_stack: RunningStack, prefect_api: str, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    """A deployment of a slow flow in a pool of its own, served by a warm worker.

    Yields the API URL and the deployment's id; stops the worker by its PID.
    """
    (tmp_path / "slow.py").write_text(SLOW_FLOW)
    (tmp_path / SLOW_MARKER).touch()
    pool = f"suspend-{uuid.uuid4().hex[:8]}"
    client = httpx.Client(base_url=prefect_api, timeout=API_TIMEOUT_S)
    client.post(
        "/work_pools/",
        json={"name": pool, "type": "process", "base_job_template": work_pool_job_template()},
    ).raise_for_status()
    flow_id = client.post("/flows/", json={"name": "slow"}).json()["id"]
    deployment = client.post(
        "/deployments/",
        json={
            "name": pool,
            "flow_id": flow_id,
            "work_pool_name": pool,
            "work_queue_name": "default",
            "entrypoint": "slow.py:slow",
            "pull_steps": [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}
            ],
        },
    )
    deployment.raise_for_status()
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "msi_prefect.warm_start.worker", "--pool", pool,
             "--type", WORKER_TYPE, "--name", pool],
            env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its warm server too is stopped with its group
        )  # fmt: skip
    try:
        yield prefect_api, deployment.json()["id"]
    finally:
        terminate([worker.pid])  # SIGKILL after the stack's stop timeout
        worker.wait()
        client.delete(f"/deployments/{deployment.json()['id']}")
        client.delete(f"/work_pools/{pool}")
        client.close()


def _run(api: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api}/flow_runs/{run_id}", timeout=API_TIMEOUT_S)
    response.raise_for_status()
    return dict(response.json())


def _task_runs(api: str, run_id: str) -> int:
    response = httpx.post(
        f"{api}/task_runs/count",
        json={"flow_runs": {"id": {"any_": [run_id]}}},
        timeout=API_TIMEOUT_S,
    )
    response.raise_for_status()
    return int(response.json())


def _process_gone(api: str, run_id: str) -> bool:
    return not [p for p in live_flow_runs(api) if p.flow_run_id == run_id]


@pytest.mark.timeout(300)
def test_a_run_suspended_from_outside_stops_at_its_next_task_and_resumes(
    slow_deployment: tuple[str, str], tmp_path: Path
) -> None:
    from prefect.flow_runs import resume_flow_run, suspend_flow_run

    api, deployment_id = slow_deployment
    created = httpx.post(
        f"{api}/deployments/{deployment_id}/create_flow_run", json={}, timeout=API_TIMEOUT_S
    )
    created.raise_for_status()
    run_id = created.json()["id"]
    wait_until(
        lambda: _task_runs(api, run_id) >= 2, "the run started its tasks", RUN_TIMEOUT_S, POLL_S
    )
    processes = [p.pid for p in live_flow_runs(api) if p.flow_run_id == run_id]
    assert processes, "the run has a process of its own"
    # The worker relays: the run started no observer of its own.
    environ = Path(f"/proc/{processes[0]}/environ").read_bytes().split(b"\0")
    assert f"{RELAY_ENV}={RELAYED}".encode() in environ

    suspend_flow_run(flow_run_id=UUID(run_id), timeout=600)
    wait_until(
        lambda: _process_gone(api, run_id),
        "the suspended run's process ended",
        TICKS * TICK_S / 2,
        POLL_S,
    )
    state = _run(api, run_id)["state"]
    assert (state["type"], state["name"]) == ("PAUSED", "Suspended")
    assert _task_runs(api, run_id) < TICKS, "the run went on to its end"

    # Resumed, the worker starts it again (a new process, from the flow's start), and the
    # run goes to its end.
    (tmp_path / SLOW_MARKER).unlink()
    resume_flow_run(UUID(run_id))
    wait_until(
        lambda: _run(api, run_id)["state"]["type"] == "COMPLETED",
        "the resumed run ended",
        RUN_TIMEOUT_S,
        POLL_S,
    )
    # ...and its process exits (the worker is stopped next: not while a run is exiting).
    wait_until(
        lambda: _process_gone(api, run_id), "the resumed run's process ended", RUN_TIMEOUT_S, POLL_S
    )
