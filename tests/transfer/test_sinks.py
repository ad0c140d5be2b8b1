"""Sinks: local directory delivery (unit) and S3 delivery against the embedded stack."""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from msi_prefect.transfer import sinks
from msi_prefect.transfer.sinks import (
    ChecksumMismatchError,
    CopyStatus,
    FsspecSink,
    LocalDirectorySink,
    Sink,
    SinkError,
    SinkResult,
    sink_for,
)

MIB = 1024 * 1024
BUCKET = "msi-backup"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def stage(tmp_path: Path) -> Callable[[bytes], Path]:
    """Write bytes into a fresh staging file under the test's root/.msi-staging."""
    staging = tmp_path / "root" / ".msi-staging"
    staging.mkdir(parents=True)

    def make(data: bytes) -> Path:
        path = staging / f"{uuid.uuid4().hex}.part"
        path.write_bytes(data)
        return path

    return make


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


# --------------------------------------------------------------------------- local sink


def test_local_delivers_and_consumes_staged_file(root: Path, stage: Callable[[bytes], Path]):
    data = b"diffraction pattern\n" * 100
    staged = stage(data)
    sink = LocalDirectorySink(root)

    result = sink.deliver(staged, PurePosixPath("scan.h5"), len(data), sha256_hex(data))

    target = root / "scan.h5"
    assert target.read_bytes() == data
    assert not staged.exists()
    assert result == SinkResult(url=target.as_uri(), size=len(data), sha256=sha256_hex(data))
    assert isinstance(sink, Sink)


def test_local_creates_nested_directories(root: Path, stage: Callable[[bytes], Path]):
    data = b"x" * 10
    rel = PurePosixPath("2024/run 12:30/detector/frame_0001.tif")

    LocalDirectorySink(root).deliver(stage(data), rel, len(data), sha256_hex(data))

    assert (root / "2024" / "run 12:30" / "detector" / "frame_0001.tif").read_bytes() == data


def test_local_replace_with_shorter_generation_leaves_no_stale_bytes(
    root: Path, stage: Callable[[bytes], Path]
):
    sink = LocalDirectorySink(root)
    rel = PurePosixPath("a/data.bin")
    old, new = b"OLD-GENERATION-" * 1000, b"new"
    sink.deliver(stage(old), rel, len(old), sha256_hex(old))

    sink.deliver(stage(new), rel, len(new), sha256_hex(new))

    assert (root / "a" / "data.bin").read_bytes() == new
    assert sink.exists(rel, len(new), sha256_hex(new))


@pytest.mark.parametrize("raw", ["../escape.bin", "/etc/passwd", "a/../../b", ".msi-state/x"])
def test_local_refuses_unsafe_paths(
    tmp_path: Path, root: Path, stage: Callable[[bytes], Path], raw: str
):
    staged = stage(b"evil")
    with pytest.raises(SinkError, match="Refusing"):
        LocalDirectorySink(root).deliver(staged, PurePosixPath(raw), 4, sha256_hex(b"evil"))
    assert staged.exists()  # left for the caller to quarantine
    assert not (tmp_path / "escape.bin").exists()
    assert not (tmp_path / "b").exists()


def test_local_refuses_symlink_escape(tmp_path: Path, root: Path, stage: Callable[[bytes], Path]):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    staged = stage(b"evil")

    with pytest.raises(SinkError, match="symlink"):
        LocalDirectorySink(root).deliver(
            staged, PurePosixPath("link/x.bin"), 4, sha256_hex(b"evil")
        )
    assert list(outside.iterdir()) == []
    assert staged.exists()


def test_local_refuses_staged_file_of_wrong_size(root: Path, stage: Callable[[bytes], Path]):
    staged = stage(b"abc")
    with pytest.raises(SinkError, match="expected 4"):
        LocalDirectorySink(root).deliver(staged, PurePosixPath("x"), 4, sha256_hex(b"abc"))
    assert not (root / "x").exists()


def test_local_target_that_is_a_directory_is_a_sink_error(
    root: Path, stage: Callable[[bytes], Path]
):
    (root / "taken" / "sub").mkdir(parents=True)
    staged = stage(b"abc")
    with pytest.raises(SinkError, match="Cannot deliver"):
        LocalDirectorySink(root).deliver(staged, PurePosixPath("taken"), 3, sha256_hex(b"abc"))
    assert staged.exists()


