"""Encrypted mode of the embedded stack (`msi-prefect up --encrypted`).

`up --encrypted` provisions two KafkaCrypto nodes under ``STATE_DIR/crypto``: one producer
(used by the watch-directory deployment) and one consumer (used by reconstruct-files). The
deployment's two passwords come from ``$MSI_CRYPTO_ROT_PASSWORD`` and
``$MSI_CRYPTO_PROVISIONING_PASSWORD`` when set; otherwise random ones are made once and
kept in ``STATE_DIR/crypto/secrets.json`` (mode 0600), so nodes provisioned later for the
same stack (another consumer, say) can join. The blocks ``msi-kafkacrypto/embedded-producer``
and ``msi-kafkacrypto/embedded-consumer`` point the flows at the nodes.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr

from msi_prefect.transfer import (
    PROVISIONING_PASSWORD_ENV,
    ROT_PASSWORD_ENV,
    NodeFiles,
    NodeRole,
    ProvisioningSecrets,
    provision_node,
)

CRYPTO_DIR_NAME = "crypto"
SECRETS_FILE = "secrets.json"
PRODUCER_NODE = "embedded-producer"
CONSUMER_NODE = "embedded-consumer"
#: Environment variable through which `up` tells the block script where the nodes are.
CRYPTO_DIR_ENV = "MSI_CRYPTO_DIR"
#: Crypto block used by each long-running deployment in encrypted mode.
DEPLOYMENT_CRYPTO_BLOCKS = {
    "watch-directory/watch-directory": PRODUCER_NODE,
    "reconstruct-files/reconstruct-files": CONSUMER_NODE,
}


def crypto_dir(state_root: Path) -> Path:
    """Where the embedded stack keeps its KafkaCrypto nodes."""
    return state_root / CRYPTO_DIR_NAME


def _stack_secrets(directory: Path, environ: Mapping[str, str]) -> ProvisioningSecrets:
    rot, provisioning = environ.get(ROT_PASSWORD_ENV), environ.get(PROVISIONING_PASSWORD_ENV)
    if rot and provisioning:
        return ProvisioningSecrets(SecretStr(rot), SecretStr(provisioning))
    path = directory / SECRETS_FILE
    if not path.exists():
        data = {
            "rot_password": secrets.token_urlsafe(24),
            "provisioning_password": secrets.token_urlsafe(24),
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
    data = json.loads(path.read_text())
    return ProvisioningSecrets(
        SecretStr(data["rot_password"]), SecretStr(data["provisioning_password"])
    )


def provision_embedded_nodes(state_root: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Provision the stack's producer and consumer nodes (kept if they exist); return the dir."""
    directory = crypto_dir(state_root)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    nodes = {PRODUCER_NODE: NodeRole.PRODUCER, CONSUMER_NODE: NodeRole.CONSUMER}
    missing = [name for name in nodes if not NodeFiles(directory, name).is_provisioned()]
    if missing:
        stack_secrets = _stack_secrets(directory, os.environ if environ is None else environ)
        for name in missing:
            provision_node(NodeFiles(directory, name), nodes[name], stack_secrets)
    return directory
