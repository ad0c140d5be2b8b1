"""The inputs of the per-file downstream flows: a rebuilt file named by an event, and blocks.

Deployment triggers start the backup, metadata and analysis flows with parameters rendered
from a ``msi.file.reconstructed`` (or ``msi.backup.missing``) event payload: ``topic``,
``file_id``, ``generation``, ``path``, ``url``, ``size`` and ``sha256``. Anybody who can emit
events can set them, so :meth:`RebuiltFile.from_parameters` checks every one of them before
a file is touched, and each refusal says which parameter is wrong and why:

* ``url`` must be a local ``file://`` URL of a file whose last path segments are ``path``
  (the directory above them is the destination, and ``path`` must stay inside it: no
  absolute path, no ``..``, no symlink on the way), or the ``s3://`` URL of the object
  ``reconstruct-files`` rebuilt it into, ending with ``path``; a worker on another host
  than ``reconstruct-files`` reads the file by that URL
  (:mod:`msi_prefect.prefect_layer.remote_files`);
* ``file_id`` must be the file id of ``path`` (wire format v1: a uuid5 of the path);
* ``size``, ``generation`` and ``sha256`` must be well formed.

:meth:`RebuiltFile.check_unchanged` then tells whether the file on disk is still the one
the event announced. :func:`load_block` loads a block document by name with a message
that says what to do when it is missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

from prefect.blocks.core import Block
from pydantic import ValidationError

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.events import REBUILT_FILE_FIELDS, FileFacts
from msi_prefect.prefect_layer.remote_files import (
    REMOTE_PROTOCOLS,
    RemoteFileMismatchError,
    RemoteFileMissingError,
    RemoteSettingMissingError,
    fetch_root,
    fetch_verified,
)
from msi_prefect.transfer import (
    UnsafePathError,
    check_topic_name,
    file_id_for,
    resolve_inside,
    validate_relative_path,
)

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import State

__all__ = [
    "BlockLoadError",
    "FileChangedError",
    "FileInputError",
    "RebuiltFile",
    "load_block",
    "retry_unless_input_error",
]

#: Block size of the hashing pass of :meth:`RebuiltFile.check_unchanged`.
HASH_BLOCK_SIZE = 1024 * 1024

_FILE_ID_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_LOCAL_HOSTS = frozenset({"", "localhost"})
# What the Prefect client says when no block document has the name.
_NOT_FOUND_MARKER = "Unable to find block document"

BlockT = TypeVar("BlockT", bound=Block)


class FileInputError(MsiError):
    """A flow was given a file it cannot work on as given; retrying will not help."""


class FileChangedError(FileInputError):
    """The file on disk is no longer the one the event announced."""


class BlockLoadError(MsiError):
    """A block document named by a flow parameter is missing or holds bad settings."""


def _check_topic(topic: str) -> str:
    try:
        return check_topic_name(topic)
    except ValueError as exc:
        raise FileInputError(f"topic {topic!r} is not a Kafka topic name: {exc}") from exc


def _local_path_of(url: str) -> Path:
    """The absolute local path of a ``file://`` URL, refusing any other kind of URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        shown = f"{parts.scheme}://" if parts.scheme else "a plain path"
        raise FileInputError(
            f"url {url!r} is {shown}; only file:// URLs of files rebuilt on this host and "
            "s3:// URLs (reconstruct-files into an S3 destination) are supported"
        )
    if parts.netloc not in _LOCAL_HOSTS:
        raise FileInputError(f"url {url!r} names host {parts.netloc!r}; file:// URLs are local")
    if parts.query or parts.fragment:
        raise FileInputError(f"url {url!r} has a query or fragment; give a plain file:// URL")
    local = url2pathname(parts.path)
    if "\0" in local or not os.path.isabs(local):
        raise FileInputError(f"url {url!r} does not name an absolute local path")
    if ".." in local.split("/"):
        raise FileInputError(f"url {url!r} has a '..' segment; give the file's direct path")
    return Path(local)


def _remote_url_of(url: str, relpath: PurePosixPath) -> str:
    """Check an ``s3://`` URL of a rebuilt file: a plain object URL that ends with its path."""
    parts = urlsplit(url)
    if not parts.netloc or "@" in parts.netloc:
        raise FileInputError(
            f"url {url!r} must name a bucket and no credentials (s3://bucket/prefix/path)"
        )
    if parts.query or parts.fragment:
        raise FileInputError(f"url {url!r} has a query or fragment; give a plain s3:// URL")
    if ".." in parts.path.split("/") or "\0" in url:
        raise FileInputError(f"url {url!r} has a '..' segment; give the file's direct URL")
    if not parts.path.endswith("/" + relpath.as_posix()):
        raise FileInputError(
            f"url {url!r} does not end with path {relpath.as_posix()!r}; the file must lie at "
            "<destination>/<path>"
        )
    return url


