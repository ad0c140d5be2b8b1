"""The extract-metadata flow: JSON to <topic>.metadata, a markdown artifact, an event."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from msi_prefect.prefect_layer.events import EventName
from msi_prefect.prefect_layer.flow_inputs import FileChangedError, FileInputError, RebuiltFile
from msi_prefect.prefect_layer.metadata_tasks import (
    artifact_key,
    describe_rebuilt_file,
    metadata_topic,
    unchanged_since_announced,
)
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack
from tests.flow_helpers import (
    SavedBackupStorage,
    file_params,
    flow_run_name,
    load_flow,
    read_artifacts,
    read_events,
    unique_name,
)

CONSUME_TIMEOUT_S = 20.0
REPO = Path(__file__).resolve().parents[2]
CSV = b"sample,temperature_K,counts\nA1,4.2,1200\nA2,4.3,1180\n"
#: A SHA-256 the file does not have: a hashing pass would refuse the file.
NOT_THE_FILES_SHA256 = "ab" * 32
#: Longer than a tick of the kernel's coarse clock that stamps file times (HZ >= 100).
CLOCK_TICK_MARGIN_S = 0.05

# --------------------------------------------------------------------------- unit


def test_artifact_key_is_lowercase_letters_digits_and_dashes() -> None:
    assert artifact_key("metadata", "0123456789ABCDEF0123") == "metadata-0123456789ab"
    assert artifact_key("Analysis", "ab_cd.ef/gh") == "analysis-ab-cd-ef-gh"


def test_metadata_topic_fits_kafka_limits() -> None:
    assert metadata_topic("lab.raw") == "lab.raw.metadata"
    assert len(metadata_topic("t" * 240)) == 249
    with pytest.raises(FileInputError, match="too long"):
        metadata_topic("t" * 241)


def rebuilt(tmp_path: Path, data: bytes = CSV, **override: Any) -> RebuiltFile:
    """The rebuilt file ``dest/runs/7/peaks.csv`` holding ``data``, as an event names it."""
    params = file_params(tmp_path / "dest", "runs/7/peaks.csv", data, "lab.raw")
    return RebuiltFile.from_parameters(**{**params, **override})


def just_before_last_change(path: Path) -> datetime:
    """A moment 1 µs before the file's change time (ctime)."""
    ctime_ns = os.stat(path).st_ctime_ns
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ctime_ns // 1000 - 1)


def test_a_file_unchanged_since_its_event_is_not_hashed_again(tmp_path: Path) -> None:
    # The event claims a SHA-256 the bytes do not have: had the file been hashed, the
    # claim would have been refused, so the result shows that no hashing pass ran.
    file = rebuilt(tmp_path, sha256=NOT_THE_FILES_SHA256)
    announced_at = datetime.now(UTC)  # the event follows the rename into place

    assert unchanged_since_announced(file, announced_at)
    metadata = describe_rebuilt_file(file, announced_at)

    assert metadata.sha256 == NOT_THE_FILES_SHA256
    assert metadata.md5 is None
    assert metadata.size == len(CSV)
    assert metadata.mime_type == "text/csv"
    assert metadata.details["columns"] == ["sample", "temperature_K", "counts"]


def test_a_file_changed_after_its_event_is_hashed_and_refused(tmp_path: Path) -> None:
    file = rebuilt(tmp_path)
    event_before_the_change = just_before_last_change(file.local_path)

    assert not unchanged_since_announced(file, event_before_the_change)
    # Hashed: the true SHA-256 passes, a wrong claim is refused.
    assert describe_rebuilt_file(file, event_before_the_change).sha256 == file.sha256
    claimed = rebuilt(tmp_path, sha256=NOT_THE_FILES_SHA256)
    with pytest.raises(FileChangedError, match="SHA-256 is now"):
        describe_rebuilt_file(claimed, just_before_last_change(claimed.local_path))


