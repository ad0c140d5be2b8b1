"""The stack's flow runs across `down` and `up`: nothing is left "Running" that does not run.

Prefect records a flow run's state only when its process reports it. A run whose process was
killed (a power cut, `kill -9`, a machine that rebooted) stays ``RUNNING`` in the database
for ever, and a long-running deployment's ``CANCEL_NEW`` concurrency slot stays taken by it,
so no new transfer could start. So:

- `msi-prefect down` cancels the long-running transfers through Prefect (they finish their
  batch, commit and end ``CANCELLED``) before it stops the worker, and once the worker and
  every flow-run process are gone it settles what is still active: ``CANCELLED`` for a
  transfer, ``CRASHED`` for a downstream run (which `rerun-crashed` then runs again);
- `msi-prefect up` marks ``CRASHED`` every active run of the stack's pool whose process is
  not alive on this machine, before it starts the transfers again.

Only the stack's own work pool is touched, and only runs of this machine's stack: the
embedded stack runs every flow on one worker here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from msi_prefect.stack.config import StackConfig
from msi_prefect.stack.prefect_api import UP_RETRY, RetryPolicy, checked, request
from msi_prefect.stack.processes import live_flow_runs

logger = logging.getLogger(__name__)

API_TIMEOUT_S = 10.0
# How long `down` waits for the cancelled transfers to commit and end.
CANCEL_WAIT_S = 40.0
POLL_S = 0.5
# A run Pending this long without a process is lost even while a worker runs: a worker
# starts a run's process within seconds of marking it Pending.
PENDING_LOST_AFTER_S = 120.0
MAX_RUNS_PER_QUERY = 200


class RunState(StrEnum):
    """The Prefect state types this module reads or sets."""

    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"


#: The long-running deployments: cancelled by `down`, started again by `up`.
TRANSFER_DEPLOYMENTS = ("watch-directory", "reconstruct-files")
#: States of a run that has (or should have) a process.
ACTIVE_STATES = (RunState.PENDING, RunState.RUNNING, RunState.CANCELLING)


@dataclass(frozen=True)
class ActiveRun:
    """A flow run of the stack's pool that Prefect believes is active."""

    id: str
    name: str
    state: RunState
    deployment_name: str | None
    state_age_s: float


def _client(config: StackConfig) -> Any:
    import httpx

    return httpx.Client(base_url=config.prefect_api_url, timeout=API_TIMEOUT_S)


def runs_in_states(
    client: Any,
    scope: dict[str, Any],
    states: tuple[RunState, ...],
    policy: RetryPolicy | None,
    what: str,
    limit: int = MAX_RUNS_PER_QUERY,
) -> list[dict[str, Any]]:
    """The flow runs in ``scope`` (a `/flow_runs/filter` clause) whose state is one of ``states``.

    Raises:
        PrefectApiError: The API did not answer (within the policy's deadline), or refused.
    """
    state_clause = {"state": {"type": {"any_": [state.value for state in states]}}}
    response = request(
        client,
        "POST",
        "/flow_runs/filter",
        what,
        policy,
        json={**scope, "flow_runs": state_clause, "limit": limit},
    )
    runs: list[dict[str, Any]] = checked(response, what).json()
    return runs


def active_runs(config: StackConfig, policy: RetryPolicy | None = None) -> list[ActiveRun]:
    """The stack pool's runs that are Pending, Running or Cancelling.

    Args:
        config: The stack.
        policy: How each API call is retried (None: once; `down` must not wait).

    Raises:
        PrefectApiError: The API did not answer (within the policy's deadline).
    """
    from datetime import UTC, datetime

    what = "listing the active flow runs"
    with _client(config) as client:
        scope = {"work_pools": {"name": {"any_": [config.work_pool]}}}
        deployments = {}
        runs = []
        now = datetime.now(UTC)
        for run in runs_in_states(client, scope, ACTIVE_STATES, policy, what):
            deployment_id = run.get("deployment_id")
            if deployment_id and deployment_id not in deployments:
                found = request(client, "GET", f"/deployments/{deployment_id}", what, policy)
                deployments[deployment_id] = found.json()["name"] if found.is_success else None
            timestamp = (run.get("state") or {}).get("timestamp")
            age = (now - datetime.fromisoformat(timestamp)).total_seconds() if timestamp else 0.0
            runs.append(
                ActiveRun(
                    id=run["id"],
                    name=run["name"],
                    state=RunState(run["state_type"]),
                    deployment_name=deployments.get(deployment_id),
                    state_age_s=age,
                )
            )
    return runs


