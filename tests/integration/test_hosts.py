"""Instrument, storage and compute as three hosts on one machine (docs/deployment.md).

One Prefect server and one broker; the flows deployed from prefect.yaml with a work pool
per kind of host (``MSI_INSTRUMENT_POOL``, ``MSI_STORAGE_POOL``, ``MSI_COMPUTE_POOL``);
three ``msi-prefect worker --role ...`` processes, each with its own working directory
and state. The storage host rebuilds into an S3 destination (its staging folder is its
own); the compute worker runs in a mount namespace of its own with the storage host's
folder hidden under an empty tmpfs, so its backup, metadata and analysis runs can only
read each file by its URL. Every process is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from msi_prefect.stack.components import Component, s3_env
from msi_prefect.stack.config import BACKUP_BUCKET, StackConfig, StateDir, free_port_map
from msi_prefect.stack.manager import StackManager
from msi_prefect.stack.processes import flow_run_processes, terminate
from msi_prefect.stack.roles import ROLE_DEPLOYMENTS, HostRole, default_pool, pool_env
from msi_prefect.stack.storage_host import REBUILD_SUBDIR
from tests.stack_helpers import (
    DONE_EVENTS,
    FINAL_STATES,
    file_events,
    pid_alive,
    wait_until_done,
)

pytestmark = [pytest.mark.stack, pytest.mark.own_stack, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
# One file: its three downstream runs are what a compute host does (each run is a process).
FILES = {"run1/a.csv": b"t,v\n" + b"1,2\n" * 2000}
DONE_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 90.0
# The storage worker's own copy of reconstruct-files is named after its host.
STORAGE_HOST = "storage-host"
ROLE_OF = {name: role for role, names in ROLE_DEPLOYMENTS.items() for name in names}
ROLE_OF[STORAGE_HOST] = HostRole.STORAGE
# Prefect's worker asks for runs every 10 s by default; a test waits for several hops.
WORKER_POLL = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}


def run_all_checked(commands: list[tuple[list[str], str | None]], env: dict[str, str]) -> None:
    """Run commands side by side (each with its stdin); every one must succeed."""
    running = [
        (argv, stdin, subprocess.Popen(argv, env=env, cwd=REPO, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT))
        for argv, stdin in commands
    ]  # fmt: skip
    for argv, stdin, process in running:
        output, _ = process.communicate(stdin, timeout=300)
        assert process.returncode == 0, f"{argv}: {output}"


@contextlib.contextmanager
def servers(root: Path) -> Iterator[StackManager]:
    """The facility's shared services: S3 store, broker and Prefect server (no worker)."""
    manager = StackManager(StateDir(root / "services"), StackConfig(ports=free_port_map()))
    try:
        manager.up([Component.S3, Component.BROKER, Component.PREFECT])
        yield manager
    finally:
        manager.down()


def role_worker_argv(role: HostRole, work_dir: Path, hidden: Path | None) -> list[str]:
    worker = [
        sys.executable, "-m", "msi_prefect.cli", "worker",
        "--role", role.value, "--work-dir", str(work_dir), "--host-name", f"{role.value}-host",
    ]  # fmt: skip
    if hidden is None:
        return worker
    # unshare execs the shell, which execs the worker: one PID, the worker's.
    script = f'mount -t tmpfs -o size=1m msi-hidden "{hidden}" && exec "$@"'
    return [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", script, "hidden-storage", *worker,
    ]  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
