"""A storage host's own deployments (msi_prefect/stack/storage_host.py).

The registration against the session's server (1.5 s); the whole path, three storage
workers and their runs sharing a topic, is
tests/integration/test_consumer_group.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from msi_prefect.cli.main import main
from msi_prefect.cli.worker import worker_argv
from msi_prefect.errors import MsiError
from msi_prefect.stack.prefect_api import RetryPolicy
from msi_prefect.stack.storage_host import (
    STORAGE_HOST_TAG,
    TEMPLATE_DEPLOYMENT,
    StorageHost,
    TemplateMissingError,
    check_host_name,
    ensure_host_rebuilder,
    host_audit_body,
    host_deployment_body,
)

API_TIMEOUT_S = 30.0
# The tests' server is up: a short deadline.
ONCE = RetryPolicy(deadline_s=30.0)
# What GET /deployments/name/reconstruct-files/reconstruct-files returns, in part.
TEMPLATE: dict[str, Any] = {
    "id": "d-1",
    "name": "reconstruct-files",
    "flow_id": "f-1",
    "entrypoint": "flows/reconstruct_files.py:reconstruct_files_flow",
    "path": "/opt/msi",
    "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/msi"}}],
    "parameter_openapi_schema": {"type": "object", "properties": {"destination": {}}},
    "enforce_parameter_schema": True,
    "job_variables": {},
    "parameters": {"destination": "s3://lab/rebuilt", "kafka_block": "lab"},
    "description": "Rebuild every file of the topic into the destination (long-running).",
    "tags": ["lab"],
    "work_pool_name": "msi-storage",
    "work_queue_name": "default",
    "concurrency_limit": 1,
    "created": "2026-12-05T00:00:00Z",
}


def test_a_host_name_must_name_a_deployment_and_a_queue() -> None:
    assert check_host_name("storage-2.lab_01") == "storage-2.lab_01"
    for bad in ("", "-x", "a/b", "a b", "50%", "x" * 64):
        with pytest.raises(MsiError, match="cannot name a storage host"):
            check_host_name(bad)
    for template in ("reconstruct-files", "audit-backups"):
        with pytest.raises(MsiError, match="is the name of the deployment every host's copy"):
            check_host_name(template)


def test_the_hosts_deployment_is_the_template_with_its_own_folder_queue_and_limit(
    tmp_path: Path,
) -> None:
    host = StorageHost("http://server/api", "storage-2", "msi-storage", tmp_path)
    body = host_deployment_body(TEMPLATE, host)

    assert host.deployment == "reconstruct-files/storage-2"
    assert body["name"] == "storage-2" and body["flow_id"] == "f-1"
    for copied in ("entrypoint", "path", "pull_steps", "parameter_openapi_schema"):
        assert body[copied] == TEMPLATE[copied]
    # The blocks and destination of the template, the host's own work folder ...
    assert body["parameters"] == {
        "destination": "s3://lab/rebuilt",
        "kafka_block": "lab",
        "work_dir": str(tmp_path / "rebuild"),
    }
    # ... on a queue only this host polls, one run at a time.
    assert (body["work_pool_name"], body["work_queue_name"]) == ("msi-storage", "storage-2")
    assert body["concurrency_limit"] == 1
    assert body["concurrency_options"] == {"collision_strategy": "CANCEL_NEW"}
    assert set(body["tags"]) == {"lab", STORAGE_HOST_TAG}
    assert not {"id", "created"} & set(body)  # the server's fields are not sent back
    assert TEMPLATE["parameters"] == {"destination": "s3://lab/rebuilt", "kafka_block": "lab"}

    local = StorageHost("http://server/api", "s3", "msi-storage", tmp_path, "/archive")
    assert host_deployment_body(TEMPLATE, local)["parameters"]["destination"] == "/archive"
    with pytest.raises(MsiError, match="has no destination parameter"):
        host_deployment_body({**TEMPLATE, "parameters": {}}, host)


def test_the_hosts_audit_reads_its_rebuilders_work_folder_on_the_templates_schedule(
    tmp_path: Path,
) -> None:
    audit = {
        **TEMPLATE,
        "name": "audit-backups",
        "parameters": {"destination": "s3://lab/rebuilt", "backup_block": "lab"},
        "schedules": [{"id": "s-1", "deployment_id": "d-2", "created": "x", "active": True,
                       "schedule": {"cron": "17 * * * *", "timezone": "UTC"},
                       "max_scheduled_runs": None, "parameters": {}, "slug": None}],
    }  # fmt: skip
    host = StorageHost("http://server/api", "storage-2", "msi-storage", tmp_path)
    body = host_audit_body(audit, host, "s3://lab/other")

    assert host.audit_deployment == "audit-backups/storage-2"
    assert body["parameters"] == {
        "destination": "s3://lab/other",  # the host's rebuilder's
        "backup_block": "lab",
        "work_dir": str(tmp_path / "rebuild"),
    }
    assert body["schedules"] == [
        {"schedule": {"cron": "17 * * * *", "timezone": "UTC"}, "active": True, "parameters": {}}
    ]
    assert (body["work_pool_name"], body["work_queue_name"]) == ("msi-storage", "storage-2")
    assert "concurrency_limit" not in body


def test_a_storage_worker_polls_the_default_queue_and_its_own() -> None:
    argv = worker_argv("msi-storage", "storage-s2", ("default", "s2"))
    assert argv[-4:] == ["--work-queue", "default", "--work-queue", "s2"]
    assert "--work-queue" not in worker_argv("msi-compute", "compute-c1")


def test_a_storage_worker_refuses_a_bad_name_or_destination_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No server to reach: it must stop on its checks, before any API call.
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    worker = ["worker", "--role", "storage", "--work-dir", str(tmp_path)]
    assert main([*worker, "--host-name", "a/b"]) != 0
    assert "'a/b' cannot name a storage host" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*worker, "--host-name", "s1", "--destination", "relative/folder"])
    assert "neither an absolute folder nor a URL" in capsys.readouterr().err


# ----------------------------------------------------------------- against the server


@pytest.fixture
def templates(prefect_api: str) -> Iterator[tuple[str, str]]:
    """The two storage templates, as `prefect deploy` leaves them, in a pool of their own.

    Yields the API URL and the pool; every deployment of the pool is deleted afterwards.
    """
    pool = f"storage-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=prefect_api, timeout=API_TIMEOUT_S) as client:
        client.post("/work_pools/", json={"name": pool, "type": "process"}).raise_for_status()
        try:
            yield prefect_api, pool
        finally:
            listed = client.post("/deployments/filter",
                                 json={"work_pools": {"name": {"any_": [pool]}}})  # fmt: skip
            for deployment in listed.json():
                client.delete(f"/deployments/{deployment['id']}")


def _deploy(client: httpx.Client, flow: str, pool: str, extra: dict[str, Any]) -> dict[str, Any]:
    flow_id = client.post("/flows/", json={"name": flow}).json()["id"]
    body = {"name": flow, "flow_id": flow_id, "work_pool_name": pool, "work_queue_name": "default",
            "entrypoint": f"flows/{flow}.py:flow", "path": "/opt/msi", **extra}  # fmt: skip
    response = client.post("/deployments/", json=body)
    response.raise_for_status()
    deployment: dict[str, Any] = response.json()
    return deployment


@pytest.mark.stack
def test_a_storage_host_registers_once_clears_its_orphans_and_starts_one_run(
    templates: tuple[str, str], tmp_path: Path
) -> None:
    api, pool = templates
    host = StorageHost(api, f"h-{pool}", pool, tmp_path)
    with pytest.raises(TemplateMissingError) as missing:
        ensure_host_rebuilder(host, ONCE)
    assert missing.value.template == TEMPLATE_DEPLOYMENT
    with httpx.Client(base_url=api, timeout=API_TIMEOUT_S) as client:
        _deploy(client, "reconstruct-files", pool, {
            "parameters": {"destination": "s3://lab/rebuilt"},
            "concurrency_limit": 1, "concurrency_options": {"collision_strategy": "CANCEL_NEW"},
        })  # fmt: skip
        assert ensure_host_rebuilder(host, ONCE, audit_required=False).audit is None
        audit_template = _deploy(client, "audit-backups", pool, {
            "parameters": {"destination": "s3://lab/rebuilt"},
            "schedules": [{"schedule": {"cron": "17 * * * *"}, "active": True}],
        })  # fmt: skip

        setup = ensure_host_rebuilder(host, ONCE)

        # One run, scheduled on the host's queue; the audit copied; the template paused.
        assert setup.started_run is None  # the first call started it
        runs = client.post("/flow_runs/filter", json={
            "deployments": {"id": {"any_": [setup.rebuilder.id]}}}).json()  # fmt: skip
        (run,) = runs
        assert run["work_queue_name"] == host.name
        assert run["parameters"]["work_dir"] == str(tmp_path / "rebuild")
        assert setup.audit is not None
        audit = client.get(f"/deployments/{setup.audit.id}").json()
        assert audit["parameters"]["work_dir"] == str(tmp_path / "rebuild")
        assert [s["schedule"]["cron"] for s in audit["schedules"]] == ["17 * * * *"]
        assert client.get(f"/deployments/{audit_template['id']}").json()["paused"]

        # A power cut: the run is Running, with no process on this machine.
        client.post(
            f"/flow_runs/{run['id']}/set_state", json={"state": {"type": "RUNNING"}, "force": True}
        ).raise_for_status()
        again = ensure_host_rebuilder(host, ONCE)
        assert again.crashed_runs == [run["id"]]
        assert client.get(f"/flow_runs/{run['id']}").json()["state_type"] == "CRASHED"
        assert again.started_run is not None and again.rebuilder.id == setup.rebuilder.id
