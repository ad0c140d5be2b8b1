"""The extract-metadata flow: JSON to <topic>.metadata, a markdown artifact, an event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.prefect_layer.events import EventName
from msi_prefect.prefect_layer.flow_inputs import FileInputError
from msi_prefect.prefect_layer.metadata_tasks import artifact_key, metadata_topic
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack
from tests.flow_helpers import (
    delete_block,
    file_params,
    flow_run_name,
    load_flow,
    read_artifacts,
    read_events,
    unique_name,
)

CONSUME_TIMEOUT_S = 20.0

# --------------------------------------------------------------------------- unit


def test_artifact_key_is_lowercase_letters_digits_and_dashes() -> None:
    assert artifact_key("metadata", "0123456789ABCDEF0123") == "metadata-0123456789ab"
    assert artifact_key("Analysis", "ab_cd.ef/gh") == "analysis-ab-cd-ef-gh"


def test_metadata_topic_fits_kafka_limits() -> None:
    assert metadata_topic("lab.raw") == "lab.raw.metadata"
    assert len(metadata_topic("t" * 240)) == 249
    with pytest.raises(FileInputError, match="too long"):
        metadata_topic("t" * 241)


# --------------------------------------------------------------------------- flow (stack)


@pytest.fixture
def kafka_block(prefect_api: str, prefect_stack: RunningStack) -> Iterator[str]:
    from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster

    name = unique_name("kafka")
    KafkaCluster(bootstrap_servers=prefect_stack.bootstrap_servers).save(name)
    yield name
    delete_block(KafkaCluster, name)


@pytest.fixture
def metadata_topic_cleanup(topic: str, prefect_stack: RunningStack) -> Iterator[str]:
    """The metadata topic of ``topic``; deleted after the test if the flow created it."""
    from confluent_kafka.admin import AdminClient

    name = metadata_topic(topic)
    yield name
    admin = AdminClient({"bootstrap.servers": prefect_stack.bootstrap_servers})
    if name in admin.list_topics(timeout=10).topics:
        for future in admin.delete_topics([name]).values():
            future.result(timeout=30)


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

    state = extract_metadata_flow(**params, kafka_block=kafka_block, return_state=True)

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