def test_a_same_size_rewrite_with_its_mtime_restored_is_still_hashed(tmp_path: Path) -> None:
    file = rebuilt(tmp_path)
    announced_at = datetime.now(UTC)
    before = os.stat(file.local_path)
    time.sleep(CLOCK_TICK_MARGIN_S)
    file.local_path.write_bytes(CSV.replace(b"4.2", b"9.9"))
    os.utime(file.local_path, ns=(before.st_atime_ns, before.st_mtime_ns))

    assert os.stat(file.local_path).st_mtime_ns == before.st_mtime_ns
    assert not unchanged_since_announced(file, announced_at)
    with pytest.raises(FileChangedError, match="SHA-256 is now"):
        describe_rebuilt_file(file, announced_at)


def test_without_the_event_time_the_file_is_hashed(tmp_path: Path) -> None:
    file = rebuilt(tmp_path, sha256=NOT_THE_FILES_SHA256)
    assert not unchanged_since_announced(file, None)
    with pytest.raises(FileChangedError, match="SHA-256 is now"):
        describe_rebuilt_file(file, None)
    assert describe_rebuilt_file(rebuilt(tmp_path)).sha256 == hashlib.sha256(CSV).hexdigest()


def test_a_file_of_another_size_is_refused_before_any_read(tmp_path: Path) -> None:
    file = rebuilt(tmp_path, size=len(CSV) + 1)
    assert not unchanged_since_announced(file, datetime.now(UTC))
    with pytest.raises(FileChangedError, match="the event announced"):
        describe_rebuilt_file(file, datetime.now(UTC))


def test_an_event_time_without_a_time_zone_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileInputError, match="no time zone"):
        describe_rebuilt_file(rebuilt(tmp_path), datetime.now(UTC).replace(tzinfo=None))


@pytest.mark.parametrize("deployment", ["extract-metadata", "process-batch"])
def test_the_triggers_render_the_event_time_as_the_flow_takes_it(deployment: str) -> None:
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.server.utilities.user_templates import render_user_template_sync
    from pydantic import TypeAdapter

    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (trigger,) = next(d for d in project["deployments"] if d["name"] == deployment)["triggers"]
    template = trigger["parameters"]["announced_at"]
    occurred = datetime(2026, 12, 5, 14, 0, 0, 123456, tzinfo=UTC)
    event = ReceivedEvent(
        event="msi.file.reconstructed",
        resource={"prefect.resource.id": "msi.file.lab.raw.x"},
        occurred=occurred,
        id=uuid.uuid4(),
    )
    # The server turns a one-expression template into "{{ expr | tojson }}" and loads the
    # JSON (a plain datetime would not serialise: the template must make it a string).
    expression = template.strip().removeprefix("{{").removesuffix("}}").strip()
    rendered = json.loads(
        render_user_template_sync(f"{{{{ {expression} | tojson }}}}", {"event": event})
    )
    assert TypeAdapter(datetime).validate_python(rendered) == occurred


# --------------------------------------------------------------------------- flow (stack)


