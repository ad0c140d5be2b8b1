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
from dataclasses import dataclass, field
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
    PngExtractor,
    TiffExtractor,
    detect_mime,
    extract_metadata,
    metadata_markdown,
    register_extractor,
    unregister_extractor,
)

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


def ztxt_chunk(key: str, value: str) -> bytes:
    body = key.encode("latin-1") + b"\0\0" + zlib.compress(value.encode("latin-1"))
    return png_chunk(b"zTXt", body)


def itxt_chunk(key: str, value: str, *, compressed: bool = False) -> bytes:
    payload = value.encode("utf-8")
    if compressed:
        payload = zlib.compress(payload)
    flag = b"\1\0" if compressed else b"\0\0"
    body = key.encode("latin-1") + b"\0" + flag + b"en\0" + b"Titel\0" + payload
    return png_chunk(b"iTXt", body)


# TIFF field types used by the writer.
SHORT, LONG, RATIONAL, ASCII = 3, 4, 5, 2


@dataclass
class TiffPage:
    """One image of a TIFF built by :func:`make_tiff`."""

    width: int
    height: int
    fmt: str  # struct code of one sample: "H" uint16, "f" float32, "B" uint8
    sample_format: int  # TIFF SampleFormat: 1 uint, 2 int, 3 float
    samples: int = 1
    strings: dict[int, str] = field(default_factory=dict)
    rationals: dict[int, tuple[int, int]] = field(default_factory=dict)
    extra: list[tuple[int, int, int, bytes]] = field(default_factory=list)


def make_tiff(
    order: str, pages: Sequence[TiffPage], *, bigtiff: bool = False, loop: bool = False
) -> bytes:
    """A TIFF (or BigTIFF) with one uncompressed strip per page; ``loop`` links the last
    page back to the first."""
    mark = b"II" if order == "<" else b"MM"
    if bigtiff:
        buf = bytearray(mark + struct.pack(order + "HHHQ", 43, 8, 0, 0))
        next_at = 8
    else:
        buf = bytearray(mark + struct.pack(order + "HI", 42, 0))
        next_at = 4
    offset_fmt = "Q" if bigtiff else "I"
    inline = 8 if bigtiff else 4
    first_ifd = 0
    for page in pages:
        count = page.width * page.height * page.samples
        values: list[float] = [(i * 37) % 65_000 for i in range(count)]
        if page.fmt == "f":
            values = [v / 4 - 10.5 for v in values]
        elif page.fmt == "B":
            values = [v % 256 for v in values]
        pixels = struct.pack(f"{order}{count}{page.fmt}", *values)
        strip = len(buf)
        buf += pixels + b"\0" * (len(pixels) % 2)
        bits = struct.calcsize(page.fmt) * 8

        def u16(*vals: int) -> bytes:
            return struct.pack(f"{order}{len(vals)}H", *vals)

        def u32(*vals: int) -> bytes:
            return struct.pack(f"{order}{len(vals)}I", *vals)

        spp = page.samples
        entries = [
            (256, LONG, 1, u32(page.width)),
            (257, LONG, 1, u32(page.height)),
            (258, SHORT, spp, u16(*[bits] * spp)),
            (259, SHORT, 1, u16(1)),
            (262, SHORT, 1, u16(2 if spp == 3 else 1)),
            (273, LONG, 1, u32(strip)),
            (277, SHORT, 1, u16(spp)),
            (278, LONG, 1, u32(page.height)),
            (279, LONG, 1, u32(len(pixels))),
            (339, SHORT, spp, u16(*[page.sample_format] * spp)),
        ]
        entries += [
            (tag, ASCII, len(text.encode()) + 1, text.encode() + b"\0")
            for tag, text in page.strings.items()
        ]
        entries += [(tag, RATIONAL, 1, u32(*pair)) for tag, pair in page.rationals.items()]
        # Extra entries replace the defaults with the same tag.
        entries = sorted({entry[0]: entry for entry in [*entries, *page.extra]}.values())

        ifd = len(buf)
        count_size, entry_size = (8, 20) if bigtiff else (2, 12)
        extra_at = ifd + count_size + len(entries) * entry_size + inline
        body = bytearray(struct.pack(order + ("Q" if bigtiff else "H"), len(entries)))
        extra = bytearray()
        for tag, ftype, n, payload in entries:
            if len(payload) <= inline:
                value = payload.ljust(inline, b"\0")
            else:
                value = struct.pack(order + offset_fmt, extra_at + len(extra))
                extra += payload + b"\0" * (len(payload) % 2)
            body += struct.pack(order + ("HHQ" if bigtiff else "HHI"), tag, ftype, n) + value
        struct.pack_into(order + offset_fmt, buf, next_at, ifd)
        first_ifd = first_ifd or ifd
        next_at = ifd + len(body)
        buf += body + b"\0" * inline + extra
    if loop:
        struct.pack_into(order + offset_fmt, buf, next_at, first_ifd)
    return bytes(buf)


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
    assert meta.md5 == hashlib.md5(data).hexdigest()
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
    monkeypatch.setattr(md, "_entry_points_loaded", True)
    yield
    EXTRACTORS[:] = saved