def test_local_falls_back_to_copy_across_devices(
    root: Path, stage: Callable[[bytes], Path], monkeypatch: pytest.MonkeyPatch
):
    data = os.urandom(3 * MIB + 7)
    staged = stage(data)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(src) == staged:  # only the staged file "lives on another device"
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(sinks.os, "replace", replace)
    sink = LocalDirectorySink(root)
    rel = PurePosixPath("far/away.bin")

    sink.deliver(staged, rel, len(data), sha256_hex(data))

    assert (root / "far" / "away.bin").read_bytes() == data
    assert not staged.exists()
    assert [p.name for p in (root / "far").iterdir()] == ["away.bin"]  # no temp left over


def test_local_exists(root: Path, stage: Callable[[bytes], Path]):
    sink = LocalDirectorySink(root)
    data = b"content"
    rel = PurePosixPath("d/f.txt")
    assert not sink.exists(rel, len(data), sha256_hex(data))
    sink.deliver(stage(data), rel, len(data), sha256_hex(data))

    assert sink.exists(rel, len(data), sha256_hex(data))
    assert not sink.exists(rel, len(data) + 1, sha256_hex(data))
    assert not sink.exists(rel, len(data), sha256_hex(b"other!!"))
    assert not sink.exists(PurePosixPath("d"), 0, sha256_hex(b""))  # a directory


def test_local_describe(root: Path):
    assert str(root) in LocalDirectorySink(root).describe()


# --------------------------------------------------------------------------- local store_copy


@pytest.fixture
def source(tmp_path: Path) -> Callable[[bytes], Path]:
    """Write bytes into a file outside the sink's root (a rebuilt file to back up)."""
    folder = tmp_path / "rebuilt"
    folder.mkdir()

    def make(data: bytes) -> Path:
        path = folder / f"{uuid.uuid4().hex}.bin"
        path.write_bytes(data)
        path.chmod(0o640)
        return path

    return make


def test_local_store_copy_leaves_source_and_verifies(root: Path, source: Callable[[bytes], Path]):
    data = os.urandom(3 * MIB + 5)  # several copy blocks
    original = source(data)
    sink = LocalDirectorySink(root)
    rel = PurePosixPath("backup/run 1/a.tif")

    result = sink.store_copy(original, rel, len(data), sha256_hex(data))
    sink.flush()

    copy = root / "backup" / "run 1" / "a.tif"
    assert result == SinkResult(copy.as_uri(), len(data), sha256_hex(data))
    assert original.read_bytes() == data  # untouched
    assert copy.read_bytes() == data
    assert copy.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in copy.parent.iterdir()] == ["a.tif"]  # no temp left over
    assert sink.check(rel, len(data), sha256_hex(data)) is CopyStatus.OK


def test_local_store_copy_of_changed_source_keeps_old_copy(
    root: Path, source: Callable[[bytes], Path]
):
    sink = LocalDirectorySink(root)
    rel = PurePosixPath("x.bin")
    old = b"good old backup"
    sink.store_copy(source(old), rel, len(old), sha256_hex(old))
    changed = source(b"changed content")  # same size as announced, other bytes

    with pytest.raises(ChecksumMismatchError) as caught:
        sink.store_copy(changed, rel, len(b"changed content"), sha256_hex(b"expected bytes!"))

    assert caught.value.actual_sha256 == sha256_hex(b"changed content")
    assert (root / "x.bin").read_bytes() == old  # the wrong copy never replaced it
    assert [p.name for p in root.iterdir()] == ["x.bin"]
    assert changed.read_bytes() == b"changed content"


