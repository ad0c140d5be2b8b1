"""Unit tests of the OpenMSIStream 1.8 decoder and encoder (no broker)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import msgpack
import pytest

from msi_prefect.transfer.formats import VerificationError, WireFormat, codec_for
from msi_prefect.transfer.openmsistream_format import (
    SHA512_PREFIX,
    UNKNOWN_SIZE,
    FileDigests,
    OpenMsiStreamCodec,
    decode_omsi_message,
    digest_stream,
    encode_omsi_chunk,
    iter_omsi_messages,
    omsi_file_id,
    omsi_key,
)
from msi_prefect.transfer.progress import FileProgress, ProgressState
from msi_prefect.transfer.wire import DecodeLimits, RejectReason, WireFormatError

LIMITS = DecodeLimits()
CONTENT = bytes(range(256)) * 10  # 2560 bytes
CHUNK = 1000


def omsi_value(
    *,
    filename: object = "scan.tif",
    file_hash: object = None,
    data: object = b"abc",
    chunk_hash: object = None,
    offset: object = 0,
    index: object = 1,
    count: object = 1,
    subdir: object = "run7/a",
    append: object = "",
    mtime: object = 1700000000.5,
    fields: int = 10,
) -> bytes:
    """A value packed the way OpenMSIStream's DataFileChunkSerializer packs it."""
    if file_hash is None:
        file_hash = hashlib.sha512(data if isinstance(data, bytes) else b"").digest()
    if chunk_hash is None:
        chunk_hash = hashlib.sha512(data if isinstance(data, bytes) else b"").digest()
    items = [filename, file_hash, chunk_hash, offset, index, count, subdir, append, data, mtime]
    return msgpack.packb(items[:fields], use_bin_type=True)


def key_for(subdir: str = "run7/a", filename: str = "scan.tif", i: int = 1, n: int = 1) -> bytes:
    return omsi_key(subdir, filename, i, n).encode()


def reject(key: object, value: object) -> WireFormatError:
    with pytest.raises(WireFormatError) as info:
        decode_omsi_message(key, value, LIMITS)  # type: ignore[arg-type]
    return info.value


def test_key_matches_openmsistream_rule() -> None:
    # get_message_prepend: subdir '/' -> '_', then '_' + filename + '_chunk', then _i_of_N.
    assert omsi_key("a/b", "x.dat", 2, 5) == "a_b_x.dat_chunk_2_of_5"
    assert omsi_key("", "x.dat", 1, 1) == "_x.dat_chunk_1_of_1"


def test_encode_then_decode_round_trip() -> None:
    digests = digest_stream(io.BytesIO(CONTENT))
    messages = list(iter_omsi_messages(io.BytesIO(CONTENT), "run7/scan 1.tif", digests, CHUNK, 5.0))
    assert len(messages) == 3
    rebuilt = bytearray(len(CONTENT))
    for key, value, _ in messages:
        chunk = decode_omsi_message(key, value, LIMITS)
        header = chunk.header
        assert header.relpath == "run7/scan 1.tif"
        assert header.chunk_size == CHUNK
        assert header.count == 3
        assert header.size == UNKNOWN_SIZE
        assert header.sha256 == SHA512_PREFIX + hashlib.sha512(CONTENT).hexdigest()
        assert header.file_id == omsi_file_id(
            "run7/scan 1.tif", hashlib.sha512(CONTENT).hexdigest()
        )
        rebuilt[header.offset : header.offset + len(chunk.data)] = chunk.data
    assert bytes(rebuilt) == CONTENT


def test_nine_field_values_from_older_producers() -> None:
    chunk = decode_omsi_message(key_for(), omsi_value(fields=9), LIMITS)
    assert chunk.data == b"abc"


def test_filename_append_goes_on_the_stem() -> None:
    chunk = decode_omsi_message(key_for(), omsi_value(append="_copy"), LIMITS)
    assert chunk.header.relpath == "run7/a/scan_copy.tif"


def test_top_level_file() -> None:
    chunk = decode_omsi_message(key_for(subdir=""), omsi_value(subdir=""), LIMITS)
    assert chunk.header.relpath == "scan.tif"


