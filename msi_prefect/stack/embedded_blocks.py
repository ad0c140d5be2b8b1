"""The block documents of the embedded stack, all named ``embedded``: build and save them.

Reads the JSON of ``msi-prefect status --json`` on stdin and the S3 credentials from the
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optionally
``AWS_DEFAULT_REGION``, as ``msi-prefect env`` exports them), then saves, overwriting
earlier versions:

* ``msi-kafka-cluster/embedded``: the embedded broker (PLAINTEXT on loopback);
* ``msi-transfer-settings/embedded``: topic ``lab-files`` with the default settings and
  the stack's downstream dispatch (``adaptive``, ``per-file`` or ``batch``, from the status);
* ``msi-backup-storage/embedded``: ``s3://<backup bucket>/backups`` on the embedded S3 store;
* with ``$MSI_CRYPTO_DIR`` set (``msi-prefect up --encrypted`` sets it):
  ``msi-kafkacrypto/embedded-producer`` and ``msi-kafkacrypto/embedded-consumer``, the
  KafkaCrypto nodes provisioned in that folder.

``blocks/create_embedded_blocks.py`` runs :func:`main` (``msi-prefect up`` runs that
script). Usage::

    eval "$(.venv/bin/msi-prefect env)"
    .venv/bin/msi-prefect status --json | .venv/bin/python blocks/create_embedded_blocks.py

The documents go to the stack's own Prefect server (``prefect_api_url`` of the status),
never to a throwaway server that a Prefect client starts when no API URL is set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import SecretStr, ValidationError

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.events import DownstreamDispatch
from msi_prefect.prefect_layer.transfers.crypto import KafkaCryptoSettings
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.stack.crypto import CONSUMER_NODE, CRYPTO_DIR_ENV, PRODUCER_NODE

DOCUMENT_NAME = "embedded"
TOPIC = "lab-files"
BACKUP_PREFIX = "backups"
ENV_HINT = 'run eval "$(.venv/bin/msi-prefect env)" first'


def _required(mapping: Mapping[str, Any], key: str, where: str, hint: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value:
        raise MsiError(f"{key} is missing from {where}; {hint}")
    return value


def build_embedded_blocks(
    status: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[KafkaCluster, TransferSettings, BackupStorage]:
    """The embedded stack's blocks, not saved yet.

    Args:
        status: The parsed output of ``msi-prefect status --json``.
        environ: Where the S3 credentials are read from (default ``os.environ``).

    Raises:
        MsiError: A status key or a credential is missing.
        pydantic.ValidationError: A value from the status is invalid.
    """
    env = os.environ if environ is None else environ
    status_hint = "pipe in the output of `msi-prefect status --json`"
    bootstrap = _required(status, "bootstrap_servers", "the status", status_hint)
    endpoint = _required(status, "s3_endpoint", "the status", status_hint)
    bucket = _required(status, "backup_bucket", "the status", status_hint)
    key = _required(env, "AWS_ACCESS_KEY_ID", "the environment", ENV_HINT)
    secret = _required(env, "AWS_SECRET_ACCESS_KEY", "the environment", ENV_HINT)
    cluster = KafkaCluster(bootstrap_servers=bootstrap)
    # The inbox is dedicated to the stack: every file in it goes, even one dropped before the
    # watcher started (the registry still sends nothing twice).
    transfer = TransferSettings(
        topic=TOPIC,
        upload_existing=True,
        downstream_dispatch=status.get("downstream_dispatch") or DownstreamDispatch.ADAPTIVE,
    )
    backup = BackupStorage(
        url=f"s3://{bucket}/{BACKUP_PREFIX}",
        endpoint_url=endpoint,
        access_key_id=key,
        secret_access_key=SecretStr(secret),
        region=env.get("AWS_DEFAULT_REGION") or None,
    )
    return cluster, transfer, backup


def create_embedded_blocks(
    status: dict[str, Any], environ: Mapping[str, str] | None = None
) -> list[str]:
    """Save the embedded stack's block documents, named ``embedded``, overwriting old ones.

    Args:
        status: The parsed output of ``msi-prefect status --json``; its ``prefect_api_url``
            (if present, else ``PREFECT_API_URL`` from the environment) is the server the
            documents are saved to.
        environ: Where the S3 credentials and ``PREFECT_API_URL`` are read from (default
            ``os.environ``).

    Returns:
        The saved documents as ``<block type slug>/embedded``, loadable with
        ``Block.load(...)`` and shown by ``prefect block ls``.

    Raises:
        MsiError: A status key, a credential or the Prefect API URL is missing.
        pydantic.ValidationError: A value from the status is invalid.
    """
    env = os.environ if environ is None else environ
    api_url = status.get("prefect_api_url") or env.get("PREFECT_API_URL")
    if not api_url:
        raise MsiError(
            "no Prefect API URL: the status has no prefect_api_url and PREFECT_API_URL is "
            f"not set; {ENV_HINT}"
        )
    blocks = build_embedded_blocks(status, env)
    saved: list[str] = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        for block in blocks:
            block.save(DOCUMENT_NAME, overwrite=True)
            saved.append(f"{block.get_block_type_slug()}/{DOCUMENT_NAME}")
        for name, crypto in build_crypto_blocks(env).items():
            crypto.save(name, overwrite=True)
            saved.append(f"{crypto.get_block_type_slug()}/{name}")
    return saved


def build_crypto_blocks(environ: Mapping[str, str]) -> dict[str, KafkaCryptoSettings]:
    """The KafkaCrypto blocks of an encrypted stack (``$MSI_CRYPTO_DIR`` set by `up`), by name.

    Each names a node `msi-prefect up --encrypted` provisioned already, so the blocks hold
    no password.
    """
    directory = environ.get(CRYPTO_DIR_ENV)
    if not directory:
        return {}
    return {
        PRODUCER_NODE: KafkaCryptoSettings(
            node_id=PRODUCER_NODE, config_dir=directory, role="producer"
        ),
        CONSUMER_NODE: KafkaCryptoSettings(
            node_id=CONSUMER_NODE, config_dir=directory, role="consumer"
        ),
    }


def main() -> int:
    """Read the status from stdin, save the documents, print what was saved."""
    try:
        status = json.load(sys.stdin)
    except json.JSONDecodeError as exc:
        print(
            f"create_embedded_blocks: stdin is not JSON ({exc}); pipe in the output of "
            "`msi-prefect status --json`",
            file=sys.stderr,
        )
        return 1
    if not isinstance(status, dict):
        print("create_embedded_blocks: expected a JSON object on stdin", file=sys.stderr)
        return 1
    try:
        saved = create_embedded_blocks(status)
    except (MsiError, ValidationError) as exc:
        print(f"create_embedded_blocks: error: {exc}", file=sys.stderr)
        return 1
    for name in saved:
        print(f"saved {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