# --------------------------------------------------------------------------- PNG


def test_png_header_and_text_chunks(tmp_path: Path) -> None:
    texts = [
        text_chunk("Software", "msi-imager 2.1"),
        ztxt_chunk("Comment", "compressed comment " * 3),
        itxt_chunk("Description", "Probe 5 µm"),
        itxt_chunk("Author", "Zoë", compressed=True),
    ]
    path = write(tmp_path / "scan.png", make_png(7, 3, text=texts))
    meta = extract_metadata(path, "run-1/scan.png")

    assert meta.relpath == "run-1/scan.png"
    assert meta.mime_type == "image/png"
    assert (meta.extractor, meta.extractor_version) == ("png", "1")
    assert meta.warnings == []
    assert_generic_facts(meta, path)
    assert meta.details == {
        "text_keys": ["Software", "Comment", "Description", "Author"],
        "text": {
            "Software": "msi-imager 2.1",
            "Comment": "compressed comment " * 3,
            "Description": "Probe 5 µm",
            "Author": "Zoë",
        },
        "width": 7,
        "height": 3,
        "bit_depth": 8,
        "color_type": "rgb",
        "interlace": "none",
    }


@pytest.mark.parametrize(
    ("color_type", "bit_depth", "interlace", "name", "interlace_name"),
    [
        (0, 16, 0, "grayscale", "none"),
        (3, 4, 0, "palette", "none"),
        (4, 8, 1, "grayscale_alpha", "adam7"),
        (6, 16, 0, "rgba", "none"),
    ],
)
def test_png_color_types(
    tmp_path: Path, color_type: int, bit_depth: int, interlace: int, name: str, interlace_name: str
) -> None:
    data = make_png(4, 2, color_type=color_type, bit_depth=bit_depth, interlace=interlace)
    meta = extract_metadata(write(tmp_path / "a.png", data))
    assert meta.warnings == []
    assert meta.details["color_type"] == name
    assert meta.details["bit_depth"] == bit_depth
    assert meta.details["interlace"] == interlace_name


def test_truncated_png_keeps_header_and_warns(tmp_path: Path) -> None:
    data = make_png(64, 64)
    idat = data.index(b"IDAT")
    path = write(tmp_path / "cut.png", data[: idat + 20])
    meta = extract_metadata(path)
    assert meta.extractor == "png"
    assert (meta.details["width"], meta.details["height"]) == (64, 64)
    assert len(meta.warnings) == 1
    assert "truncated" in meta.warnings[0]
    assert "'IDAT'" in meta.warnings[0]
    assert_generic_facts(meta, path)


def test_png_cut_after_signature_and_bad_crc(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "sig.png", md.PNG_SIGNATURE))
    assert meta.mime_type == "image/png"
    assert any("truncated" in w for w in meta.warnings)

    data = bytearray(make_png(2, 2, text=[text_chunk("k", "v")]))
    data[data.index(b"tEXt") + 5] ^= 0xFF  # flip a byte of the value
    meta = extract_metadata(write(tmp_path / "crc.png", bytes(data)))
    assert meta.details["width"] == 2
    assert any("CRC mismatch in 'tEXt'" in w for w in meta.warnings)


