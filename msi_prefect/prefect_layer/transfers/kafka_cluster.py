"""The Kafka cluster block: the core's :class:`~msi_prefect.transfer.KafkaConnection`, saved.

:class:`KafkaCluster` is a ``KafkaConnection`` (same fields, same librdkafka settings) that
Prefect stores as a block document, with the checks a form in the UI needs: brokers given
as ``host:port``, SASL settings only with a SASL protocol, empty text boxes as unset. Every
transfer flow and the metadata publisher connect through it.

Values are checked when the block is built or loaded, and a bad value fails with a message
that names the field and says what a good value looks like. Secrets are ``SecretStr``:
``repr``, ``str`` and ``model_dump_json`` show ``**********``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar

from prefect.blocks.core import Block
from pydantic import HttpUrl, field_validator, model_validator

from msi_prefect.transfer import (
    KafkaConnection,
    SecurityProtocol,
)

if TYPE_CHECKING:
    pass

__all__ = ["KafkaCluster"]

MAX_PORT = 65535

# A host name or IPv4 address (letters, digits, '.', '-', '_'), or an IPv6 address in [].
_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.%A-Za-z]+\]")
_SASL_PROTOCOLS = frozenset({SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL})
# What the block's "documentation" link in the Prefect UI opens.
_LIBRDKAFKA_CONFIGURATION_URL = HttpUrl(
    "https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md"
)


def _check_host_port(entry: str) -> str | None:
    """Why ``entry`` is not ``host:port``, or ``None`` when it is."""
    if not entry:
        return "an entry is empty (two commas in a row, or a comma at the end?)"
    if "://" in entry:
        return f"{entry!r} has a scheme; give host:port only and set security_protocol"
    separator = next((c for c in entry if c == ";" or c.isspace()), None)
    if separator is not None:
        return f"{entry!r} contains {separator!r}; separate brokers with ','"
    host, sep, port = entry.rpartition(":")
    if not sep or not host:
        return f"{entry!r} has no port; write it as host:port, e.g. {entry}:9092"
    if not port.isdigit():
        return f"{entry!r} has port {port!r}, which is not a number"
    if not 0 < int(port) <= MAX_PORT:
        return f"{entry!r} has port {port}, outside 1-{MAX_PORT}"
    if not _HOST_RE.fullmatch(host):
        return f"{entry!r} has host {host!r}, which is not a host name or address"
    return None


class KafkaCluster(Block, KafkaConnection):
    """Where a Kafka cluster's brokers are and how to authenticate to them.

    A `KafkaConnection` of the transfer core (its fields, its librdkafka settings) that
    Prefect saves as a block document, with the checks a form in the UI needs. It sets every
    producer, consumer and admin client of a transfer: `bootstrap.servers`,
    `security.protocol`, `sasl.*`, `ssl.*` and any extra setting. Works with Apache Kafka,
    Confluent Cloud (SASL_SSL with PLAIN), Redpanda and the embedded Tansu broker; AWS MSK
    IAM authentication is not supported.

    Example:
        Load a saved cluster and get the transfer core's connection settings:
        ```python
        from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster

        kafka_cluster = KafkaCluster.load("BLOCK_NAME")
        connection = kafka_cluster.to_connection()
        ```
    """

    _block_type_name: ClassVar[str | None] = "MSI Kafka Cluster"
    _documentation_url: ClassVar[HttpUrl | None] = _LIBRDKAFKA_CONFIGURATION_URL

    @field_validator("bootstrap_servers")
    @classmethod
    def _validate_bootstrap_servers(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",")]
        for entry in entries:
            problem = _check_host_port(entry)
            if problem:
                raise ValueError(
                    "bootstrap_servers must be a comma-separated list of host:port, e.g. "
                    f"broker1:9092,broker2:9092; got {value!r}: {problem}"
                )
        return ",".join(entries)

    @field_validator(
        "sasl_mechanism",
        "sasl_username",
        "ssl_ca_location",
        "ssl_certificate_location",
        "ssl_key_location",
    )
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        # The UI's form sends "" for a cleared text box; librdkafka would take it literally.
        if value is None:
            return None
        return value.strip() or None

    @model_validator(mode="after")
    def _validate_sasl(self) -> KafkaCluster:
        sasl_fields = [
            name
            for name in ("sasl_mechanism", "sasl_username", "sasl_password")
            if getattr(self, name) is not None
        ]
        if sasl_fields and self.security_protocol not in _SASL_PROTOCOLS:
            raise ValueError(
                f"{', '.join(sasl_fields)} set but security_protocol is "
                f"{self.security_protocol.value}, which does not use SASL; set "
                "security_protocol to SASL_SSL (or SASL_PLAINTEXT) or clear the SASL fields"
            )
        return self

    def to_connection(self) -> KafkaConnection:
        """The transfer core's connection settings for this cluster, as a plain copy."""
        fields = {name: getattr(self, name) for name in KafkaConnection.model_fields}
        return KafkaConnection(**{**fields, "extra": dict(self.extra)})

    @classmethod
    def from_connection(cls, connection: KafkaConnection) -> KafkaCluster:
        """A block holding the same settings as ``connection`` (e.g. to save it)."""
        return cls(**connection.model_dump(exclude={"extra"}), extra=dict(connection.extra))
