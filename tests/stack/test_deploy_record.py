"""When `up` may skip ``prefect deploy --all`` (the record of this stack's last deploy), and
where it runs a project's blocks script."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.dispatch.mode import EARLIER_BATCH_FLOWS
from msi_prefect.stack.deploy import create_blocks, retire_earlier_deployments
from msi_prefect.stack.deploy_record import (
    RECORD_FILE,
    DeployRecord,
    deploy_fingerprint,
    deploy_is_current,
    forget_record,
    load_record,
    referenced_env,
    save_record,
    server_deployments,
)
from msi_prefect.stack.project import BLOCKS_SCRIPT, bundled_project_dir

ENV = {
    "MSI_WATCH_DIR": "/lab/inbox",
    "MSI_DESTINATION_DIR": "/lab/received",
    "MSI_PROJECT_DIR": "/lab/project",
    "MSI_INSTRUMENT_POOL": "msi-process",
    "MSI_STORAGE_POOL": "msi-process",
    "MSI_COMPUTE_POOL": "msi-process",
    "PREFECT_API_URL": "http://127.0.0.1:4200/api",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the bundled project's prefect.yaml and flows, to edit."""
    source = bundled_project_dir()
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copyfile(source / "prefect.yaml", copy / "prefect.yaml")
    shutil.copytree(source / "flows", copy / "flows")
    return copy


def test_the_variables_a_prefect_yaml_names_are_found() -> None:
    text = 'a: "{{ $MSI_WATCH_DIR }}"\nb: "{{$OTHER}}"\nc: "{{ event.payload.path }}"\n'
    assert referenced_env(text) == ["MSI_WATCH_DIR", "OTHER"]
    bundled = (bundled_project_dir() / "prefect.yaml").read_text()
    assert set(referenced_env(bundled)) == set(ENV) - {"PREFECT_API_URL"}


def test_the_fingerprint_follows_every_input_of_a_deploy(project: Path) -> None:
    first = deploy_fingerprint(project, ENV)
    assert deploy_fingerprint(project, dict(ENV)) == first
    # Variables the prefect.yaml does not name change nothing.
    assert deploy_fingerprint(project, {**ENV, "HOME": "/elsewhere"}) == first

    changed = [deploy_fingerprint(project, {**ENV, "MSI_WATCH_DIR": "/lab/other-inbox"})]
    changed.append(deploy_fingerprint(project, {**ENV, "PREFECT_API_URL": "http://x/api"}))
    changed.append(
        deploy_fingerprint(project, {k: v for k, v in ENV.items() if k != "MSI_COMPUTE_POOL"})
    )
    flow = project / "flows" / "backup_file.py"
    flow.write_text(flow.read_text() + "\n# edited\n")
    changed.append(deploy_fingerprint(project, ENV))
    (project / "lab_analysis.py").write_text("def analyze(path): return {}\n")
    changed.append(deploy_fingerprint(project, ENV))
    yaml = project / "prefect.yaml"
    yaml.write_text(yaml.read_text().replace("work_queue_name: default", "work_queue_name: q", 1))
    changed.append(deploy_fingerprint(project, ENV))
    assert len({first, *changed}) == len(changed) + 1

    moved = project.parent / "moved"
    project.rename(moved)
    assert deploy_fingerprint(moved, ENV) != changed[-1]


def test_the_record_is_kept_and_a_damaged_one_means_deploy(tmp_path: Path) -> None:
    assert load_record(tmp_path) is None
    record = DeployRecord(fingerprint="abc", deployments={"flow/watch": "id-1"})
    save_record(tmp_path, record)
    assert load_record(tmp_path) == record
    for damaged in ("{not json", '{"fingerprint": "abc"}', '{"fingerprint": 1, "deployments": []}'):
        (tmp_path / RECORD_FILE).write_text(damaged)
        assert load_record(tmp_path) is None, damaged
    forget_record(tmp_path)
    assert not (tmp_path / RECORD_FILE).exists()
    forget_record(tmp_path)  # nothing to forget: no error


