"""Flow ``reconstruct-files``: rebuild the files of a topic (long-running)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from msi_prefect.prefect_layer.flow_inputs import load_block
from msi_prefect.prefect_layer.transfers.crypto import KafkaCryptoSettings
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.prefect_layer.transfers.streaming import run_reconstruct_files
from msi_prefect.transfer import StopConditions, WireFormat


@flow(
    name="reconstruct-files",
    flow_run_name="rebuild into {destination}",
    description="Rebuild every file of a topic, verified, into a folder or an s3:// URL.",
)
def reconstruct_files_flow(
    destination: str,
    kafka_block: str = "embedded",
    transfer_block: str = "embedded",
    work_dir: str | None = None,
    stop_after_files: int | None = None,
    idle_timeout_s: float | None = None,
    crypto_block: str | None = None,
    wire_format: WireFormat | None = None,
) -> dict[str, int]:
    """Rebuild files until cancelled (or a stop condition is met).

    Args:
        destination: A folder, or an fsspec URL such as s3://bucket/prefix.
        kafka_block: Name of the MSI Kafka Cluster block.
        transfer_block: Name of the MSI Transfer Settings block (topic, group, limits).
        work_dir: Staging and progress state; required for a remote destination.
        stop_after_files: End after this many files (for tests and scripts).
        idle_timeout_s: End after this long without a message.
        crypto_block: Name of an MSI KafkaCrypto block: encrypt end to end with its node
            (none: the transfer is in clear).
        wire_format: 'native' or 'openmsistream'; default: the transfer block's.

    Returns:
        Counters of the run.
    """
    return run_reconstruct_files(
        destination,
        load_block(KafkaCluster, kafka_block),
        load_block(TransferSettings, transfer_block),
        Path(work_dir) if work_dir else None,
        StopConditions(stop_after_files, idle_timeout_s),
        load_block(KafkaCryptoSettings, crypto_block) if crypto_block else None,
        wire_format,
    )
