"""A minimal Gatan DigitalMicrograph 4 (DM4) writer, for the benchmark only.

Nothing in msi_prefect writes DM files; the 4 GiB benchmark of issue 16 needs one. This
module writes a DM4 file holding one uint16 image stack and a small thumbnail, laid out as
DigitalMicrograph lays out its own files (checked against ``../shared/samples/gatan_2d.dm4``
by :func:`compare_with_sample`):

* **Header** (big-endian): version ``u32`` = 4, length of the root tag group ``u64`` (the
  file's size less the 16-byte header and the 8 zero bytes at the end), byte order of the
  tag data ``u32`` (1: little-endian).
* **Root tag group**: ``sorted u8``, ``open u8``, number of tags ``u64``.
* **Each tag**: kind ``u8`` (20 group, 21 data), label length ``u16``, label (may be
  empty), then the number of bytes of the rest of the tag ``u64`` (DM4 only; DM3 has no
  such field and 4-byte counts).

  * a *group* continues like the root group, followed by its tags;
  * a *data* tag continues with ``%%%%``, the number of entries of its type description
    ``u64``, the entries (``u64`` each), and the value in the byte order of the header:
    a simple value is ``[type]``; an array ``[20, element type, length]``; a struct
    ``[15, 0, fields, 0, type, 0, type, ...]``.
* **End**: 8 zero bytes.

Types used here: 3 int32, 11 int64, 4 uint16 (also a character of a text), 5 uint32, 6 float32,
8 bool, 20 array. Image data types (``ImageData.DataType``): 10 uint16, 23 RGBA.

The pixel data of the stack is not written but skipped with a seek, so the file is sparse
and reads as zeros except where :func:`write_dm4_stack` writes the bright half of the middle
frame.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

DM_VERSION: Final = 4
LITTLE_ENDIAN_DATA: Final = 1
GROUP_TAG: Final = 20
DATA_TAG: Final = 21
DATA_MARKER: Final = b"%%%%"
END_PADDING: Final = b"\0" * 8
#: Header bytes before the root group: version, root length, byte order.
HEADER_SIZE: Final = 16

# Type codes of tag values.
INT32: Final = 3
INT64: Final = 11
UINT16: Final = 4
UINT32: Final = 5
FLOAT32: Final = 6
BOOL: Final = 8
ARRAY: Final = 20
#: struct format (little-endian) and size of each simple type.
SIMPLE_FORMATS: Final = {
    INT32: "<i",
    INT64: "<q",
    UINT16: "<H",
    UINT32: "<I",
    FLOAT32: "<f",
    BOOL: "<?",
}

# ImageData.DataType codes.
IMAGE_UINT16: Final = 10
IMAGE_RGBA: Final = 23
THUMBNAIL_SIZE: Final = 2
#: DM identifies each image by four 32-bit numbers; any will do for one document.
UNIQUE_ID: Final = (1, 2, 3, 4)
RGBA_BYTES: Final = 4


@dataclass(frozen=True)
class Value:
    """A simple value (one number) of a type code."""

    type_code: int
    value: float | int | bool

    def info(self) -> list[int]:
        """Its type description."""
        return [self.type_code]

    def payload(self) -> bytes:
        """Its bytes."""
        return struct.pack(SIMPLE_FORMATS[self.type_code], self.value)


@dataclass(frozen=True)
class Array:
    """An array of simple values; ``values`` None: ``length`` elements left as a hole."""

    element_type: int
    length: int
    values: Sequence[int | float] | None = None

    def info(self) -> list[int]:
        """Its type description."""
        return [ARRAY, self.element_type, self.length]

    def payload(self) -> bytes:
        """Its bytes (empty for a hole)."""
        if self.values is None:
            return b""
        fmt = SIMPLE_FORMATS[self.element_type]
        return b"".join(struct.pack(fmt, v) for v in self.values)

    @property
    def nbytes(self) -> int:
        """Bytes of the array in the file."""
        return self.length * struct.calcsize(SIMPLE_FORMATS[self.element_type])


def text(value: str) -> Array:
    """A text as DM stores labels and units: an array of UTF-16 code units."""
    units = list(
        struct.unpack(f"<{len(value.encode('utf-16-le')) // 2}H", value.encode("utf-16-le"))
    )
    return Array(UINT16, len(units), units)


@dataclass(frozen=True)
class Struct:
    """A struct of simple values (e.g. a rectangle, a pixel size pair)."""

    fields: Sequence[Value]

    def info(self) -> list[int]:
        """Its type description: 15, 0, the field count, then 0 and a type per field."""
        info = [15, 0, len(self.fields)]
        for item in self.fields:
            info += [0, item.type_code]
        return info

    def payload(self) -> bytes:
        """Its bytes."""
        return b"".join(item.payload() for item in self.fields)


Data = Value | Array | Struct


@dataclass
class Group:
    """A tag group: labelled (or unlabelled, as list items are) tags in order."""

    tags: list[tuple[str, Group | Data]] = field(default_factory=list)
    sorted: bool = True

    def add(self, label: str, tag: Group | Data) -> Group:
        """Append a tag; returns self for chaining."""
        self.tags.append((label, tag))
        return self


@dataclass(frozen=True)
class Hole:
    """Bytes left unwritten (a sparse region that reads as zeros)."""

    size: int


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def _group_body(group: Group) -> Iterator[bytes | Hole]:
    yield struct.pack(">BB", group.sorted, False) + _u64(len(group.tags))
    for label, tag in group.tags:
        name = label.encode("latin-1")
        head = struct.pack(">BH", GROUP_TAG if isinstance(tag, Group) else DATA_TAG, len(name))
        body = list(_group_body(tag) if isinstance(tag, Group) else _data_body(tag))
        yield head + name + _u64(_length(body))
        yield from body


def _data_body(tag: Data) -> Iterator[bytes | Hole]:
    info = tag.info()
    yield DATA_MARKER + _u64(len(info)) + b"".join(_u64(entry) for entry in info)
    if isinstance(tag, Array) and tag.values is None:
        yield Hole(tag.nbytes)
    else:
        yield tag.payload()


def _length(parts: Sequence[bytes | Hole]) -> int:
    return sum(part.size if isinstance(part, Hole) else len(part) for part in parts)


def write_dm4(path: Path, root: Group) -> list[int]:
    """Write ``root`` as a DM4 file; the offsets of its holes (in order) are returned."""
    body = list(_group_body(root))
    holes: list[int] = []
    with path.open("wb") as out:
        out.write(struct.pack(">I", DM_VERSION) + _u64(_length(body)))
        out.write(struct.pack(">I", LITTLE_ENDIAN_DATA))
        for part in body:
            if isinstance(part, Hole):
                holes.append(out.tell())
                out.seek(part.size, 1)
            else:
                out.write(part)
        out.write(END_PADDING)
    return holes


def _calibration(origin: float, scale: float, unit: str) -> Group:
    return (
        Group()
        .add("Origin", Value(FLOAT32, origin))
        .add("Scale", Value(FLOAT32, scale))
        .add("Units", text(unit))
    )


def _image(
    name: str,
    dimensions: Sequence[int],
    data_type: int,
    pixel_depth: int,
    data: Array,
    calibrations: Sequence[tuple[float, str]],
    tags: Group,
) -> Group:
    """One entry of ``ImageList``; ``dimensions`` fastest axis first, as DM stores them."""
    unique_id = Group(sorted=False)
    for part in UNIQUE_ID:
        unique_id.add("", Value(UINT32, part))
    dimension = Group(sorted=False)
    for scale, unit in calibrations:
        dimension.add("", _calibration(0.0, scale, unit))
    sizes = Group(sorted=False)
    for size in dimensions:
        sizes.add("", Value(UINT32, size))
    image_data = (
        Group()
        .add(
            "Calibrations",
            Group()
            .add("Brightness", _calibration(0.0, 1.0, ""))
            .add("Dimension", dimension)
            .add("DisplayCalibratedUnits", Value(BOOL, True)),
        )
        .add("Data", data)
        .add("DataType", Value(UINT32, data_type))
        .add("Dimensions", sizes)
        .add("PixelDepth", Value(UINT32, pixel_depth))
    )
    return (
        Group()
        .add("ImageData", image_data)
        .add("ImageTags", tags)
        .add("Name", text(name))
        .add("UniqueID", unique_id)
    )


@dataclass(frozen=True)
class StackSpec:
    """What :func:`write_dm4_stack` writes: a uint16 stack and its acquisition facts."""

    frames: int
    rows: int
    columns: int
    pixel_nm: float = 0.25
    frame_s: float = 0.1
    voltage_v: float = 200_000.0
    magnification: float = 500_000.0
    microscope: str = "Bench TEM"
    operator: str = "bench"
    bright: int = 1000

    @property
    def frame_bytes(self) -> int:
        """Bytes of one frame."""
        return self.rows * self.columns * 2


def stack_document(spec: StackSpec) -> Group:
    """The tag tree of a DM4 document: a 2 x 2 RGBA thumbnail, then the stack."""
    pixels = spec.frames * spec.rows * spec.columns
    thumbnail = _image(
        "Thumbnail",
        (THUMBNAIL_SIZE, THUMBNAIL_SIZE),
        IMAGE_RGBA,
        RGBA_BYTES,
        Array(INT32, THUMBNAIL_SIZE * THUMBNAIL_SIZE, [0] * THUMBNAIL_SIZE**2),
        [(1.0, ""), (1.0, "")],
        Group(),
    )
    image_tags = (
        Group()
        .add(
            "DataBar",
            Group()
            .add("Acquisition Date", text("12/5/2026"))
            .add("Acquisition Time", text("2:00:00 PM")),
        )
        .add(
            "Microscope Info",
            Group()
            .add("Indicated Magnification", Value(FLOAT32, spec.magnification))
            .add("Microscope", text(spec.microscope))
            .add("Voltage", Value(FLOAT32, spec.voltage_v)),
        )
        .add("Session Info", Group().add("Operator", text(spec.operator)))
    )
    stack = _image(
        "Bench stack",
        (spec.columns, spec.rows, spec.frames),
        IMAGE_UINT16,
        2,
        Array(UINT16, pixels),  # a hole: written sparsely by write_dm4_stack
        [(spec.pixel_nm, "nm"), (spec.pixel_nm, "nm"), (spec.frame_s, "s")],
        image_tags,
    )
    return (
        Group()
        .add("ImageList", Group(sorted=False).add("", thumbnail).add("", stack))
        .add("InImageMode", Value(BOOL, True))
        .add(
            "Thumbnails",
            Group(sorted=False).add(
                "",
                Group()
                .add("ImageIndex", Value(UINT32, 0))
                .add(
                    "SourceSize_Pixels",
                    Struct([Value(INT64, THUMBNAIL_SIZE), Value(INT64, THUMBNAIL_SIZE)]),
                ),
            ),
        )
    )


def write_dm4_stack(path: Path, spec: StackSpec) -> int:
    """Write the stack document; the middle frame's left half is ``spec.bright``.

    Returns:
        The offset of the pixel data in the file.
    """
    import numpy as np

    (offset,) = write_dm4(path, stack_document(spec))
    frame = np.zeros((spec.rows, spec.columns), dtype="<u2")
    frame[:, : spec.columns // 2] = spec.bright
    with path.open("r+b") as out:
        out.seek(offset + spec.frames // 2 * spec.frame_bytes)
        out.write(frame.tobytes())
    return offset


def _skeleton(tags: object, path: str = "") -> set[tuple[str, str]]:
    """(label path, kind of value) of every tag of a parsed tree.

    List items (``TagGroupN``, ``DataN``) count as one label ``[]``, and a text (a string,
    or an empty list when it is empty) as ``text``: a stack has one more axis than an
    image, and its units are not empty.
    """
    if isinstance(tags, dict) and not {"offset", "size_bytes"} <= set(tags):
        found: set[tuple[str, str]] = set()
        for key, value in tags.items():
            label = "[]" if re.fullmatch(r"(TagGroup|Data)[0-9]+", key) else key
            found |= _skeleton(value, f"{path}/{label}")
        return found
    if isinstance(tags, dict):
        return {(path, "data block")}
    return {(path, "text" if isinstance(tags, str | list) else type(tags).__name__)}


def compare_with_sample(written: Path, sample: Path) -> list[str]:
    """How RosettaSciIO's DM parser sees ``written`` unlike the real ``sample``.

    Compares the header (version, byte order), the number of images that are not
    thumbnails, and for the last image the labels and kinds of value of its
    ``ImageData`` (the pixel data must parse as a data block), ``Name`` and ``UniqueID``,
    and those of the thumbnail list.

    Returns:
        One line per difference; empty when the structures agree.
    """
    from rsciio.digitalmicrograph._api import DigitalMicrographReader

    parsed = []
    for path in (written, sample):
        with path.open("rb") as f:
            reader = DigitalMicrographReader(f)
            reader.parse_file()
            parsed.append(reader)
    mine, theirs = parsed
    differences = []
    for name in ("dm_version", "endian"):
        if getattr(mine, name) != getattr(theirs, name):
            differences.append(f"{name}: {getattr(mine, name)} != {getattr(theirs, name)}")
    images = [reader.get_image_dictionaries() or [] for reader in parsed]
    if len(images[0]) != len(images[1]):
        differences.append(f"images: {len(images[0])} != {len(images[1])}")
    for part in ("ImageData", "Name", "UniqueID"):
        mine_part = _skeleton(images[0][-1][part])
        theirs_part = _skeleton(images[1][-1][part])
        if mine_part != theirs_part:
            differences.append(f"{part}: {sorted(mine_part ^ theirs_part)}")
    mine_thumbs = _skeleton(mine.tags_dict["Thumbnails"])
    theirs_thumbs = _skeleton(theirs.tags_dict["Thumbnails"])
    if mine_thumbs != theirs_thumbs:
        differences.append(f"Thumbnails: {sorted(mine_thumbs ^ theirs_thumbs)}")
    return differences


def main() -> None:
    """Write a stack and print how RosettaSciIO reads it beside the sample DM4."""
    import argparse

    from rsciio.digitalmicrograph import file_reader

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the DM4 file to write")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--columns", type=int, default=32)
    parser.add_argument("--sample", type=Path, default=None, help="a real DM4 file to compare")
    args = parser.parse_args()
    write_dm4_stack(args.out, StackSpec(args.frames, args.rows, args.columns))
    (signal,) = file_reader(str(args.out), lazy=True)
    print("shape", signal["data"].shape, "dtype", signal["data"].dtype)
    for axis in signal["axes"]:
        print("axis", axis)
    if args.sample is not None:
        print("differences from the sample:", compare_with_sample(args.out, args.sample) or "none")


if __name__ == "__main__":
    main()
