"""Flow ``extract-metadata-batch``: metadata of every file of one batch (batch dispatch).

Its trigger renders ``files`` from a ``msi.files.batch-ready`` event payload; each file
gets its extract and publish task runs and its own ``msi.file.metadata-extracted`` event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow
from prefect.states import State

from msi_prefect.prefect_layer.dispatch.batches import (
    BatchEntryResult,
    batch_run_name,
    check_batch_size,
    run_per_file,
)
from msi_prefect.prefect_layer.flow_inputs import RebuiltFile, load_block
from msi_prefect.prefect_layer.metadata_tasks import (
    extract_file_metadata,
    metadata_topic,
    publish_file_metadata,
)
from msi_prefect.prefect_layer.previews import load_preview_storage
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster


@flow(
    name="extract-metadata-batch",
    flow_run_name=batch_run_name("metadata of"),
    description="Extract the metadata of every file of a batch, publish it to "
    "<topic>.metadata and show it as artifacts.",
)
def extract_metadata_batch_flow(
    files: list[dict[str, Any]],
    kafka_block: str = "embedded",
    backup_block: str | None = "embedded",
    announced_at: datetime | None = None,
) -> list[BatchEntryResult]:
    """Extract and publish the metadata of the files a batch event announced.

    Args:
        files: One entry per file: ``topic``, ``file_id``, ``generation``, ``path``,
            ``url``, ``size`` and ``sha256``, as a per-file ``extract-metadata`` run takes them.
        kafka_block: Name of the ``MSI Kafka Cluster`` block of the broker.
        backup_block: Name of the ``MSI Backup Storage`` block the preview pictures of
            image-like files are stored in, beside the backups; empty: no previews.
        announced_at: When the batch event occurred (the trigger renders it): every file
            of the batch was rebuilt before, so one unchanged since is not hashed again.
    """
    check_batch_size(files)
    kafka = load_block(KafkaCluster, kafka_block)
    preview_storage = load_preview_storage(backup_block)

    def extract_and_publish(file: RebuiltFile) -> State[Any]:
        metadata_topic(file.topic)  # a topic too long for the suffix fails before any work
        extracted = extract_file_metadata(file, preview_storage, announced_at, return_state=True)
        if not extracted.is_completed():
            return extracted
        return publish_file_metadata(file, extracted.result(), kafka, return_state=True)

    return run_per_file("Metadata", files, extract_and_publish)