def test_png_text_chunks_are_capped(tmp_path: Path) -> None:
    texts = [text_chunk(f"k{i}", "x" * 500) for i in range(60)]
    meta = extract_metadata(write(tmp_path / "many.png", make_png(1, 1, text=texts)))
    assert meta.warnings == []
    keys = meta.details["text_keys"]
    assert isinstance(keys, list) and len(keys) == 50
    text = meta.details["text"]
    assert isinstance(text, dict)
    assert len(str(text["k0"])) == md.MAX_STRING_CHARS


def test_png_zip_bomb_text_is_bounded(tmp_path: Path) -> None:
    bomb = png_chunk(b"zTXt", b"bomb\0\0" + zlib.compress(b"A" * (50 * MIB), 9))
    meta = extract_metadata(write(tmp_path / "bomb.png", make_png(1, 1, text=[bomb])))
    assert meta.warnings == []
    text = meta.details["text"]
    assert isinstance(text, dict)
    assert len(str(text["bomb"])) == md.MAX_STRING_CHARS


def test_png_content_wins_over_extension(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "really-a-png.tif", make_png(3, 5)))
    assert meta.mime_type == "image/png"
    assert meta.extractor == "png"
    assert meta.details["height"] == 5


# --------------------------------------------------------------------------- TIFF

COMMON_STRINGS = {
    270: "Mass spec image, 3 x 2 pixels",
    271: "Bruker",
    272: "timsTOF fleX",
    305: "msi-prefect test writer",
    306: "2024:05:17 10:11:12",
}


def test_little_endian_uint16_tiff_two_pages(tmp_path: Path) -> None:
    first = TiffPage(
        3,
        2,
        "H",
        1,
        strings=COMMON_STRINGS,
        rationals={282: (300, 1), 283: (145, 2)},
        extra=[(296, SHORT, 1, struct.pack("<H", 2))],
    )
    path = write(tmp_path / "stack.tif", make_tiff("<", [first, TiffPage(3, 2, "H", 1)]))
    meta = extract_metadata(path)

    assert meta.mime_type == "image/tiff"
    assert (meta.extractor, meta.extractor_version) == ("tiff", "1")
    assert meta.warnings == []
    assert_generic_facts(meta, path)
    assert meta.details == {
        "byte_order": "little",
        "bigtiff": False,
        "width": 3,
        "height": 2,
        "bits_per_sample": 16,
        "samples_per_pixel": 1,
        "sample_format": "uint",
        "dtype": "uint16",
        "compression": "none",
        "photometric": "min_is_black",
        "planar_configuration": "contig",
        "tiled": False,
        "tags": {
            "ImageDescription": "Mass spec image, 3 x 2 pixels",
            "Make": "Bruker",
            "Model": "timsTOF fleX",
            "Software": "msi-prefect test writer",
            "DateTime": "2024:05:17 10:11:12",
            "XResolution": 300.0,
            "YResolution": 72.5,
            "ResolutionUnit": "inch",
        },
        "flavor": None,
        "page_count_capped": False,
        "page_count": 2,
    }


def test_big_endian_float32_rgb_tiff_two_pages(tmp_path: Path) -> None:
    # Three samples put BitsPerSample and SampleFormat out of line: big-endian SHORT arrays.
    pages = [TiffPage(4, 5, "f", 3, samples=3, strings={305: "be writer"}) for _ in range(2)]
    path = write(tmp_path / "float.tiff", make_tiff(">", pages))
    meta = extract_metadata(path)

    assert meta.warnings == []
    assert_generic_facts(meta, path)
    details = meta.details
    assert details["byte_order"] == "big"
    assert details["bigtiff"] is False
    assert (details["width"], details["height"]) == (4, 5)
    assert details["samples_per_pixel"] == 3
    assert details["bits_per_sample"] == 32
    assert details["sample_format"] == "float"
    assert details["dtype"] == "float32"
    assert details["photometric"] == "rgb"
    assert details["page_count"] == 2
    assert details["tags"] == {"Software": "be writer"}