def test_three_hosts_rebuild_on_storage_and_process_on_a_compute_host_that_sees_no_disk(
    tmp_path: Path,
) -> None:
    hosts = {role: tmp_path / role.value for role in HostRole}
    for folder in hosts.values():
        folder.mkdir()
    inbox = hosts[HostRole.INSTRUMENT] / "inbox"
    inbox.mkdir()
    prefix = f"rebuilt-{uuid.uuid4().hex[:8]}"
    with servers(tmp_path) as manager:
        api = manager.config.prefect_api_url
        aws = s3_env(manager.config, manager.state.credentials())
        pools = {pool_env(role): default_pool(role) for role in HostRole}
        # Each host knows the server; only storage and compute know the S3 store.
        base = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "PREFECT_", "MSI_"))
        }
        host_env = {
            HostRole.INSTRUMENT: {**base, "PREFECT_API_URL": api, **WORKER_POLL},
            HostRole.STORAGE: {**base, "PREFECT_API_URL": api, **WORKER_POLL, **aws},
            HostRole.COMPUTE: {**base, "PREFECT_API_URL": api, **WORKER_POLL, **aws},
        }
        create_pools(api, pools.values())
        workers: dict[HostRole, subprocess.Popen[bytes]] = {}
        try:
            # The workers start while the operator's machine creates blocks and deploys.
            for role in HostRole:
                hidden = hosts[HostRole.STORAGE] if role is HostRole.COMPUTE else None
                with (tmp_path / f"{role.value}-worker.log").open("wb") as log:
                    workers[role] = subprocess.Popen(
                        role_worker_argv(role, hosts[role], hidden),
                        env=host_env[role],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
            deploy_env = {
                **os.environ,
                **manager.client_env(),
                **pools,
                "MSI_PROJECT_DIR": str(REPO),
                "MSI_WATCH_DIR": str(inbox),
                "MSI_DESTINATION_DIR": f"s3://{BACKUP_BUCKET}/{prefix}",
            }
            status = json.dumps({**asdict(manager.status()), "components": []}, default=str)
            run_all_checked(
                [
                    ([sys.executable, "blocks/create_embedded_blocks.py"], status),
                    ([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], None),
                ],
                deploy_env,
            )
            # The storage worker started its host's rebuilder itself (once it was deployed).
            rebuild_dir = hosts[HostRole.STORAGE] / REBUILD_SUBDIR
            run_deployment(api, "watch-directory", {})
            since = time.time()
            for relpath, data in FILES.items():
                (inbox / relpath).parent.mkdir(parents=True, exist_ok=True)
                (inbox / relpath).write_bytes(data)

            done, finished = wait_until_done(api, since, lambda: set(FILES), DONE_TIMEOUT_S)
            logs = {r.value: (tmp_path / f"{r.value}-worker.log").read_text()[-3000:]
                    for r in HostRole}  # fmt: skip
            assert done, f"done: {sorted(finished)}; worker logs: {logs}"

            # The compute host never saw the storage host's folder ...
            compute_pid = workers[HostRole.COMPUTE].pid
            assert pid_alive(compute_pid)
            assert (rebuild_dir / "progress.sqlite").is_file(), "the storage host's rebuilder"
            assert list(Path(f"/proc/{compute_pid}/root{hosts[HostRole.STORAGE]}").iterdir()) == []
            # ... so it read each file by its s3:// URL, and ran every downstream step.
            events = file_events(api, since, DONE_EVENTS)
            assert {event["payload"]["url"] for event in events} == {
                f"s3://{BACKUP_BUCKET}/{prefix}/{relpath}" for relpath in FILES
            }
            # The storage host audits the backups of what it rebuilt, from its rebuilder's
            # work folder (an S3 destination holds no progress store); the template, which
            # knows no host's folder, is paused.
            audit = wait_final(api, run_named(api, f"audit-backups/{STORAGE_HOST}"))
            assert audit["state_type"] == "COMPLETED", audit["state"]
            assert audit["parameters"]["work_dir"] == str(rebuild_dir)
            assert read_deployment(api, "audit-backups/audit-backups")["paused"]
            ran = pools_of_runs(api)
            assert {"watch-directory", STORAGE_HOST} <= set(ran)
            assert {"backup-file", "process-batch"} & set(ran), ran
            assert ran == {name: {default_pool(ROLE_OF[name])} for name in ran}
        finally:
            stop_everything(api, workers)


def run_deployment(api: str, name: str, parameters: dict[str, Any]) -> None:
    """What `prefect deployment run NAME/NAME --param ...` does, without its start-up."""
    with httpx.Client(timeout=30) as client:
        deployment = client.get(f"{api}/deployments/name/{name}/{name}")
        deployment.raise_for_status()
        client.post(
            f"{api}/deployments/{deployment.json()['id']}/create_flow_run",
            json={"parameters": parameters},
        ).raise_for_status()


def read_deployment(api: str, name: str) -> dict[str, Any]:
    """``flow/deployment`` as the server has it."""
    with httpx.Client(timeout=30) as client:
        response = client.get(f"{api}/deployments/name/{name}")
        response.raise_for_status()
        found: dict[str, Any] = response.json()
        return found


def run_named(api: str, name: str) -> str:
    """Start a run of ``flow/deployment`` with its own parameters; return its id."""
    with httpx.Client(timeout=30) as client:
        created = client.post(
            f"{api}/deployments/{read_deployment(api, name)['id']}/create_flow_run", json={}
        )
        created.raise_for_status()
        return str(created.json()["id"])


def wait_final(api: str, run_id: str) -> dict[str, Any]:
    """The run once it is in a final state (or as it is after :data:`RUN_TIMEOUT_S`)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    with httpx.Client(timeout=30) as client:
        while True:
            run: dict[str, Any] = client.get(f"{api}/flow_runs/{run_id}").json()
            if run["state_type"] in FINAL_STATES or time.monotonic() > deadline:
                return run
            time.sleep(0.5)


def create_pools(api: str, names: Iterable[str]) -> None:
    """What `prefect work-pool create --type process NAME` does, for each pool."""
    with httpx.Client(timeout=30) as client:
        for name in names:
            created = client.post(f"{api}/work_pools/", json={"name": name, "type": "process"})
            created.raise_for_status()


def flow_runs(api: str) -> list[dict[str, Any]]:
    with httpx.Client(timeout=30) as client:
        response = client.post(f"{api}/flow_runs/filter", json={"limit": 200})
        response.raise_for_status()
        runs: list[dict[str, Any]] = response.json()
        deployments = client.post(f"{api}/deployments/filter", json={"limit": 200})
        deployments.raise_for_status()
    names = {d["id"]: d["name"] for d in deployments.json()}
    return [{**run, "deployment": names.get(run["deployment_id"])} for run in runs]


def pools_of_runs(api: str) -> dict[str, set[str]]:
    """Deployment name -> the work pools its runs went to."""
    found: dict[str, set[str]] = {}
    for run in flow_runs(api):
        if run["deployment"]:
            found.setdefault(run["deployment"], set()).add(run["work_pool_name"])
    return found


def stop_everything(api: str, workers: dict[HostRole, subprocess.Popen[bytes]]) -> None:
    """Cancel the long-running runs, stop the workers and any flow run left, by PID."""
    with contextlib.suppress(Exception), httpx.Client(timeout=30) as client:
        for run in flow_runs(api):
            if run["state_type"] in ("RUNNING", "PENDING", "SCHEDULED"):
                client.post(
                    f"{api}/flow_runs/{run['id']}/set_state",
                    json={"state": {"type": "CANCELLING"}, "force": True},
                )
    for worker in workers.values():
        worker.send_signal(signal.SIGTERM)
    for worker in workers.values():
        try:
            worker.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    terminate(flow_run_processes(api))
