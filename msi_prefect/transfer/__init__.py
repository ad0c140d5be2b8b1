"""The transfer core: send files through Kafka in chunks, rebuild and verify them.

The core imports only itself and :mod:`msi_prefect.errors`, never Prefect, the stack or
the CLI (``tests/test_layers.py`` checks it). The other layers use it through this
module: the names in :data:`__all__` are what they may rely on; the submodules behind them
are the core's own business.

Names are loaded on first use (:pep:`562`), so ``msi-prefect upload`` does not pay for the
reassembler, the watcher or KafkaCrypto.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from msi_prefect.transfer.crypto import (
        CryptoCodec,
        NodeFiles,
        ProvisioningSecrets,
        provision_node,
    )
    from msi_prefect.transfer.crypto_settings import (
        DEFAULT_KEY_WAIT_S,
        PROVISIONING_PASSWORD_ENV,
        ROT_PASSWORD_ENV,
        NodeRole,
    )
    from msi_prefect.transfer.filters import FileFilter
    from msi_prefect.transfer.formats import WireFormat
    from msi_prefect.transfer.kafka import (
        MAX_TOPIC_CHARS,
        Compression,
        KafkaConnection,
        SecurityProtocol,
        check_topic_name,
        ensure_topic,
    )
    from msi_prefect.transfer.layout import (
        EVENT_OUTBOX_FILE,
        REGISTRY_FILE,
        STATE_DIR_NAME,
        DestinationLayout,
        registry_beside,
        user_state_dir,
    )
    from msi_prefect.transfer.paths import (
        UnsafePathError,
        relative_posix,
        resolve_inside,
        validate_relative_path,
    )
    from msi_prefect.transfer.producer import (
        GOOD_OUTCOMES,
        FileProducer,
        ProducerSettings,
        UploadOutcome,
        UploadResult,
        UploadTally,
    )
    from msi_prefect.transfer.progress import FileProgress, ProgressState, ProgressStore
    from msi_prefect.transfer.reassembler import (
        FileEvent,
        FileEventKind,
        Reassembler,
        ReassemblerSettings,
    )
    from msi_prefect.transfer.registry import FileRecord, FileState, Registry
    from msi_prefect.transfer.sinks import (
        ChecksumMismatchError,
        CopyStatus,
        Sink,
        SinkError,
        sink_for,
    )
    from msi_prefect.transfer.sqlite_db import DurableQueue
    from msi_prefect.transfer.stopping import StopConditions, StopOnSignal
    from msi_prefect.transfer.upload_list import iter_upload_files
    from msi_prefect.transfer.watch_loop import watch_and_send
    from msi_prefect.transfer.watcher import FileSeen, LocalFileSystem, WatchSettings
    from msi_prefect.transfer.wire import (
        DEFAULT_CHUNK_SIZE,
        FORMAT_VERSION,
        MIB,
        DecodeLimits,
        HeaderName,
        file_id_for,
    )

#: Where each public name of the core is defined.
_DEFINED_IN: dict[str, str] = {
    "CryptoCodec": "crypto",
    "NodeFiles": "crypto",
    "ProvisioningSecrets": "crypto",
    "provision_node": "crypto",
    "DEFAULT_KEY_WAIT_S": "crypto_settings",
    "NodeRole": "crypto_settings",
    "PROVISIONING_PASSWORD_ENV": "crypto_settings",
    "ROT_PASSWORD_ENV": "crypto_settings",
    "FileFilter": "filters",
    "WireFormat": "formats",
    "Compression": "kafka",
    "KafkaConnection": "kafka",
    "MAX_TOPIC_CHARS": "kafka",
    "SecurityProtocol": "kafka",
    "check_topic_name": "kafka",
    "ensure_topic": "kafka",
    "DestinationLayout": "layout",
    "EVENT_OUTBOX_FILE": "layout",
    "REGISTRY_FILE": "layout",
    "STATE_DIR_NAME": "layout",
    "registry_beside": "layout",
    "user_state_dir": "layout",
    "UnsafePathError": "paths",
    "relative_posix": "paths",
    "resolve_inside": "paths",
    "validate_relative_path": "paths",
    "FileProducer": "producer",
    "GOOD_OUTCOMES": "producer",
    "ProducerSettings": "producer",
    "UploadOutcome": "producer",
    "UploadResult": "producer",
    "UploadTally": "producer",
    "FileProgress": "progress",
    "ProgressStore": "progress",
    "ProgressState": "progress",
    "FileEvent": "reassembler",
    "FileEventKind": "reassembler",
    "Reassembler": "reassembler",
    "ReassemblerSettings": "reassembler",
    "FileRecord": "registry",
    "FileState": "registry",
    "Registry": "registry",
    "ChecksumMismatchError": "sinks",
    "CopyStatus": "sinks",
    "Sink": "sinks",
    "SinkError": "sinks",
    "sink_for": "sinks",
    "DurableQueue": "sqlite_db",
    "StopConditions": "stopping",
    "StopOnSignal": "stopping",
    "iter_upload_files": "upload_list",
    "watch_and_send": "watch_loop",
    "FileSeen": "watcher",
    "LocalFileSystem": "watcher",
    "WatchSettings": "watcher",
    "DEFAULT_CHUNK_SIZE": "wire",
    "DecodeLimits": "wire",
    "FORMAT_VERSION": "wire",
    "HeaderName": "wire",
    "MIB": "wire",
    "file_id_for": "wire",
}

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_KEY_WAIT_S",
    "EVENT_OUTBOX_FILE",
    "FORMAT_VERSION",
    "GOOD_OUTCOMES",
    "MAX_TOPIC_CHARS",
    "MIB",
    "PROVISIONING_PASSWORD_ENV",
    "REGISTRY_FILE",
    "ROT_PASSWORD_ENV",
    "STATE_DIR_NAME",
    "ChecksumMismatchError",
    "Compression",
    "CopyStatus",
    "CryptoCodec",
    "DecodeLimits",
    "DestinationLayout",
    "DurableQueue",
    "FileEvent",
    "FileEventKind",
    "FileFilter",
    "FileProducer",
    "FileProgress",
    "FileRecord",
    "FileSeen",
    "FileState",
    "HeaderName",
    "KafkaConnection",
    "LocalFileSystem",
    "NodeFiles",
    "NodeRole",
    "ProducerSettings",
    "ProgressState",
    "ProgressStore",
    "ProvisioningSecrets",
    "Reassembler",
    "ReassemblerSettings",
    "Registry",
    "SecurityProtocol",
    "Sink",
    "SinkError",
    "StopConditions",
    "StopOnSignal",
    "UnsafePathError",
    "UploadOutcome",
    "UploadResult",
    "UploadTally",
    "WatchSettings",
    "WireFormat",
    "check_topic_name",
    "ensure_topic",
    "file_id_for",
    "iter_upload_files",
    "provision_node",
    "registry_beside",
    "relative_posix",
    "resolve_inside",
    "sink_for",
    "user_state_dir",
    "validate_relative_path",
    "watch_and_send",
]


def __getattr__(name: str) -> Any:
    """Load ``name`` from the core module that defines it, on first use."""
    module = _DEFINED_IN.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
