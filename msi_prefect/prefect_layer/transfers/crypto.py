"""The KafkaCrypto block: end-to-end encryption of a transfer's file chunks.

:class:`KafkaCryptoSettings` names a KafkaCrypto node and where its key material lives,
provisions it on first use when given the deployment's passwords, and opens the core's
:class:`~msi_prefect.transfer.CryptoCodec` for the ``watch-directory`` and
``reconstruct-files`` flows.

Values are checked when the block is built or loaded, and a bad value fails with a message
that names the field and says what a good value looks like. Secrets are ``SecretStr``:
``repr``, ``str`` and ``model_dump_json`` show ``**********``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, field_validator

from msi_prefect.transfer import (
    KafkaConnection,
)

if TYPE_CHECKING:
    from msi_prefect.transfer import CryptoCodec, NodeFiles

__all__ = ["KafkaCryptoSettings"]

DEFAULT_KEY_WAIT_TIMEOUT_S = 30.0

_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
# What the block's "documentation" link in the Prefect UI opens.
_KAFKACRYPTO_URL = HttpUrl("https://github.com/tmcqueen-materials/kafkacrypto")


class KafkaCryptoSettings(Block):
    """End-to-end encryption of the file chunks with KafkaCrypto.

    Holds the node's identity and where its key material lives on the worker machine; the
    encryption itself is configured by the KafkaCrypto files in `config_dir`. A node that is
    not provisioned yet is provisioned on first use from the two deployment passwords
    (or beforehand with `msi-prefect crypto provision`, leaving the passwords out of the
    block). The `watch-directory` and `reconstruct-files` flows take the block's name as
    `crypto_block`.

    Example:
        Load saved KafkaCrypto settings:
        ```python
        from msi_prefect.prefect_layer.transfers.crypto import KafkaCryptoSettings

        kafka_crypto_settings = KafkaCryptoSettings.load("BLOCK_NAME")
        ```
    """

    _block_type_name: ClassVar[str | None] = "MSI KafkaCrypto"
    _documentation_url: ClassVar[HttpUrl | None] = _KAFKACRYPTO_URL

    node_id: str = Field(
        title="Node ID",
        description="KafkaCrypto node ID of this producer or consumer; names its files "
        "(<node_id>.config, .seed, .crypto): letters, digits, '.', '_' and '-'.",
    )
    config_dir: str = Field(
        title="Config Directory",
        description="Directory on the worker machine that holds the node's KafkaCrypto "
        "configuration and key files.",
    )
    provisioning_password: SecretStr | None = Field(
        default=None,
        title="Provisioning Password",
        description="Password used once to provision the node's keys; leave empty when "
        "the node is provisioned already.",
    )
    rot_password: SecretStr | None = Field(
        default=None,
        title="Root-of-Trust Password",
        description="Root-of-trust password of the deployment (12+ characters), needed "
        "with the provisioning password to provision the node; leave empty when the node "
        "is provisioned already.",
    )
    role: Literal["producer", "consumer", "prodcon"] = Field(
        default="prodcon",
        title="Role",
        description="What the node does if it has to be provisioned: producer (sends), "
        "consumer (receives) or prodcon (both).",
    )
    key_wait_timeout_s: float = Field(
        default=DEFAULT_KEY_WAIT_TIMEOUT_S,
        gt=0,
        title="Key Wait Timeout (seconds)",
        description="How long a consumer waits for the key of an encrypted chunk before "
        "it gives up on that file.",
    )

    @field_validator("node_id")
    @classmethod
    def _validate_node_id(cls, value: str) -> str:
        if not _NODE_ID_RE.fullmatch(value) or value in (".", ".."):
            raise ValueError(
                f"node_id {value!r} must be a non-empty name of ASCII letters, digits, '.', "
                "'_' and '-' (it names the node's KafkaCrypto files)"
            )
        return value

    @field_validator("config_dir")
    @classmethod
    def _validate_config_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("config_dir is empty; give the directory of the KafkaCrypto files")
        if "\0" in value:
            raise ValueError("config_dir contains a NUL character")
        return value

    @field_validator("provisioning_password", "rot_password")
    @classmethod
    def _validate_provisioning_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        return value

    def node_files(self) -> NodeFiles:
        """Where the node's KafkaCrypto files are."""
        from msi_prefect.transfer import NodeFiles

        return NodeFiles(Path(self.config_dir).expanduser(), self.node_id)

    def ensure_provisioned(self) -> NodeFiles:
        """Provision the node from the two passwords unless its files exist already.

        Raises:
            MsiError: the node is not provisioned and the passwords are not both set.
        """
        from msi_prefect.errors import MsiError
        from msi_prefect.transfer import NodeRole, ProvisioningSecrets, provision_node

        files = self.node_files()
        if files.is_provisioned():
            return files
        if self.rot_password is None or self.provisioning_password is None:
            raise MsiError(
                f"KafkaCrypto node {self.node_id!r} is not provisioned in {self.config_dir} "
                "and the block has no root-of-trust and provisioning passwords to do it"
            )
        secrets = ProvisioningSecrets(self.rot_password, self.provisioning_password)
        return provision_node(files, NodeRole(self.role), secrets)

    def open_codec(self, connection: KafkaConnection, topics: Sequence[str]) -> CryptoCodec:
        """Open the node (provisioning it first if needed) for an encrypted transfer.

        Args:
            connection: The Kafka cluster.
            topics: Data topics whose key-exchange topics are created now.

        Returns:
            The codec; the caller closes it.
        """
        from msi_prefect.transfer import CryptoCodec

        return CryptoCodec.for_node(
            self.ensure_provisioned(), connection, self.key_wait_timeout_s, topics
        )
