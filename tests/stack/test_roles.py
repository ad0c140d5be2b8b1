"""The kinds of host, their work pools in prefect.yaml, and the worker command's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from msi_prefect.cli.main import main
from msi_prefect.cli.worker import worker_env
from msi_prefect.errors import MsiError
from msi_prefect.stack.roles import (
    ROLE_DEPLOYMENTS,
    HostRole,
    default_pool,
    pool_env,
    pool_of,
    single_host_pools,
)

REPO = Path(__file__).resolve().parents[2]


def test_every_deployment_is_in_the_pool_of_its_kind_of_host() -> None:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools = {d["name"]: d["work_pool"]["name"] for d in config["deployments"]}

    expected = {
        name: f"{{{{ ${pool_env(role)} }}}}"
        for role, names in ROLE_DEPLOYMENTS.items()
        for name in names
    }
    assert pools == expected


def test_a_pool_comes_from_its_variable_or_the_default() -> None:
    assert pool_of(HostRole.COMPUTE, {}) == default_pool(HostRole.COMPUTE) == "msi-compute"
    assert pool_of(HostRole.STORAGE, {"MSI_STORAGE_POOL": " archive "}) == "archive"
    with pytest.raises(MsiError, match="MSI_INSTRUMENT_POOL is set but empty"):
        pool_of(HostRole.INSTRUMENT, {"MSI_INSTRUMENT_POOL": " "})
    assert single_host_pools("msi-process") == {
        "MSI_INSTRUMENT_POOL": "msi-process",
        "MSI_STORAGE_POOL": "msi-process",
        "MSI_COMPUTE_POOL": "msi-process",
    }


def test_the_worker_keeps_the_hosts_state_in_its_working_directory(tmp_path: Path) -> None:
    env = worker_env(tmp_path, {"PREFECT_API_URL": "http://server:4200/api"})
    assert env["MSI_EVENT_OUTBOX_DIR"] == str(tmp_path / "events")
    assert env["MSI_FETCH_DIR"] == str(tmp_path / "fetched")
    kept = worker_env(tmp_path, {"PREFECT_API_URL": "x", "MSI_FETCH_DIR": "/scratch"})
    assert kept["MSI_FETCH_DIR"] == "/scratch"


def test_a_worker_without_a_server_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    status = main(["worker", "--role", "compute", "--work-dir", str(tmp_path)])

    assert status != 0
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
