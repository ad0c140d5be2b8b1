"""Settings of end-to-end encryption the command line offers: node roles, key wait, passwords.

A module of its own, without imports, so that `msi-prefect` can build its options without
importing :mod:`msi_prefect.transfer.crypto`.
"""

from __future__ import annotations

from enum import StrEnum

#: Environment variable holding the deployment's root-of-trust password (12+ characters).
ROT_PASSWORD_ENV = "MSI_CRYPTO_ROT_PASSWORD"
#: Environment variable holding the deployment's provisioning password (6+ characters).
PROVISIONING_PASSWORD_ENV = "MSI_CRYPTO_PROVISIONING_PASSWORD"

#: Default seconds a consumer waits for the key of an encrypted message before rejecting it.
DEFAULT_KEY_WAIT_S = 30.0


class NodeRole(StrEnum):
    """What a provisioned node may do (KafkaCrypto's chain "usages")."""

    PRODUCER = "producer"
    CONSUMER = "consumer"
    PRODCON = "prodcon"
