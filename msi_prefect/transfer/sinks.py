"""Sinks: put a rebuilt, verified file at its final place.

The consumer rebuilds each file into a staging file, checks its SHA-256, fsyncs and closes
it, and then hands it to a sink. A sink moves it to where it belongs and proves it got
there intact:

* :class:`LocalDirectorySink` renames the staging file into a directory (atomic on one
  filesystem, copy + fsync + rename across filesystems).
* :class:`FsspecSink` uploads it to any fsspec URL, e.g. ``s3://bucket/prefix`` through
  s3fs, in parts of bounded size, then streams the stored object back and hashes it,
  because S3 ETags of multipart uploads are not content hashes.

Both sinks can also *copy* a file that must stay where it is (``store_copy``, used for
backups), verified the same way, and tell how a stored copy compares with what it should
be (``check``, used by the backup audit).

:func:`sink_for` picks the sink for a destination string. Memory use of both sinks is
bounded by their block/part size, whatever the file size.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import math
import os
import shutil
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

import fsspec
from fsspec.core import split_protocol

from msi_prefect.errors import TransferError
from msi_prefect.transfer.paths import UnsafePathError, resolve_inside, validate_relative_path

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Default multipart part size and read block size of :class:`FsspecSink`.
DEFAULT_PART_SIZE = 8 * MIB
#: Default number of parts uploaded at once. Python allocations peak near
#: ``3 * part_size * max_concurrency`` (botocore copies part bodies): measured 46 MiB for
#: 8 MiB x 2, the same for a 128 MiB and a 1 GiB file.
DEFAULT_MAX_CONCURRENCY = 2
#: S3 refuses parts smaller than this (except the last one).
S3_MIN_PART_SIZE = 5 * MIB
#: S3 allows at most this many parts per multipart upload.
S3_MAX_PARTS = 10_000
#: Object metadata key holding the whole-file SHA-256 (``x-amz-meta-msi-sha256`` on S3).
SHA256_METADATA_KEY = "msi-sha256"
#: Block size used to copy and hash local files.
LOCAL_BLOCK_SIZE = 1 * MIB

_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Name prefix of the temporary file a cross-device copy writes next to its target.
_TEMP_PREFIX = ".msi-tmp-"


@dataclass(frozen=True)
class SinkResult:
    """Where a delivered file ended up.

    Attributes:
        url: URL of the delivered file (``file://`` or the fsspec URL); never holds secrets.
        size: Size in bytes.
        sha256: Hex SHA-256 of the content.
    """

    url: str
    size: int
    sha256: str


class CopyStatus(enum.StrEnum):
    """How the stored copy of a file compares with the size and SHA-256 it should have."""

    OK = "ok"
    MISSING = "missing"
    WRONG_SIZE = "wrong-size"
    WRONG_HASH = "wrong-hash"


class SinkError(TransferError):
    """A file could not be delivered to, or checked at, its destination.

    Not the file's fault: the reassembler treats it as a local error (like a full disk) and
    retries the batch.
    """


class ChecksumMismatchError(SinkError):
    """The stored copy does not have the expected size or SHA-256.

    Attributes:
        url: The checked location.
        expected_size: Size the file should have.
        actual_size: Size found.
        expected_sha256: SHA-256 the file should have.
        actual_sha256: SHA-256 found, or ``None`` when the size already differed.
    """

    def __init__(
        self,
        url: str,
        *,
        expected_size: int,
        actual_size: int,
        expected_sha256: str,
        actual_sha256: str | None,
    ) -> None:
        self.url = url
        self.expected_size = expected_size
        self.actual_size = actual_size
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        if actual_size != expected_size:
            what = f"size is {actual_size} bytes, expected {expected_size}"
        else:
            what = f"SHA-256 is {actual_sha256}, expected {expected_sha256}"
        super().__init__(f"Stored copy at {url} is corrupt: its {what}; it was removed.")


@runtime_checkable
class Sink(Protocol):
    """Final destination of rebuilt files."""

    def deliver(self, staged: Path, relpath: PurePosixPath, size: int, sha256: str) -> SinkResult:
        """Move a staged file to ``relpath`` below the destination.

        Args:
            staged: The staging file; already verified, fsynced and closed. It no longer
                exists once this returns. On error it is left in place for a retry.
            relpath: Relative POSIX path of the file below the destination (untrusted).
            size: Expected size in bytes.
            sha256: Expected hex SHA-256.

        Returns:
            Where the file now is.

        Raises:
            SinkError: If the file could not be delivered or the stored copy is wrong.
        """
        ...

    def store_copy(
        self, source: Path, relpath: PurePosixPath, size: int, sha256: str
    ) -> SinkResult:
        """Copy a file to ``relpath`` below the destination, leaving the source in place.

        The copy is streamed (bounded memory) and verified like :meth:`deliver`; a copy
        that does not match ``size`` and ``sha256`` is removed, never left in place.

        Args:
            source: A regular file; only read.
            relpath: Relative POSIX path of the copy below the destination (untrusted).
            size: Expected size in bytes.
            sha256: Expected hex SHA-256.

        Returns:
            Where the copy is.

        Raises:
            SinkError: If the file could not be copied or the copy is wrong
                (:class:`ChecksumMismatchError`, e.g. the source changed while copied).
        """
        ...

    def exists(self, relpath: PurePosixPath, size: int, sha256: str) -> bool:
        """Tell whether ``relpath`` is present with this size and SHA-256.

        Raises:
            SinkError: If the destination could not be checked (not the same as missing).
        """
        ...

    def check(self, relpath: PurePosixPath, size: int, sha256: str) -> CopyStatus:
        """Tell how the copy at ``relpath`` compares with this size and SHA-256.

        Raises:
            SinkError: If the destination could not be checked (not the same as missing).
        """
        ...

    def url_of(self, relpath: PurePosixPath) -> str:
        """The URL ``relpath`` has below the destination."""
        ...

    def describe(self) -> str:
        """A human description of the destination, free of secrets."""
        ...

    def flush(self) -> None:
        """Make every delivery since the last flush durable.

        Call it before reporting deliveries as done. A local directory batches the fsync of
        its directory entries here (one per directory, not one per file).

        Raises:
            SinkError: If the deliveries could not be made durable.
        """
        ...


def _check_relpath(relpath: PurePosixPath) -> PurePosixPath:
    """Validate an untrusted relative path, turning refusal into a :class:`SinkError`."""
    try:
        return validate_relative_path(relpath.as_posix())
    except UnsafePathError as exc:
        raise SinkError(f"Refusing to deliver {relpath.as_posix()!r}: {exc}") from exc


def _check_source(source: Path, size: int, role: str = "Staged file") -> None:
    """Refuse a source that is missing, not a regular file, or not of the announced size."""
    try:
        info = os.stat(source)
    except OSError as exc:
        raise SinkError(f"{role} {source} cannot be read: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise SinkError(f"{role} {source} is not a regular file.")
    if info.st_size != size:
        raise SinkError(f"{role} {source} has {info.st_size} bytes, expected {size}.")


def _sha256_of_stream(stream: BinaryIO, block_size: int) -> str:
    """Hash a binary stream block by block (memory bounded by ``block_size``)."""
    digest = hashlib.sha256()
    while block := stream.read(block_size):
        digest.update(block)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Make a rename or creation inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDirectorySink:
    """Deliver files into a local directory by atomic rename.

    The consumer stages files under ``root/.msi-staging``, on the same filesystem, so
    delivery is one ``os.replace``: readers see the old generation or the new one, never a
    mix, and a shorter new generation leaves no trailing bytes of the old one.

    Args:
        root: Destination directory; created on first delivery if missing.
    """

    def __init__(self, root: Path) -> None:
        # abspath, not resolve(): a root that is a symlink (/data -> /mnt/data) is allowed.
        self.root = Path(os.path.abspath(root))
        # Directories whose entries changed since the last flush().
        self._unsynced_dirs: set[Path] = set()

    def __repr__(self) -> str:
        return f"LocalDirectorySink({str(self.root)!r})"

    def describe(self) -> str:
        """Human description of the destination."""
        return f"local directory {self.root}"

    def url_of(self, relpath: PurePosixPath) -> str:
        """The ``file://`` URL of ``relpath`` below the destination."""
        return self.target_path(relpath).as_uri()

    def target_path(self, relpath: PurePosixPath) -> Path:
        """The final path of ``relpath``, refused if it could leave the root.

        Raises:
            SinkError: If the path is unsafe (absolute, ``..``, symlink on the way...).
        """
        try:
            return resolve_inside(self.root, relpath)  # validates relpath too
        except UnsafePathError as exc:
            raise SinkError(f"Refusing to deliver {relpath.as_posix()!r}: {exc}") from exc

    def deliver(self, staged: Path, relpath: PurePosixPath, size: int, sha256: str) -> SinkResult:
        """Rename the staged file to ``root/relpath`` and make the rename durable.

        See :meth:`Sink.deliver`.
        """
        _check_source(staged, size)
        target = self.target_path(relpath)
        parent = target.parent
        try:
            created = self._make_parents(parent)
            if created:
                # Re-check: the directories we just created are ours, but a concurrent
                # writer could have swapped a component for a symlink in the meantime.
                target = self.target_path(relpath)
            try:
                os.replace(staged, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_into_place(staged, target)
                staged.unlink()
            self._unsynced_dirs.add(parent)
            self._unsynced_dirs.update(directory.parent for directory in created)
        except OSError as exc:
            raise SinkError(
                f"Cannot deliver {relpath.as_posix()!r} into {self.root}: {exc}"
            ) from exc
        logger.debug("Delivered %s to %s", relpath, target)
        return SinkResult(url=target.as_uri(), size=size, sha256=sha256)

    def store_copy(
        self, source: Path, relpath: PurePosixPath, size: int, sha256: str
    ) -> SinkResult:
        """Copy ``source`` to ``root/relpath``: temporary name, fsync, check, rename.

        The SHA-256 of the bytes copied is checked before the rename, so a wrong copy never
        replaces the file at ``relpath``. The directory entry is made durable by
        :meth:`flush`. See :meth:`Sink.store_copy`.
        """
        _check_source(source, size, "Source file")
        target = self.target_path(relpath)
        try:
            created = self._make_parents(target.parent)
            if created:
                target = self.target_path(relpath)  # see deliver()
            self._copy_into_place(source, target, expected=(size, sha256))
            self._unsynced_dirs.add(target.parent)
            self._unsynced_dirs.update(directory.parent for directory in created)
        except OSError as exc:
            raise SinkError(
                f"Cannot copy {source} to {relpath.as_posix()!r} in {self.root}: {exc}"
            ) from exc
        logger.debug("Copied %s to %s", source, target)
        return SinkResult(url=target.as_uri(), size=size, sha256=sha256)

    def flush(self) -> None:
        """Fsync every directory that gained a file since the last flush.

        See :meth:`Sink.flush`.
        """
        # Deepest first, so a new directory's own entry is durable after its contents.
        for directory in sorted(self._unsynced_dirs, key=lambda d: len(d.parts), reverse=True):
            try:
                _fsync_directory(directory)
            except OSError as exc:
                raise SinkError(f"Cannot make deliveries into {directory} durable: {exc}") from exc
        self._unsynced_dirs.clear()

    def exists(self, relpath: PurePosixPath, size: int, sha256: str) -> bool:
        """Tell whether ``root/relpath`` is a regular file with this size and content.

        The content is hashed (no metadata to trust on a plain filesystem).
        """
        return self.check(relpath, size, sha256) is CopyStatus.OK

    def check(self, relpath: PurePosixPath, size: int, sha256: str) -> CopyStatus:
        """Compare ``root/relpath`` with this size and content (hashed); see :meth:`Sink.check`.

        Anything but a regular file counts as missing.
        """
        target = self.target_path(relpath)
        try:
            if not target.is_file():
                return CopyStatus.MISSING
            if target.stat().st_size != size:
                return CopyStatus.WRONG_SIZE
            with open(target, "rb") as stream:
                matches = _sha256_of_stream(stream, LOCAL_BLOCK_SIZE) == sha256
        except FileNotFoundError:
            return CopyStatus.MISSING
        except OSError as exc:
            raise SinkError(f"Cannot check {target}: {exc}") from exc
        return CopyStatus.OK if matches else CopyStatus.WRONG_HASH

    def _make_parents(self, directory: Path) -> list[Path]:
        """Create ``directory`` and missing parents; return the ones created, top first."""
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            if current == current.parent:
                break
            current = current.parent
        if not missing:
            return []  # the usual case: no mkdir call (and no EEXIST) per delivered file
        directory.mkdir(parents=True, exist_ok=True)
        return list(reversed(missing))

    @staticmethod
    def _copy_into_place(
        source: Path, target: Path, expected: tuple[int, str] | None = None
    ) -> None:
        """Copy to a temporary name beside ``target``, fsync, rename over ``target``.

        Args:
            source: The file to copy; left in place.
            target: Final path.
            expected: Size and SHA-256 the copied bytes must have; checked before the
                rename (a mismatch removes the temporary copy and raises
                :class:`ChecksumMismatchError`).
        """
        # A short fixed-length name: "<prefix><target name>" could exceed NAME_MAX.
        temp = target.parent / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            digest = hashlib.sha256()
            copied = 0
            with open(source, "rb") as src, open(temp, "xb") as dst:
                while block := src.read(LOCAL_BLOCK_SIZE):
                    if expected is not None:
                        digest.update(block)
                    copied += len(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            if expected is not None and (copied, digest.hexdigest()) != expected:
                size, sha256 = expected
                raise ChecksumMismatchError(
                    target.as_uri(),
                    expected_size=size,
                    actual_size=copied,
                    expected_sha256=sha256,
                    actual_sha256=digest.hexdigest() if copied == size else None,
                )
            shutil.copymode(source, temp)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


def _redact_url(url: str) -> str:
    """Drop any ``user:password@`` part of a URL so it can be shown and logged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=host))


class FsspecSink:
    """Upload files to an fsspec URL such as ``s3://bucket/prefix``, then verify them.

    The object of ``relpath`` is ``<prefix>/<relpath>``. Uploads stream from disk in parts
    of ``part_size`` (S3 multipart above two parts), so memory is a small multiple of
    ``part_size * max_concurrency`` whatever the file size. On S3 the SHA-256 is stored as object
    metadata (``x-amz-meta-msi-sha256``); after every upload the object's size is checked and
    its content streamed back and hashed, since a multipart ETag is no content hash. A
    mismatch deletes the object and raises :class:`ChecksumMismatchError`.

    On other fsspec backends the file is written through ``fs.open(..., "wb")`` without
    metadata, and :meth:`exists` hashes the content instead.

    Args:
        url: Destination URL, e.g. ``s3://msi-backup/lab1``.
        storage_options: fsspec options, e.g. ``{"key": ..., "secret": ...,
            "client_kwargs": {"endpoint_url": ...}}``. Never logged or shown.
        part_size: Multipart part size and read block size in bytes (S3: at least 5 MiB).
            Raised automatically when a file would need more than 10,000 parts.
        max_concurrency: Parts uploaded at once (S3 only).

    Raises:
        SinkError: If the URL's protocol is unknown or its package is not installed.
        ValueError: If ``part_size`` or ``max_concurrency`` is out of range.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        self._shown_url = _redact_url(url).rstrip("/")
        try:
            fs, base = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise SinkError(f"Cannot use destination {self._shown_url}: {exc}") from exc
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self._is_s3 = bool(protocols & _S3_PROTOCOLS)
        minimum = S3_MIN_PART_SIZE if self._is_s3 else 1
        if part_size < minimum:
            raise ValueError(f"part_size must be at least {minimum} bytes, got {part_size}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._fs: Any = fs
        self._base = base.rstrip("/")
        self.part_size = part_size
        self.max_concurrency = max_concurrency

    def __repr__(self) -> str:
        # Not a dataclass on purpose: a generated repr would print the storage options.
        return f"FsspecSink({self._shown_url!r})"

    def describe(self) -> str:
        """Human description of the destination (URL without credentials)."""
        return f"fsspec destination {self._shown_url}"

    def object_path(self, relpath: PurePosixPath) -> str:
        """The backend path (``bucket/prefix/relpath`` on S3) of a relative path.

        Raises:
            SinkError: If the path is unsafe; ``..`` would escape the prefix.
        """
        rel = _check_relpath(relpath).as_posix()
        return f"{self._base}/{rel}" if self._base else rel

    def url_of(self, relpath: PurePosixPath) -> str:
        """The URL of the object of ``relpath`` (without credentials)."""
        return _redact_url(self._fs.unstrip_protocol(self.object_path(relpath)))

    def deliver(self, staged: Path, relpath: PurePosixPath, size: int, sha256: str) -> SinkResult:
        """Upload the staged file, verify the stored object, then remove the staged file.

        See :meth:`Sink.deliver`.
        """
        _check_source(staged, size)
        url = self._store(staged, relpath, size, sha256)
        try:
            staged.unlink(missing_ok=True)
        except OSError as exc:
            raise SinkError(
                f"Uploaded {url} but cannot remove staged file {staged}: {exc}"
            ) from exc
        logger.debug("Delivered %s to %s", relpath, url)
        return SinkResult(url=url, size=size, sha256=sha256)

    def store_copy(
        self, source: Path, relpath: PurePosixPath, size: int, sha256: str
    ) -> SinkResult:
        """Upload a copy of ``source`` and verify the stored object; ``source`` stays.

        See :meth:`Sink.store_copy`.
        """
        _check_source(source, size, "Source file")
        url = self._store(source, relpath, size, sha256)
        logger.debug("Copied %s to %s", source, url)
        return SinkResult(url=url, size=size, sha256=sha256)

    def flush(self) -> None:
        """Nothing to do: every upload is verified before :meth:`deliver` returns."""

    def exists(self, relpath: PurePosixPath, size: int, sha256: str) -> bool:
        """Tell whether the object exists with this size and SHA-256.

        The stored SHA-256 metadata is trusted when present; otherwise the object is
        streamed and hashed.
        """
        return self.check(relpath, size, sha256) is CopyStatus.OK

    def check(self, relpath: PurePosixPath, size: int, sha256: str) -> CopyStatus:
        """Compare the object with this size and SHA-256; see :meth:`Sink.check`.

        The stored SHA-256 metadata is trusted when present; otherwise the object is
        streamed and hashed. Anything but a file (a "directory" prefix) counts as missing.
        """
        path = self.object_path(relpath)
        url = self.url_of(relpath)
        try:
            self._fs.invalidate_cache(path)
            info = self._fs.info(path)
            if info.get("type") != "file":
                return CopyStatus.MISSING
            if info.get("size") != size:
                return CopyStatus.WRONG_SIZE
            stored = self._stored_sha256(path)
            actual = stored if stored is not None else self._stream_sha256(path)
        except FileNotFoundError:
            return CopyStatus.MISSING
        except Exception as exc:
            raise SinkError(f"Cannot check {url}: {exc}") from exc
        return CopyStatus.OK if actual == sha256 else CopyStatus.WRONG_HASH

    def _store(self, source: Path, relpath: PurePosixPath, size: int, sha256: str) -> str:
        """Upload ``source`` to the object of ``relpath`` and verify it; return its URL."""
        path = self.object_path(relpath)
        url = self.url_of(relpath)
        try:
            self._upload(source, path, size, sha256)
        except Exception as exc:
            raise SinkError(f"Upload of {relpath.as_posix()!r} to {url} failed: {exc}") from exc
        self._verify(path, url, size, sha256)
        return url

    def _effective_part_size(self, size: int) -> int:
        """The configured part size, raised if the file would need too many parts."""
        if not self._is_s3:
            return self.part_size
        return max(self.part_size, math.ceil(size / S3_MAX_PARTS))

    def _upload(self, staged: Path, path: str, size: int, sha256: str) -> None:
        """Stream the staged file to ``path`` in parts of bounded size."""
        part_size = self._effective_part_size(size)
        if self._is_s3:
            # s3fs reads max_concurrency parts at a time, uploads them, then reads on; a
            # file under two parts goes as one PUT. The object appears only when complete.
            self._fs.put_file(
                str(staged),
                path,
                chunksize=part_size,
                max_concurrency=self.max_concurrency,
                Metadata={SHA256_METADATA_KEY: sha256},
            )
            return
        parent = self._fs._parent(path)
        if parent:
            self._fs.makedirs(parent, exist_ok=True)
        with open(staged, "rb") as src, self._fs.open(path, "wb", block_size=part_size) as dst:
            shutil.copyfileobj(src, dst, part_size)

    def _verify(self, path: str, url: str, size: int, sha256: str) -> None:
        """Check the stored object's size and content; delete it if either is wrong."""
        try:
            self._fs.invalidate_cache(path)
            actual_size = int(self._fs.info(path)["size"])
            actual_sha: str | None = None
            if actual_size == size:
                # Metadata could be right while the bytes are not: always hash the content.
                actual_sha = self._stream_sha256(path)
        except Exception as exc:
            raise SinkError(f"Cannot verify {url} after upload: {exc}") from exc
        if actual_size == size and actual_sha == sha256:
            return
        logger.warning("Stored copy at %s is corrupt; removing it", url)
        try:
            self._fs.rm_file(path)
        except Exception as exc:
            raise SinkError(
                f"Stored copy at {url} is corrupt and removing it failed: {exc}"
            ) from exc
        raise ChecksumMismatchError(
            url,
            expected_size=size,
            actual_size=actual_size,
            expected_sha256=sha256,
            actual_sha256=actual_sha,
        )

    def _stored_sha256(self, path: str) -> str | None:
        """The SHA-256 kept in the object's metadata, if the backend has such metadata."""
        if not self._is_s3:
            return None
        metadata = self._fs.metadata(path)
        value = metadata.get(SHA256_METADATA_KEY)
        return str(value).lower() if value else None

    def _stream_sha256(self, path: str) -> str:
        """Hash the stored object by streaming it in ``part_size`` blocks."""
        # No read-ahead cache on S3: s3fs's default would hold an extra block per read.
        options = {"cache_type": "none"} if self._is_s3 else {}
        with self._fs.open(path, "rb", block_size=self.part_size, **options) as stream:
            return _sha256_of_stream(stream, self.part_size)


def sink_for(destination: str, storage_options: Mapping[str, Any] | None = None) -> Sink:
    """Choose the sink of a destination.

    Args:
        destination: A plain directory path or ``file://`` URL (local directory), or any
            other fsspec URL such as ``s3://bucket/prefix``.
        storage_options: fsspec options (credentials, endpoint); ignored for local paths.

    Returns:
        A :class:`LocalDirectorySink` or a :class:`FsspecSink`.

    Raises:
        SinkError: If the destination is empty, a ``file://`` URL names another host, or the
            protocol is unknown.
    """
    if not destination:
        raise SinkError("The destination is empty; give a directory or a URL like s3://bucket.")
    protocol, _ = split_protocol(destination)
    if protocol is None:
        return LocalDirectorySink(Path(destination).expanduser())
    if protocol in _LOCAL_PROTOCOLS:
        parts = urlsplit(destination)
        if parts.netloc not in ("", "localhost"):
            raise SinkError(
                f"Destination {destination!r} names host {parts.netloc!r}; "
                "file:// URLs must be local."
            )
        # file:// URLs percent-encode (what SinkResult.url emits); decode back to a path.
        return LocalDirectorySink(Path(url2pathname(parts.path)))
    return FsspecSink(destination, storage_options)
