"""Tests of wire format v1: round trips, every reject reason, and hostile input."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msi_prefect.transfer.producer import HEADER_ALLOWANCE_BYTES
from msi_prefect.transfer.wire import (
    DEFAULT_CHUNK_SIZE,
    FILE_ID_NAMESPACE,
    FORMAT_VERSION,
    MIB,
    TIB,
    AbortNotice,
    Chunk,
    ChunkHeader,
    DecodeLimits,
    HeaderName,
    KafkaHeaderList,
    RejectReason,
    WireFormatError,
    decode_message,
    encode_abort_headers,
    encode_chunk_headers,
    file_id_for,
    message_key,
    plan_chunks,
)

Headers = KafkaHeaderList


def chunk_messages(
    relpath: str, data: bytes, chunk_size: int, generation: int = 1
) -> list[tuple[bytes, bytes, Headers]]:
    """Cut a file into (key, value, headers) messages the way a producer does."""
    count = plan_chunks(len(data), chunk_size)
    digest = hashlib.sha256(data).hexdigest()
    messages = []
    for index in range(count):
        header = ChunkHeader.for_chunk(
            relpath=relpath,
            size=len(data),
            chunk_size=chunk_size,
            index=index,
            mtime_ns=1_700_000_000_123_456_789,
            producer_id="lab-pc-1",
            generation=generation,
            sha256=digest if index == count - 1 else None,
        )
        value = data[header.offset : header.offset + chunk_size]
        messages.append((message_key(header.file_id), value, encode_chunk_headers(header)))
    return messages


def one_chunk(relpath: str = "run1/image.tif", data: bytes = b"0123456789") -> Headers:
    """Headers of a one-chunk file (the last chunk, so it carries the digest)."""
    return chunk_messages(relpath, data, 1 * MIB)[0][2]


def with_header(headers: Headers, name: str, value: bytes | None) -> Headers:
    """Replace (or add) one header."""
    kept = [(n, v) for n, v in headers if n != name]
    return [*kept, (name, value)]


def without_header(headers: Headers, name: str) -> Headers:
    return [(n, v) for n, v in headers if n != name]


def reject(key: object, value: object, headers: object, limits: DecodeLimits | None = None):
    """Decode and return the WireFormatError, failing if the message was accepted."""
    with pytest.raises(WireFormatError) as info:
        decode_message(key, value, headers, limits or DecodeLimits())  # type: ignore[arg-type]
    return info.value


KEY = message_key(file_id_for("run1/image.tif"))
APACHE_KAFKA_DEFAULT_MESSAGE_BYTES = 1_000_000
DATA = b"0123456789"


# --- basics ---


def test_constants() -> None:
    assert FORMAT_VERSION == "1.0"
    # A default chunk and its headers fit Apache Kafka's default 1,000,000-byte message.
    assert DEFAULT_CHUNK_SIZE + HEADER_ALLOWANCE_BYTES <= APACHE_KAFKA_DEFAULT_MESSAGE_BYTES


def test_file_id_is_stable_hex_and_path_specific() -> None:
    fid = file_id_for("ünï/cödé.tif")
    assert re.fullmatch(r"[0-9a-f]{32}", fid)
    assert fid == file_id_for("ünï/cödé.tif")
    assert fid != file_id_for("ünï/code.tif")
    # Pinned: changing the namespace would re-key every file ever sent.
    assert file_id_for("a.txt") == "7e6deab6263d5ef6b557824c1543c4fc"
    assert file_id_for("a.txt") == uuid.uuid5(FILE_ID_NAMESPACE, "a.txt").hex


@pytest.mark.parametrize(
    "relpath", ["a", "run 1/ünï;'q\"/img\n.tif", "日本/データ.csv", "x" * 4000, "z/🧪.bin"]
)
def test_file_id_is_the_uuid5_of_the_path(relpath: str) -> None:
    # file_id_for computes uuid5 itself (faster); it must never drift from the standard.
    assert file_id_for(relpath) == uuid.uuid5(FILE_ID_NAMESPACE, relpath).hex
    assert uuid.UUID(file_id_for(relpath)).version == 5


@pytest.mark.parametrize(
    ("size", "chunk_size", "count"),
    [(0, 10, 1), (1, 10, 1), (10, 10, 1), (11, 10, 2), (20, 10, 2), (21, 10, 3), (5, 1, 5)],
)
def test_plan_chunks(size: int, chunk_size: int, count: int) -> None:
    assert plan_chunks(size, chunk_size) == count


@pytest.mark.parametrize(("size", "chunk_size"), [(-1, 10), (10, 0), (10, -5)])
def test_plan_chunks_refuses_bad_arguments(size: int, chunk_size: int) -> None:
    with pytest.raises(ValueError):
        plan_chunks(size, chunk_size)


def test_decode_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DecodeLimits(max_file_size=0)


# --- round trips ---


@pytest.mark.parametrize(("size", "chunk_size"), [(0, 4), (1, 4), (4, 4), (10, 4), (1000, 7)])
def test_round_trip_rebuilds_the_file(size: int, chunk_size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    rebuilt = bytearray(size)
    chunks = []
    for key, value, headers in chunk_messages("sp ace/ünï.dat", data, chunk_size, generation=3):
        decoded = decode_message(key, value, headers, DecodeLimits())
        assert isinstance(decoded, Chunk)
        chunks.append(decoded)
        rebuilt[decoded.header.offset : decoded.header.offset + len(decoded.data)] = decoded.data
    assert bytes(rebuilt) == data
    assert len(chunks) == plan_chunks(size, chunk_size)
    last = chunks[-1].header
    assert last.is_last
    assert last.sha256 == hashlib.sha256(data).hexdigest()
    assert all(c.header.sha256 is None for c in chunks[:-1])
    assert {c.header.generation for c in chunks} == {3}
    assert {c.header.relpath for c in chunks} == {"sp ace/ünï.dat"}
    assert chunks[0].header.mtime_ns == 1_700_000_000_123_456_789
    assert chunks[0].header.producer_id == "lab-pc-1"


def test_header_fields_survive_encoding() -> None:
    header = ChunkHeader.for_chunk(
        relpath="a;b.csv",
        size=25,
        chunk_size=10,
        index=1,
        mtime_ns=-5_000,  # pre-1970 files exist; mtime may be negative
        producer_id="prod ü",
        generation=7,
    )
    encoded = encode_chunk_headers(header)
    names = [name for name, _ in encoded]
    assert len(names) == len(set(names))
    assert HeaderName.SHA256 not in names
    decoded = decode_message(message_key(header.file_id), b"x" * 10, encoded, DecodeLimits())
    assert isinstance(decoded, Chunk)
    assert decoded.header == header


def test_memoryview_and_bytearray_values_are_accepted() -> None:
    headers = one_chunk()
    decoded = decode_message(KEY, memoryview(DATA), headers, DecodeLimits())  # type: ignore[arg-type]
    assert isinstance(decoded, Chunk)
    assert bytes(decoded.data) == DATA
    decoded = decode_message(KEY, bytearray(DATA), headers, DecodeLimits())  # type: ignore[arg-type]
    assert isinstance(decoded, Chunk)
    assert decoded.data == DATA


def test_empty_file_is_one_empty_chunk_and_none_value_is_empty() -> None:
    ((key, value, headers),) = chunk_messages("empty.txt", b"", DEFAULT_CHUNK_SIZE)
    assert value == b""
    for candidate in (b"", None):
        decoded = decode_message(key, candidate, headers, DecodeLimits())
        assert isinstance(decoded, Chunk)
        assert decoded.data == b""
        assert decoded.header.count == 1
        assert decoded.header.sha256 == hashlib.sha256(b"").hexdigest()


def test_abort_round_trip() -> None:
    notice = AbortNotice.for_path("run1/image.tif", generation=4, producer_id="lab-pc-1")
    headers = encode_abort_headers(notice)
    assert {name for name, _ in headers} == {
        "msi.v",
        "msi.kind",
        "msi.fid",
        "msi.path",
        "msi.gen",
        "msi.pid",
    }
    assert decode_message(KEY, None, headers, DecodeLimits()) == notice
    assert decode_message(KEY, b"", headers, DecodeLimits()) == notice


def test_higher_minor_version_with_unknown_headers_is_accepted() -> None:
    headers = with_header(one_chunk(), "msi.v", b"1.7")
    headers += [("msi.future", b"whatever"), ("trace-id", b"\xff\x00")]
    decoded = decode_message(KEY, DATA, headers, DecodeLimits())
    assert isinstance(decoded, Chunk)


def test_dict_form_of_headers_is_accepted() -> None:
    # confluent-kafka's HeadersType also allows a dict.
    decoded = decode_message(KEY, DATA, dict(one_chunk()), DecodeLimits())
    assert isinstance(decoded, Chunk)
    assert decoded.header.relpath == "run1/image.tif"


def test_unknown_header_with_none_value_is_ignored() -> None:
    headers = [*one_chunk(), ("other", None)]
    assert isinstance(decode_message(KEY, DATA, headers, DecodeLimits()), Chunk)


# --- encoder refuses what the decoder would refuse ---


def test_encoder_refuses_inconsistent_headers() -> None:
    good = ChunkHeader.for_chunk(
        relpath="a.txt",
        size=20,
        chunk_size=10,
        index=1,
        mtime_ns=0,
        producer_id="p",
        generation=1,
        sha256="0" * 64,
    )
    encode_chunk_headers(good)
    cases = [
        (replace(good, sha256=None), RejectReason.BAD_CHECKSUM_FIELD),
        (replace(good, count=3), RejectReason.INCONSISTENT_CHUNK),
        (replace(good, offset=5), RejectReason.INCONSISTENT_CHUNK),
        (replace(good, relpath="../a.txt"), RejectReason.UNSAFE_PATH),
        (replace(good, generation=0), RejectReason.BAD_HEADER_VALUE),
        (replace(good, producer_id=""), RejectReason.BAD_HEADER_VALUE),
    ]
    for header, reason in cases:
        with pytest.raises(WireFormatError) as info:
            encode_chunk_headers(header)
        assert info.value.reason is reason, header
    with pytest.raises(WireFormatError) as info:
        encode_abort_headers(AbortNotice("0" * 32, "a.txt", 1, "p"))
    assert info.value.reason is RejectReason.FILE_ID_MISMATCH


# --- every reject reason ---


def test_error_message_is_a_sentence() -> None:
    error = reject(KEY, DATA, with_header(one_chunk(), "msi.v", b"2.0"))
    assert error.reason is RejectReason.UNKNOWN_VERSION
    text = str(error)
    assert text.startswith("Message rejected because its wire-format version is not supported")
    assert "'2.0'" in text
    assert text.endswith(".")


def test_not_msi() -> None:
    assert reject(b"k", b"v", None).reason is RejectReason.NOT_MSI
    assert reject(b"k", b"v", []).reason is RejectReason.NOT_MSI
    assert reject(b"k", b"v", [("content-type", b"json")]).reason is RejectReason.NOT_MSI


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"10.0"])
def test_unknown_major_version(version: bytes) -> None:
    # Even with no other header: the version decides before anything else is read.
    error = reject(KEY, DATA, [("msi.v", version)])
    assert error.reason is RejectReason.UNKNOWN_VERSION


@pytest.mark.parametrize("version", [b"1", b"1.", b"v1.0", b"1.0.0", b"01.0", b"", b"1.0 "])
def test_malformed_version(version: bytes) -> None:
    error = reject(KEY, DATA, with_header(one_chunk(), "msi.v", version))
    assert error.reason is RejectReason.BAD_HEADER_VALUE


def test_unknown_kind() -> None:
    error = reject(KEY, DATA, with_header(one_chunk(), "msi.kind", b"manifest"))
    assert error.reason is RejectReason.UNKNOWN_KIND


@pytest.mark.parametrize(
    "name",
    [
        "msi.kind",
        "msi.fid",
        "msi.path",
        "msi.size",
        "msi.csz",
        "msi.idx",
        "msi.n",
        "msi.off",
        "msi.mtime",
        "msi.pid",
        "msi.gen",
    ],
)
def test_missing_chunk_header(name: str) -> None:
    error = reject(KEY, DATA, without_header(one_chunk(), name))
    assert error.reason is RejectReason.MISSING_HEADER
    assert name in error.detail


@pytest.mark.parametrize("name", ["msi.fid", "msi.path", "msi.gen", "msi.pid"])
def test_missing_abort_header(name: str) -> None:
    headers = encode_abort_headers(AbortNotice.for_path("run1/image.tif", 1, "p"))
    assert reject(KEY, None, without_header(headers, name)).reason is RejectReason.MISSING_HEADER


@pytest.mark.parametrize("name", ["msi.v", "msi.path", "msi.idx", "msi.sha256"])
def test_duplicate_header(name: str) -> None:
    headers = one_chunk()
    duplicate = next(item for item in headers if item[0] == name)
    error = reject(KEY, DATA, [*headers, duplicate])
    assert error.reason is RejectReason.DUPLICATE_HEADER


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("msi.size", b"-10"),
        ("msi.size", b"+10"),
        ("msi.size", b" 10"),
        ("msi.size", b"1e3"),
        ("msi.size", b"010"),
        ("msi.size", b"\xd9\xa1\xd9\xa0"),  # Arabic-Indic digits: not plain ASCII digits
        ("msi.size", b"9" * 40),
        ("msi.size", b"9223372036854775808"),  # 2**63
        ("msi.csz", b"0"),
        ("msi.idx", b""),
        ("msi.gen", b"0"),
        ("msi.mtime", b"-0"),
        ("msi.mtime", b"12.5"),
        ("msi.fid", b"A" * 32),
        ("msi.fid", b"abc"),
        ("msi.path", b"\xff\xfe"),
        ("msi.pid", b""),
        ("msi.pid", b"x" * 201),
        ("msi.pid", b"evil\nlog line"),
        ("msi.kind", None),
        ("msi.path", b"a" * 5000),  # longer than any header value may be
    ],
)
def test_bad_header_value(name: str, value: bytes | None) -> None:
    error = reject(KEY, DATA, with_header(one_chunk(), name, value))
    assert error.reason is RejectReason.BAD_HEADER_VALUE, error


@pytest.mark.parametrize(
    "path", ["../x", "a/../../x", "/etc/passwd", "C:\\x", "c:/x", "a//b", "./a", ".msi-state/x"]
)
def test_unsafe_path(path: str) -> None:
    key = message_key(file_id_for(path))
    headers = with_header(one_chunk(), "msi.path", path.encode())
    headers = with_header(headers, "msi.fid", key)
    error = reject(key, DATA, headers)
    assert error.reason is RejectReason.UNSAFE_PATH


def test_unsafe_path_with_nul() -> None:
    path = "a\x00b"
    key = message_key(file_id_for(path))
    headers = with_header(with_header(one_chunk(), "msi.path", path.encode()), "msi.fid", key)
    assert reject(key, DATA, headers).reason is RejectReason.UNSAFE_PATH


def test_too_large() -> None:
    limits = DecodeLimits(max_file_size=9)
    assert reject(KEY, DATA, one_chunk(), limits).reason is RejectReason.TOO_LARGE
    limits = DecodeLimits(max_chunk_size=MIB - 1)
    assert reject(KEY, DATA, one_chunk(), limits).reason is RejectReason.TOO_LARGE
    # Tiny chunks of a huge file would need a huge progress bitmap.
    header = ChunkHeader.for_chunk(
        relpath="run1/image.tif",
        size=TIB,
        chunk_size=1,
        index=0,
        mtime_ns=0,
        producer_id="p",
        generation=1,
    )
    error = reject(KEY, b"x", encode_chunk_headers(header))
    assert error.reason is RejectReason.TOO_LARGE
    assert "chunks" in error.detail


def test_size_beyond_default_limit() -> None:
    headers = chunk_messages("run1/image.tif", b"x" * 20, 10)[0][2]
    headers = with_header(headers, "msi.size", str(TIB + 1).encode())
    headers = with_header(headers, "msi.n", str(plan_chunks(TIB + 1, 10)).encode())
    assert reject(KEY, b"x" * 10, headers).reason is RejectReason.TOO_LARGE


def test_inconsistent_chunks() -> None:
    first = chunk_messages("run1/image.tif", b"x" * 25, 10)[0][2]
    cases = [
        with_header(first, "msi.n", b"2"),  # 25 bytes in tens make 3
        with_header(first, "msi.idx", b"3"),  # past the last chunk
        with_header(first, "msi.off", b"10"),  # chunk 0 starts at 0
    ]
    for headers in cases:
        assert reject(KEY, b"x" * 10, headers).reason is RejectReason.INCONSISTENT_CHUNK
    # Value lengths: 10 expected for chunk 0, 5 for the last.
    assert reject(KEY, b"x" * 9, first).reason is RejectReason.INCONSISTENT_CHUNK
    assert reject(KEY, b"x" * 11, first).reason is RejectReason.INCONSISTENT_CHUNK
    assert reject(KEY, None, first).reason is RejectReason.INCONSISTENT_CHUNK
    last = chunk_messages("run1/image.tif", b"x" * 25, 10)[2][2]
    assert reject(KEY, b"x" * 10, last).reason is RejectReason.INCONSISTENT_CHUNK


def test_file_id_mismatch() -> None:
    other = file_id_for("other.tif").encode()
    error = reject(other, DATA, with_header(one_chunk(), "msi.fid", other))
    assert error.reason is RejectReason.FILE_ID_MISMATCH


@pytest.mark.parametrize("key", [None, b"", b"chunk_0_of_1", file_id_for("other").encode()])
def test_key_mismatch(key: bytes | None) -> None:
    assert reject(key, DATA, one_chunk()).reason is RejectReason.KEY_MISMATCH


def test_bad_checksum_field() -> None:
    last = one_chunk()
    assert (
        reject(KEY, DATA, without_header(last, "msi.sha256")).reason
        is RejectReason.BAD_CHECKSUM_FIELD
    )
    for value in (b"0" * 63, b"A" * 64, b"g" * 64, b"\xff" * 64, None):
        error = reject(KEY, DATA, with_header(last, "msi.sha256", value))
        assert error.reason is RejectReason.BAD_CHECKSUM_FIELD
    first = chunk_messages("run1/image.tif", b"x" * 20, 10)[0][2]
    error = reject(KEY, b"x" * 10, with_header(first, "msi.sha256", b"0" * 64))
    assert error.reason is RejectReason.BAD_CHECKSUM_FIELD


@pytest.mark.parametrize(
    "headers",
    [
        "msi.v=1.0",
        b"msi.v",
        [("msi.v",)],
        [("msi.v", b"1.0", b"extra")],
        [(b"msi.v", b"1.0")],
        [("msi.v", "1.0")],
        [("msi.v", 10)],
        42,
    ],
)
def test_malformed_header_lists(headers: object) -> None:
    assert reject(KEY, DATA, headers).reason is RejectReason.MALFORMED_MESSAGE


def test_value_of_wrong_type() -> None:
    assert reject(KEY, "text", one_chunk()).reason is RejectReason.MALFORMED_MESSAGE


def _unsafe_path_message() -> tuple[bytes, bytes, Headers]:
    key = message_key(file_id_for("../x"))
    headers = with_header(with_header(one_chunk(), "msi.path", b"../x"), "msi.fid", key)
    return key, DATA, headers


# One sample per reason: adding a reason without a way to trigger it fails here.
_SAMPLES: dict[RejectReason, tuple[object, object, object]] = {
    RejectReason.NOT_MSI: (KEY, DATA, []),
    RejectReason.UNKNOWN_VERSION: (KEY, DATA, [("msi.v", b"2.0")]),
    RejectReason.UNKNOWN_KIND: (KEY, DATA, with_header(one_chunk(), "msi.kind", b"x")),
    RejectReason.MALFORMED_MESSAGE: (KEY, DATA, [("msi.v",)]),
    RejectReason.MISSING_HEADER: (KEY, DATA, without_header(one_chunk(), "msi.n")),
    RejectReason.DUPLICATE_HEADER: (KEY, DATA, [*one_chunk(), ("msi.v", b"1.0")]),
    RejectReason.BAD_HEADER_VALUE: (KEY, DATA, with_header(one_chunk(), "msi.gen", b"-1")),
    RejectReason.UNSAFE_PATH: _unsafe_path_message(),
    RejectReason.TOO_LARGE: (KEY, DATA, with_header(one_chunk(), "msi.csz", b"999999999")),
    RejectReason.INCONSISTENT_CHUNK: (KEY, DATA + b"!", one_chunk()),
    RejectReason.FILE_ID_MISMATCH: (KEY, DATA, with_header(one_chunk(), "msi.fid", b"0" * 32)),
    RejectReason.KEY_MISMATCH: (b"0" * 32, DATA, one_chunk()),
    RejectReason.BAD_CHECKSUM_FIELD: (KEY, DATA, without_header(one_chunk(), "msi.sha256")),
    RejectReason.ENCRYPTED: (KEY, DATA, with_header(one_chunk(), "msi.kind", b"sealed")),
}
# Raised by the KafkaCrypto codec before decoding, not by the decoder (transfer/test_crypto.py).
_CODEC_REASONS = {
    RejectReason.NOT_ENCRYPTED,
    RejectReason.UNDECRYPTABLE,
    RejectReason.KEY_MISSING,
}


# Raised only by the OpenMSIStream decoder (transfer/test_openmsistream_format.py).
_OTHER_FORMATS_ONLY = {RejectReason.CHUNK_HASH_MISMATCH}


def test_every_reason_has_a_sample() -> None:
    assert set(_SAMPLES) == set(RejectReason) - _CODEC_REASONS - _OTHER_FORMATS_ONLY


@pytest.mark.parametrize("reason", list(_SAMPLES))
def test_sample_triggers_its_reason(reason: RejectReason) -> None:
    key, value, headers = _SAMPLES[reason]
    error = reject(key, value, headers)
    assert error.reason is reason
    assert error.detail
    assert str(error).startswith("Message rejected because ")


# --- hostile input: properties ---

# The normal run stays fast; a long fuzz run sets MSI_FUZZ_EXAMPLES=10000.
_FUZZ_EXAMPLES = int(os.environ.get("MSI_FUZZ_EXAMPLES", "300"))
_NAMES = [str(name) for name in HeaderName] + ["msi.future", "x", ""]
_VALUE_STRATEGY = st.one_of(
    st.none(),
    st.binary(max_size=80),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: str(n).encode()),
    st.sampled_from([b"1.0", b"1.9", b"2.0", b"chunk", b"abort", b"0", b"", b"a.txt"]),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
_HEADER_LISTS = st.lists(
    st.tuples(st.one_of(st.sampled_from(_NAMES), st.text(max_size=12)), _VALUE_STRATEGY),
    max_size=16,
)


@settings(max_examples=_FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.one_of(st.none(), st.binary(max_size=40)),
    value=st.one_of(st.none(), st.binary(max_size=64)),
    headers=st.one_of(st.none(), _HEADER_LISTS),
)
def test_decode_never_raises_anything_else_on_arbitrary_input(
    key: bytes | None, value: bytes | None, headers: Headers | None
) -> None:
    try:
        decode_message(key, value, headers, DecodeLimits(max_file_size=10**6))
    except WireFormatError as error:
        # The catch-all fallback is for bugs: every input should meet a specific check.
        assert error.__cause__ is None, f"fallback used for {error.__cause__!r}"


@st.composite
def _mutated_valid_messages(draw: st.DrawFn) -> tuple[bytes | None, bytes | None, Headers]:
    """A valid message with a few headers replaced, dropped or duplicated."""
    relpath = draw(st.sampled_from(["a.txt", "d/ünï.tif", "x y;z.csv"]))
    data = draw(st.binary(max_size=50))
    chunk_size = draw(st.integers(min_value=1, max_value=20))
    messages = chunk_messages(relpath, data, chunk_size)
    original_key, original_value, original_headers = draw(st.sampled_from(messages))
    key: bytes | None = original_key
    value: bytes | None = original_value
    headers = list(original_headers)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        operation = draw(st.sampled_from(["replace", "drop", "duplicate", "key", "value"]))
        index = draw(st.integers(min_value=0, max_value=max(0, len(headers) - 1)))
        if operation == "replace" and headers:
            headers[index] = (headers[index][0], draw(_VALUE_STRATEGY))
        elif operation == "drop" and headers:
            del headers[index]
        elif operation == "duplicate" and headers:
            headers.append(headers[index])
        elif operation == "key":
            key = draw(st.one_of(st.none(), st.binary(max_size=40)))
        else:
            value = draw(st.one_of(st.none(), st.binary(max_size=50)))
    return key, value, headers


@settings(max_examples=_FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=_mutated_valid_messages())
def test_decode_of_mutated_messages_is_total(
    message: tuple[bytes | None, bytes | None, Headers],
) -> None:
    key, value, headers = message
    try:
        decoded = decode_message(key, value, headers, DecodeLimits())
    except WireFormatError as error:
        assert error.__cause__ is None, f"fallback used for {error.__cause__!r}"
        return
    # Whatever survived mutation must still satisfy the consistency rules.
    if isinstance(decoded, Chunk):
        h = decoded.header
        assert h.count == plan_chunks(h.size, h.chunk_size)
        assert h.offset == h.index * h.chunk_size
        assert len(decoded.data) == h.data_length
        assert (h.sha256 is not None) == h.is_last
        assert key == message_key(file_id_for(h.relpath))
