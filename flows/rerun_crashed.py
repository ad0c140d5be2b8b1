"""Flow ``rerun-crashed``: run crashed downstream flow runs again.

Triggered by ``prefect.flow-run.Crashed`` of the downstream deployments (see prefect.yaml),
typically after a Prefect server outage caught runs that were starting or finishing, and
run without a run id to sweep up crashes whose event was lost or held back: hourly, and a
minute and three minutes after `msi-prefect up` started the server.
"""

from __future__ import annotations

from prefect import flow

from msi_prefect.prefect_layer.crashed_runs import rerun_all_crashed, rerun_crashed


@flow(
    name="rerun-crashed",
    flow_run_name="rerun {flow_run}",
    description="Start crashed downstream runs again with the same parameters.",
)
def rerun_crashed_flow(flow_run: str = "all") -> list[str]:
    """Re-run one crashed flow run, or every recent one.

    Args:
        flow_run: The crashed run's id, or its event resource id; ``all`` sweeps every
            crashed downstream run of the last 24 hours.

    Returns:
        The ids of the re-runs (empty when there was nothing to re-run).
    """
    if flow_run == "all":
        return rerun_all_crashed()
    rerun = rerun_crashed(flow_run)
    return [rerun] if rerun else []
