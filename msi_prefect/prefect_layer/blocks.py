"""Prefect blocks: the Kafka cluster, transfer settings, KafkaCrypto and backup storage.

Each block is a pydantic v2 model that Prefect stores as a block document (secrets
encrypted by the server, shown obfuscated in the UI) and that maps onto the settings
objects of the transfer core, which imports no Prefect:

* :class:`KafkaCluster` -> :class:`~msi_prefect.transfer.kafka.KafkaConnection`
* :class:`TransferSettings` -> :class:`~msi_prefect.transfer.producer.ProducerSettings`
  and :class:`~msi_prefect.transfer.filters.FileFilter`
* :class:`KafkaCryptoSettings` (used by the KafkaCrypto integration)
* :class:`BackupStorage` -> s3fs storage options and a :class:`~msi_prefect.transfer.sinks.Sink`

Register the block types with a Prefect server with
``prefect block register -m msi_prefect.prefect_layer.blocks``; a server started in an
environment where this package is installed registers them on its own through the
``prefect.collections`` entry point.

Values are checked when a block is built or loaded, and a bad value fails with a message
that names the field and says what a good value looks like. Secrets are ``SecretStr``:
``repr``, ``str`` and ``model_dump_json`` show ``**********``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

from fsspec.core import split_protocol
from fsspec.registry import known_implementations, registry
from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, field_validator, model_validator

from msi_prefect.prefect_layer.events import DownstreamDispatch
from msi_prefect.transfer import (
    DEFAULT_CHUNK_SIZE,
    MIB,
    Compression,
    FileFilter,
    KafkaConnection,
    SecurityProtocol,
    WireFormat,
)

if TYPE_CHECKING:
    from msi_prefect.transfer import CryptoCodec, NodeFiles, ProducerSettings, Sink

__all__ = [
    "BLOCK_TYPES",
    "BackupStorage",
    "KafkaCluster",
    "KafkaCryptoSettings",
    "TransferSettings",
]

#: Largest chunk a transfer may use (the producer keeps 64 MiB in flight at most).
MAX_CHUNK_SIZE = 64 * MIB
TIB = 1024**4
DEFAULT_MAX_FILE_SIZE = 1 * TIB
DEFAULT_CONSUMER_GROUP = "msi-reassembler"
DEFAULT_STABILITY_WINDOW_S = 2.0
DEFAULT_BATCH_MAX_FILES = 50
# A batch run holds one task run per file in memory: keep it bounded.
MAX_BATCH_FILES = 1000
DEFAULT_BATCH_MAX_WAIT_S = 5.0
MAX_BATCH_WAIT_S = 3600.0
DEFAULT_KEY_WAIT_TIMEOUT_S = 30.0
#: Kafka's own limit on topic names (longer names break the broker's log directories).
MAX_TOPIC_CHARS = 249
MAX_PORT = 65535

_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]+")
# A host name or IPv4 address (letters, digits, '.', '-', '_'), or an IPv6 address in [].
_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.%A-Za-z]+\]")
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_SASL_PROTOCOLS = frozenset({SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL})

# What each block's "documentation" link in the Prefect UI opens: the reference of the
# settings the block is made of.
_LIBRDKAFKA_CONFIGURATION_URL = HttpUrl(
    "https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md"
)
_KAFKA_TOPIC_CONFIGS_URL = HttpUrl("https://kafka.apache.org/documentation/#topicconfigs")
_KAFKACRYPTO_URL = HttpUrl("https://github.com/tmcqueen-materials/kafkacrypto")
_S3FS_URL = HttpUrl("https://s3fs.readthedocs.io/en/latest/")


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


def _check_topic(topic: str) -> str:
    """Return ``topic`` if Kafka accepts it as a topic name, else raise ``ValueError``."""
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
            f"topic {topic!r} contains {''.join(bad)!r}; Kafka topic names may only use "
            "ASCII letters, digits, '.', '_' and '-'"
        )
    return topic


class KafkaCluster(Block):
    """Where a Kafka cluster's brokers are and how to authenticate to them.

    Maps onto the librdkafka settings of every producer, consumer and admin client of a
    transfer: `bootstrap.servers`, `security.protocol`, `sasl.*`, `ssl.*` and any extra
    setting. Works with Apache Kafka, Confluent Cloud (SASL_SSL with PLAIN), Redpanda and
    the embedded Tansu broker; AWS MSK IAM authentication is not supported.

    Example:
        Load a saved cluster and get the transfer core's connection settings:
        ```python
        from msi_prefect.prefect_layer.blocks import KafkaCluster

        kafka_cluster = KafkaCluster.load("BLOCK_NAME")
        connection = kafka_cluster.to_connection()
        ```
    """

    _block_type_name: ClassVar[str | None] = "MSI Kafka Cluster"
    _documentation_url: ClassVar[HttpUrl | None] = _LIBRDKAFKA_CONFIGURATION_URL

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
        """The transfer core's connection settings for this cluster."""
        return KafkaConnection(
            bootstrap_servers=self.bootstrap_servers,
            security_protocol=self.security_protocol,
            sasl_mechanism=self.sasl_mechanism,
            sasl_username=self.sasl_username,
            sasl_password=self.sasl_password,
            ssl_ca_location=self.ssl_ca_location,
            ssl_certificate_location=self.ssl_certificate_location,
            ssl_key_location=self.ssl_key_location,
            extra=dict(self.extra),
        )

    @classmethod
    def from_connection(cls, connection: KafkaConnection) -> KafkaCluster:
        """A block holding the same settings as ``connection`` (e.g. to save it)."""
        return cls(**connection.model_dump(exclude={"extra"}), extra=dict(connection.extra))


