"""The backup storage block: where backups of rebuilt files go, and how to reach it.

:class:`BackupStorage` is a local directory or an fsspec URL (S3 and S3-compatible stores
through s3fs) with its credentials; :meth:`BackupStorage.sink` gives the core's
:class:`~msi_prefect.transfer.Sink` that the backup task and the audit use.

Values are checked when the block is built or loaded, and a bad value fails with a message
that names the field and says what a good value looks like. Secrets are ``SecretStr``:
``repr``, ``str`` and ``model_dump_json`` show ``**********``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from fsspec.core import split_protocol, url_to_fs
from fsspec.registry import known_implementations, registry
from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, field_validator, model_validator

if TYPE_CHECKING:
    from msi_prefect.transfer import Sink

__all__ = ["BackupStorage"]

_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
# What the block's "documentation" link in the Prefect UI opens.
_S3FS_URL = HttpUrl("https://s3fs.readthedocs.io/en/latest/")


class BackupStorage(Block):
    """Where backups of received files are stored: a local directory or an fsspec URL.

    S3 and S3-compatible stores (SeaweedFS, MinIO, Ceph) are reached through s3fs with the
    credentials and endpoint given here; without credentials s3fs uses its default chain
    (environment variables, ~/.aws, instance roles).

    Example:
        Load saved backup storage and get a sink for it:
        ```python
        from msi_prefect.prefect_layer.backup.storage import BackupStorage

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

    def presigned_url(self, relpath: PurePosixPath, expires_in_s: int) -> str | None:
        """A URL that lets anyone holding it read the object of ``relpath`` for a while.

        A presigned S3 GET: the store checks the signature, so the bucket stays private
        and a browser (an ``<img>`` in the Prefect UI) loads the object without
        credentials. It names the endpoint as this block does, so a browser must be able
        to reach that address.

        Args:
            relpath: Path of the object below the URL's prefix.
            expires_in_s: How long the URL works, in seconds (S3 allows at most 7 days).

        Returns:
            The URL, or None when the storage is not S3 (a local folder has no URL a web
            page may load).
        """
        if not self.is_s3:
            return None
        fs, base = url_to_fs(self.url, **self.storage_options())
        object_path = f"{base.rstrip('/')}/{relpath.as_posix()}"
        return str(fs.sign(object_path, expiration=expires_in_s))