def test_local_store_copy_refuses_bad_sources_and_paths(
    tmp_path: Path, root: Path, source: Callable[[bytes], Path]
):
    sink = LocalDirectorySink(root)
    data = b"abc"
    with pytest.raises(SinkError, match="not a regular file"):
        sink.store_copy(tmp_path, PurePosixPath("d"), 0, sha256_hex(b""))
    with pytest.raises(SinkError, match="expected 4"):
        sink.store_copy(source(data), PurePosixPath("y"), 4, sha256_hex(data))
    with pytest.raises(SinkError, match="cannot be read"):
        sink.store_copy(tmp_path / "missing", PurePosixPath("y"), 3, sha256_hex(data))
    with pytest.raises(SinkError, match="Refusing"):
        sink.store_copy(source(data), PurePosixPath("../escape"), 3, sha256_hex(data))
    assert not (tmp_path / "escape").exists()


def test_local_check_tells_what_is_wrong(root: Path, stage: Callable[[bytes], Path]):
    sink = LocalDirectorySink(root)
    data = b"content"
    rel = PurePosixPath("d/f.txt")
    assert sink.check(rel, len(data), sha256_hex(data)) is CopyStatus.MISSING
    sink.deliver(stage(data), rel, len(data), sha256_hex(data))

    assert sink.check(rel, len(data), sha256_hex(data)) is CopyStatus.OK
    assert sink.check(rel, len(data) + 1, sha256_hex(data)) is CopyStatus.WRONG_SIZE
    assert sink.check(rel, len(data), sha256_hex(b"other!!")) is CopyStatus.WRONG_HASH
    assert sink.check(PurePosixPath("d"), 0, sha256_hex(b"")) is CopyStatus.MISSING


# --------------------------------------------------------------------------- sink_for


def test_sink_for_plain_path_and_file_url(tmp_path: Path):
    plain = sink_for(str(tmp_path / "dest"), None)
    assert isinstance(plain, LocalDirectorySink)
    assert plain.root == tmp_path / "dest"

    spaced = tmp_path / "my dest"
    from_url = sink_for(spaced.as_uri(), {"ignored": True})
    assert isinstance(from_url, LocalDirectorySink)
    assert from_url.root == spaced


def test_sink_for_remote_urls():
    assert isinstance(sink_for("s3://bucket/prefix", {"key": "k", "secret": "s"}), FsspecSink)
    assert isinstance(sink_for("memory://somewhere", None), FsspecSink)


@pytest.mark.parametrize("dest", ["", "file://otherhost/data", "nosuchproto://x/y"])
def test_sink_for_refuses_bad_destinations(dest: str):
    with pytest.raises(SinkError):
        sink_for(dest, None)


# --------------------------------------------------------------------------- fsspec sink, no server


def test_fsspec_sink_hides_secrets():
    secret = "TOP-SECRET-VALUE"
    sink = FsspecSink("s3://bucket/pre/", {"key": "AKIAEXAMPLE", "secret": secret})
    assert sink.describe() == "fsspec destination s3://bucket/pre"
    assert secret not in repr(sink)
    assert secret not in sink.url_of(PurePosixPath("a/b"))


def test_redact_url_drops_credentials():
    assert sinks._redact_url("ftp://user:pw@host:21/dir") == "ftp://host:21/dir"
    assert sinks._redact_url("s3://bucket/prefix") == "s3://bucket/prefix"


def test_fsspec_sink_rejects_bad_settings():
    with pytest.raises(ValueError, match="part_size"):
        FsspecSink("s3://bucket", {}, part_size=1 * MIB)
    with pytest.raises(ValueError, match="max_concurrency"):
        FsspecSink("s3://bucket", {}, max_concurrency=0)


def test_fsspec_sink_object_path_refuses_escape():
    sink = FsspecSink("s3://bucket/prefix", {})
    assert sink.object_path(PurePosixPath("a/b.bin")) == "bucket/prefix/a/b.bin"
    with pytest.raises(SinkError):
        sink.object_path(PurePosixPath("../other-prefix/x"))


@pytest.fixture
def memory_sink() -> Iterator[FsspecSink]:
    """A generic (non-S3) fsspec sink on a private in-memory filesystem."""
    import fsspec

    base = f"memory://sink-test-{uuid.uuid4().hex}"
    yield FsspecSink(base, None, part_size=64 * 1024)
    fsspec.filesystem("memory").rm(base, recursive=True)