class TransferSettings(Block):
    """Which files of a watched folder go to which Kafka topic, and how they are sent.

    One document per stream of files: the producer uses the topic, chunking, compression
    and file selection; the consumer uses the topic, consumer group and size limit.

    Example:
        Load saved settings and build the producer settings and file filter:
        ```python
        from msi_prefect.prefect_layer.blocks import TransferSettings

        transfer_settings = TransferSettings.load("BLOCK_NAME")
        producer_settings = transfer_settings.producer_settings()
        file_filter = transfer_settings.file_filter()
        ```
    """

    _block_type_name: ClassVar[str | None] = "MSI Transfer Settings"
    _documentation_url: ClassVar[HttpUrl | None] = _KAFKA_TOPIC_CONFIGS_URL

    topic: str = Field(
        title="Topic",
        description="Kafka topic the files travel through: 1-249 characters of ASCII "
        "letters, digits, '.', '_' and '-'.",
        examples=["lab-files"],
    )
    chunk_size: int = Field(
        default=DEFAULT_CHUNK_SIZE,
        gt=0,
        le=MAX_CHUNK_SIZE,
        title="Chunk Size (bytes)",
        description="Bytes of file data per Kafka message, at most 64 MiB. A chunk plus "
        "its headers must fit the broker's and topic's max message size (Apache Kafka's "
        "default is 1 MB: use 960 KiB or less there, or raise max.message.bytes).",
    )
    compression: Compression = Field(
        default=Compression.NONE,
        title="Compression",
        description="Producer compression codec; most instrument files are already "
        "compressed, so none is the default.",
    )
    include: list[str] = Field(
        default_factory=list,
        title="Include Globs",
        description="Glob patterns of files to upload, relative to the watched folder, "
        "e.g. *.tif or raw/**; empty means every file that no exclude glob matches.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        title="Exclude Globs",
        description="Glob patterns of files never to upload, e.g. *.log or **/LOGS/**; "
        "an exclude always wins over an include.",
    )
    stability_window_s: float = Field(
        default=DEFAULT_STABILITY_WINDOW_S,
        gt=0,
        title="Stability Window (seconds)",
        description="A file is uploaded once its size and modification time have not "
        "changed for this many seconds.",
    )
    upload_existing: bool = Field(
        default=False,
        title="Upload Existing Files",
        description="Also upload the files already in the folder when watching starts.",
    )
    max_file_size: int = Field(
        default=DEFAULT_MAX_FILE_SIZE,
        gt=0,
        title="Max File Size (bytes)",
        description="Largest file the consumer rebuilds; announced larger files are "
        "rejected. Default 1 TiB.",
    )
    consumer_group: str = Field(
        default=DEFAULT_CONSUMER_GROUP,
        min_length=1,
        title="Consumer Group",
        description="Kafka consumer group of the file rebuilders; consumers in one group "
        "share the topic's partitions.",
    )
    downstream_dispatch: DownstreamDispatch = Field(
        default=DownstreamDispatch.ADAPTIVE,
        title="Downstream Dispatch",
        description="adaptive (default): a rebuilt file starts its own backup, metadata and "
        "analysis runs while the downstream runs keep up, and files that arrive faster are "
        "grouped into batches sized by the backlog. per-file: every rebuilt file starts its "
        "own runs. batch: rebuilt files are always grouped, and each group starts one run "
        "of each batch deployment. Every file gets its events and a run or task run named "
        "after it in every mode.",
    )
    batch_max_files: int = Field(
        default=DEFAULT_BATCH_MAX_FILES,
        ge=1,
        le=MAX_BATCH_FILES,
        title="Batch Size (files)",
        description="batch and adaptive dispatch: a batch is sent as soon as it has this "
        "many files.",
    )
    batch_max_wait_s: float = Field(
        default=DEFAULT_BATCH_MAX_WAIT_S,
        gt=0,
        le=MAX_BATCH_WAIT_S,
        title="Batch Wait (seconds)",
        description="batch and adaptive dispatch: a batch that is not full is sent at the "
        "latest this long after its first file was rebuilt (adaptive dispatch sends it "
        "sooner, as soon as the downstream runs before it have started).",
    )
    wire_format: WireFormat = Field(
        default=WireFormat.NATIVE,
        title="Wire Format",
        description="How files are laid out on the topic. 'native' is msi_prefect's own "
        "format. 'openmsistream' reads what OpenMSIStream 1.8 uploaders write and writes "
        "what its DataFileDownloadDirectory reads; it allows one rebuilder per consumer "
        "group (see docs/migration-from-openmsistream.md).",
    )

    @field_validator("topic")
    @classmethod
    def _validate_topic(cls, value: str) -> str:
        return _check_topic(value)

    @field_validator("consumer_group")
    @classmethod
    def _validate_consumer_group(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the consumer group is blank")
        return value

    @model_validator(mode="after")
    def _validate_globs(self) -> TransferSettings:
        # FileFilter's message names the field and the pattern, e.g.
        # "invalid include glob 'raw\\*.csv': backslash is not allowed ...".
        self.file_filter()
        return self

    def producer_settings(self) -> ProducerSettings:
        """The transfer core's producer settings (topic, chunk size, compression)."""
        from msi_prefect.transfer import ProducerSettings

        return ProducerSettings(
            topic=self.topic,
            chunk_size=self.chunk_size,
            compression=self.compression,
            wire_format=self.wire_format,
        )

    def file_filter(self) -> FileFilter:
        """The include/exclude rules of the watched folder.

        Raises:
            ValueError: A glob is invalid (the message names the field and the pattern).
        """
        return FileFilter(include=tuple(self.include), exclude=tuple(self.exclude))


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
        from msi_prefect.prefect_layer.blocks import KafkaCryptoSettings

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


class BackupStorage(Block):
    """Where backups of received files are stored: a local directory or an fsspec URL.

    S3 and S3-compatible stores (SeaweedFS, MinIO, Ceph) are reached through s3fs with the
    credentials and endpoint given here; without credentials s3fs uses its default chain
    (environment variables, ~/.aws, instance roles).

    Example:
        Load saved backup storage and get a sink for it:
        ```python
        from msi_prefect.prefect_layer.blocks import BackupStorage

        backup_storage = BackupStorage.load("BLOCK_NAME")
        sink = backup_storage.sink()
        ```
    """

    _block_type_name: ClassVar[str | None] = "MSI Backup Storage"
    _documentation_url: ClassVar[HttpUrl | None] = _S3FS_URL

    url: str = Field(
        title="URL",
        description="Destination: an fsspec URL such as s3://bucket/prefix, or an absolute "
        "local directory path (or file:// URL) on the worker machine.",
        examples=["s3://msi-backup/backups", "/data/backups"],
    )
    endpoint_url: str | None = Field(
        default=None,
        title="S3 Endpoint URL",
        description="Endpoint of an S3-compatible store, e.g. http://127.0.0.1:8333; "
        "leave empty for AWS S3.",
    )
    access_key_id: str | None = Field(
        default=None,
        title="S3 Access Key ID",
        description="S3 access key ID; leave empty to use s3fs's default credential chain.",
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        title="S3 Secret Access Key",
        description="S3 secret access key belonging to the access key ID.",
    )
    region: str | None = Field(
        default=None,
        title="S3 Region",
        description="S3 region name, e.g. us-east-1.",
    )

    @field_validator("endpoint_url", "access_key_id", "region")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip() or None

    @field_validator("secret_access_key")
    @classmethod
    def _empty_secret_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        return value

    @field_validator("url")
    @classmethod
    def _validate_url(cls, value: str) -> str:
        url = value.strip()
        if not url:
            raise ValueError("url is empty; give s3://bucket/prefix or an absolute directory")
        protocol, _ = split_protocol(url)
        if protocol is None:
            if not Path(url).expanduser().is_absolute():
                raise ValueError(
                    f"local path {url!r} is relative; give an absolute directory (workers "
                    "run in other directories) or a URL like s3://bucket/prefix"
                )
            return url
        protocol = protocol.lower()
        if protocol not in known_implementations and protocol not in registry:
            raise ValueError(
                f"url {url!r} has unknown protocol {protocol!r}; use s3://bucket/prefix, "
                "another fsspec protocol, or an absolute local directory"
            )
        parts = urlsplit(url)
        if "@" in parts.netloc:
            raise ValueError(
                "url must not contain credentials (user:password@); put them in "
                "access_key_id and secret_access_key"
            )
        if protocol in _LOCAL_PROTOCOLS:
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"url {url!r} names host {parts.netloc!r}; file:// is local")
            return url
        if protocol in _S3_PROTOCOLS and not parts.netloc:
            raise ValueError(f"url {url!r} names no bucket; write it as s3://bucket/prefix")
        return url

    @field_validator("endpoint_url")
    @classmethod
    def _validate_endpoint_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"endpoint_url {value!r} must be an http:// or https:// URL with a host, "
                "e.g. http://127.0.0.1:8333"
            )
        if parts.username or parts.password:
            raise ValueError(
                "endpoint_url must not contain credentials; put them in access_key_id and "
                "secret_access_key"
            )
        return value

    @model_validator(mode="after")
    def _validate_s3_options(self) -> BackupStorage:
        has_key = self.access_key_id is not None
        has_secret = self.secret_access_key is not None
        if has_key != has_secret:
            given, missing = (
                ("access_key_id", "secret_access_key")
                if has_key
                else ("secret_access_key", "access_key_id")
            )
            raise ValueError(f"{given} is set but {missing} is not; set both or neither")
        s3_fields = [
            name
            for name in ("endpoint_url", "access_key_id", "secret_access_key", "region")
            if getattr(self, name) is not None
        ]
        if s3_fields and not self.is_s3:
            raise ValueError(
                f"{', '.join(s3_fields)} only apply to s3:// URLs, but url is {self.url!r}"
            )
        return self

    @property
    def is_s3(self) -> bool:
        """True when the URL is an S3 (or S3-compatible) location."""
        protocol, _ = split_protocol(self.url)
        return protocol is not None and protocol.lower() in _S3_PROTOCOLS

    def storage_options(self) -> dict[str, Any]:
        """fsspec storage options for the URL (s3fs: key, secret, endpoint, region).

        The result holds the secret in clear text: pass it to fsspec, never log it.
        """
        if not self.is_s3:
            return {}
        options: dict[str, Any] = {}
        if self.access_key_id is not None and self.secret_access_key is not None:
            options["key"] = self.access_key_id
            options["secret"] = self.secret_access_key.get_secret_value()
        client_kwargs: dict[str, str] = {}
        if self.endpoint_url is not None:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region is not None:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options

    def sink(self) -> Sink:
        """A sink that delivers rebuilt files below the URL and verifies them.

        Raises:
            msi_prefect.transfer.sinks.SinkError: The destination cannot be used.
        """
        from msi_prefect.transfer import sink_for

        return sink_for(self.url, self.storage_options())


#: Every block type of this module, e.g. for registration in tests and scripts.
BLOCK_TYPES: tuple[type[Block], ...] = (
    KafkaCluster,
    TransferSettings,
    KafkaCryptoSettings,
    BackupStorage,
)
