"""Three storage hosts' ``reconstruct-files`` runs share a 6-partition topic; kill -9 of one
mid-file loses nothing and duplicates nothing.

Three ``msi-prefect worker --role storage`` processes, each a storage host with its own
host name, working directory and state, serve one storage pool of the Prefect server.
Each registers its host's copy of the ``reconstruct-files`` deployment (deployed from
prefect.yaml with ``prefect deploy``) and starts its run: three flow runs, on three
workers, in one consumer group, rebuilding into one S3 destination
(docs/deployment.md, "Adding a storage host"). The flow-run process of the first run seen
with a file half received is killed with SIGKILL (found by its flow-run id); its
partitions go to the other two, which read that file again from its first chunk (the
committed offset never passes the start of an unfinished file), and its worker reports
the run ``Crashed``.

The verdict comes from the store, which keeps every version of every object: every file
is there, byte-identical, and nothing else; a file is stored twice only if its first copy
was stored before the kill (the killed run had stored it, but not yet committed its
offsets: the same bytes again, and the same event id downstream). Every file's
``msi.file.reconstructed`` event is on the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from msi_prefect.prefect_layer.dispatch.mode import DownstreamDispatch
from msi_prefect.prefect_layer.events import EventName
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.stack.processes import live_flow_runs, terminate
from msi_prefect.stack.storage_host import REBUILD_SUBDIR
from tests.chaos.harness import (
    KIB,
    MIB,
    Processes,
    cli,
    create_topic,
    processes,  # noqa: F401  (a fixture)
    query,
    upload_command,
    wait_for,
)
from tests.conftest import RunningStack
from tests.flow_helpers import delete_block, s3_client, unique_name
from tests.stack_helpers import file_events

pytestmark = [pytest.mark.stack, pytest.mark.timeout(360)]

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 6
HOSTS = 3
START_TIMEOUT_S = 150.0
HALF_WAY_TIMEOUT_S = 90.0
DONE_TIMEOUT_S = 150.0
STATE_TIMEOUT_S = 60.0
DEPLOY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
API_TIMEOUT_S = 30.0
API_ATTEMPTS = 3
# Prefect's worker asks for runs every 10 s by default.
WORKER_POLL = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
# Large files, so that a rebuilder is caught with one half received.
SIZES = {f"run/{i:02d}.bin": (6 * MIB if i % 3 == 0 else 300 * KIB) for i in range(18)}
PREFIX = "rebuilt"


@pytest.fixture
def versioned_bucket(prefect_stack: RunningStack) -> Iterator[tuple[Any, str]]:
    """A bucket of its own that keeps every version of every object."""
    client = s3_client(prefect_stack.s3_env())
    bucket = f"group-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    try:
        yield client, bucket
    finally:
        for version in client.list_object_versions(Bucket=bucket).get("Versions", []):
            client.delete_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
        client.delete_bucket(Bucket=bucket)


@pytest.fixture
def transfer_blocks(
    prefect_api: str, prefect_stack: RunningStack
) -> Iterator[tuple[str, str, str]]:
    """The Kafka cluster and transfer settings blocks of a fresh 6-partition topic, and it."""
    topic = create_topic(prefect_stack.bootstrap_servers, PARTITIONS)
    kafka_name, transfer_name = unique_name("kafka"), unique_name("transfer")
    KafkaCluster(bootstrap_servers=prefect_stack.bootstrap_servers).save(kafka_name)
    TransferSettings(
        topic=topic,
        consumer_group=f"g-{topic}",
        downstream_dispatch=DownstreamDispatch.PER_FILE,
    ).save(transfer_name)
    try:
        yield kafka_name, transfer_name, topic
    finally:
        delete_block(KafkaCluster, kafka_name)
        delete_block(TransferSettings, transfer_name)
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": prefect_stack.bootstrap_servers})
        for future in admin.delete_topics([topic]).values():
            with contextlib.suppress(Exception):
                future.result(timeout=30)


def partly_received(rebuild_dir: Path) -> bool:
    """A file has some of its chunks durably staged by this rebuilder, but not all."""
    rows = query(
        rebuild_dir / "progress.sqlite",
        "SELECT COUNT(*) FROM progress WHERE received_count > 0 AND received_count < chunk_count",
    )
    return bool(rows and rows[0][0])


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    # The session's server is shared with the other tests of its worker: a slow answer
    # is asked again, not a failure.
    for attempt in range(API_ATTEMPTS):
        try:
            with httpx.Client(timeout=API_TIMEOUT_S) as client:
                response = client.post(f"{api}{path}", json=body)
            break
        except httpx.TimeoutException:
            if attempt == API_ATTEMPTS - 1:
                raise
    response.raise_for_status()
    return response.json()


def host_runs(api: str, pool: str) -> dict[str, dict[str, Any]]:
    """Host name (its deployment's name) -> its rebuilder's newest run, in the storage pool."""
    rebuilders = {
        "work_pools": {"name": {"any_": [pool]}},
        "flows": {"name": {"any_": ["reconstruct-files"]}},
    }
    runs = api_post(api, "/flow_runs/filter",
                    {**rebuilders, "sort": "START_TIME_ASC", "limit": 50})  # fmt: skip
    deployments = api_post(api, "/deployments/filter", {**rebuilders, "limit": 50})
    names = {d["id"]: d["name"] for d in deployments}
    return {names[run["deployment_id"]]: run for run in runs if run["deployment_id"] in names}


def deploy_templates(api: str, pool: str, bucket: str, kafka_name: str, transfer_name: str) -> None:
    """What the operator does once: `prefect deploy` of the storage deployments of
    prefect.yaml (the templates each storage host copies), reconstruct-files with the
    test's blocks."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "MSI_PROJECT_DIR": str(REPO),
        "MSI_WATCH_DIR": str(REPO / "unused-inbox"),
        "MSI_DESTINATION_DIR": f"s3://{bucket}/{PREFIX}",
        "MSI_INSTRUMENT_POOL": pool,
        "MSI_STORAGE_POOL": pool,
        "MSI_COMPUTE_POOL": pool,
    }
    deploy = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name"]
    for argv in (
        [*deploy, "audit-backups"],
        [*deploy, "reconstruct-files", "--param", f"kafka_block={kafka_name}",
         "--param", f"transfer_block={transfer_name}"],
    ):  # fmt: skip
        result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=DEPLOY_TIMEOUT_S, check=False)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_storage_hosts_run_killed_mid_file_hands_its_partitions_over_with_nothing_lost(
    prefect_stack: RunningStack,
    prefect_api: str,
    versioned_bucket: tuple[Any, str],
    transfer_blocks: tuple[str, str, str],
    tmp_path: Path,
    processes: Processes,  # noqa: F811
) -> None:
    client, bucket = versioned_bucket
    kafka_name, transfer_name, topic = transfer_blocks
    api = prefect_api
    pool = f"storage-{uuid.uuid4().hex[:8]}"
    api_post(api, "/work_pools/", {"name": pool, "type": "process"})
    deploy_templates(api, pool, bucket, kafka_name, transfer_name)
    src = tmp_path / "src"
    expected: dict[str, str] = {}
    for relpath, size in SIZES.items():
        data = uuid.uuid4().bytes * (size // 16)
        (src / relpath).parent.mkdir(parents=True, exist_ok=True)
        (src / relpath).write_bytes(data)
        expected[relpath] = hashlib.sha256(data).hexdigest()

    # Each storage host knows the server and the S3 store, and nothing of the test's own.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_", "MSI_"))}
    host_env = {**base, "PREFECT_API_URL": api, **WORKER_POLL, **prefect_stack.s3_env()}
    hosts = [f"s{i}-{pool}" for i in range(HOSTS)]
    work = {host: tmp_path / host for host in hosts}
    workers = [
        processes.start(
            f"worker-{host}",
            cli("worker", "--role", "storage", "--pool", pool, "--host-name", host,
                "--work-dir", str(work[host])),
            env=host_env,
        )
        for host in hosts
    ]  # fmt: skip
    try:
        # Each worker registered its host's deployment and started its run.
        def all_running() -> bool:
            found = host_runs(api, pool)
            return len(found) == HOSTS and all(r["state_type"] == "RUNNING" for r in found.values())

        wait_for(
            all_running,
            "a running reconstruct-files run per storage host",
            START_TIMEOUT_S,
            step_s=1.0,
        )
        runs = host_runs(api, pool)
        assert set(runs) == set(hosts), runs.keys()
        for host, run in runs.items():
            assert run["work_queue_name"] == host
            assert run["parameters"]["work_dir"] == str(work[host] / REBUILD_SUBDIR)
        since = time.time()
        bootstrap = prefect_stack.bootstrap_servers
        processes.start("upload", upload_command(src, topic, bootstrap, tmp_path / "reg.sqlite"))

        # The first host seen with a file half received has its flow-run process killed.
        half_way: list[str] = []

        def one_half_way() -> bool:
            half_way.extend(h for h in hosts if partly_received(work[h] / REBUILD_SUBDIR))
            return bool(half_way)

        wait_for(one_half_way, "a rebuilder half-way through a file", HALF_WAY_TIMEOUT_S)
        victim = half_way[0]
        victim_run = runs[victim]["id"]
        pids = [p.pid for p in live_flow_runs(api) if p.flow_run_id == victim_run]
        assert pids, f"no process of flow run {victim_run} on this machine"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.time()

        def stored() -> dict[str, list[datetime]]:
            found: dict[str, list[datetime]] = defaultdict(list)
            versions = client.list_object_versions(Bucket=bucket, Prefix=f"{PREFIX}/")
            for version in versions.get("Versions", []):
                found[version["Key"].removeprefix(f"{PREFIX}/")].append(version["LastModified"])
            return found

        wait_for(lambda: set(stored()) >= set(expected), "every file in the store",
                 DONE_TIMEOUT_S, step_s=0.5)  # fmt: skip
        # The killed run is reported crashed by its worker; the others go on.
        wait_for(
            lambda: host_runs(api, pool)[victim]["state_type"] == "CRASHED",
            f"the killed run of {victim} marked Crashed",
            STATE_TIMEOUT_S,
            step_s=1.0,
        )
        after = host_runs(api, pool)
        assert all(after[h]["state_type"] == "RUNNING" for h in hosts if h != victim), after
        assert all(worker.poll() is None for worker in workers), processes.errors()

        versions = stored()
        assert set(versions) == set(expected), "stray or partial objects in the store"
        for relpath, digest in expected.items():
            body = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{relpath}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == digest, f"{relpath} is corrupt"
        # Stored twice only if the killed run stored it first (S3 times are whole seconds).
        twice = {relpath: sorted(times) for relpath, times in versions.items() if len(times) > 1}
        kill_second = datetime.fromtimestamp(int(killed_at) + 1, UTC)
        for relpath, times in twice.items():
            assert len(times) == 2 and times[0] <= kill_second, f"{relpath} stored at {times}"

        # Every file was announced to Prefect (once: the event ids are deterministic).
        def announced() -> set[str]:
            events = file_events(api, since - 60, (EventName.RECONSTRUCTED,))
            return {e["payload"]["path"] for e in events if e["payload"]["url"].startswith(
                f"s3://{bucket}/")}  # fmt: skip

        # A file the killed run delivered just before the kill may have its event waiting
        # in that host's outbox; the host's next rebuilder posts it. A crashed rebuilder is
        # started again by its worker's next start or by hand (docs/deployment.md): here,
        # by hand, as `prefect deployment run reconstruct-files/<host>` does.
        api_post(api, f"/deployments/{runs[victim]['deployment_id']}/create_flow_run", {})
        wait_for(
            lambda: host_runs(api, pool)[victim]["state_type"] == "RUNNING",
            f"{victim}'s rebuilder started again",
            START_TIMEOUT_S,
            step_s=1.0,
        )
        wait_for(lambda: announced() == set(expected), "every file's event", DONE_TIMEOUT_S,
                 step_s=2.0)  # fmt: skip
        print(f"victim {victim}; stored twice: {sorted(twice)}")
    finally:
        stop_hosts(api, pool, workers)


def stop_hosts(api: str, pool: str, workers: list[subprocess.Popen[bytes]]) -> None:
    """Stop the runs' processes (SIGTERM: they commit and end), then the workers, by PID."""
    ours = {run["id"] for run in host_runs(api, pool).values()}
    terminate([p.pid for p in live_flow_runs(api) if p.flow_run_id in ours])
    for worker in workers:
        Processes.terminate(worker, timeout_s=STOP_TIMEOUT_S)
    # Nothing of this test stays "active" or scheduled (the hosts' hourly audits) on the
    # session's server.
    with contextlib.suppress(Exception):
        for run in host_runs(api, pool).values():
            if run["state_type"] in ("RUNNING", "PENDING", "SCHEDULED", "CANCELLING"):
                api_post(api, f"/flow_runs/{run['id']}/set_state",
                         {"state": {"type": "CANCELLED"}, "force": True})  # fmt: skip
        with httpx.Client(timeout=API_TIMEOUT_S) as client:
            for deployment in api_post(api, "/deployments/filter",
                                       {"work_pools": {"name": {"any_": [pool]}}}):  # fmt: skip
                client.delete(f"{api}/deployments/{deployment['id']}")