def test_generic_fsspec_sink_round_trip(memory_sink: FsspecSink, stage: Callable[[bytes], Path]):
    data = os.urandom(200_000)
    rel = PurePosixPath("x/y.bin")
    staged = stage(data)

    result = memory_sink.deliver(staged, rel, len(data), sha256_hex(data))

    assert not staged.exists()
    assert result.url.startswith("memory://") and result.url.endswith("/x/y.bin")
    assert memory_sink.exists(rel, len(data), sha256_hex(data))  # stream-hash, no metadata
    assert not memory_sink.exists(rel, len(data), sha256_hex(b"nope"))
    assert not memory_sink.exists(PurePosixPath("missing"), 1, sha256_hex(b"x"))


def test_generic_fsspec_store_copy_and_check(memory_sink: FsspecSink, tmp_path: Path):
    data = os.urandom(150_000)
    original = tmp_path / "rebuilt.bin"
    original.write_bytes(data)
    rel = PurePosixPath("copies/rebuilt.bin")

    result = memory_sink.store_copy(original, rel, len(data), sha256_hex(data))

    assert original.read_bytes() == data
    assert result.url == memory_sink.url_of(rel)
    assert memory_sink.check(rel, len(data), sha256_hex(data)) is CopyStatus.OK
    assert memory_sink.check(rel, len(data) - 1, sha256_hex(data)) is CopyStatus.WRONG_SIZE
    assert memory_sink.check(rel, len(data), sha256_hex(b"x")) is CopyStatus.WRONG_HASH
    assert memory_sink.check(PurePosixPath("nope"), 1, sha256_hex(b"x")) is CopyStatus.MISSING


def test_generic_fsspec_store_copy_of_changed_source_stores_nothing(
    memory_sink: FsspecSink, tmp_path: Path
):
    original = tmp_path / "changed.bin"
    original.write_bytes(b"new bytes")
    rel = PurePosixPath("changed.bin")

    with pytest.raises(ChecksumMismatchError):
        memory_sink.store_copy(original, rel, 9, sha256_hex(b"old bytes"))

    assert memory_sink.check(rel, 9, sha256_hex(b"new bytes")) is CopyStatus.MISSING
    assert original.read_bytes() == b"new bytes"


# --------------------------------------------------------------------------- S3 (real stack)


@pytest.fixture
def s3_env(kafka_stack: Any) -> dict[str, str]:
    env: dict[str, str] = kafka_stack.s3_env()
    return env


@pytest.fixture
def s3_options(s3_env: dict[str, str]) -> dict[str, Any]:
    return {
        "key": s3_env["AWS_ACCESS_KEY_ID"],
        "secret": s3_env["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {
            "endpoint_url": s3_env["AWS_ENDPOINT_URL"],
            "region_name": s3_env["AWS_DEFAULT_REGION"],
        },
    }


@pytest.fixture
def s3_client(s3_env: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3_env["AWS_DEFAULT_REGION"],
    )


@pytest.fixture
def s3_prefix(s3_client: Any) -> Iterator[str]:
    """A private key prefix in the backup bucket; every object under it is removed after."""
    prefix = f"sink-tests/{uuid.uuid4().hex}"
    yield prefix
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            s3_client.delete_object(Bucket=BUCKET, Key=obj["Key"])


@pytest.fixture
def s3_sink(s3_options: dict[str, Any], s3_prefix: str) -> FsspecSink:
    return FsspecSink(f"s3://{BUCKET}/{s3_prefix}", s3_options, part_size=5 * MIB)