def test_empty_file_as_one_empty_chunk() -> None:
    digests = digest_stream(io.BytesIO(b""))
    [(key, value, length)] = list(iter_omsi_messages(io.BytesIO(b""), "e", digests, CHUNK, 0.0))
    assert length == 0
    assert decode_omsi_message(key, value, LIMITS).data == b""


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (key_for(), b"\xc1not msgpack", RejectReason.MALFORMED_MESSAGE),
        (key_for(), msgpack.packb({"a": 1}), RejectReason.MALFORMED_MESSAGE),
        (key_for(), msgpack.packb([1, 2, 3]), RejectReason.MALFORMED_MESSAGE),
        (key_for(), omsi_value(fields=8), RejectReason.MALFORMED_MESSAGE),
        (key_for(), None, RejectReason.MALFORMED_MESSAGE),
        (key_for(), omsi_value(filename=5), RejectReason.BAD_HEADER_VALUE),
        (key_for(), omsi_value(filename=b"\xff"), RejectReason.BAD_HEADER_VALUE),
        (key_for(), omsi_value(offset=-1), RejectReason.BAD_HEADER_VALUE),
        (key_for(), omsi_value(offset=True), RejectReason.BAD_HEADER_VALUE),
        (key_for(), omsi_value(index=0), RejectReason.BAD_HEADER_VALUE),
        (key_for(), omsi_value(data=5), RejectReason.BAD_HEADER_VALUE),
        (key_for(), omsi_value(mtime=float("nan")), RejectReason.BAD_HEADER_VALUE),
        (key_for(), omsi_value(mtime="x"), RejectReason.BAD_HEADER_VALUE),
        (key_for(), omsi_value(file_hash=b"short"), RejectReason.BAD_CHECKSUM_FIELD),
        (key_for(), omsi_value(chunk_hash=b"0" * 64), RejectReason.CHUNK_HASH_MISMATCH),
        (key_for(subdir="../x"), omsi_value(subdir="../x"), RejectReason.UNSAFE_PATH),
        (key_for(subdir="/etc"), omsi_value(subdir="/etc"), RejectReason.UNSAFE_PATH),
        (key_for(filename="a/b"), omsi_value(filename="a/b"), RejectReason.UNSAFE_PATH),
        (key_for(filename=".."), omsi_value(filename=".."), RejectReason.UNSAFE_PATH),
        (key_for(), omsi_value(append="/../../x"), RejectReason.UNSAFE_PATH),
        (key_for(subdir=".msi-state"), omsi_value(subdir=".msi-state"), RejectReason.UNSAFE_PATH),
        (b"other", omsi_value(), RejectReason.KEY_MISMATCH),
        (None, omsi_value(), RejectReason.KEY_MISMATCH),
        (key_for(i=2, n=1), omsi_value(index=2, count=1), RejectReason.INCONSISTENT_CHUNK),
        (key_for(), omsi_value(offset=3), RejectReason.INCONSISTENT_CHUNK),
        # chunk 2 of 3 must start at one chunk length
        (
            key_for(i=2, n=3),
            omsi_value(index=2, count=3, offset=5),
            RejectReason.INCONSISTENT_CHUNK,
        ),
        # last chunk: offset 7 is not a multiple of the 2 chunks before it
        (
            key_for(i=3, n=3),
            omsi_value(index=3, count=3, offset=7),
            RejectReason.INCONSISTENT_CHUNK,
        ),
        (
            key_for(i=1, n=2**30),
            omsi_value(index=1, count=2**30),
            RejectReason.TOO_LARGE,
        ),
    ],
)
def test_hostile_values_are_rejected(key: object, value: object, reason: RejectReason) -> None:
    assert reject(key, value).reason is reason


def test_encoder_refuses_unsafe_paths() -> None:
    with pytest.raises(WireFormatError):
        encode_omsi_chunk(
            relpath="../x", file_sha512=b"0" * 64, index=1, count=1, offset=0, data=b"", mtime=0
        )


def _progress(path: Path, count: int, chunk_size: int, expected: str) -> FileProgress:
    return FileProgress(
        topic="t",
        file_id="f",
        generation=1,
        relpath="x",
        size=UNKNOWN_SIZE,
        chunk_count=count,
        chunk_size=chunk_size,
        mtime_ns=0,
        sha256=expected,
        received=b"",
        received_count=count,
        staging_path=str(path),
        state=ProgressState.RECEIVING,
        reason=None,
        updated_at=0.0,
    )


def test_verify_checks_sha512_and_reports_sha256(tmp_path: Path) -> None:
    staged = tmp_path / "s"
    staged.write_bytes(CONTENT)
    codec = codec_for(WireFormat.OPENMSISTREAM)
    assert isinstance(codec, OpenMsiStreamCodec)
    expected = SHA512_PREFIX + hashlib.sha512(CONTENT).hexdigest()
    verified = codec.verify(_progress(staged, 3, CHUNK, expected), staged, None)
    assert verified.size == len(CONTENT)
    assert verified.sha256 == hashlib.sha256(CONTENT).hexdigest()
    staged.write_bytes(CONTENT[:-1] + b"!")
    with pytest.raises(VerificationError, match="SHA-512 mismatch"):
        codec.verify(_progress(staged, 3, CHUNK, expected), staged, None)


def test_digest_stream() -> None:
    assert digest_stream(io.BytesIO(CONTENT), block_bytes=7) == FileDigests(
        size=len(CONTENT),
        sha512=hashlib.sha512(CONTENT).digest(),
        sha256=hashlib.sha256(CONTENT).hexdigest(),
    )