def _local_destination(url: str, path: str, relpath: PurePosixPath) -> tuple[Path, Path]:
    """The destination folder and the file of a local ``file://`` URL that ends with path.

    Raises:
        FileInputError: The URL is not a local file URL, does not end with ``path``, or
            ``path`` leaves the destination.
    """
    local = _local_path_of(url)
    depth = len(relpath.parts)
    if local.parts[-depth:] != relpath.parts or len(local.parts) <= depth:
        raise FileInputError(
            f"url {url!r} does not end with path {path!r}; the file must lie at "
            "<destination>/<path>"
        )
    destination = Path(*local.parts[:-depth])
    try:
        return destination, resolve_inside(destination, relpath)
    except UnsafePathError as exc:
        raise FileInputError(
            f"path {path!r} is outside the destination {destination}: {exc}"
        ) from exc


@dataclass(frozen=True)
class RebuiltFile:
    """One rebuilt, verified file, as announced by an event; validated.

    Attributes:
        topic: Kafka topic the file travelled through.
        file_id: The file id (uuid5 of ``path``, 32 hex digits).
        generation: Version of the file; grows each time the file is sent anew.
        path: Relative POSIX path below the destination.
        url: ``file://`` or ``s3://`` URL of the rebuilt file, as announced.
        destination: The destination directory (the URL's path without ``path``); for a
            file read by URL, the local folder its verified copy is fetched into.
        local_path: The rebuilt file on this machine (for a file read by URL, its local
            copy, there once :meth:`check_unchanged` has fetched it).
        size: Size in bytes announced by the event.
        sha256: Lower-case hex SHA-256 announced by the event.
        remote_url: The ``s3://`` URL the file is read from; None for a local file.
    """

    topic: str
    file_id: str
    generation: int
    path: PurePosixPath
    url: str
    destination: Path
    local_path: Path
    size: int
    sha256: str
    remote_url: str | None = None

    @classmethod
    def from_parameters(
        cls,
        *,
        topic: str,
        file_id: str,
        generation: int,
        path: str,
        url: str,
        size: int,
        sha256: str,
    ) -> RebuiltFile:
        """Validate the event parameters of a downstream flow.

        Args:
            topic: Kafka topic.
            file_id: File id from the event.
            generation: File generation from the event.
            path: Relative POSIX path from the event.
            url: ``file://`` or ``s3://`` URL of the rebuilt file from the event.
            size: Size in bytes from the event.
            sha256: Hex SHA-256 from the event.

        Raises:
            FileInputError: A parameter is malformed, the URL is neither a local
                ``file://`` URL nor an ``s3://`` URL, it does not end with ``path``, or
                ``path`` leaves the destination.
        """
        _check_topic(topic)
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise FileInputError(f"generation must be an integer >= 0, got {generation!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise FileInputError(f"size must be an integer >= 0 (bytes), got {size!r}")
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise FileInputError(f"sha256 must be 64 hex digits, got {sha256!r}")
        try:
            relpath = validate_relative_path(path)
        except UnsafePathError as exc:
            raise FileInputError(f"path {path!r} is refused: {exc}") from exc
        if not _FILE_ID_RE.fullmatch(file_id):
            raise FileInputError(f"file_id must be 32 lower-case hex digits, got {file_id!r}")
        if file_id != file_id_for(path):
            raise FileInputError(
                f"file_id {file_id} is not the id of path {path!r} ({file_id_for(path)}); "
                "the parameters do not come from one event"
            )
        remote_url: str | None = None
        if isinstance(url, str) and urlsplit(url).scheme.lower() in REMOTE_PROTOCOLS:
            # Fetched on first use into a folder of this file's own (one per generation).
            remote_url = _remote_url_of(url, relpath)
            destination = fetch_root() / f"{file_id}-{generation}"
            local_path = destination.joinpath(*relpath.parts)
        else:
            destination, local_path = _local_destination(url, path, relpath)
        return cls(
            topic=topic,
            file_id=file_id,
            generation=generation,
            path=relpath,
            url=url,
            destination=destination,
            local_path=local_path,
            size=size,
            sha256=sha256.lower(),
            remote_url=remote_url,
        )

    @classmethod
    def from_entry(cls, entry: Any) -> RebuiltFile:
        """Validate a rebuilt-file contract mapping (e.g. one entry of a batch).

        Raises:
            FileInputError: The entry is not a mapping, lacks a field of
                :data:`~msi_prefect.prefect_layer.events.REBUILT_FILE_FIELDS`, or a value
                is bad.
        """
        if not isinstance(entry, Mapping):
            raise FileInputError(f"a batch entry must be an object, got {type(entry).__name__}")
        missing = [key for key in REBUILT_FILE_FIELDS if key not in entry]
        if missing:
            raise FileInputError(f"batch entry lacks {', '.join(missing)}")
        return cls.from_parameters(**{key: entry[key] for key in REBUILT_FILE_FIELDS})

    def check_unchanged(self, *, hash_content: bool = True) -> None:
        """Check the file is still a regular file of the announced size (and SHA-256).

        A file read by URL is fetched here (once per process), its size and SHA-256
        checked on the way, whatever ``hash_content`` says.

        Args:
            hash_content: Also stream the file through SHA-256 (one read of the file).

        Raises:
            FileChangedError: The file is gone, not a regular file, or differs from the event.
            FileInputError: This worker lacks a setting to read the file's URL.
            RemoteReadError: The store of the URL could not be read (retry).
        """
        if self.remote_url is not None:
            self._fetch()
            return
        try:
            info = os.lstat(self.local_path)
        except FileNotFoundError:
            raise FileChangedError(
                f"{self.path} is not at {self.local_path}: it was moved or deleted after it "
                "was rebuilt, or this worker runs on another host than reconstruct-files and "
                "cannot see its destination folder (then rebuild into an S3 destination, "
                "MSI_DESTINATION_DIR=s3://bucket/prefix, so the file is read by its URL, or "
                "run this deployment on the storage host's pool, MSI_STORAGE_POOL)"
            ) from None
        except OSError as exc:
            raise FileChangedError(f"{self.path} cannot be read: {exc}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise FileChangedError(
                f"{self.local_path} is not a regular file (a symlink, directory or device); "
                "refusing it"
            )
        if info.st_size != self.size:
            raise FileChangedError(
                f"{self.path} changed since it was rebuilt: it now has {info.st_size} bytes, "
                f"the event announced {self.size}"
            )
        if hash_content:
            self.check_sha256(self._hash())

    def _fetch(self) -> None:
        assert self.remote_url is not None
        try:
            fetch_verified(self.remote_url, self.local_path, self.size, self.sha256)
        except (RemoteFileMissingError, RemoteFileMismatchError) as exc:
            raise FileChangedError(str(exc)) from exc
        except RemoteSettingMissingError as exc:
            raise FileInputError(str(exc)) from exc

    def check_sha256(self, actual: str) -> None:
        """Compare a SHA-256 computed from the file with the announced one.

        Raises:
            FileChangedError: They differ.
        """
        if actual.lower() != self.sha256:
            raise FileChangedError(
                f"{self.path} changed since it was rebuilt: its SHA-256 is now {actual}, "
                f"the event announced {self.sha256}"
            )

    def _hash(self) -> str:
        digest = hashlib.sha256()
        try:
            with open(self.local_path, "rb") as stream:
                while block := stream.read(HASH_BLOCK_SIZE):
                    digest.update(block)
        except OSError as exc:
            raise FileChangedError(f"{self.path} cannot be read: {exc}") from exc
        return digest.hexdigest()

    def facts(self, **extra: Any) -> FileFacts:
        """The event facts of this file, with ``extra`` payload fields."""
        return FileFacts(
            topic=self.topic,
            file_id=self.file_id,
            path=self.path.as_posix(),
            generation=self.generation,
            size=self.size,
            sha256=self.sha256,
            url=self.url,
            extra=extra,
        )


def load_block(block_type: type[BlockT], name: str) -> BlockT:
    """Load the block document ``name`` of ``block_type`` from the Prefect server.

    Raises:
        BlockLoadError: The name is blank, no such document exists, or its settings are
            invalid; the message names the block type and the document.
    """
    type_name = block_type.get_block_type_name()
    if not isinstance(name, str) or not name.strip():
        raise BlockLoadError(f"no {type_name} block name given")
    try:
        loaded = block_type.load(name)
    except ValidationError as exc:
        raise BlockLoadError(
            f"the {type_name} block {name!r} holds invalid settings; fix it in the Prefect UI "
            f"(Blocks): {exc}"
        ) from exc
    except ValueError as exc:
        if _NOT_FOUND_MARKER not in str(exc):
            raise
        raise BlockLoadError(
            f"there is no {type_name} block named {name!r} on the Prefect server; create it "
            "in the Prefect UI (Blocks) or with blocks/create_embedded_blocks.py, or pass the "
            "name of an existing one"
        ) from exc
    if not isinstance(loaded, block_type):  # load() is a coroutine in async code
        raise BlockLoadError(f"loading the {type_name} block {name!r} gave {loaded!r}")
    return loaded


def retry_unless_input_error(task: Task[..., Any], task_run: TaskRun, state: State) -> bool:
    """A task's ``retry_condition_fn``: retry, except after a :class:`FileInputError`.

    A bad parameter or a changed file stays bad; an S3 or broker outage may pass.
    """
    return not isinstance(state.data, FileInputError)
