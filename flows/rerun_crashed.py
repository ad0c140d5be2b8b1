"""Flow ``rerun-crashed``: run crashed downstream flow runs again.

Triggered by ``prefect.flow-run.Crashed`` of the downstream deployments (see prefect.yaml),
typically after a Prefect server outage caught runs that were starting or finishing, and
run without a run id to sweep up crashes whose event was lost or held back: hourly, and at
once, a minute and three minutes after `msi-prefect up` started the server. The sweeps after a
start also start the downstream runs the server's previous life was told to start and
never did (``msi_prefect.prefect_layer.lost_dispatches``).
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from msi_prefect.prefect_layer.crashed_runs import rerun_all_crashed, rerun_crashed
from msi_prefect.prefect_layer.lost_dispatches import start_lost_dispatches


@flow(
    name="rerun-crashed",
    flow_run_name="rerun {flow_run}",
    description="Start crashed downstream runs again with the same parameters.",
)
def rerun_crashed_flow(
    flow_run: str = "all", server_started_at: datetime | None = None
) -> list[str]:
    """Re-run one crashed flow run, or every recent one.

    Args:
        flow_run: The crashed run's id, or its event resource id; ``all`` sweeps every
            crashed downstream run of the last 24 hours.
        server_started_at: With ``all``: when the Prefect server started (``msi-prefect up``
            passes it); the sweep then also starts the downstream runs of the events the
            server received before that start and never acted on.

    Returns:
        The ids of the re-runs and runs started (empty when there was nothing to do).
    """
    if flow_run != "all":
        rerun = rerun_crashed(flow_run)
        return [rerun] if rerun else []
    started = rerun_all_crashed()
    if server_started_at is not None:
        started += start_lost_dispatches(server_started_at)
    return started
