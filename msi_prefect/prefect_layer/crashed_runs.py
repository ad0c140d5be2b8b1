"""Run a crashed downstream flow run again, with the same parameters.

A flow run crashes when its process cannot report to the Prefect server: a server outage
that starts while the worker submits a run, or while a run starts or finishes, leaves it
``CRASHED`` (the worker records it when the server is back). Prefect does not retry a
crash, and the file event that started the run has already been consumed, so without help
that file's backup, metadata or analysis would never be done.

The ``rerun-crashed`` deployment is triggered by ``prefect.flow-run.Crashed`` of the
downstream deployments and calls :func:`rerun_crashed`, which creates one new run of the
same deployment with the same parameters. It is idempotent (a second call for the same
crashed run finds the first re-run by its tag) and bounded (a run whose re-runs keep
crashing, a real fault, is re-run at most :data:`MAX_RERUNS` times in a row). Two callers
at once are safe too: the re-run is created with an idempotency key of the crashed run's
id, and the server keeps one run per key.

A crash recorded just after a server restart follows a state event the restarted server
has not seen (Prefect keeps that bookkeeping in memory), and Prefect holds such an event
back from triggers for 15 minutes before evaluating it anyway; a second restart in that
time loses it. So the same deployment also sweeps every crashed run of the downstream
deployments (:func:`rerun_all_crashed`): hourly, and at once, a minute and three minutes
after `msi-prefect up` started the server (``msi_prefect.stack.deploy``), when such crashes
are recorded.
"""

from __future__ import annotations

import logging
import uuid

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.dispatch.mode import FILE_FLOWS

__all__ = [
    "DOWNSTREAM_DEPLOYMENTS",
    "MAX_RERUNS",
    "RERUN_OF_TAG",
    "RERUN_TAG",
    "rerun_all_crashed",
    "rerun_crashed",
]

logger = logging.getLogger(__name__)

#: How many times in a row a crashed run is re-run.
MAX_RERUNS = 3
#: Tag of a re-run: ``msi.rerun:<n>``, n counting the re-runs in a row.
RERUN_TAG = "msi.rerun"
#: Tag naming the crashed run a re-run replaces: ``msi.rerun-of:<flow run id>``.
RERUN_OF_TAG = "msi.rerun-of"
_RESOURCE_PREFIX = "prefect.flow-run."
#: The deployments whose crashed runs are re-run (the long-running ones are not: `msi-prefect
#: up` restarts them, and two of them must not run at once).
DOWNSTREAM_DEPLOYMENTS = (*FILE_FLOWS, "audit-backups")
#: How far back the sweep looks for crashed runs.
SWEEP_LOOKBACK_HOURS = 24.0


def _generation(tags: list[str]) -> int:
    found = [t.split(":", 1)[1] for t in tags if t.startswith(f"{RERUN_TAG}:")]
    return max((int(n) for n in found if n.isdigit()), default=0)


def rerun_crashed(flow_run: str) -> str | None:
    """Start the deployment of a crashed run again with the same parameters.

    Args:
        flow_run: The crashed run's id, or its event resource id (``prefect.flow-run.<id>``).

    Returns:
        The id of the re-run (an existing one if this run was re-run already), or None when
        there is nothing to do: the run is not crashed, has no deployment, or has been
        re-run :data:`MAX_RERUNS` times in a row.

    Raises:
        MsiError: `flow_run` is not a flow run id.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType

    try:
        run_id = uuid.UUID(flow_run.removeprefix(_RESOURCE_PREFIX))
    except ValueError as exc:
        raise MsiError(f"not a flow run id: {flow_run!r}") from exc
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.state is None or run.state.type is not StateType.CRASHED:
            logger.info("flow run %s is not crashed; nothing to re-run", run_id)
            return None
        if run.deployment_id is None:
            logger.info("flow run %s has no deployment; it cannot be re-run", run_id)
            return None
        generation = _generation(list(run.tags))
        if generation >= MAX_RERUNS:
            logger.error(
                "flow run %s crashed after %d re-runs in a row; not re-running it again",
                run_id,
                generation,
            )
            return None
        marker = f"{RERUN_OF_TAG}:{run_id}"
        earlier = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[marker])), limit=1
        )
        if earlier:
            return str(earlier[0].id)
        kept = [t for t in run.tags if not t.startswith((f"{RERUN_TAG}:", f"{RERUN_OF_TAG}:"))]
        rerun = client.create_flow_run_from_deployment(
            run.deployment_id,
            parameters=dict(run.parameters),
            tags=[*kept, f"{RERUN_TAG}:{generation + 1}", marker],
            # Two sweeps (or a sweep and the trigger) at once: the server creates one
            # re-run per key and hands the second caller the same run.
            idempotency_key=marker,
        )
        logger.info("flow run %s crashed; started %s with the same parameters", run_id, rerun.id)
        return str(rerun.id)


def rerun_all_crashed(
    deployments: tuple[str, ...] = DOWNSTREAM_DEPLOYMENTS,
    lookback_hours: float = SWEEP_LOOKBACK_HOURS,
) -> list[str]:
    """Re-run every crashed run of `deployments` that started in the last `lookback_hours`.

    Returns:
        The ids of the re-runs started (or found) for them.
    """
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    since = datetime.now(UTC) - timedelta(hours=lookback_hours)
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
                expected_start_time=FlowRunFilterExpectedStartTime(after_=since),  # type: ignore[arg-type]
            ),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(deployments))),
        )
    reruns = [rerun_crashed(str(run.id)) for run in crashed]
    return [rerun for rerun in reruns if rerun is not None]
