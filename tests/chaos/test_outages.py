"""Service outages on a full `msi-prefect up` stack: the S3 store and the Prefect server.

Opt in with `-m chaos` (each test runs minutes). Both start a private stack on free ports
through the CLI, as a user would, and take it down by PID at the end.

    PYTHONPATH=. python -m pytest -m chaos tests/chaos/test_outages.py
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from msi_prefect.prefect_layer.event_queries import event_pages
from msi_prefect.prefect_layer.transfers.streaming import ARTIFACT_INTERVAL_S
from msi_prefect.stack.components import Component
from msi_prefect.stack.config import BACKUP_BUCKET, StateDir, free_port_map
from msi_prefect.stack.deploy import LONG_RUNNING_DEPLOYMENTS
from msi_prefect.stack.manager import StackManager
from msi_prefect.stack.processes import flow_run_processes
from tests.flow_helpers import s3_client
from tests.listening import not_on_loopback
from tests.stack_helpers import API_TIMEOUT_S, FINAL_STATES, cli, flow_run_named

pytestmark = [pytest.mark.chaos, pytest.mark.stack]

OUTAGE_S = float(os.environ.get("MSI_CHAOS_OUTAGE_S", "60"))
# Files rebuilt, and their downstream runs finished, on a busy two-core machine.
SETTLE_S = 300
# Files dropped during the Prefect outage are rebuilt within this, with the server down.
REBUILT_WITHIN_S = 45
# Prefect holds back, for 15 minutes, a Crashed event that follows an event from before
# the restart; then its trigger fires.
HELD_BACK_S = 960
# A flow run renews its deployment concurrency lease (300 s) every 225 s.
LEASE_RENEWED_AFTER_S = 240


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, StackManager]]:
    """A private full stack (memory broker), deployed; stopped by PID afterwards."""
    root = tmp_path_factory.mktemp("outage")
    ports = free_port_map()
    port_args = [arg for name, port in ports.items() for arg in ("--port", f"{name}={port}")]
    state_dir = root / "state"
    try:
        started = cli(state_dir, "up", "--storage", "memory", *port_args)
        assert started.returncode == 0, started.stdout + started.stderr
        yield root, StackManager.open(StateDir(state_dir))
    finally:
        down = cli(state_dir, "down")
        assert down.returncode == 0, down.stderr
        assert flow_run_processes(f"http://127.0.0.1:{ports['prefect']}/api") == []


def _wait(condition: Any, timeout_s: float = SETTLE_S, every_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    return False


def _events(api: str, name: str) -> list[dict[str, Any]]:
    """Every event called `name` the server has (paged)."""
    body = {"filter": {"event": {"name": [name]}}, "limit": 50}
    with httpx.Client(timeout=API_TIMEOUT_S) as client:
        return [event for page in event_pages(client, body, api) for event in page]


def _state(api: str, run_name: str) -> str | None:
    run = flow_run_named(api, run_name)
    return run["state"]["type"] if run else None


def _long_run_pids(api: str) -> dict[int, str]:
    """PID -> flow-run id of the running watch-directory and reconstruct-files runs."""
    wanted = set()
    for deployment in LONG_RUNNING_DEPLOYMENTS:
        flow_name, name = deployment.split("/")
        found = httpx.get(f"{api}/deployments/name/{flow_name}/{name}", timeout=API_TIMEOUT_S)
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={
                "deployments": {"id": {"any_": [found.json()["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
            },
            timeout=API_TIMEOUT_S,
        ).json()
        wanted |= {run["id"] for run in runs}
    pids = {}
    for pid in flow_run_processes(api):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if (
                item.startswith(b"PREFECT__FLOW_RUN_ID=")
                and item.split(b"=", 1)[1].decode() in wanted
            ):
                pids[pid] = item.split(b"=", 1)[1].decode()
    return pids


def _completed(api: str, run_name: str) -> bool:
    """Whether a run called `run_name` (the first, or a re-run of a crashed one) completed."""
    runs = httpx.post(
        f"{api}/flow_runs/filter",
        json={
            "flow_runs": {
                "name": {"any_": [run_name]},
                "state": {"type": {"any_": ["COMPLETED"]}},
            },
            "limit": 1,
        },
        timeout=API_TIMEOUT_S,
    ).json()
    return bool(runs)


def _pid(manager: StackManager, component: Component) -> int:
    record = manager.process(component).read_pid()
    assert record is not None, component
    return record.pid


def test_everything_listens_on_loopback_only(stack: tuple[Path, StackManager]) -> None:
    root, manager = stack
    (root / "inbox" / "warm-up.dat").write_bytes(b"w" * 100)
    assert _wait(lambda: (root / "received" / "warm-up.dat").exists())
    pids = {_pid(manager, c) for c in manager.config.components}
    pids |= set(flow_run_processes(manager.config.prefect_api_url))
    assert not_on_loopback(pids) == []


def test_s3_down_for_a_minute_during_backups(stack: tuple[Path, StackManager]) -> None:
    """Backups started while the store is away retry and complete; none is announced early."""
    root, manager = stack
    api = manager.config.prefect_api_url
    names = [f"s3-outage-{i}.dat" for i in range(3)]
    manager.process(Component.S3).stop()
    stopped_at = time.monotonic()
    for i, name in enumerate(names):
        (root / "inbox" / name).write_bytes(bytes([i]) * 5000)
    assert _wait(lambda: all(_state(api, f"backup {n}") == "RUNNING" for n in names), 120)
    # Nothing is announced as backed up while the store is down.
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
    backed_up = {e["payload"]["path"] for e in _events(api, "msi.file.backed-up")}
    assert not backed_up & set(names)
    manager.up([Component.S3])
    restored_at = time.monotonic()
    assert _wait(lambda: all(_state(api, f"backup {n}") in FINAL_STATES for n in names))
    print(f"S3 outage {OUTAGE_S:.0f} s; backups done {time.monotonic() - restored_at:.0f} s after")
    assert {n: _state(api, f"backup {n}") for n in names} == dict.fromkeys(names, "COMPLETED")
    # Every file announced as backed up is in the bucket with the right bytes.
    s3 = s3_client(manager.client_env())
    announced = [e for e in _events(api, "msi.file.backed-up") if e["payload"]["path"] in names]
    assert Counter(e["payload"]["path"] for e in announced) == Counter(names)
    for i, name in enumerate(names):
        keys = [
            obj["Key"]
            for obj in s3.list_objects_v2(Bucket=BACKUP_BUCKET).get("Contents", [])
            if obj["Key"].endswith(name)
        ]
        assert len(keys) == 1, keys
        body = s3.get_object(Bucket=BACKUP_BUCKET, Key=keys[0])["Body"].read()
        assert body == bytes([i]) * 5000


def test_prefect_server_down_for_a_minute(stack: tuple[Path, StackManager]) -> None:
    """Files keep flowing while the server is away; their events and runs come after."""
    root, manager = stack
    api = manager.config.prefect_api_url
    before = [f"before-{i}.dat" for i in range(2)]
    during = [f"during-{i}.dat" for i in range(4)]
    for name in before:
        (root / "inbox" / name).write_bytes(name.encode() * 300)
    assert _wait(lambda: all((root / "received" / n).exists() for n in before))
    rebuilt_at = time.monotonic()
    assert _wait(lambda: all(_state(api, f"backup {n}") == "COMPLETED" for n in before))
    # Let the long-running runs' progress artifacts fall due, so the files of the outage
    # make them publish while the server is away (which once held the transfer up).
    time.sleep(max(0.0, ARTIFACT_INTERVAL_S + 1 - (time.monotonic() - rebuilt_at)))
    worker_pid = _pid(manager, Component.WORKER)
    long_runs = _long_run_pids(api)
    assert len(long_runs) == 2, long_runs

    manager.process(Component.PREFECT).stop()
    stopped_at = time.monotonic()
    for name in during:
        (root / "inbox" / name).write_bytes(name.encode() * 300)
    received = root / "received"
    assert _wait(lambda: all((received / n).exists() for n in during), REBUILT_WITHIN_S)
    rebuilt_after = time.monotonic() - stopped_at
    assert manager.process(Component.PREFECT).read_pid() is None  # still down
    for name in during:
        assert (received / name).read_bytes() == name.encode() * 300
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
    # The worker and the long-running flow runs outlived the outage.
    assert manager.process(Component.WORKER).read_pid().pid == worker_pid  # type: ignore[union-attr]
    assert set(long_runs) <= set(flow_run_processes(api))
    manager.up([Component.PREFECT])
    restored_at = time.monotonic()

    everything = before + during
    wanted = [f"{verb} {n}" for n in everything for verb in ("backup", "metadata of", "analyze")]
    # A run crashed by the outage is re-run by rerun-crashed on its Crashed event, which
    # Prefect may hold back for 15 minutes after the restart.
    assert _wait(lambda: all(_completed(api, name) for name in wanted), SETTLE_S + HELD_BACK_S)
    delivered_after = time.monotonic() - restored_at
    crashed = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"state": {"type": {"any_": ["CRASHED"]}}}},
        timeout=API_TIMEOUT_S,
    ).json()
    print(
        f"Prefect outage {OUTAGE_S:.0f} s: files rebuilt {rebuilt_after:.0f} s into it; "
        f"all downstream runs done {delivered_after:.0f} s after the restart; "
        f"{len(crashed)} run(s) crashed by the outage and were re-run"
    )
    rebuilt = Counter(e["payload"]["path"] for e in _events(api, "msi.file.reconstructed"))
    assert {n: rebuilt[n] for n in everything} == dict.fromkeys(everything, 1)
    # The long-running runs are still the same processes, and still RUNNING on the server,
    # also after renewing their deployment concurrency leases with the restarted server.
    time.sleep(max(0.0, LEASE_RENEWED_AFTER_S - (time.monotonic() - restored_at)))
    assert _long_run_pids(api) == long_runs
