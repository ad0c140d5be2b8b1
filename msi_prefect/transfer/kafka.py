"""Connection settings for a Kafka cluster, turned into librdkafka configuration.

The Prefect Kafka block maps onto `KafkaConnection`, so the core and the CLI use the same
settings whether a Prefect server is involved or not.
"""

from __future__ import annotations

import logging
import re
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, SecretStr

from msi_prefect.errors import MsiError

logger = logging.getLogger(__name__)

# librdkafka log levels are syslog levels; 3 = errors only (its warnings go to our logger).
LIBRDKAFKA_LOG_LEVEL_ERRORS = 3
ADMIN_TIMEOUT_S = 30.0
# One metadata attempt while `ensure_topic` waits for the brokers; between attempts the
# errors librdkafka reported are looked at, so a refused login fails within seconds.
METADATA_PROBE_S = 2.0
#: Kafka's own limit on topic names (longer names break the broker's log directories).
MAX_TOPIC_CHARS = 249
_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]+")


def check_topic_name(topic: str) -> str:
    """Return ``topic`` if Kafka accepts it as a topic name.

    Raises:
        ValueError: It is empty, longer than :data:`MAX_TOPIC_CHARS`, ``.`` or ``..``, or
            uses a character other than ASCII letters, digits, ``.``, ``_`` and ``-``; the
            message says which.
    """
    if not topic:
        raise ValueError("the topic name is empty")
    if len(topic) > MAX_TOPIC_CHARS:
        raise ValueError(
            f"the topic name has {len(topic)} characters; Kafka allows at most {MAX_TOPIC_CHARS}"
        )
    if topic in (".", ".."):
        raise ValueError(f"{topic!r} is not a valid topic name")
    if not _TOPIC_RE.fullmatch(topic):
        bad = sorted({c for c in topic if not _TOPIC_RE.fullmatch(c)})
        raise ValueError(
            f"topic {topic!r} contains {''.join(bad)!r}; Kafka topic names may only contain "
            "ASCII letters, digits, '.', '_' and '-'"
        )
    return topic


class SecurityProtocol(StrEnum):
    """How clients talk to the brokers."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class Compression(StrEnum):
    """Producer-side compression codec."""

    NONE = "none"
    LZ4 = "lz4"
    ZSTD = "zstd"
    GZIP = "gzip"
    SNAPPY = "snappy"


class KafkaConnection(BaseModel):
    """Where the brokers are and how to authenticate to them.

    The Prefect layer's Kafka cluster block is a subclass that Prefect can save: these
    fields, titles and descriptions are what its form in the Prefect UI shows.
    """

    bootstrap_servers: str = Field(
        title="Bootstrap Servers",
        description="Comma-separated host:port list of brokers to contact first, "
        "e.g. broker1:9092,broker2:9092 or 127.0.0.1:9092.",
        examples=["127.0.0.1:9092", "pkc-xxxxx.europe-west1.gcp.confluent.cloud:9092"],
    )
    security_protocol: SecurityProtocol = Field(
        default=SecurityProtocol.PLAINTEXT,
        title="Security Protocol",
        description="Transport and authentication protocol: PLAINTEXT, SSL (TLS), "
        "SASL_PLAINTEXT or SASL_SSL (SASL over TLS, used by Confluent Cloud).",
    )
    sasl_mechanism: str | None = Field(
        default=None,
        title="SASL Mechanism",
        description="SASL mechanism when the protocol is SASL_*, e.g. PLAIN, SCRAM-SHA-256 "
        "or SCRAM-SHA-512.",
    )
    sasl_username: str | None = Field(
        default=None,
        title="SASL Username",
        description="SASL user name (the API key on Confluent Cloud).",
    )
    sasl_password: SecretStr | None = Field(
        default=None,
        title="SASL Password",
        description="SASL password (the API secret on Confluent Cloud).",
    )
    ssl_ca_location: str | None = Field(
        default=None,
        title="TLS CA File",
        description="Path of a CA certificate file (PEM) on the worker machine, when the "
        "brokers' certificates are not signed by a CA the system trusts.",
    )
    ssl_certificate_location: str | None = Field(
        default=None,
        title="TLS Client Certificate File",
        description="Path of the client certificate file (PEM) for mutual TLS, on the "
        "worker machine.",
    )
    ssl_key_location: str | None = Field(
        default=None,
        title="TLS Client Key File",
        description="Path of the client private key file (PEM) for mutual TLS, on the "
        "worker machine.",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        title="Extra librdkafka Settings",
        description="Further librdkafka settings applied last, e.g. "
        '{"client.id": "lab-3"} (see librdkafka CONFIGURATION.md). Values here are not '
        "secret: they are shown in the UI and in logs.",
    )

    def client_config(self) -> dict[str, Any]:
        """Settings common to producers, consumers and admin clients."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol.value,
            "log_level": LIBRDKAFKA_LOG_LEVEL_ERRORS,
            "logger": logger,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        config.update({key: value for key, value in optional.items() if value is not None})
        config.update(self.extra)
        return config