def test_no_record_or_another_fingerprint_is_not_current_without_asking_the_server() -> None:
    unreachable = "http://127.0.0.1:1/api"  # would fail after `up`'s retries if asked
    assert not deploy_is_current(None, "abc", unreachable, ["watch"])
    record = DeployRecord(fingerprint="abc", deployments={})
    assert not deploy_is_current(record, "def", unreachable, ["watch"])


@pytest.mark.stack
def test_a_deployment_deleted_or_made_again_makes_the_record_stale(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    names = [f"record-{uuid.uuid4().hex[:8]}", f"record-{uuid.uuid4().hex[:8]}"]
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(f"flow-{uuid.uuid4().hex[:8]}")
        ids = [client.create_deployment(flow_id, name) for name in names]
        record = DeployRecord("abc", server_deployments(prefect_api, names))
        assert record.deployments == {
            f"{flow_id}/{name}": str(deployment_id)
            for name, deployment_id in zip(names, ids, strict=True)
        }
        assert deploy_is_current(record, "abc", prefect_api, names)

        client.delete_deployment(ids[0])
        assert not deploy_is_current(record, "abc", prefect_api, names)
        client.create_deployment(flow_id, names[0])  # the same name, a new deployment
        assert not deploy_is_current(record, "abc", prefect_api, names)


@pytest.mark.stack
def test_up_retires_the_batch_deployments_process_batch_replaced(prefect_api: str) -> None:
    import httpx
    from prefect.client.orchestration import get_client

    # As an earlier msi-prefect left them: a deployment per step, each owning its trigger.
    with get_client(sync_client=True) as client:
        ids = {
            name: client.create_deployment(client.create_flow_from_name(name), name)
            for name in EARLIER_BATCH_FLOWS
        }
    for name, deployment_id in ids.items():
        created = httpx.post(
            f"{prefect_api}/automations/",
            json={
                "name": f"{name}__automation_1",
                "trigger": {
                    "type": "event",
                    "posture": "Reactive",
                    "expect": ["msi.files.batch-ready"],
                },
                "actions": [{"type": "do-nothing"}],
                "owner_resource": f"prefect.deployment.{deployment_id}",
            },
            timeout=30,
        )
        assert created.is_success, created.text

    def automations_of(deployment_id: Any) -> list[Any]:
        owned = httpx.get(
            f"{prefect_api}/automations/related-to/prefect.deployment.{deployment_id}", timeout=30
        )
        assert owned.is_success, owned.text
        return list(owned.json())

    # A project that still declares one (a lab project of an older `init`) keeps it.
    kept = EARLIER_BATCH_FLOWS[0]
    retired = retire_earlier_deployments(prefect_api, {kept, "process-batch"})

    assert retired == sorted(EARLIER_BATCH_FLOWS[1:])
    left = server_deployments(prefect_api, EARLIER_BATCH_FLOWS)
    assert [key.split("/")[1] for key in left] == [kept]
    assert automations_of(ids[kept])
    for name in retired:
        assert automations_of(ids[name]) == [], name
    assert retire_earlier_deployments(prefect_api, set()) == [kept]
    assert server_deployments(prefect_api, EARLIER_BATCH_FLOWS) == {}


def test_a_projects_own_blocks_script_runs_in_a_process_of_its_own(tmp_path: Path) -> None:
    # Only the script the package carries runs inside `up`; a lab's own version of it runs
    # as the user would run it, the status on its stdin, its failure reported with its output.
    project = tmp_path / "lab"
    (project / BLOCKS_SCRIPT).parent.mkdir(parents=True)
    (project / BLOCKS_SCRIPT).write_text(
        "import sys\nprint('the lab script read', sys.stdin.read())\nsys.exit(3)\n"
    )
    with pytest.raises(MsiError, match="creating the blocks failed") as failed:
        create_blocks(project, {"backup_bucket": "lab-bucket"}, dict(os.environ))
    assert 'the lab script read {"backup_bucket": "lab-bucket"}' in str(failed.value)
