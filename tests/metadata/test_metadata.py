"""Metadata extraction on small real files built byte by byte, plus hostile and huge inputs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tracemalloc
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from msi_prefect import metadata as md
from msi_prefect.metadata import (
    EXTRACTORS,
    CsvExtractor,
    ExtractionError,
    FileMetadata,
    JsonExtractor,
    PillowImageExtractor,
    detect_mime,
    extract_metadata,
    metadata_markdown,
    register_extractor,
    unregister_extractor,
)
from msi_prefect.metadata import registry as md_registry
from msi_prefect.metadata import rendering as md_rendering

MIB = 1024 * 1024


# --------------------------------------------------------------------------- builders


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk with a valid CRC."""
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def make_png(
    width: int,
    height: int,
    *,
    color_type: int = 2,
    bit_depth: int = 8,
    interlace: int = 0,
    text: Sequence[bytes] = (),
) -> bytes:
    """A PNG with real (unfiltered, deflated) scanlines; ``text`` holds whole text chunks."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row_bytes = (width * channels * bit_depth + 7) // 8
    scanlines = b"".join(
        b"\0" + bytes((x + y) % 256 for x in range(row_bytes)) for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    chunks = [png_chunk(b"IHDR", ihdr)]
    if color_type == 3:
        chunks.append(png_chunk(b"PLTE", bytes(range(6))))
    chunks += list(text)
    chunks += [png_chunk(b"IDAT", zlib.compress(scanlines)), png_chunk(b"IEND", b"")]
    return md.PNG_SIGNATURE + b"".join(chunks)


def text_chunk(key: str, value: str) -> bytes:
    return png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))


def write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", newline="")
    else:
        path.write_bytes(data)
    return path


def assert_generic_facts(meta: FileMetadata, path: Path) -> None:
    """Size, hashes and times agree with the file and with hashlib."""
    data = path.read_bytes()
    assert meta.size == len(data) == path.stat().st_size
    assert meta.sha256 == hashlib.sha256(data).hexdigest()
    assert meta.md5 is None  # only on request (compute_md5=True)
    mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    assert datetime.fromisoformat(meta.modified_at) == mtime
    assert meta.modified_at.endswith("Z")
    extracted = datetime.fromisoformat(meta.extracted_at)
    assert abs((datetime.now(UTC) - extracted).total_seconds()) < 60
    json.dumps(meta.to_json_dict(), allow_nan=False)


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees the built-ins only and may change the registry freely."""
    saved = list(EXTRACTORS)
    monkeypatch.setattr(md_registry, "_entry_points_loaded", True)
    yield
    EXTRACTORS[:] = saved


# --------------------------------------------------------------------------- CSV / TSV

CSV_TEXT = (
    "name,comment,value\r\n"
    '"Smith, J.","said ""hi""",1\r\n'
    '"multi\nline",x,2\r\n'
    "\r\n"
    "plain,,3\r\n"
    "short,row\r\n"
)


def test_csv_with_quoting(tmp_path: Path) -> None:
    path = write(tmp_path / "table.csv", CSV_TEXT)
    meta = extract_metadata(path)
    assert meta.mime_type == "text/csv"
    assert (meta.extractor, meta.extractor_version) == ("csv", "1")
    assert meta.warnings == []
    assert_generic_facts(meta, path)
    assert meta.details == {
        "delimiter": ",",
        "encoding": "utf-8",
        "columns": ["name", "comment", "value"],
        "column_count": 3,
        "row_count": 4,
        "row_count_capped": False,
        "ragged_rows": 1,
        "sample_rows": [
            ["Smith, J.", 'said "hi"', "1"],
            ["multi\nline", "x", "2"],
            ["plain", "", "3"],
        ],
    }