def test_bigtiff_is_detected(tmp_path: Path) -> None:
    pages = [TiffPage(2, 2, "B", 2), TiffPage(2, 2, "B", 2), TiffPage(2, 2, "B", 2)]
    meta = extract_metadata(write(tmp_path / "big.tif", make_tiff("<", pages, bigtiff=True)))
    assert meta.warnings == []
    assert meta.details["bigtiff"] is True
    assert meta.details["dtype"] == "int8"
    assert meta.details["page_count"] == 3


def test_tiff_mixed_samples_and_named_codes(tmp_path: Path) -> None:
    page = TiffPage(
        1,
        1,
        "H",
        1,
        samples=2,
        extra=[(259, SHORT, 1, struct.pack(">H", 50000)), (262, SHORT, 1, struct.pack(">H", 7))],
    )
    data = bytearray(make_tiff(">", [page]))
    # Make the second sample signed: SampleFormat (1, 2).
    ifd = struct.unpack(">I", data[4:8])[0]
    (count,) = struct.unpack(">H", data[ifd : ifd + 2])
    for i in range(count):
        pos = ifd + 2 + 12 * i
        if struct.unpack(">H", data[pos : pos + 2])[0] == 339:
            data[pos + 8 : pos + 12] = struct.pack(">HH", 1, 2)
    meta = extract_metadata(write(tmp_path / "mixed.tif", bytes(data)))
    assert meta.details["sample_format"] == ["uint", "int"]
    assert meta.details["dtype"] is None
    assert meta.details["compression"] == "zstd"
    assert meta.details["photometric"] == "unknown(7)"


def test_tiff_long_description_is_truncated_and_flavor_detected(tmp_path: Path) -> None:
    description = '<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org">' + "x" * 5000
    page = TiffPage(1, 1, "H", 1, strings={270: description})
    meta = extract_metadata(write(tmp_path / "ome.tif", make_tiff("<", [page])))
    tags = meta.details["tags"]
    assert isinstance(tags, dict)
    assert len(str(tags["ImageDescription"])) == 1000
    assert str(tags["ImageDescription"]).endswith("…")
    assert meta.details["flavor"] == "ome"


def test_tiff_page_count_is_capped(tmp_path: Path) -> None:
    path = write(tmp_path / "pages.tif", make_tiff("<", [TiffPage(1, 1, "H", 1)] * 5))
    meta = extract_metadata(path, extractors=[TiffExtractor(max_pages=3)])
    assert meta.warnings == []
    assert meta.details["page_count"] == 3
    assert meta.details["page_count_capped"] is True


def test_corrupt_tiff_warns_instead_of_raising(tmp_path: Path) -> None:
    # A valid header whose first IFD lies far beyond the end of the file.
    path = write(tmp_path / "bad.tif", b"II*\x00" + struct.pack("<I", 10_000) + b"\0" * 40)
    meta = extract_metadata(path)
    assert meta.extractor == "tiff"
    assert meta.details == {"byte_order": "little", "bigtiff": False}
    assert len(meta.warnings) == 1 and "beyond end of file" in meta.warnings[0]
    assert_generic_facts(meta, path)

    meta = extract_metadata(write(tmp_path / "junk.tif", b"not a tiff at all"))
    assert meta.mime_type == "image/tiff"
    assert meta.details == {}
    assert meta.warnings == ["tiff: not a TIFF file (bad byte order mark or magic number)"]


def test_tiff_broken_ifd_chain(tmp_path: Path) -> None:
    data = make_tiff("<", [TiffPage(2, 2, "H", 1), TiffPage(2, 2, "H", 1)])
    cut = write(tmp_path / "cut.tif", data[: len(data) - 40])
    meta = extract_metadata(cut)
    assert meta.details["width"] == 2
    assert meta.details["page_count"] == 1
    assert any("page 2" in w for w in meta.warnings)

    looped = make_tiff("<", [TiffPage(2, 2, "H", 1), TiffPage(2, 2, "H", 1)], loop=True)
    meta = extract_metadata(write(tmp_path / "loop.tif", looped))
    assert meta.details["page_count"] == 2
    assert any("loops" in w for w in meta.warnings)


