"""Deploy the project's flows onto the embedded stack and start the long-running ones.

`msi-prefect up` calls this once every part is healthy, so a user who drops a file into
the watched folder sees it rebuilt, backed up, described and analysed with no further
step. It does what a user would (`blocks/create_embedded_blocks.py`, `prefect deploy
--all`) with the stack's environment, in the project `msi_prefect.stack.project` finds:
the current folder's (a lab project of `msi-prefect init`, or a checkout), else the one
the package carries (an install). The bundled blocks script runs in this process, the
deploy in a child process, and only when something it reads has changed
(`msi_prefect.stack.deploy_record`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.dispatch.mode import EARLIER_BATCH_FLOWS
from msi_prefect.stack.config import Component
from msi_prefect.stack.crypto import (
    CRYPTO_DIR_ENV,
    DEPLOYMENT_CRYPTO_BLOCKS,
    provision_embedded_nodes,
)
from msi_prefect.stack.deploy_record import (
    DeployRecord,
    deploy_fingerprint,
    deploy_is_current,
    forget_record,
    load_record,
    save_record,
    server_deployments,
)
from msi_prefect.stack.manager import StackManager
from msi_prefect.stack.prefect_api import checked, request
from msi_prefect.stack.project import (
    BLOCKS_SCRIPT,
    CHECKOUT_DIR,
    PROJECT_FILE,
    blocks_script,
    bundled_project_dir,
    deployment_names,
    project_for_up,
)
from msi_prefect.stack.roles import single_host_pools
from msi_prefect.stack.runs import (
    ACTIVE_STATES,
    TRANSFER_DEPLOYMENTS,
    RunState,
    crash_orphaned_runs,
)
from msi_prefect.stack.unresponsive_runs import apply_stack_automations, heartbeat_s

logger = logging.getLogger(__name__)

# The checkout of an editable install (tests read the project files there).
PROJECT_DIR = CHECKOUT_DIR
# `flow name/deployment name`: each long-running flow has one deployment of its name.
LONG_RUNNING_DEPLOYMENTS = tuple(f"{name}/{name}" for name in TRANSFER_DEPLOYMENTS)
#: Run without parameters, it re-runs every crashed downstream run of the last day.
RERUN_SWEEP_DEPLOYMENT = "rerun-crashed/rerun-crashed"
#: The deployments `up` starts or schedules by name: a project must declare them.
UP_DEPLOYMENTS = (*TRANSFER_DEPLOYMENTS, RERUN_SWEEP_DEPLOYMENT.split("/")[1])
#: Tag of the sweeps `up` schedules after it started the server.
SWEEP_AFTER_START_TAG = "msi.sweep-after-start"
# A deployment with a run in one of these has its transfer running or about to.
STARTING_OR_ACTIVE = (RunState.SCHEDULED.value, *(state.value for state in ACTIVE_STATES))
DEPLOY_TIMEOUT_S = 300
#: After a start of the Prefect server, the sweep also runs this long after: a downstream
#: run that the restart cut off (its process lost the server) is marked ``CRASHED`` by the
#: worker once the server answers again, and Prefect holds that ``Crashed`` event back from
#: the `rerun-crashed` trigger for 15 minutes (the event follows a state event that only
#: the old server saw). Three sweeps: one at once, for the runs the server's previous
#: life was told to start and never did (``msi_prefect.prefect_layer.lost_dispatches``) and
#: the runs this `up` found without a process; most runs the restart cut off are marked
#: within seconds of it, the rest when their client's retries run out (about a minute).
SWEEP_DELAYS_AFTER_SERVER_START_S = (0.0, 60.0, 180.0)
#: `up` schedules them if the server started less than this long ago (this `up` started
#: it, or an earlier one that failed later on): after that, the trigger acts on its own.
SWEEP_WINDOW_AFTER_SERVER_START_S = 15 * 60.0
#: The sweep's parameter that says when the server started (flows/rerun_crashed.py).
SERVER_STARTED_AT_PARAMETER = "server_started_at"


def project_dir(folder: Path | None = None) -> Path:
    """The project `up` deploys when run in ``folder`` (default: the current folder).

    Raises:
        MsiError: The folder's prefect.yaml is not an msi-prefect project, or the
            installation carries no project files (see `msi_prefect.stack.project`).
    """
    return project_for_up(folder or Path.cwd(), UP_DEPLOYMENTS)


@dataclass(frozen=True)
class DeployOutcome:
    """What :func:`deploy_flows` did.

    Attributes:
        deployed: ``prefect deploy --all`` ran (False: this stack's last deploy was
            current, `msi_prefect.stack.deploy_record`).
        started: The long-running deployments started (those already running are kept).
    """

    deployed: bool
    started: list[str]


def deploy_flows(manager: StackManager, worker_just_started: bool) -> DeployOutcome:
    """Create the blocks, deploy every flow, and start the long-running deployments.

    The project is the current folder's, else the package's (:func:`project_dir`). Its
    ``prefect deploy --all`` is skipped when this stack's last one read the same files
    and settings and its deployments are still there (:func:`deploy_project`). The
    stack's own automations are applied (`msi_prefect.stack.unresponsive_runs`: a run
    whose heartbeats stopped is marked crashed, with no `up` needed). Runs left active by a
    stack that died (their processes are gone) are marked crashed before the transfers are
    started, so they start again (see `msi_prefect.stack.runs`). After a start of
    the server, sweeps of crashed downstream runs are scheduled at once, a minute and three
    minutes after it (:func:`schedule_sweeps_after_server_start`).

    Args:
        manager: The stack, every part healthy.
        worker_just_started: This `up` started the worker (it was not running).

    Returns:
        Whether it deployed, and the long-running deployments it started.

    Raises:
        MsiError: No project to deploy (see :func:`project_dir`), or a step failed (with
            its output).
    """
    project = project_dir()
    logger.info("deploying %s", project / "prefect.yaml")
    config = manager.config
    assert config.watch_dir is not None and config.destination_dir is not None
    for folder in (config.watch_dir, config.destination_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **manager.client_env(),
        "MSI_PROJECT_DIR": str(project),
        "MSI_WATCH_DIR": config.watch_dir,
        "MSI_DESTINATION_DIR": config.destination_dir,
        # One machine, one worker: the instrument, storage and compute deployments share
        # its pool (a facility gives each kind of host its own: msi_prefect.stack.roles).
        **single_host_pools(config.work_pool),
    }
    if config.encrypted:
        env[CRYPTO_DIR_ENV] = str(provision_embedded_nodes(manager.state.root))
    status = {**asdict(manager.status()), "components": []}
    create_blocks(project, status, env)
    deployed = deploy_project(manager, project, env)
    apply_stack_automations(config.prefect_api_url, bundled_project_dir(), heartbeat_s())
    orphans = crash_orphaned_runs(config, worker_just_started)
    if any(run.deployment_name not in TRANSFER_DEPLOYMENTS for run in orphans):
        # Downstream work cut off by a power cut: their Crashed events follow state events
        # the restarted server never saw, and Prefect holds such events back from the
        # triggers for 15 minutes. The sweep re-runs them now, also on a server that has
        # run longer than the sweeps' window (a dead worker); sweeps at once meet safely.
        start_deployment_run(manager, RERUN_SWEEP_DEPLOYMENT, sweep_parameters(manager))
    schedule_sweeps_after_server_start(manager)
    started = []
    for deployment in LONG_RUNNING_DEPLOYMENTS:
        if not _has_active_run(manager, deployment):
            parameters = (
                {"crypto_block": DEPLOYMENT_CRYPTO_BLOCKS[deployment]} if config.encrypted else {}
            )
            start_deployment_run(manager, deployment, parameters)
            started.append(deployment)
    return DeployOutcome(deployed=deployed, started=started)


def create_blocks(project: Path, status: dict[str, Any], env: dict[str, str]) -> None:
    """Save the embedded stack's blocks with the project's blocks script.

    The script the package carries is run in this process (`up` has Prefect imported
    already; a new interpreter costs seconds of CPU); a project's own script, as a user
    would, in a child process.

    Raises:
        MsiError: The blocks could not be saved (with the script's output).
    """
    from msi_prefect.stack.embedded_blocks import create_embedded_blocks  # imports Prefect

    script = blocks_script(project)
    if script.read_bytes() == (bundled_project_dir() / BLOCKS_SCRIPT).read_bytes():
        try:
            saved = create_embedded_blocks(json.loads(json.dumps(status, default=str)), env)
        except (MsiError, ValidationError) as exc:
            raise MsiError(f"creating the blocks failed:\n{exc}") from exc
        except Exception as exc:  # Prefect's client: its HTTP and connection errors
            raise MsiError(f"creating the blocks failed: {exc!r}") from exc
        logger.info("saved the blocks %s", ", ".join(saved))
        return
    _run(
        [sys.executable, str(script)],
        env,
        project,
        "creating the blocks",
        stdin=json.dumps(status, default=str),
    )


def deploy_project(manager: StackManager, project: Path, env: dict[str, str]) -> bool:
    """Run ``prefect deploy --all`` in ``project``, unless this stack's last deploy is current.

    See `msi_prefect.stack.deploy_record`: the deploy is skipped when it would read the
    same files and environment as the last one, whose deployments the server still holds.

    Returns:
        Whether it deployed (False: the last deploy is current).

    Raises:
        MsiError: The deploy failed (with its output).
        PrefectApiError: The API did not answer within `up`'s deadline.
    """
    api_url = manager.config.prefect_api_url
    names = deployment_names(project / PROJECT_FILE)
    fingerprint = deploy_fingerprint(project, env)
    state_root = manager.state.root
    if deploy_is_current(load_record(state_root), fingerprint, api_url, names):
        logger.info("the deployments are those of %s already: not deployed again", project)
        return False
    forget_record(state_root)
    _run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        env,
        project,
        "deploying the flows",
    )
    save_record(state_root, DeployRecord(fingerprint, server_deployments(api_url, names)))
    retire_earlier_deployments(api_url, names)
    return True


def retire_earlier_deployments(api_url: str, declared: set[str]) -> list[str]:
    """Delete the deployments an earlier msi-prefect made and the project no longer has.

    The three batch deployments (a run per step) that ``process-batch`` replaced would
    otherwise stay on an upgraded stack, their triggers still acting on each batch event:
    every batch would be done twice, and their flow files are gone. Their triggers (the
    automations the deployment owns) go with them. A project that still declares them (a
    lab project written by an older ``msi-prefect init``) keeps them.

    Returns:
        The names of the deployments deleted.

    Raises:
        PrefectApiError: The API did not answer within `up`'s deadline, or refused.
    """
    import httpx

    retired = [name for name in EARLIER_BATCH_FLOWS if name not in declared]
    found = server_deployments(api_url, retired) if retired else {}
    deleted = []
    with httpx.Client(base_url=api_url) as client:
        for key, deployment_id in sorted(found.items()):
            name = key.split("/")[1]
            what = f"retiring the deployment {name}"
            owned = f"/automations/owned-by/prefect.deployment.{deployment_id}"
            checked(request(client, "DELETE", owned, what), what)
            checked(request(client, "DELETE", f"/deployments/{deployment_id}", what), what)
            logger.info("deleted the deployment %s: process-batch does its work now", name)
            deleted.append(name)
    return sorted(deleted)


def start_deployment_run(manager: StackManager, deployment: str, parameters: dict[str, str]) -> str:
    """Create a run of ``deployment`` (``flow/deployment``) to start now; return its id.

    What ``prefect deployment run`` does, through the API: not a new interpreter that
    imports Prefect (seconds per run, on every `up`). Parameters not given are the
    deployment's.

    Raises:
        PrefectApiError: The API did not answer within `up`'s deadline, or refused.
    """
    import httpx

    flow_name, deployment_name = deployment.split("/")
    what = f"starting {deployment}"
    with httpx.Client(base_url=manager.config.prefect_api_url) as client:
        found = request(client, "GET", f"/deployments/name/{flow_name}/{deployment_name}", what)
        deployment_id = checked(found, what).json()["id"]
        created = request(
            client,
            "POST",
            f"/deployments/{deployment_id}/create_flow_run",
            what,
            json={"parameters": parameters},
        )
        return str(checked(created, what).json()["id"])


def _run(
    argv: list[str], env: dict[str, str], cwd: Path, what: str, stdin: str | None = None
) -> None:
    result = subprocess.run(
        argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True,
        timeout=DEPLOY_TIMEOUT_S, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise MsiError(f"{what} failed:\n{tail}")


def _has_active_run(manager: StackManager, deployment: str) -> bool:
    """Whether the deployment already has a run that is running or about to.

    Raises:
        PrefectApiError: The API did not answer within `up`'s deadline.
    """
    import httpx

    flow_name, deployment_name = deployment.split("/")
    what = f"looking for a run of {deployment}"
    with httpx.Client(base_url=manager.config.prefect_api_url) as client:
        found = request(client, "GET", f"/deployments/name/{flow_name}/{deployment_name}", what)
        if found.status_code != HTTPStatus.OK:
            return False
        runs = request(
            client,
            "POST",
            "/flow_runs/filter",
            what,
            json={
                "deployments": {"id": {"any_": [found.json()["id"]]}},
                "flow_runs": {"state": {"type": {"any_": list(STARTING_OR_ACTIVE)}}},
                "limit": 1,
            },
        )
    return bool(checked(runs, what).json())


def sweep_parameters(manager: StackManager) -> dict[str, str]:
    """The parameters of a sweep after a start of the server: that start, if recorded.

    With it the sweep also starts the downstream runs of the events the server's previous
    life stored and never acted on (``msi_prefect.prefect_layer.lost_dispatches``).
    """
    from datetime import UTC, datetime

    record = manager.process(Component.PREFECT).read_pid()
    if record is None:
        return {}
    started = datetime.fromtimestamp(record.started_at, UTC)
    return {SERVER_STARTED_AT_PARAMETER: started.isoformat()}


def schedule_sweeps_after_server_start(manager: StackManager) -> list[str]:
    """Schedule the sweeps that follow a start of the stack's Prefect server.

    One run of the crashed-run sweep :data:`SWEEP_DELAYS_AFTER_SERVER_START_S` after the
    server's start each (now, if that is past), when the server started less than
    :data:`SWEEP_WINDOW_AFTER_SERVER_START_S` ago. Each has an idempotency key of the
    server's start and its delay, so an `up` run again after a failure schedules nothing
    twice. The sweep is idempotent too (a crashed run is re-run once, whoever asks): a
    sweep that finds nothing costs one short run.

    Returns:
        The ids of the sweeps scheduled (or found scheduled already).

    Raises:
        PrefectApiError: The API did not answer within `up`'s deadline, or refused.
    """
    from datetime import UTC, datetime

    import httpx

    record = manager.process(Component.PREFECT).read_pid()
    now = time.time()
    if record is None or now - record.started_at >= SWEEP_WINDOW_AFTER_SERVER_START_S:
        return []
    flow_name, deployment_name = RERUN_SWEEP_DEPLOYMENT.split("/")
    what = f"scheduling {RERUN_SWEEP_DEPLOYMENT}"
    scheduled = []
    parameters = sweep_parameters(manager)
    with httpx.Client(base_url=manager.config.prefect_api_url) as client:
        found = request(client, "GET", f"/deployments/name/{flow_name}/{deployment_name}", what)
        deployment_id = checked(found, what).json()["id"]
        for delay_s in SWEEP_DELAYS_AFTER_SERVER_START_S:
            start = datetime.fromtimestamp(max(now, record.started_at + delay_s), UTC)
            created = request(
                client,
                "POST",
                f"/deployments/{deployment_id}/create_flow_run",
                what,
                json={
                    "state": {
                        "type": "SCHEDULED",
                        "state_details": {"scheduled_time": start.isoformat()},
                    },
                    "parameters": parameters,
                    "tags": [SWEEP_AFTER_START_TAG],
                    "idempotency_key": f"{SWEEP_AFTER_START_TAG}:{record.started_at}:{delay_s}",
                },
            )
            scheduled.append(str(checked(created, what).json()["id"]))
    return scheduled