def test_tsv_with_quoting(tmp_path: Path) -> None:
    text = 'sample\tmz\tnote\nA1\t100.5\t"tab\there"\nA2\t200.25\t"quote "" inside"\n'
    path = write(tmp_path / "peaks.tsv", text)
    meta = extract_metadata(path)
    assert meta.mime_type == "text/tab-separated-values"
    assert meta.extractor == "csv"
    assert meta.warnings == []
    assert_generic_facts(meta, path)
    assert meta.details["delimiter"] == "\t"
    assert meta.details["columns"] == ["sample", "mz", "note"]
    assert meta.details["row_count"] == 2
    assert meta.details["sample_rows"] == [
        ["A1", "100.5", "tab\there"],
        ["A2", "200.25", 'quote " inside'],
    ]


def test_txt_is_csv_only_when_sniffed(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "export.txt", "a;b;c\n1;2;3\n4;5;6\n"))
    assert meta.mime_type == "text/csv"
    assert meta.extractor == "csv"
    assert meta.details["delimiter"] == ";"
    assert meta.details["row_count"] == 2

    prose = "Notes from the run, written by hand.\nThe laser was at 30%, all fine.\nDone.\n"
    meta = extract_metadata(write(tmp_path / "notes.txt", prose))
    assert meta.mime_type == "text/plain"
    assert meta.extractor == "generic"
    assert meta.details == {}


def test_csv_caps_values_and_rows(tmp_path: Path) -> None:
    long_value = "v" * 300
    rows = "\n".join(f"{i},{long_value}" for i in range(20))
    path = write(tmp_path / "long.csv", f"id,{'h' * 150}\n{rows}\n")
    meta = extract_metadata(path, extractors=[CsvExtractor(max_rows=5)])
    assert meta.warnings == []
    assert meta.details["row_count"] == 5
    assert meta.details["row_count_capped"] is True
    columns = meta.details["columns"]
    assert isinstance(columns, list) and len(str(columns[1])) == 100
    assert meta.details["sample_rows"] == [[str(i), "v" * 99 + "…"] for i in range(3)]

    meta = extract_metadata(path)
    assert meta.details["row_count"] == 20
    assert meta.details["row_count_capped"] is False


def test_csv_latin1_and_overlong_line(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "l1.csv", "Maß,Größe\n1,2\n".encode("latin-1")))
    assert meta.details["encoding"] == "latin-1"
    assert meta.details["columns"] == ["Maß", "Größe"]

    path = write(tmp_path / "oneline.csv", b"a,b\n1,2\n" + b"x" * (3 * MIB))
    meta = extract_metadata(path)
    assert meta.details["row_count"] == 1
    assert len(meta.warnings) == 1 and "line longer than" in meta.warnings[0]


def test_relpath_decides_type_of_staging_file(tmp_path: Path) -> None:
    path = write(tmp_path / ".msi-staging-1234", "x,y\n1,2\n")
    meta = extract_metadata(path, "run-7/positions.csv")
    assert meta.relpath == "run-7/positions.csv"
    assert meta.mime_type == "text/csv"
    assert meta.details["row_count"] == 1


# --------------------------------------------------------------------------- JSON


def test_json_object(tmp_path: Path) -> None:
    doc = {f"key{i:03d}": {"nested": [i, {"deep": True}]} for i in range(150)}
    path = write(tmp_path / "run.json", json.dumps(doc))
    meta = extract_metadata(path)
    assert meta.mime_type == "application/json"
    assert (meta.extractor, meta.extractor_version) == ("json", "1")
    assert meta.warnings == []
    assert_generic_facts(meta, path)
    assert meta.details == {
        "top_level_type": "object",
        "parsed": True,
        "key_count": 150,
        "keys": [f"key{i:03d}" for i in range(100)],
    }


def test_json_array_and_scalar(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "list.json", json.dumps([{"a": 1}, 2, "x", None])))
    assert meta.details == {"top_level_type": "array", "parsed": True, "length": 4}
    meta = extract_metadata(write(tmp_path / "scalar.json", "  true "))
    assert meta.details == {"top_level_type": "boolean", "parsed": True}


def test_json_without_extension_is_sniffed(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "manifest", '{"files": [1, 2]}'))
    assert meta.mime_type == "application/json"
    assert meta.details["keys"] == ["files"]


