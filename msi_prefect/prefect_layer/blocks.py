"""Every block type of msi_prefect, in one module for Prefect to register.

``prefect block register -m msi_prefect.prefect_layer.blocks`` registers them with a
Prefect server by hand; a server started in an environment where this package is installed
registers them on its own through the ``prefect.collections`` entry point, which names this
module. Each block lives beside the code that uses it:

* :class:`~msi_prefect.prefect_layer.transfers.kafka_cluster.KafkaCluster` ->
  :class:`~msi_prefect.transfer.KafkaConnection` (it is one)
* :class:`~msi_prefect.prefect_layer.transfers.settings.TransferSettings` ->
  :class:`~msi_prefect.transfer.ProducerSettings` and :class:`~msi_prefect.transfer.FileFilter`
* :class:`~msi_prefect.prefect_layer.transfers.crypto.KafkaCryptoSettings` ->
  :class:`~msi_prefect.transfer.CryptoCodec`
* :class:`~msi_prefect.prefect_layer.backup.storage.BackupStorage` -> s3fs storage options
  and a :class:`~msi_prefect.transfer.Sink`
"""

from __future__ import annotations

from prefect.blocks.core import Block

from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.transfers.crypto import KafkaCryptoSettings
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import TransferSettings

__all__ = [
    "BLOCK_TYPES",
    "BackupStorage",
    "KafkaCluster",
    "KafkaCryptoSettings",
    "TransferSettings",
]

#: Every block type, e.g. for registration in tests and scripts.
BLOCK_TYPES: tuple[type[Block], ...] = (
    KafkaCluster,
    TransferSettings,
    KafkaCryptoSettings,
    BackupStorage,
)
