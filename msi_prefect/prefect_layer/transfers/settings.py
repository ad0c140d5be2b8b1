"""The transfer settings block: which files go to which topic, and how they are sent.

:class:`TransferSettings` maps onto the core's
:class:`~msi_prefect.transfer.ProducerSettings` and :class:`~msi_prefect.transfer.FileFilter`,
and holds the consumer side's group and size limit, the downstream dispatch of rebuilt
files (:mod:`msi_prefect.prefect_layer.dispatch`) and the retention of sent files in the
watched folder (:mod:`msi_prefect.prefect_layer.prune`; off by default).

Values are checked when the block is built or loaded, and a bad value fails with a message
that names the field and says what a good value looks like. Secrets are ``SecretStr``:
``repr``, ``str`` and ``model_dump_json`` show ``**********``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, field_validator, model_validator

from msi_prefect.prefect_layer.dispatch.mode import DownstreamDispatch
from msi_prefect.transfer import (
    DEFAULT_CHUNK_SIZE,
    MIB,
    Compression,
    FileFilter,
    WireFormat,
    check_topic_name,
)

if TYPE_CHECKING:
    from msi_prefect.transfer import ProducerSettings

__all__ = ["TransferSettings"]

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

# What the block's "documentation" link in the Prefect UI opens.
_KAFKA_TOPIC_CONFIGS_URL = HttpUrl("https://kafka.apache.org/documentation/#topicconfigs")


class TransferSettings(Block):
    """Which files of a watched folder go to which Kafka topic, and how they are sent.

    One document per stream of files: the producer uses the topic, chunking, compression
    and file selection; the consumer uses the topic, consumer group and size limit.

    Example:
        Load saved settings and build the producer settings and file filter:
        ```python
        from msi_prefect.prefect_layer.transfers.settings import TransferSettings

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
        description="batch and adaptive dispatch: a batch that is not full is sent this "
        "long after its first file was rebuilt. Adaptive dispatch sends it sooner, as soon "
        "as the downstream runs before it have started, or later, while the stack is "
        "overloaded (runs wait to start), for at most 30 s after its first file.",
    )
    wire_format: WireFormat = Field(
        default=WireFormat.NATIVE,
        title="Wire Format",
        description="How files are laid out on the topic. 'native' is msi_prefect's own "
        "format. 'openmsistream' reads what OpenMSIStream 1.8 uploaders write and writes "
        "what its DataFileDownloadDirectory reads; it allows one rebuilder per consumer "
        "group (see docs/migration-from-openmsistream.md).",
    )

    retention_days: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        title="Delete Sent Files After (days)",
        description="Opt-in. Empty (the default): files stay in the watched folder. A "
        "number: the prune-source deployment deletes a file from the watched folder this "
        "many days after its newest generation was backed up, and only if the file is "
        "unchanged since it was sent and its backup exists with the same size and SHA-256 "
        "at that moment (0: as soon as that holds).",
        examples=[7],
    )

    @field_validator("topic")
    @classmethod
    def _validate_topic(cls, value: str) -> str:
        return check_topic_name(value)

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