def set_state(
    config: StackConfig,
    run_id: str,
    state: RunState,
    message: str,
    policy: RetryPolicy | None = None,
) -> None:
    """Force a run into `state` (as `prefect flow-run cancel` and the worker do).

    Raises:
        PrefectApiError: The API did not answer (within ``policy``'s deadline) or refused.
    """
    what = f"marking flow run {run_id} {state.value}"
    with _client(config) as client:
        response = request(
            client,
            "POST",
            f"/flow_runs/{run_id}/set_state",
            what,
            policy,
            json={"state": {"type": state.value, "message": message}, "force": True},
        )
        checked(response, what)


def cancel_transfers(config: StackConfig, deployments: tuple[str, ...]) -> list[str]:
    """Cancel the active runs of the long-running `deployments`; wait until they end.

    The worker passes the cancellation to each run's process, which stops at the end of its
    batch and commits. The wait ends for a run once it is no longer active or its process
    has exited: the worker marks it ``CANCELLED`` only after loading its flow to look for
    cancellation hooks (seconds per run, none of which the transfers have), and a run it
    has not marked when it is stopped is marked by :func:`settle_after_stop`. Runs still
    running after :data:`CANCEL_WAIT_S` are left to :func:`settle_after_stop` too.

    Returns:
        The names of the runs cancelled.
    """
    transfers = [run for run in active_runs(config) if run.deployment_name in deployments]
    for run in transfers:
        if run.state is not RunState.CANCELLING:
            set_state(config, run.id, RunState.CANCELLING, "msi-prefect down")
    deadline = time.monotonic() + CANCEL_WAIT_S
    pending = {run.id for run in transfers}
    while pending and time.monotonic() < deadline:
        time.sleep(POLL_S)
        with_process = {process.flow_run_id for process in live_flow_runs(config.prefect_api_url)}
        pending &= {run.id for run in active_runs(config)} & with_process
    return [run.name for run in transfers]


def settle_after_stop(config: StackConfig, deployments: tuple[str, ...]) -> list[ActiveRun]:
    """After the worker and its runs are stopped: end every run Prefect still holds active.

    Transfers (`deployments`) end ``CANCELLED``; other runs ``CRASHED``, so that
    `rerun-crashed` runs them again when the stack is back.

    Returns:
        The runs whose state this call set.
    """
    alive = {process.flow_run_id for process in live_flow_runs(config.prefect_api_url)}
    settled = []
    for run in active_runs(config):
        if run.id in alive:
            continue
        if run.deployment_name in deployments:
            set_state(config, run.id, RunState.CANCELLED, "stopped by msi-prefect down")
        else:
            set_state(
                config, run.id, RunState.CRASHED, "its process was stopped by msi-prefect down"
            )
        settled.append(run)
    return settled


def crash_orphaned_runs(
    config: StackConfig, worker_just_started: bool, policy: RetryPolicy | None = UP_RETRY
) -> list[ActiveRun]:
    """Mark ``CRASHED`` every active run of the pool whose process is gone.

    Args:
        config: The stack.
        worker_just_started: The worker was not running before this `up`: then no run can
            be on its way to a process, and a Pending run is as lost as a Running one.
        policy: How each API call is retried (`up` calls this on a server that may have
            just been restarted and be busy).

    Returns:
        The runs marked crashed.
    """
    alive = {process.flow_run_id for process in live_flow_runs(config.prefect_api_url)}
    crashed = []
    for run in active_runs(config, policy):
        if run.id in alive:
            continue
        if (
            run.state is RunState.PENDING
            and not worker_just_started
            and run.state_age_s < PENDING_LOST_AFTER_S
        ):
            continue
        set_state(
            config,
            run.id,
            RunState.CRASHED,
            "its process was gone when the stack came up (power cut, kill or reboot)",
            policy,
        )
        logger.info("flow run %s (%s) had no process; marked crashed", run.name, run.id)
        crashed.append(run)
    return crashed
