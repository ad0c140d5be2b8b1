"""`msi-prefect down`'s bookkeeping of the transfers (msi_prefect/stack/runs.py), on the
session's Prefect server: a stand-in process plays the transfer's flow-run process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from msi_prefect.stack import runs
from msi_prefect.stack.config import StackConfig
from tests.conftest import RunningStack

pytestmark = pytest.mark.stack

API_TIMEOUT_S = 30.0
# Far longer than the test waits: `cancel_transfers` must end because the process did.
NEVER_S = 600.0
# How long the test gives `cancel_transfers` to see the exit (it looks every POLL_S).
RETURN_TIMEOUT_S = 60.0


@pytest.fixture
def transfer_run(
    prefect_stack: RunningStack, prefect_api: str
) -> Iterator[tuple[StackConfig, str]]:
    """A Running run of a transfer deployment in a pool of its own (no worker serves it).

    Yields the stack's settings with that pool, and the deployment's name.
    """
    pool, name = f"runs-{uuid.uuid4().hex[:8]}", f"transfer-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=prefect_api, timeout=API_TIMEOUT_S) as client:
        client.post("/work_pools/", json={"name": pool, "type": "process"}).raise_for_status()
        flow_id = client.post("/flows/", json={"name": name}).json()["id"]
        deployment = client.post(
            "/deployments/",
            json={"name": name, "flow_id": flow_id, "work_pool_name": pool,
                  "work_queue_name": "default", "entrypoint": "flows/transfer.py:flow"},
        )  # fmt: skip
        deployment.raise_for_status()
        created = client.post(
            f"/deployments/{deployment.json()['id']}/create_flow_run",
            json={"state": {"type": "RUNNING"}},
        )
        created.raise_for_status()
        try:
            yield prefect_stack.config.model_copy(update={"work_pool": pool}), name
        finally:
            client.post(
                f"/flow_runs/{created.json()['id']}/set_state",
                json={"state": {"type": "CANCELLED"}, "force": True},
            )
            client.delete(f"/deployments/{deployment.json()['id']}")
            client.delete(f"/work_pools/{pool}")


def test_down_waits_for_a_cancelled_transfer_to_exit_not_for_its_worker_to_record_it(
    transfer_run: tuple[StackConfig, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, name = transfer_run
    (run,) = runs.active_runs(config)
    # The run's process, as `down` sees processes (the worker gives it these variables).
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, "PREFECT_API_URL": config.prefect_api_url,
             "PREFECT__FLOW_RUN_ID": run.id},
    )  # fmt: skip
    monkeypatch.setattr(runs, "CANCEL_WAIT_S", NEVER_S)
    cancelled: list[list[str]] = []
    waiter = threading.Thread(
        target=lambda: cancelled.append(runs.cancel_transfers(config, (name,))), daemon=True
    )
    try:
        waiter.start()
        deadline = time.monotonic() + RETURN_TIMEOUT_S
        while runs.active_runs(config)[0].state is not runs.RunState.CANCELLING:
            assert time.monotonic() < deadline, "the transfer was not set Cancelling"
            time.sleep(runs.POLL_S)
        time.sleep(3 * runs.POLL_S)
        assert waiter.is_alive(), "cancel_transfers ended while the transfer's process ran"
    finally:
        stand_in.kill()
        stand_in.wait()
    waiter.join(RETURN_TIMEOUT_S)
    assert not waiter.is_alive(), "cancel_transfers still waits for a transfer that exited"
    assert cancelled == [[run.name]]
    # No worker recorded the end: the run is left Cancelling, for `settle_after_stop`.
    (still,) = runs.active_runs(config)
    assert still.state is runs.RunState.CANCELLING