def test_json_over_size_cap_is_only_peeked(tmp_path: Path) -> None:
    path = write(tmp_path / "big.json", "\ufeff \n[" + "1," * 1000 + "1]")
    meta = extract_metadata(path, extractors=[JsonExtractor(max_bytes=100)])
    assert meta.warnings == []
    assert meta.details == {"top_level_type": "array", "parsed": False, "size_capped": True}


def test_invalid_json_warns(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "bad.json", '{"a": 1,'))
    assert meta.details == {"top_level_type": "object", "parsed": False}
    assert len(meta.warnings) == 1 and meta.warnings[0].startswith("json: invalid JSON")

    meta = extract_metadata(write(tmp_path / "deep.json", "[" * 200_000))
    assert meta.details["top_level_type"] == "array"
    assert meta.warnings and "invalid JSON" in meta.warnings[0]


# --------------------------------------------------------------------------- other files


def test_unknown_binary_gets_generic_facts(tmp_path: Path) -> None:
    path = write(tmp_path / "raw.dat", bytes(range(256)) * 40)
    meta = extract_metadata(path)
    assert meta.mime_type == "application/octet-stream"
    assert (meta.extractor, meta.extractor_version) == ("generic", "1")
    assert meta.details == {}
    assert meta.warnings == []
    assert_generic_facts(meta, path)


def test_md5_only_on_request(tmp_path: Path) -> None:
    path = write(tmp_path / "a.bin", b"abc")
    meta = extract_metadata(path)
    assert meta.md5 is None
    assert meta.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert "MD5" not in metadata_markdown(meta)
    asked = extract_metadata(path, compute_md5=True)
    assert asked.md5 == hashlib.md5(b"abc").hexdigest()
    assert asked.sha256 == meta.sha256
    assert f"| MD5 | `{asked.md5}` |" in metadata_markdown(asked)


@pytest.mark.parametrize(
    ("name", "extractor", "details", "warned"),
    [
        ("empty.bin", "generic", {}, False),
        ("empty.csv", "csv", None, False),
        ("empty.json", "json", {"top_level_type": None, "parsed": False}, True),
        ("empty.png", "image", {}, True),
        ("empty.tif", "tiff", {}, True),
    ],
)
def test_empty_file(
    tmp_path: Path, name: str, extractor: str, details: dict[str, Any] | None, warned: bool
) -> None:
    path = write(tmp_path / name, b"")
    meta = extract_metadata(path)
    assert meta.size == 0
    assert meta.sha256 == hashlib.sha256(b"").hexdigest()
    assert meta.md5 is None
    assert meta.extractor == extractor
    assert bool(meta.warnings) is warned
    if details is not None:
        assert meta.details == details
    else:
        assert meta.details["row_count"] == 0 and meta.details["columns"] == []


def test_modified_at_is_utc(tmp_path: Path) -> None:
    path = write(tmp_path / "t.bin", b"x")
    os.utime(path, (1_700_000_000.5, 1_700_000_000.5))
    assert extract_metadata(path).modified_at == "2023-11-14T22:13:20.500000Z"


