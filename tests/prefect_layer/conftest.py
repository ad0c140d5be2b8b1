"""Fixtures shared by the Prefect layer's tests: saved blocks on the session's stack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from msi_prefect.prefect_layer.metadata_tasks import metadata_topic
from tests.conftest import RunningStack
from tests.flow_helpers import SavedBackupStorage, delete_block, saved_backup_storage, unique_name


@pytest.fixture
def backup_storage(prefect_api: str, prefect_stack: RunningStack) -> Iterator[SavedBackupStorage]:
    """An ``MSI Backup Storage`` block on the stack's S3 store, in a bucket of its own."""
    yield from saved_backup_storage(prefect_stack.s3_env())


@pytest.fixture
def kafka_block(prefect_api: str, prefect_stack: RunningStack) -> Iterator[str]:
    """The name of an ``MSI Kafka Cluster`` block of the stack's broker (deleted after)."""
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
