"""Flow ``rerun-crashed``: run a crashed downstream flow run again (event-triggered).

Triggered by ``prefect.flow-run.Crashed`` of the downstream deployments (see prefect.yaml),
typically after a Prefect server outage caught runs that were starting or finishing.
"""

from __future__ import annotations

from prefect import flow

from msi_prefect.crashed_runs import rerun_crashed


@flow(
    name="rerun-crashed",
    flow_run_name="rerun {flow_run}",
    description="Start a crashed downstream run again with the same parameters.",
)
def rerun_crashed_flow(flow_run: str) -> str | None:
    """Re-run one crashed flow run.

    Args:
        flow_run: The crashed run's id, or its event resource id.

    Returns:
        The id of the re-run, or None when there was nothing to re-run.
    """
    return rerun_crashed(flow_run)
