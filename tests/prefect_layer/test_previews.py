"""Previews in the metadata flow: stored beside the backup, an image artifact, never a failure."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path, PurePosixPath

import httpx
import pytest

from msi_prefect.metadata import FileMetadata
from msi_prefect.prefect_layer.previews import (
    PREVIEW_FOLDER,
    StoredPreview,
    is_image_like,
    preview_markdown,
    preview_relpath,
)
from tests.flow_helpers import (
    BUCKET,
    REPO,
    SavedBackupStorage,
    delete_block,
    file_params,
    load_flow,
    read_artifacts,
    unique_name,
)

SAMPLES = (REPO / "../shared/samples").resolve()
SEM_SAMPLE = SAMPLES / "zeiss_sem_512.tif"
# The Zeiss SEM image is 512 x 384 px: its preview keeps that size.
SEM_PREVIEW_SIZE = (512, 384)
# Logs reach the server in batches, a second or two after the run.
LOG_TIMEOUT_S = 15
needs_sample = pytest.mark.skipif(
    not SEM_SAMPLE.is_file(), reason=f"sample {SEM_SAMPLE} is absent (../shared/samples)"
)

# --------------------------------------------------------------------------- unit


def _metadata(mime_type: str, shape: list[int] | None = None) -> FileMetadata:
    record = {
        "relpath": "a",
        "size": 1,
        "sha256": "0" * 64,
        "md5": "0" * 32,
        "mime_type": mime_type,
        "modified_at": "2026-01-01T00:00:00Z",
        "extracted_at": "2026-01-01T00:00:00Z",
        "extractor": "x",
        "extractor_version": "1",
        "normalized": {"shape": shape},
        "details": {},
        "warnings": [],
    }
    return FileMetadata.from_json_dict(record)


def test_a_preview_goes_below_a_folder_no_transfer_delivers_to() -> None:
    assert PurePosixPath(".msi-state/previews") == PREVIEW_FOLDER
    assert preview_relpath(PurePosixPath("runs/7/a.tif")) == PurePosixPath("runs/7/a.tif.png")
    assert preview_relpath(PurePosixPath("a.tif")) == PurePosixPath("a.tif.png")


def test_images_and_arrays_are_image_like_tables_are_not() -> None:
    assert is_image_like(_metadata("image/tiff"))
    assert is_image_like(_metadata("application/octet-stream", [4, 512, 512]))
    assert not is_image_like(_metadata("text/csv"))
    assert not is_image_like(_metadata("application/octet-stream"))


def test_the_markdown_links_the_picture_and_keeps_the_file_path_out_of_code() -> None:
    shown = StoredPreview("s3://b/p/a.tif.png", "http://s3/b/p/a.tif.png?X-Amz=1", "image", 8, 6)
    assert "[open the picture](http://s3/b/p/a.tif.png?X-Amz=1)" in preview_markdown(shown)
    local = StoredPreview("file:///x/`a`.png", None, "image", 8, 6)
    assert "`file:///x/a.png`" in preview_markdown(local)
    assert preview_markdown(None) == ""


def test_an_s3_store_signs_a_url_for_the_browser_a_local_folder_has_none(
    tmp_path: Path,
) -> None:
    from pydantic import SecretStr

    from msi_prefect.prefect_layer.backup.storage import BackupStorage

    s3 = BackupStorage(
        url="s3://msi-backup/backups",
        endpoint_url="http://127.0.0.1:8333",
        access_key_id="AKEXAMPLE",
        secret_access_key=SecretStr("not-in-the-url"),
    )
    url = s3.presigned_url(PREVIEW_FOLDER / "runs/a.tif.png", 3600)
    assert url is not None
    assert url.startswith("http://127.0.0.1:8333/msi-backup/backups/.msi-state/previews/runs/")
    assert "AKEXAMPLE" in url
    assert "not-in-the-url" not in url
    assert BackupStorage(url=str(tmp_path)).presigned_url(PurePosixPath("a.png"), 60) is None


# --------------------------------------------------------------------------- flow (stack)


def _run_log_messages(flow_run_id: uuid.UUID, wanted: str) -> list[str]:
    """The run's log messages, read again until one holds ``wanted`` (logs arrive in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + LOG_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            messages = [log.message for log in logs]
            if any(wanted in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(0.5)


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


@needs_sample
@pytest.mark.stack
def test_the_metadata_flow_stores_and_shows_the_preview_of_an_image(
    kafka_block: str, backup_storage: SavedBackupStorage, topic: str, tmp_path: Path
) -> None:
    params = file_params(tmp_path / "dest", "sem/zeiss.tif", SEM_SAMPLE.read_bytes(), topic)
    extract_metadata_flow = load_flow("flows/extract_metadata.py:extract_metadata_flow")

    state = extract_metadata_flow(
        **params, kafka_block=kafka_block, backup_block=backup_storage.name, return_state=True
    )

    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    key = f"{backup_storage.prefix}/.msi-state/previews/sem/zeiss.tif.png"
    stored = backup_storage.s3_client.get_object(Bucket=BUCKET, Key=key)
    assert stored["ContentType"] == "image/png"
    assert _png_size(stored["Body"].read()) == SEM_PREVIEW_SIZE
    images = read_artifacts(f"preview-{params['file_id'][:12]}", flow_run_id)
    assert [artifact.type for artifact in images] == ["image"]
    image_url = images[0].data
    # The browser's view: no credentials, only the signature in the URL.
    fetched = httpx.get(image_url, timeout=30)
    assert fetched.status_code == 200, fetched.text
    assert _png_size(fetched.content) == SEM_PREVIEW_SIZE
    markdown = read_artifacts(f"metadata-{params['file_id'][:12]}", flow_run_id)
    assert f"[open the picture]({image_url})" in markdown[0].data


@pytest.mark.stack
def test_a_preview_that_fails_leaves_the_metadata_published(
    kafka_block: str, backup_storage: SavedBackupStorage, topic: str, tmp_path: Path
) -> None:
    # A TIFF header and nothing after it: image-like, but no pixels to draw.
    params = file_params(tmp_path / "dest", "broken.tif", b"II*\x00" + b"\x00" * 60, topic)
    extract_metadata_flow = load_flow("flows/extract_metadata.py:extract_metadata_flow")

    state = extract_metadata_flow(
        **params, kafka_block=kafka_block, backup_block=backup_storage.name, return_state=True
    )

    assert state.is_completed(), state.message
    assert state.result().relpath == "broken.tif"
    flow_run_id = state.state_details.flow_run_id
    assert read_artifacts(f"preview-{params['file_id'][:12]}", flow_run_id) == []
    markdown = read_artifacts(f"metadata-{params['file_id'][:12]}", flow_run_id)
    assert "Preview" not in markdown[0].data
    warnings = [m for m in _run_log_messages(flow_run_id, "No preview of") if "No preview" in m]
    assert warnings and "broken.tif" in warnings[0], warnings


@needs_sample
@pytest.mark.stack
def test_the_batch_run_shows_a_preview_for_each_image_of_the_batch(
    kafka_block: str, backup_storage: SavedBackupStorage, topic: str, tmp_path: Path
) -> None:
    image = file_params(tmp_path / "dest", "sem/b.tif", SEM_SAMPLE.read_bytes(), topic)
    table = file_params(tmp_path / "dest", "sem/b.csv", b"x,y\n1,2\n", topic)
    batch_flow = load_flow("flows/process_batch.py:process_batch_flow")

    state = batch_flow(
        files=[image, table],
        kafka_block=kafka_block,
        backup_block=backup_storage.name,
        return_state=True,
    )

    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    images = read_artifacts(f"preview-{image['file_id'][:12]}", flow_run_id)
    assert [artifact.type for artifact in images] == ["image"]
    assert _png_size(httpx.get(images[0].data, timeout=30).content) == SEM_PREVIEW_SIZE
    assert read_artifacts(f"preview-{table['file_id'][:12]}", flow_run_id) == []


@needs_sample
@pytest.mark.stack
def test_a_local_backup_folder_gets_the_preview_but_no_image_artifact(
    kafka_block: str, prefect_api: str, topic: str, tmp_path: Path
) -> None:
    from msi_prefect.prefect_layer.backup.storage import BackupStorage

    backups = tmp_path / "backups"
    block_name = unique_name("backup-local")
    BackupStorage(url=str(backups)).save(block_name)
    params = file_params(tmp_path / "dest", "c.tif", SEM_SAMPLE.read_bytes(), topic)
    extract_metadata_flow = load_flow("flows/extract_metadata.py:extract_metadata_flow")
    try:
        state = extract_metadata_flow(
            **params, kafka_block=kafka_block, backup_block=block_name, return_state=True
        )
    finally:
        delete_block(BackupStorage, block_name)

    assert state.is_completed(), state.message
    stored = backups / ".msi-state" / "previews" / "c.tif.png"
    assert _png_size(stored.read_bytes()) == SEM_PREVIEW_SIZE
    flow_run_id = state.state_details.flow_run_id
    assert read_artifacts(f"preview-{params['file_id'][:12]}", flow_run_id) == []
    markdown = read_artifacts(f"metadata-{params['file_id'][:12]}", flow_run_id)
    assert "c.tif.png" in markdown[0].data
    messages = _run_log_messages(flow_run_id, "cannot show it")
    assert any("cannot show it" in m for m in messages), messages