def consume_one(bootstrap: str, topic: str, partition: int, offset: int) -> Any:
    """Read the message at ``offset`` of one partition (assigned: no group join to wait for)."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique_name("metadata-test"),
            "session.timeout.ms": TEST_SESSION_TIMEOUT_MS,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                return message
        raise AssertionError(f"no message at {topic}[{partition}]@{offset}")
    finally:
        consumer.close()


@pytest.mark.stack
def test_extract_metadata_flow_publishes_shows_and_announces(
    kafka_block: str,
    topic: str,
    metadata_topic_cleanup: str,
    prefect_stack: RunningStack,
    tmp_path: Path,
) -> None:
    data = b"sample,temperature_K,counts\nA1,4.2,1200\nA2,4.3,1180\n"
    params = file_params(tmp_path / "dest", "runs/7/peaks.csv", data, topic)
    extract_metadata_flow = load_flow("flows/extract_metadata.py:extract_metadata_flow")

    state = extract_metadata_flow(
        **params, kafka_block=kafka_block, announced_at=datetime.now(UTC), return_state=True
    )

    assert state.is_completed(), state.message
    published = state.result()
    assert published.topic == metadata_topic_cleanup
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_name(flow_run_id) == "metadata of runs/7/peaks.csv"

    message = consume_one(
        prefect_stack.bootstrap_servers, published.topic, published.partition, published.offset
    )
    assert message.key() == params["file_id"].encode()
    headers = dict(message.headers())
    assert headers["msi.kind"] == b"metadata"
    assert headers["msi.v"] == b"1.0"
    assert headers["msi.gen"] == b"1"
    metadata = json.loads(message.value())
    assert metadata["relpath"] == "runs/7/peaks.csv"
    assert metadata["sha256"] == params["sha256"]
    assert metadata["size"] == len(data)
    assert metadata["mime_type"] == "text/csv"

    artifacts = read_artifacts(f"metadata-{params['file_id'][:12]}", flow_run_id)
    assert len(artifacts) == 1
    assert artifacts[0].type == "markdown"
    assert "peaks.csv" in artifacts[0].data
    assert params["sha256"] in artifacts[0].data

    events = read_events(EventName.METADATA_EXTRACTED, f"msi.file.{topic}.{params['file_id']}")
    assert len(events) == 1
    assert events[0].payload["metadata_topic"] == published.topic
    assert events[0].payload["mime_type"] == "text/csv"
    assert events[0].payload["sha256"] == params["sha256"]


@pytest.mark.stack
def test_extract_metadata_flow_refuses_a_url_that_is_not_a_local_file(
    prefect_api: str, tmp_path: Path
) -> None:
    params = file_params(tmp_path / "dest", "a.csv", b"a,b\n", "lab.raw")
    extract_metadata_flow = load_flow("flows/extract_metadata.py:extract_metadata_flow")

    state = extract_metadata_flow(
        **{**params, "url": "ftp://host/a.csv"}, kafka_block="unused", return_state=True
    )

    assert state.is_failed()
    assert "only file:// URLs of files rebuilt" in str(state.result(raise_on_failure=False))


@pytest.mark.stack
def test_a_batch_run_hashes_for_its_metadata_only_the_files_touched_since_its_event(
    kafka_block: str,
    backup_storage: SavedBackupStorage,
    topic: str,
    metadata_topic_cleanup: str,
    tmp_path: Path,
) -> None:
    dest = tmp_path / "dest"
    # Unchanged since the event, and announced with a SHA-256 its bytes do not have: it
    # passes only if the run trusts the event instead of hashing the file.
    kept = {**file_params(dest, "runs/kept.csv", CSV, topic), "sha256": NOT_THE_FILES_SHA256}
    touched = file_params(dest, "runs/touched.csv", CSV, topic)
    announced_at = datetime.now(UTC)
    time.sleep(CLOCK_TICK_MARGIN_S)
    (dest / "runs" / "touched.csv").write_bytes(CSV.replace(b"4.2", b"9.9"))  # same size
    batch_flow = load_flow("flows/process_batch.py:process_batch_flow")

    state = batch_flow(
        files=[kept, touched],
        kafka_block=kafka_block,
        backup_block=backup_storage.name,
        announced_at=announced_at,
        return_state=True,
    )

    # Both fail their backup, which hashes the copy it writes: the kept file's against the
    # SHA-256 it was announced with.
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert error.startswith(
        "Processing: 2 of 2 files failed: runs/kept.csv: failed; runs/touched.csv: failed"
    ), error
    resource = f"msi.file.{topic}.{kept['file_id']}"
    (event,) = read_events(EventName.METADATA_EXTRACTED, resource)
    assert event.payload["sha256"] == NOT_THE_FILES_SHA256
    # The touched file failed before its publication: no event (one look suffices, as
    # the kept file's, emitted earlier in the run, has arrived).
    touched_resource = f"msi.file.{topic}.{touched['file_id']}"
    assert read_events(EventName.METADATA_EXTRACTED, touched_resource, timeout_s=0) == []
