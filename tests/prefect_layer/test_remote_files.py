"""Downstream steps read a rebuilt file by its s3:// URL (a compute host sees no local copy).

Against the real S3 store (SeaweedFS) of the session's stack: the object is fetched into a
local copy only when its size and SHA-256 are the announced ones, and every failure says
what is wrong, naming the setting a worker lacks.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.prefect_layer.events import FileFacts
from msi_prefect.prefect_layer.flow_inputs import FileChangedError, FileInputError, RebuiltFile
from msi_prefect.prefect_layer.remote_files import FETCH_DIR_ENV
from msi_prefect.stack.config import BACKUP_BUCKET
from msi_prefect.transfer.wire import file_id_for
from tests.conftest import RunningStack
from tests.flow_helpers import s3_client

RELPATH = "run 7/frame 0001.tif"
DATA = b"\x00\x01 detector frame " * 40_000


def s3_params(url: str, data: bytes = DATA) -> dict[str, Any]:
    return FileFacts(
        topic="lab.raw",
        file_id=file_id_for(RELPATH),
        generation=1,
        path=RELPATH,
        url=url,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    ).parameters()


@pytest.fixture
def s3_object(
    kafka_stack: RunningStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """An object below a private prefix of the store; this process has the worker's env."""
    env = kafka_stack.s3_env()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("AWS_DEFAULT_REGION", env["AWS_DEFAULT_REGION"])
    monkeypatch.setenv(FETCH_DIR_ENV, str(tmp_path / "fetched"))
    prefix = f"remote-{uuid.uuid4().hex[:8]}"
    client = s3_client(env)
    client.put_object(Bucket=BACKUP_BUCKET, Key=f"{prefix}/{RELPATH}", Body=DATA)
    try:
        yield f"s3://{BACKUP_BUCKET}/{prefix}/{RELPATH}"
    finally:
        client.delete_object(Bucket=BACKUP_BUCKET, Key=f"{prefix}/{RELPATH}")


@pytest.mark.stack
def test_a_file_named_by_s3_url_is_fetched_verified(s3_object: str, tmp_path: Path) -> None:
    file = RebuiltFile.from_parameters(**s3_params(s3_object))

    assert file.remote_url == s3_object
    assert not file.local_path.exists()  # nothing is read before a step needs it
    file.check_unchanged(hash_content=False)

    assert file.local_path.read_bytes() == DATA
    assert file.local_path.is_relative_to(tmp_path / "fetched")
    file.check_unchanged(hash_content=True)  # the verified copy is kept, not fetched again


@pytest.mark.stack
def test_an_object_that_differs_from_the_event_is_refused(s3_object: str) -> None:
    changed = s3_params(s3_object, b"X" + DATA[1:])
    with pytest.raises(FileChangedError, match="changed since it was rebuilt: its SHA-256"):
        RebuiltFile.from_parameters(**changed).check_unchanged()
    longer = s3_params(s3_object, DATA[:-10])
    with pytest.raises(FileChangedError, match="more than"):
        RebuiltFile.from_parameters(**longer).check_unchanged()
    missing = s3_params(s3_object.replace("remote-", "gone-"))
    with pytest.raises(FileChangedError, match="no longer exists"):
        RebuiltFile.from_parameters(**missing).check_unchanged()


@pytest.mark.stack
def test_a_worker_without_credentials_is_told_which_settings_it_lacks(
    s3_object: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    # No other source of credentials: no ~/.aws files, no instance metadata (no network).
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    file = RebuiltFile.from_parameters(**s3_params(s3_object))

    with pytest.raises(FileInputError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        file.check_unchanged()
    assert not file.local_path.exists()


def test_a_local_url_this_host_cannot_see_names_the_missing_setting(tmp_path: Path) -> None:
    """A compute host with the storage host's folder hidden: the message says what to set."""
    (tmp_path / "dest").mkdir()
    url = (tmp_path / "dest" / "run 7" / "frame 0001.tif").as_uri()
    file = RebuiltFile.from_parameters(**s3_params(url))

    with pytest.raises(FileChangedError, match="MSI_DESTINATION_DIR=s3://") as error:
        file.check_unchanged(hash_content=False)
    assert "another host than reconstruct-files" in str(error.value)


@pytest.mark.stack
def test_a_fetched_copy_is_described_without_a_second_hashing_pass(s3_object: str) -> None:
    from msi_prefect.prefect_layer.metadata_tasks import describe_rebuilt_file

    file = RebuiltFile.from_parameters(**s3_params(s3_object))
    file.check_unchanged(hash_content=False)  # the fetch checks the SHA-256 on the way
    # Same size, other bytes, after the fetch: a second hashing pass would refuse them.
    file.local_path.write_bytes(b"Y" * len(DATA))

    metadata = describe_rebuilt_file(file, announced_at=None)

    assert metadata.sha256 == file.sha256
    assert metadata.size == len(DATA)
