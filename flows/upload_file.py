"""Flow ``upload-file``: send files or folders once (no watching)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from msi_prefect.prefect_layer.flow_inputs import FileInputError, load_block
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.prefect_layer.transfers.streaming import run_upload_files
from msi_prefect.transfer import registry_beside

# A broker outage may pass; the registry makes a retry send only what is missing.
UPLOAD_RETRIES = 2
UPLOAD_RETRY_DELAY_S = 10


@task(
    name="send-files",
    task_run_name="send {paths}",
    retries=UPLOAD_RETRIES,
    retry_delay_seconds=UPLOAD_RETRY_DELAY_S,
)
def send_files(
    paths: list[str],
    root: str | None,
    kafka: KafkaCluster,
    transfer: TransferSettings,
    registry_path: str,
) -> dict[str, int]:
    """Send the files (see ``run_upload_files`` in ``prefect_layer.transfers.streaming``)."""
    return run_upload_files(
        [Path(p) for p in paths], Path(root) if root else None, kafka, transfer, Path(registry_path)
    )


@flow(
    name="upload-file",
    flow_run_name="upload {paths}",
    description="Send files or folders to Kafka once, each verified on the other side.",
)
def upload_file_flow(
    paths: list[str],
    root: str | None = None,
    kafka_block: str = "embedded",
    transfer_block: str = "embedded",
    registry_path: str | None = None,
) -> dict[str, int]:
    """Send `paths` (files or folders; sub-folders are kept) once.

    Args:
        paths: Files and folders to send.
        root: Relative paths are taken below it; default: each path's parent folder.
        kafka_block: Name of the MSI Kafka Cluster block.
        transfer_block: Name of the MSI Transfer Settings block (topic, chunking).
        registry_path: Producer registry file; default: beside the first path, so sending
            the same unchanged file again does nothing.

    Returns:
        Files per outcome (`sent`, `already-sent`).
    """
    if not paths:
        raise FileInputError("paths is empty: name at least one file or folder")
    missing = [path for path in paths if not Path(path).exists()]
    if missing:  # fails the run at once: retrying would not make them appear
        raise FileInputError(f"no such file or folder: {', '.join(missing)}")
    registry = registry_path or str(registry_beside(Path(paths[0]).absolute()))
    return send_files(
        paths,
        root,
        load_block(KafkaCluster, kafka_block),
        load_block(TransferSettings, transfer_block),
        registry,
    )
