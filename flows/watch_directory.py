"""Flow ``watch-directory``: send every file that settles in a folder (long-running)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from msi_prefect.prefect_layer.flow_inputs import load_block
from msi_prefect.prefect_layer.transfers.crypto import KafkaCryptoSettings
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.prefect_layer.transfers.streaming import run_watch_directory
from msi_prefect.transfer import StopConditions, registry_beside


@flow(
    name="watch-directory",
    flow_run_name="watch {directory}",
    description="Send every file that appears (and settles) in a folder to Kafka.",
)
def watch_directory_flow(
    directory: str,
    kafka_block: str = "embedded",
    transfer_block: str = "embedded",
    registry_path: str | None = None,
    stop_after_files: int | None = None,
    idle_timeout_s: float | None = None,
    crypto_block: str | None = None,
) -> dict[str, int]:
    """Watch `directory` until cancelled (or a stop condition is met).

    Args:
        directory: The instrument folder to watch (sub-folders are kept).
        kafka_block: Name of the MSI Kafka Cluster block.
        transfer_block: Name of the MSI Transfer Settings block (topic, filters, window).
        registry_path: Producer registry file; default: DIRECTORY/../.msi-producer-registry.sqlite
            beside the folder, so it survives restarts and is not itself watched.
        stop_after_files: End after this many files (for tests and scripts).
        idle_timeout_s: End after this long with nothing to send.
        crypto_block: Name of an MSI KafkaCrypto block: encrypt end to end with its node
            (none: the transfer is in clear).

    Returns:
        Files per outcome.
    """
    folder = Path(directory)
    registry = Path(registry_path) if registry_path else registry_beside(folder)
    return run_watch_directory(
        folder,
        load_block(KafkaCluster, kafka_block),
        load_block(TransferSettings, transfer_block),
        registry,
        StopConditions(stop_after_files, idle_timeout_s),
        load_block(KafkaCryptoSettings, crypto_block) if crypto_block else None,
    )
