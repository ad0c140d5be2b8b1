"""Read a rebuilt file by its URL, on a host that cannot see the storage host's disk.

A facility runs ``reconstruct-files`` on a storage host and the downstream flows (backup,
metadata, analysis) on compute hosts. A compute host does not see the storage host's
folders, so when ``reconstruct-files`` rebuilds into an S3 destination, the event's ``url``
is an ``s3://`` URL and the downstream steps read the object itself:
:func:`fetch_verified` streams it into a local copy (bounded memory), hashes it on the
way, and renames it into place only when its size and SHA-256 are the ones the event
announced. The extractors and the user's analysis then read an ordinary local file.

Credentials and endpoint come from the worker's environment, as for the storage host's
``reconstruct-files`` (s3fs's default chain: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, and ``AWS_ENDPOINT_URL`` for an S3-compatible store). Local
copies go below ``$MSI_FETCH_DIR`` (default: the system's temporary folder), in a folder
of the process that fetched them, removed when that process (one flow run) ends.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from msi_prefect.errors import MsiError

__all__ = [
    "ENDPOINT_ENV",
    "FETCH_DIR_ENV",
    "REMOTE_PROTOCOLS",
    "RemoteFileMismatchError",
    "RemoteFileMissingError",
    "RemoteReadError",
    "RemoteSettingMissingError",
    "fetch_root",
    "fetch_verified",
]

#: Where local copies of files read by URL are kept while a flow run uses them.
FETCH_DIR_ENV = "MSI_FETCH_DIR"
#: The S3-compatible store's endpoint (empty or unset: AWS S3 itself).
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
#: URL schemes of rebuilt files a downstream step reads by URL.
REMOTE_PROTOCOLS = frozenset({"s3", "s3a"})
#: Read block size: memory per fetch is one block.
FETCH_BLOCK_SIZE = 8 * 1024 * 1024
# botocore's exception names, compared by name so this module needs no botocore import.
_NO_CREDENTIALS_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError"})
_NO_ENDPOINT_ERRORS = frozenset({"EndpointConnectionError", "ConnectTimeoutError"})
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a store "
    "other than AWS S3) in this worker's environment, the same values the storage host's "
    "reconstruct-files uses"
)


class RemoteReadError(MsiError):
    """A rebuilt file could not be read by its URL (the store may be away; retry)."""


class RemoteSettingMissingError(RemoteReadError):
    """This worker lacks a setting it needs to read the URL; retrying will not help."""


class RemoteFileMissingError(RemoteReadError):
    """No object is at the URL (deleted since it was rebuilt)."""


class RemoteFileMismatchError(RemoteReadError):
    """The object at the URL is not the file the event announced."""


_process_root: Path | None = None


def fetch_root() -> Path:
    """The folder of this process's local copies (not created here).

    One folder per process: each flow run is a process of its own, and its copies go
    when it ends.
    """
    base = os.environ.get(FETCH_DIR_ENV) or tempfile.gettempdir()
    return Path(base) / f"msi-fetched-{os.getpid()}"


def _remove_on_exit(root: Path) -> None:
    global _process_root
    if _process_root == root:
        return
    _process_root = root
    atexit.register(shutil.rmtree, root, ignore_errors=True)


def storage_options() -> dict[str, Any]:
    """fsspec options from the environment: the endpoint of an S3-compatible store."""
    endpoint = os.environ.get(ENDPOINT_ENV, "").strip()
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def _explain(url: str, exc: BaseException) -> RemoteReadError:
    name = type(exc).__name__
    chain = {type(cause).__name__ for cause in (exc, exc.__cause__, exc.__context__) if cause}
    if chain & _NO_CREDENTIALS_ERRORS:
        return RemoteSettingMissingError(
            f"cannot read {url}: this worker has no S3 credentials; {_CREDENTIALS_HINT}"
        )
    if chain & _NO_ENDPOINT_ERRORS:
        return RemoteReadError(
            f"cannot reach the store of {url} ({exc}); check {ENDPOINT_ENV} in this "
            "worker's environment (the storage host's S3 endpoint, reachable from here)"
        )
    if isinstance(exc, PermissionError):
        return RemoteSettingMissingError(
            f"cannot read {url}: access denied ({exc}); {_CREDENTIALS_HINT}, with read access "
            "to the bucket"
        )
    return RemoteReadError(f"cannot read {url}: {name}: {exc}")


def fetch_verified(url: str, target: Path, size: int, sha256: str) -> None:
    """Copy the object at ``url`` to ``target``, verified against ``size`` and ``sha256``.

    A ``target`` already present with the announced size was verified by an earlier call
    of this process (it is renamed into place only after its check) and is kept.

    Args:
        url: The rebuilt file's ``s3://`` URL.
        target: Where the local copy goes, below :func:`fetch_root`.
        size: Size in bytes the event announced.
        sha256: Lower-case hex SHA-256 the event announced.

    Raises:
        RemoteFileMissingError: No object at the URL.
        RemoteFileMismatchError: The object differs from the announced size or SHA-256.
        RemoteSettingMissingError: The worker lacks credentials; the message names them.
        RemoteReadError: The store could not be read (retry).
    """
    with contextlib.suppress(FileNotFoundError):
        if target.stat().st_size == size:
            return
    import fsspec

    root = fetch_root()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_on_exit(root)
    partial = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    written = 0
    try:
        # A fresh client: fsspec's cached one would keep credentials the environment lost.
        fs, object_path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **storage_options())
        source = fs.open(object_path, "rb", block_size=FETCH_BLOCK_SIZE, cache_type="none")
        with source as src, open(partial, "wb") as dst:
            while block := src.read(FETCH_BLOCK_SIZE):
                written += len(block)
                if written > size:
                    break  # a larger object: no need to read the rest of it
                digest.update(block)
                dst.write(block)
    except FileNotFoundError:
        partial.unlink(missing_ok=True)
        raise RemoteFileMissingError(
            f"{url} no longer exists; was it deleted after it was rebuilt?"
        ) from None
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise _explain(url, exc) from exc
    actual = digest.hexdigest()
    if written != size or actual != sha256:
        partial.unlink(missing_ok=True)
        what = (
            f"it has {'more than ' if written > size else ''}{written} bytes, the event "
            f"announced {size}"
            if written != size
            else f"its SHA-256 is {actual}, the event announced {sha256}"
        )
        raise RemoteFileMismatchError(f"{url} changed since it was rebuilt: {what}")
    os.replace(partial, target)