def test_tiff_hostile_entry_counts(tmp_path: Path) -> None:
    header = b"MM\x00*" + struct.pack(">I", 8)
    meta = extract_metadata(write(tmp_path / "huge.tif", header + struct.pack(">H", 65535)))
    assert any("corrupt" in w for w in meta.warnings)

    # SamplesPerPixel 2**32-1 and a BitsPerSample count of 2**32-1 pointing nowhere.
    page = TiffPage(1, 1, "H", 1)
    data = bytearray(make_tiff("<", [page]))
    ifd = struct.unpack("<I", data[4:8])[0]
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for i in range(count):
        pos = ifd + 2 + 12 * i
        tag = struct.unpack("<H", data[pos : pos + 2])[0]
        if tag == 277:
            data[pos + 2 : pos + 12] = struct.pack("<HII", LONG, 1, 2**32 - 1)
        if tag == 258:
            data[pos + 2 : pos + 12] = struct.pack("<HII", SHORT, 2**32 - 1, 2**31)
    meta = extract_metadata(write(tmp_path / "hostile.tif", bytes(data)))
    assert meta.details["samples_per_pixel"] == 2**32 - 1
    assert meta.details["bits_per_sample"] == 1  # unreadable: default
    assert any("tag 258" in w for w in meta.warnings)


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


def test_md5_is_optional(tmp_path: Path) -> None:
    meta = extract_metadata(write(tmp_path / "a.bin", b"abc"), compute_md5=False)
    assert meta.md5 is None
    assert meta.sha256 == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    ("name", "extractor", "details", "warned"),
    [
        ("empty.bin", "generic", {}, False),
        ("empty.csv", "csv", None, False),
        ("empty.json", "json", {"top_level_type": None, "parsed": False}, True),
        ("empty.png", "png", {}, True),
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
    assert meta.md5 == hashlib.md5(b"").hexdigest()
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
    assert extract_metadata(path).extractor == "png"

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

    monkeypatch.setattr(md, "entry_points", fake_entry_points)
    monkeypatch.setattr(md, "_entry_points_loaded", False)
    meta = extract_metadata(write(tmp_path / "a.png", make_png(1, 1)))
    assert calls == ["msi_prefect.extractors"]
    assert [e.name for e in EXTRACTORS[:3]] == ["plugin-a", "plugin-b", "png"]
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
        "details",
        "warnings",
    }


def test_markdown_is_readable_and_escaped(tmp_path: Path) -> None:
    hostile = [text_chunk("Title", "a | b <script>alert(1)</script> [x](http://evil)")]
    data = make_png(5, 4, text=hostile)
    path = write(tmp_path / "img_1.png", data[: len(data) - 12])  # drop IEND: one warning
    meta = extract_metadata(path)
    text = metadata_markdown(meta)

    assert text.startswith("### img\\_1.png\n")
    assert f"| SHA-256 | `{meta.sha256}` |" in text
    assert f"| Size | {len(data) - 12} B ({len(data) - 12:,} bytes) |" in text
    assert "| width | 5 |" in text
    assert "| color\\_type | rgb |" in text
    assert (
        "| text.Title | a \\| b &lt;script&gt;alert(1)&lt;/script&gt; \\[x\\](http://evil) |"
        in text
    )
    assert "<script>" not in text
    assert "**Warnings**" in text and "truncated" in text
    # Every table row has exactly the expected number of unescaped cell separators.
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.replace("\\|", "").count("|") == 3

    csv_meta = extract_metadata(write(tmp_path / "t.tsv", "a\tb\n1\t2\n"))
    # Control characters are shown JSON-escaped (the backslash itself escaped for markdown).
    assert '| delimiter | "\\\\t" |' in metadata_markdown(csv_meta)
    assert "MiB" in md._human_size(5 * MIB) and md._human_size(3 * 1024**4).endswith("TiB")


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
    assert isinstance(PngExtractor(), md.Extractor)
