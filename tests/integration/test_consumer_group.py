"""Three rebuilders share a 6-partition topic; kill -9 of one mid-file loses nothing.

Three ``msi-prefect reconstruct`` processes (the core that ``reconstruct-files`` runs) in
one consumer group, each with its own work folder, rebuild into one S3 destination, as a
storage host with several rebuilders does (docs/deployment.md). One of them is killed
with SIGKILL while it holds a file half received; its partitions go to the other two,
which read that file again from its first chunk (the committed offset never passes the
start of an unfinished file). The verdict comes from the store: every file is there,
byte-identical, and nothing else (no partial or stray object); the store keeps every
version of every object, so a file stored twice is seen. The only file a kill may let
be stored twice is one the killed rebuilder had stored, and reported, but whose offsets
it had not committed yet: the same bytes again, and the same event id downstream.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import (
    KIB,
    MIB,
    RECONSTRUCTED_LINE,
    Processes,
    cli,
    create_topic,
    processes,  # noqa: F401  (a fixture)
    query,
    upload_command,
    wait_for,
)
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack
from tests.flow_helpers import s3_client

pytestmark = [pytest.mark.stack, pytest.mark.timeout(180)]

PARTITIONS = 6
REBUILDERS = 3
DONE_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 60.0
# Large files, so that a rebuilder is caught with one half received.
SIZES = {f"run/{i:02d}.bin": (6 * MIB if i % 3 == 0 else 300 * KIB) for i in range(18)}


@pytest.fixture
def versioned_bucket(kafka_stack: RunningStack) -> Iterator[tuple[Any, str]]:
    """A bucket of its own that keeps every version of every object."""
    client = s3_client(kafka_stack.s3_env())
    bucket = f"group-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    try:
        yield client, bucket
    finally:
        for version in client.list_object_versions(Bucket=bucket).get("Versions", []):
            client.delete_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
        client.delete_bucket(Bucket=bucket)


def partly_received(work_dir: Path) -> bool:
    """A file has some of its chunks durably staged by this rebuilder, but not all."""
    rows = query(
        work_dir / "progress.sqlite",  # a remote destination keeps it in the work folder
        "SELECT COUNT(*) FROM progress WHERE received_count > 0 AND received_count < chunk_count",
    )
    return bool(rows and rows[0][0])


def test_a_rebuilder_killed_mid_file_hands_its_partitions_over_with_nothing_lost(
    kafka_stack: RunningStack,
    versioned_bucket: tuple[Any, str],
    tmp_path: Path,
    processes: Processes,  # noqa: F811
) -> None:
    client, bucket = versioned_bucket
    bootstrap = kafka_stack.bootstrap_servers
    topic = create_topic(bootstrap, PARTITIONS)
    src = tmp_path / "src"
    expected: dict[str, str] = {}
    for relpath, size in SIZES.items():
        data = uuid.uuid4().bytes * (size // 16)
        (src / relpath).parent.mkdir(parents=True, exist_ok=True)
        (src / relpath).write_bytes(data)
        expected[relpath] = hashlib.sha256(data).hexdigest()
    work = [tmp_path / f"work-{i}" for i in range(REBUILDERS)]
    rebuilders = [
        processes.start(
            f"rebuilder-{i}",
            cli(
                "reconstruct", f"s3://{bucket}/rebuilt", "--topic", topic,
                "--bootstrap", bootstrap, "--group", f"g-{topic}", "--work-dir", str(work[i]),
                "--session-timeout-ms", str(TEST_SESSION_TIMEOUT_MS),
            ),
            env={**os.environ, **kafka_stack.s3_env()},
        )
        for i in range(REBUILDERS)
    ]  # fmt: skip
    processes.start("upload", upload_command(src, topic, bootstrap, tmp_path / "reg.sqlite"))

    # The first rebuilder seen with a file half received is killed.
    half_way: list[int] = []

    def one_half_way() -> bool:
        half_way.extend(i for i in range(REBUILDERS) if partly_received(work[i]))
        return bool(half_way)

    wait_for(one_half_way, "a rebuilder half-way through a file", JOIN_TIMEOUT_S)
    victim = half_way[0]
    processes.kill9(rebuilders[victim])

    def stored() -> Counter[str]:
        versions = client.list_object_versions(Bucket=bucket, Prefix="rebuilt/")
        return Counter(v["Key"].removeprefix("rebuilt/") for v in versions.get("Versions", []))

    wait_for(lambda: set(stored()) >= set(expected), "every file in the store",
             DONE_TIMEOUT_S, step_s=0.5)  # fmt: skip
    survivors = [p for i, p in enumerate(rebuilders) if i != victim]
    for process in survivors:
        assert process.poll() is None, processes.errors()

    versions = stored()
    assert set(versions) == set(expected), "stray or partial objects in the store"
    for relpath, digest in expected.items():
        body = client.get_object(Bucket=bucket, Key=f"rebuilt/{relpath}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, f"{relpath} is corrupt"
    outputs = {i: processes.output(f"rebuilder-{i}") for i in range(REBUILDERS)}
    by_victim = set(RECONSTRUCTED_LINE.findall(outputs[victim]))
    by_survivors = Counter(
        name
        for i in range(REBUILDERS)
        if i != victim
        for name in RECONSTRUCTED_LINE.findall(outputs[i])
    )
    # Every file reported by a live rebuilder or by the victim before it died ...
    assert set(by_survivors) | by_victim == set(expected)
    # ... the survivors took the victim's partitions (they rebuilt what it had left) ...
    assert set(by_survivors) >= set(expected) - by_victim
    # ... and nothing was stored twice, but for a file the victim stored just before the
    # kill without committing its offsets (the same bytes again).
    twice = {relpath for relpath, count in versions.items() if count > 1}
    assert twice <= by_victim, f"stored twice: {sorted(twice - by_victim)}"
    assert all(count == 1 for count in by_survivors.values()), by_survivors
    print(f"victim reported {len(by_victim)}, stored twice: {sorted(twice)}")
