"""A preview picture of a rebuilt file, stored beside its backup and shown in the Prefect UI.

The metadata flows call :func:`store_file_preview` for every file once its metadata is
extracted. For an image-like file (an image MIME type, or an array shape in the metadata)
it renders the preview with :func:`~msi_prefect.metadata.preview.render_preview` (a PNG of
at most 512 px; one strided plane read, so memory stays bounded whatever the file's size),
writes it to the backup store at::

    <backup URL>/.msi-state/previews/<path>.png

and shows it as an image artifact ``preview-<start of the file id>`` of the run, at a
presigned URL the browser can load for :data:`PREVIEW_URL_EXPIRY_S`. ``.msi-state`` is a
first path segment no transfer ever delivers a file to, so a preview can never overwrite
the backup of a lab's own file (``x.tif`` beside a ``x.tif.preview.png`` of its own).

A preview is a convenience: nothing here raises. A file with nothing to show, an
unreachable store or a backup storage that is not S3 ends in a warning in the run's log,
and the metadata is published all the same.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final

from prefect import get_run_logger
from prefect.artifacts import create_image_artifact

from msi_prefect.metadata import FileMetadata
from msi_prefect.metadata.preview import PreviewError, render_preview
from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.flow_inputs import BlockLoadError, RebuiltFile, load_block
from msi_prefect.transfer import STATE_DIR_NAME, SinkError, sink_for

if TYPE_CHECKING:
    import logging

    from msi_prefect.transfer import Sink

__all__ = [
    "PREVIEW_FOLDER",
    "PREVIEW_URL_EXPIRY_S",
    "StoredPreview",
    "is_image_like",
    "load_preview_storage",
    "preview_markdown",
    "preview_relpath",
    "store_file_preview",
]

#: Folder of the previews below the backup URL: inside a name no transfer delivers to.
PREVIEW_FOLDER: Final = PurePosixPath(STATE_DIR_NAME, "previews")
PREVIEW_SUFFIX: Final = ".png"
#: How long the preview's URL works: 7 days, the longest S3 allows for a presigned URL.
#: Running the file's metadata again (``msi-prefect rerun metadata PATH``) signs anew.
PREVIEW_URL_EXPIRY_S: Final = 7 * 24 * 3600
#: Read block size when hashing the rendered PNG.
_HASH_BLOCK_SIZE: Final = 1024 * 1024


@dataclass(frozen=True)
class StoredPreview:
    """A preview PNG stored beside the backup.

    Attributes:
        storage_url: Where the PNG is, as the backup storage names it (``s3://...``).
        image_url: A presigned ``http(s)`` URL a browser can load, valid for
            :data:`PREVIEW_URL_EXPIRY_S`; None when the store has none (a local folder).
        kind: What it shows (``image``, ``middle-frame``, ``spectrum``).
        width: Width in pixels.
        height: Height in pixels.
    """

    storage_url: str
    image_url: str | None
    kind: str
    width: int
    height: int


def is_image_like(metadata: FileMetadata) -> bool:
    """Whether a preview is worth trying: an image MIME type, or an array in the file."""
    return metadata.mime_type.startswith("image/") or bool(metadata.normalized.get("shape"))


def preview_relpath(path: PurePosixPath) -> PurePosixPath:
    """Where the preview of the file ``path`` goes, below :data:`PREVIEW_FOLDER`."""
    return path.parent / f"{path.name}{PREVIEW_SUFFIX}"


def _preview_sink(storage: BackupStorage) -> Sink:
    """A sink rooted at the previews' folder of the backup store.

    Rooted there, not at the backup URL: a sink refuses to deliver below ``.msi-state``,
    the very reason no lab's file can be there.
    """
    return sink_for(f"{storage.url.rstrip('/')}/{PREVIEW_FOLDER}", storage.storage_options())


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


def load_preview_storage(block_name: str | None) -> BackupStorage | None:
    """The backup storage previews go to, or None (and a warning) when it cannot be loaded.

    Args:
        block_name: Name of an ``MSI Backup Storage`` block; None or empty: no previews.
    """
    if not block_name:
        return None
    try:
        return load_block(BackupStorage, block_name)
    except BlockLoadError as exc:
        get_run_logger().warning("No previews in this run: %s", exc)
    except Exception as exc:  # the server's surprise must not fail the metadata run
        get_run_logger().warning("No previews in this run: cannot load %r: %r", block_name, exc)
    return None


def store_file_preview(
    file: RebuiltFile, metadata: FileMetadata, storage: BackupStorage | None, artifact_key: str
) -> StoredPreview | None:
    """Render the file's preview, store it beside the backup, show it as an image artifact.

    Call it from a task or flow run (it logs to the run and creates the artifact there).
    Never raises: a preview that cannot be made or stored is a warning in the run's log.

    Args:
        file: The rebuilt file, checked against its event already.
        metadata: Its metadata (decides whether the file is image-like).
        storage: The backup storage; None makes no preview.
        artifact_key: Key of the image artifact.

    Returns:
        The stored preview, or None when there is none.
    """
    logger = get_run_logger()
    if storage is None or not is_image_like(metadata):
        return None
    try:
        return _store_preview(file, storage, artifact_key, logger)
    except (PreviewError, SinkError, OSError) as exc:
        logger.warning("No preview of %s: %s", file.path, exc)
    except Exception as exc:  # a library's surprise must not fail the metadata run
        logger.warning("No preview of %s: unexpected %r", file.path, exc)
    return None


def _store_preview(
    file: RebuiltFile,
    storage: BackupStorage,
    artifact_key: str,
    logger: logging.Logger | logging.LoggerAdapter,
) -> StoredPreview:
    relpath = preview_relpath(file.path)
    with tempfile.TemporaryDirectory(prefix="msi-preview-") as work:
        # The .png name also gives the stored object its image/png content type.
        rendered = render_preview(file.local_path, Path(work) / f"preview{PREVIEW_SUFFIX}")
        size = rendered.path.stat().st_size
        sink = _preview_sink(storage)
        stored = sink.store_copy(rendered.path, relpath, size, _sha256_of(rendered.path))
    image_url = storage.presigned_url(PREVIEW_FOLDER / relpath, PREVIEW_URL_EXPIRY_S)
    preview = StoredPreview(
        storage_url=stored.url,
        image_url=image_url,
        kind=rendered.kind.value,
        width=rendered.width,
        height=rendered.height,
    )
    if image_url is None:
        logger.warning(
            "The preview of %s is at %s, but the Prefect UI cannot show it: the backup "
            "storage is not S3, so there is no URL a browser may load",
            file.path,
            stored.url,
        )
        return preview
    create_image_artifact(
        image_url=image_url,
        key=artifact_key,
        description=f"Preview of {file.path} (generation {file.generation}, "
        f"{preview.kind}, {preview.width} x {preview.height} px)",
    )
    logger.info(
        "Preview of %s (%s, %d x %d px) stored at %s",
        file.path,
        preview.kind,
        preview.width,
        preview.height,
        stored.url,
    )
    return preview


def preview_markdown(preview: StoredPreview | None) -> str:
    """The markdown artifact's line about the preview (empty when there is none)."""
    if preview is None:
        return ""
    size = f"{preview.width} x {preview.height} px, {preview.kind}"
    if preview.image_url is None:
        where = preview.storage_url.replace("`", "")  # the path is the file's: no code span
        return f"\n\n**Preview**: `{where}` ({size})\n"
    # The URL is ours (signed by the store), not the file's: safe to put in a link.
    return f"\n\n**Preview**: [open the picture]({preview.image_url}) ({size})\n"
