"""Flow ``extract-metadata``: metadata of one rebuilt file to Kafka and the UI.

Its trigger renders the parameters from a ``msi.file.reconstructed`` event payload.
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from msi_prefect.prefect_layer.flow_inputs import RebuiltFile, load_block
from msi_prefect.prefect_layer.metadata_tasks import (
    PublishedMetadata,
    extract_file_metadata,
    metadata_topic,
)
from msi_prefect.prefect_layer.previews import load_preview_storage
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster


@flow(
    name="extract-metadata",
    flow_run_name="metadata of {path}",
    description="Extract one rebuilt file's metadata, publish it to <topic>.metadata and "
    "show it (and an image's preview) as artifacts.",
)
def extract_metadata_flow(
    topic: str,
    file_id: str,
    generation: int,
    path: str,
    url: str,
    size: int,
    sha256: str,
    kafka_block: str = "embedded",
    backup_block: str | None = "embedded",
    announced_at: datetime | None = None,
) -> PublishedMetadata:
    """Extract and publish the metadata of the file an event announced.

    Args:
        topic: Kafka topic the file came through; the metadata goes to ``<topic>.metadata``.
        file_id: File id (uuid5 of the path).
        generation: File generation.
        path: Relative POSIX path below the destination.
        url: ``file://`` URL of the rebuilt file.
        size: Size in bytes.
        sha256: Hex SHA-256 of the content.
        kafka_block: Name of the ``MSI Kafka Cluster`` block of the broker.
        backup_block: Name of the ``MSI Backup Storage`` block the preview pictures of
            image-like files are stored in, beside the backups; empty: no previews.
        announced_at: When the announcing event occurred (the trigger renders it); a file
            unchanged since is not hashed again. None (a manual run): it is.
    """
    file = RebuiltFile.from_parameters(
        topic=topic,
        file_id=file_id,
        generation=generation,
        path=path,
        url=url,
        size=size,
        sha256=sha256,
    )
    metadata_topic(file.topic)  # refuse a topic too long for the suffix before any work
    kafka = load_block(KafkaCluster, kafka_block)
    preview_storage = load_preview_storage(backup_block)
    return extract_file_metadata(file, kafka, preview_storage, announced_at).published