def head(s3_client: Any, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        result: dict[str, Any] = s3_client.head_object(Bucket=BUCKET, Key=key)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return result


@pytest.mark.stack
def test_s3_small_file(
    s3_sink: FsspecSink, s3_client: Any, s3_prefix: str, stage: Callable[[bytes], Path]
):
    data = b"small file\n" * 50
    staged = stage(data)
    rel = PurePosixPath("lab 1/run:7/small.txt")

    result = s3_sink.deliver(staged, rel, len(data), sha256_hex(data))

    key = f"{s3_prefix}/{rel}"
    assert result == SinkResult(f"s3://{BUCKET}/{key}", len(data), sha256_hex(data))
    assert not staged.exists()
    body = s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == data
    assert head(s3_client, key)["Metadata"] == {"msi-sha256": sha256_hex(data)}  # type: ignore[index]


@pytest.mark.stack
def test_s3_multipart_file(
    s3_sink: FsspecSink, s3_client: Any, s3_prefix: str, stage: Callable[[bytes], Path]
):
    data = os.urandom(20 * MIB + 123)
    rel = PurePosixPath("big/frames.bin")

    s3_sink.deliver(stage(data), rel, len(data), sha256_hex(data))

    info = head(s3_client, f"{s3_prefix}/{rel}")
    assert info is not None
    assert info["ContentLength"] == len(data)
    # A multipart ETag is "<md5 of part md5s>-<parts>": 20 MiB in 5 MiB parts is 5 parts.
    assert info["ETag"].strip('"').endswith("-5")
    assert info["Metadata"] == {"msi-sha256": sha256_hex(data)}
    assert s3_sink.exists(rel, len(data), sha256_hex(data))


@pytest.mark.stack
def test_s3_replace_with_shorter_generation(
    s3_sink: FsspecSink, s3_client: Any, s3_prefix: str, stage: Callable[[bytes], Path]
):
    rel = PurePosixPath("gen.bin")
    old, new = b"O" * 10_000, b"new"
    s3_sink.deliver(stage(old), rel, len(old), sha256_hex(old))
    s3_sink.deliver(stage(new), rel, len(new), sha256_hex(new))

    assert s3_client.get_object(Bucket=BUCKET, Key=f"{s3_prefix}/gen.bin")["Body"].read() == new
    assert s3_sink.exists(rel, len(new), sha256_hex(new))
    assert not s3_sink.exists(rel, len(old), sha256_hex(old))


@pytest.mark.stack
@pytest.mark.parametrize("corrupt", ["flipped-byte", "truncated"])
def test_s3_verification_catches_corrupted_object(
    s3_sink: FsspecSink,
    s3_client: Any,
    s3_prefix: str,
    stage: Callable[[bytes], Path],
    monkeypatch: pytest.MonkeyPatch,
    corrupt: str,
):
    data = os.urandom(12 * MIB)  # multipart with 5 MiB parts
    sha = sha256_hex(data)
    rel = PurePosixPath("corrupt/me.bin")
    key = f"{s3_prefix}/{rel}"
    bad = (
        data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        if corrupt == "flipped-byte"
        else data[:-1]
    )
    real_upload = s3_sink._upload

    def upload_then_corrupt(staged: Path, path: str, size: int, sha256: str) -> None:
        real_upload(staged, path, size, sha256)
        # Storage rot after the upload; the metadata still claims the right SHA-256, so only
        # hashing the content back can notice.
        s3_client.put_object(Bucket=BUCKET, Key=key, Body=bad, Metadata={"msi-sha256": sha})

    monkeypatch.setattr(s3_sink, "_upload", upload_then_corrupt)
    staged = stage(data)

    with pytest.raises(ChecksumMismatchError) as caught:
        s3_sink.deliver(staged, rel, len(data), sha)

    error = caught.value
    assert error.url == f"s3://{BUCKET}/{key}"
    assert error.expected_sha256 == sha
    if corrupt == "truncated":
        assert error.actual_size == len(data) - 1
        assert error.actual_sha256 is None
    else:
        assert error.actual_sha256 == sha256_hex(bad)
    assert head(s3_client, key) is None  # the bad object was removed
    assert staged.exists()  # kept for a retry


@pytest.mark.stack
def test_s3_exists(
    s3_sink: FsspecSink, s3_client: Any, s3_prefix: str, stage: Callable[[bytes], Path]
):
    data = b"audit me" * 1000
    sha = sha256_hex(data)
    rel = PurePosixPath("audit/file.bin")
    assert not s3_sink.exists(rel, len(data), sha)

    s3_sink.deliver(stage(data), rel, len(data), sha)

    assert s3_sink.exists(rel, len(data), sha)
    assert not s3_sink.exists(rel, len(data) - 1, sha)
    assert not s3_sink.exists(rel, len(data), sha256_hex(b"other"))
    assert not s3_sink.exists(PurePosixPath("audit"), 0, sha256_hex(b""))  # a "directory"


@pytest.mark.stack
def test_s3_exists_without_metadata_hashes_content(
    s3_sink: FsspecSink, s3_client: Any, s3_prefix: str
):
    data = b"uploaded by someone else"
    s3_client.put_object(Bucket=BUCKET, Key=f"{s3_prefix}/foreign.bin", Body=data)
    rel = PurePosixPath("foreign.bin")

    assert s3_sink.exists(rel, len(data), sha256_hex(data))
    assert not s3_sink.exists(rel, len(data), sha256_hex(b"x" * len(data)))


@pytest.mark.stack
def test_s3_describe_and_errors_hold_no_secret(
    s3_options: dict[str, Any], s3_prefix: str, stage: Callable[[bytes], Path]
):
    secret = s3_options["secret"]
    sink = sink_for(f"s3://{BUCKET}/{s3_prefix}", s3_options)
    assert secret not in sink.describe()
    assert secret not in repr(sink)

    wrong = {**s3_options, "secret": "definitely-wrong-secret"}
    bad_sink = sink_for(f"s3://{BUCKET}/{s3_prefix}", wrong)
    staged = stage(b"data")
    with pytest.raises(SinkError) as caught:
        bad_sink.deliver(staged, PurePosixPath("x.bin"), 4, sha256_hex(b"data"))
    assert "definitely-wrong-secret" not in str(caught.value)
    assert staged.exists()


@pytest.mark.stack
def test_s3_upload_memory_does_not_grow_with_file_size(
    s3_options: dict[str, Any], s3_prefix: str, stage: Callable[[bytes], Path]
):
    import tracemalloc

    size = 64 * MIB
    staged = stage(b"")
    digest = hashlib.sha256()
    with open(staged, "wb") as out:
        for index in range(size // MIB):
            block = index.to_bytes(8, "big") * (MIB // 8)
            out.write(block)
            digest.update(block)
    sink = FsspecSink(
        f"s3://{BUCKET}/{s3_prefix}", s3_options, part_size=5 * MIB, max_concurrency=1
    )

    tracemalloc.start()
    try:
        sink.deliver(staged, PurePosixPath("memory/big.bin"), size, digest.hexdigest())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Measured about 28 MiB (a few copies of one 5 MiB part); a whole-file buffer is 64 MiB.
    assert peak < 40 * MIB


@pytest.mark.stack
def test_s3_store_copy_keeps_source_and_checks(
    s3_sink: FsspecSink, s3_client: Any, s3_prefix: str, tmp_path: Path
):
    data = os.urandom(11 * MIB)  # multipart with 5 MiB parts
    sha = sha256_hex(data)
    original = tmp_path / "rebuilt.bin"
    original.write_bytes(data)
    rel = PurePosixPath("copies/rebuilt.bin")

    result = s3_sink.store_copy(original, rel, len(data), sha)

    key = f"{s3_prefix}/{rel}"
    assert result == SinkResult(f"s3://{BUCKET}/{key}", len(data), sha)
    assert original.read_bytes() == data
    info = head(s3_client, key)
    assert info is not None and info["Metadata"] == {"msi-sha256": sha}
    assert s3_sink.check(rel, len(data), sha) is CopyStatus.OK
    assert s3_sink.check(rel, len(data) + 1, sha) is CopyStatus.WRONG_SIZE
    assert s3_sink.check(rel, len(data), sha256_hex(b"x")) is CopyStatus.WRONG_HASH
    s3_client.delete_object(Bucket=BUCKET, Key=key)
    assert s3_sink.check(rel, len(data), sha) is CopyStatus.MISSING


@pytest.mark.stack
def test_s3_store_copy_of_changed_source_stores_nothing(
    s3_sink: FsspecSink, s3_client: Any, s3_prefix: str, tmp_path: Path
):
    original = tmp_path / "changed.bin"
    original.write_bytes(b"new bytes")

    with pytest.raises(ChecksumMismatchError):
        s3_sink.store_copy(original, PurePosixPath("changed.bin"), 9, sha256_hex(b"old bytes"))

    assert head(s3_client, f"{s3_prefix}/changed.bin") is None
    assert original.read_bytes() == b"new bytes"