def _refusal(connection: KafkaConnection, errors: list[Any]) -> str | None:
    """A clear sentence for an authentication or TLS failure among librdkafka's errors.

    Never includes the password: librdkafka's error strings do not carry it, and only the
    user name and mechanism are added.
    """
    from confluent_kafka import KafkaError

    for error in errors:
        code = error.code()
        if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            who = (
                f"user {connection.sasl_username!r} with {connection.sasl_mechanism}"
                if connection.sasl_username
                else "these credentials"
            )
            return (
                f"authentication to the Kafka brokers at {connection.bootstrap_servers} failed "
                f"for {who} ({error.str()}); check the user name and password (sasl_username, "
                "sasl_password) and the mechanism of the KafkaCluster block"
            )
        if code == KafkaError._SSL:
            return (
                f"the TLS handshake with the Kafka brokers at {connection.bootstrap_servers} "
                f"failed ({error.str()}); check ssl_ca_location (the CA that signed the "
                "brokers' certificates) and the security protocol of the KafkaCluster block"
            )
    return None


def wait_for_brokers(connection: KafkaConnection, timeout_s: float = ADMIN_TIMEOUT_S) -> Any:
    """Connect to the cluster and return its metadata.

    A wrong password or an untrusted certificate fails at once with a sentence naming it,
    instead of librdkafka's retries until the timeout and a bare "transport failure".

    Returns:
        The cluster metadata (``confluent_kafka.admin.ClusterMetadata``).

    Raises:
        MsiError: authentication or TLS failed, or no broker answered within `timeout_s`.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[Any] = []
    config: dict[str, Any] = {**connection.client_config(), "error_cb": errors.append}
    admin = AdminClient(config)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return admin.list_topics(timeout=min(METADATA_PROBE_S, timeout_s))
        except KafkaException as exc:
            last: KafkaException = exc
        admin.poll(0)  # serves error_cb
        if refusal := _refusal(connection, errors):
            raise MsiError(refusal) from last
        if time.monotonic() >= deadline:
            raise MsiError(
                f"cannot reach the Kafka brokers at {connection.bootstrap_servers}: {last}"
            ) from last


def ensure_topic(
    connection: KafkaConnection, topic: str, partitions: int = 4, replication_factor: int = 1
) -> bool:
    """Create the topic if it does not exist yet.

    Consumers subscribed to a missing topic only see it after a metadata refresh (minutes),
    so every entry point creates its topic up front.

    Returns:
        True if the topic was created, False if it existed already.

    Raises:
        MsiError: the broker cannot be reached, refuses the credentials or the TLS
            handshake (within seconds, naming which), or refuses to create the topic.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    metadata = wait_for_brokers(connection)
    admin = AdminClient(connection.client_config())
    if topic in metadata.topics:
        return False
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)]
    )
    try:
        futures[topic].result(timeout=ADMIN_TIMEOUT_S)
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise MsiError(f"cannot create topic {topic!r}: {exc}") from exc
    return True
