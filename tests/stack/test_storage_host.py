"""A storage host's own rebuilder deployment (msi_prefect/stack/storage_host.py), no server.

The whole path, three storage workers and their runs sharing a topic, is
tests/integration/test_consumer_group.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from msi_prefect.cli.main import main
from msi_prefect.cli.worker import worker_argv
from msi_prefect.errors import MsiError
from msi_prefect.stack.storage_host import (
    STORAGE_HOST_TAG,
    StorageHost,
    check_host_name,
    host_audit_body,
    host_deployment_body,
)

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