def test_non_regular_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a regular file"):
        extract_metadata(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        extract_metadata(fifo)  # must not block on open
    with pytest.raises(FileNotFoundError):
        extract_metadata(tmp_path / "missing.csv")


def test_detect_mime() -> None:
    assert detect_mime("x.tif", b"MM\x00*rest", complete=False) == "image/tiff"
    assert detect_mime("x", b"II+\x00\x08\x00\x00\x00", complete=True) == "image/tiff"
    assert detect_mime("x.txt", b"[section]\nkey=1\n", complete=True) == "text/plain"
    assert detect_mime("x", b'[{"a": 1}, ', complete=False) == "application/json"
    assert detect_mime("x", b"a\tb\n1\t2\n", complete=True) == "text/tab-separated-values"
    assert detect_mime("x", b"\x00\x01\x02", complete=True) == "application/octet-stream"
    assert detect_mime("notes.md", b"a,b\n1,2\n", complete=True) != "text/csv"


# --------------------------------------------------------------------------- plugins


class UpperExtractor:
    """A research extractor claiming PNGs."""

    name = "custom-png"
    version = "7"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        return mime == "image/png"

    def extract(self, path: Path) -> Mapping[str, Any]:
        return {"first_bytes": path.read_bytes()[1:4].decode(), "tuple": (1, 2)}


def test_registered_extractor_takes_priority(tmp_path: Path) -> None:
    path = write(tmp_path / "a.png", make_png(2, 2))
    register_extractor(UpperExtractor())
    assert EXTRACTORS[0].name == "custom-png"
    meta = extract_metadata(path)
    assert (meta.extractor, meta.extractor_version) == ("custom-png", "7")
    assert meta.details == {"first_bytes": "PNG", "tuple": [1, 2]}
    assert_generic_facts(meta, path)

    # Re-registering the same name replaces it; first=False puts it behind the built-ins.
    register_extractor(UpperExtractor(), first=False)
    assert [e.name for e in EXTRACTORS].count("custom-png") == 1
    assert extract_metadata(path).extractor == "image"

    assert unregister_extractor("custom-png") is True
    assert unregister_extractor("custom-png") is False
    with pytest.raises(TypeError):
        register_extractor(object())  # type: ignore[arg-type]


class BrokenExtractor:
    name = "broken"
    version = "0"

    def __init__(self, fail_in: str) -> None:
        self.fail_in = fail_in

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        if self.fail_in == "matches":
            raise RuntimeError("cannot decide")
        return True

    def extract(self, path: Path) -> Mapping[str, Any]:
        if self.fail_in == "extract":
            raise RuntimeError("plugin bug")
        if self.fail_in == "partial":
            raise ExtractionError("half read", "second problem", details={"read": 1})
        return {"path": path, "nan": math.nan, "nested": {"set": {1}}}


def test_failing_extractors_never_cost_the_generic_facts(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "a,b\n1,2\n")

    meta = extract_metadata(path, extractors=[BrokenExtractor("matches"), CsvExtractor()])
    assert meta.extractor == "csv" and meta.details["row_count"] == 1
    assert meta.warnings == ["broken: matches() failed: RuntimeError('cannot decide')"]

    meta = extract_metadata(path, extractors=[BrokenExtractor("extract")])
    assert meta.extractor == "broken" and meta.details == {}
    assert meta.warnings == ["broken: failed: RuntimeError('plugin bug')"]
    assert_generic_facts(meta, path)

    meta = extract_metadata(path, extractors=[BrokenExtractor("partial")])
    assert meta.details == {"read": 1}
    assert meta.warnings == ["broken: half read", "broken: second problem"]

    meta = extract_metadata(path, extractors=[BrokenExtractor("none")])
    assert meta.details == {"path": str(path), "nan": None, "nested": {"set": "{1}"}}
    assert meta.warnings == ["broken: converted to strings: PosixPath, set"]
    json.dumps(meta.to_json_dict(), allow_nan=False)


@dataclass
class FakeEntryPoint:
    name: str
    value: str
    target: Any

    def load(self) -> Any:
        if isinstance(self.target, Exception):
            raise self.target
        return self.target


def test_entry_point_plugins_are_loaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class PluginA(UpperExtractor):
        name = "plugin-a"

    class PluginB(UpperExtractor):
        name = "plugin-b"

    points = [
        FakeEntryPoint("b", "pkg:PluginB", PluginB()),  # an instance
        FakeEntryPoint("a", "pkg:PluginA", PluginA),  # a class
        FakeEntryPoint("c", "pkg:missing", ImportError("no module pkg")),
        FakeEntryPoint("d", "pkg:junk", 42),
    ]
    calls: list[str] = []

    def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
        calls.append(group)
        return points

    monkeypatch.setattr(md_registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(md_registry, "_entry_points_loaded", False)
    meta = extract_metadata(write(tmp_path / "a.png", make_png(1, 1)))
    assert calls == ["msi_prefect.extractors"]
    assert [e.name for e in EXTRACTORS[:3]] == ["plugin-a", "plugin-b", "tiff"]
    assert meta.extractor == "plugin-a"

    # Explicit registrations still go ahead of plugins; plugins are not loaded again.
    register_extractor(UpperExtractor())
    extract_metadata(tmp_path / "a.png")
    assert calls == ["msi_prefect.extractors"]
    assert EXTRACTORS[0].name == "custom-png"


# --------------------------------------------------------------------------- output


def test_json_dict_round_trip(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "t.csv", CSV_TEXT))
    data = json.loads(json.dumps(meta.to_json_dict()))
    assert FileMetadata.from_json_dict(data) == meta
    assert set(data) == {
        "relpath",
        "size",
        "sha256",
        "md5",
        "mime_type",
        "modified_at",
        "extracted_at",
        "extractor",
        "extractor_version",
        "normalized",
        "details",
        "warnings",
    }


def test_markdown_is_readable_and_escaped(tmp_path: Path) -> None:
    hostile = [text_chunk("Title", "a | b <script>alert(1)</script> [x](http://evil)")]
    data = make_png(5, 4, text=hostile)
    path = write(tmp_path / "img_1.png", data[: len(data) - 12])  # no IEND: header is enough
    meta = extract_metadata(path)
    text = metadata_markdown(meta)

    assert text.startswith("### img\\_1.png\n")
    assert f"| SHA-256 | `{meta.sha256}` |" in text
    assert f"| Size | {len(data) - 12} B ({len(data) - 12:,} bytes) |" in text
    assert "| width | 5 |" in text
    assert "| mode | RGB |" in text
    assert "| Shape | 4 (y) x 5 (x) x 3 (channel) |" in text
    assert (
        "| info.Title | a \\| b &lt;script&gt;alert(1)&lt;/script&gt; \\[x\\](http://evil) |"
        in text
    )
    assert "<script>" not in text
    warned = metadata_markdown(extract_metadata(write(tmp_path / "bad.json", "{")))
    assert "**Warnings**" in warned and "invalid JSON" in warned
    # Every table row has exactly the expected number of unescaped cell separators.
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.replace("\\|", "").count("|") == 3

    csv_meta = extract_metadata(write(tmp_path / "t.tsv", "a\tb\n1\t2\n"))
    # Control characters are shown JSON-escaped (the backslash itself escaped for markdown).
    assert '| delimiter | "\\\\t" |' in metadata_markdown(csv_meta)
    assert "MiB" in md_rendering.human_size(5 * MIB) and md_rendering.human_size(
        3 * 1024**4
    ).endswith("TiB")


# --------------------------------------------------------------------------- huge files


@pytest.fixture(scope="module")
def zeros_200mib_sha256() -> str:
    digest = hashlib.sha256()
    block = bytes(MIB)
    for _ in range(200):
        digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("suffix", [".bin", ".csv", ".json", ".tif"])
def test_huge_sparse_file_has_bounded_memory(
    tmp_path: Path, suffix: str, zeros_200mib_sha256: str
) -> None:
    path = tmp_path / f"sparse{suffix}"
    with path.open("wb") as f:
        f.truncate(200 * MIB)
    tracemalloc.start()
    try:
        meta = extract_metadata(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * MIB, f"peak {peak / MIB:.1f} MiB"
    assert meta.size == 200 * MIB
    assert meta.sha256 == zeros_200mib_sha256
    # Zeros are no valid content for any of the typed extractors: warnings, no exception.
    assert bool(meta.warnings) is (suffix != ".bin")


def test_extraction_error_messages() -> None:
    exc = ExtractionError(details={"x": 1})
    assert exc.messages == ("malformed content",) and exc.details == {"x": 1}
    assert str(ExtractionError("a", "b")) == "a; b"
    assert isinstance(PillowImageExtractor(), md.Extractor)
