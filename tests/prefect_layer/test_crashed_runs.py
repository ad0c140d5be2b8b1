"""Re-running crashed downstream runs (what a Prefect server outage leaves behind)."""

from __future__ import annotations

import contextvars
import threading
import uuid

import pytest

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.crashed_runs import (
    MAX_RERUNS,
    RERUN_OF_TAG,
    RERUN_TAG,
    rerun_all_crashed,
    rerun_crashed,
)
from tests.flow_helpers import load_flow

pytestmark = pytest.mark.stack


def _deployment_run(client, deployment_id: uuid.UUID, tags: list[str] | None = None):  # type: ignore[no-untyped-def]
    from prefect.states import Crashed

    run = client.create_flow_run_from_deployment(
        deployment_id, parameters={"flow_run": "x"}, tags=tags or ["msi"]
    )
    client.set_flow_run_state(run.id, Crashed(message="lost the API"), force=True)
    return run


def test_a_crashed_run_is_started_again_once_and_not_forever(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    flow = load_flow("flows/rerun_crashed.py:rerun_crashed_flow")
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow.name)
        deployment_name = f"test-{uuid.uuid4().hex[:8]}"
        deployment_id = client.create_deployment(flow_id, deployment_name)
        crashed = _deployment_run(client, deployment_id)

        rerun_id = rerun_crashed(f"prefect.flow-run.{crashed.id}")
        assert rerun_id is not None
        rerun = client.read_flow_run(uuid.UUID(rerun_id))
        assert rerun.deployment_id == deployment_id
        assert rerun.parameters == {"flow_run": "x"}
        assert set(rerun.tags) == {"msi", f"{RERUN_TAG}:1", f"{RERUN_OF_TAG}:{crashed.id}"}
        # The trigger may fire twice for one crash: still one re-run.
        assert rerun_crashed(str(crashed.id)) == rerun_id

        # A run that is not crashed, or was re-run too often in a row, is left alone.
        assert rerun_crashed(rerun_id) is None
        worn_out = _deployment_run(client, deployment_id, [f"{RERUN_TAG}:{MAX_RERUNS}"])
        assert rerun_crashed(str(worn_out.id)) is None

        # The sweep finds a crash whose event never started a re-run, and only that one.
        missed = _deployment_run(client, deployment_id)
        swept = rerun_all_crashed((deployment_name,))
        assert rerun_id in swept and len(swept) == 2
        (new_id,) = set(swept) - {rerun_id}
        assert f"{RERUN_OF_TAG}:{missed.id}" in client.read_flow_run(uuid.UUID(new_id)).tags

    with pytest.raises(MsiError, match="not a flow run id"):
        rerun_crashed("prefect.flow-run.nonsense")


def test_sweeps_at_once_start_one_rerun_of_a_crashed_run(prefect_api: str) -> None:
    # The sweeps `up` schedules after a server start, the hourly one and the trigger can
    # meet: however many ask at the same moment, the crashed run is re-run once.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    flow = load_flow("flows/rerun_crashed.py:rerun_crashed_flow")
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow.name)
        deployment_id = client.create_deployment(flow_id, f"test-{uuid.uuid4().hex[:8]}")
        crashed = _deployment_run(client, deployment_id)
    callers = 4
    barrier = threading.Barrier(callers)
    reruns: list[str | None] = []

    def sweep() -> None:
        barrier.wait()
        reruns.append(rerun_crashed(str(crashed.id)))

    # Prefect's settings (the API URL) live in context variables: each thread gets a copy.
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(sweep,))
        for _ in range(callers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(reruns)) == 1 and reruns[0] is not None
    with get_client(sync_client=True) as client:
        marked = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"{RERUN_OF_TAG}:{crashed.id}"])
            )
        )
    assert [str(run.id) for run in marked] == [reruns[0]]
