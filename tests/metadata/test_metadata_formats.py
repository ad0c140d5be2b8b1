"""Metadata of real instrument files: the values each sample truly holds, and damaged copies.

The samples live outside the repository, in ``../shared/samples`` beside the work tree
(real files from RosettaSciIO's test data, see its README); the expected values were read
from them with tifffile, RosettaSciIO and h5py directly. The fuzz tests damage copies of
them in ``tmp_path`` (cut short, bits flipped): every extractor must still return the
generic facts, and a note of what it could not read, never raise.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.metadata import FileMetadata, extract_metadata
from tests.samples import SAMPLES, needs_samples

# The repository's root, found upwards so the file may move into a sub-folder of tests/.
#: A TIA .emi file is read together with its .ser data file beside it.
COMPANIONS = {"fei_tia_tem_search.emi": ("fei_tia_tem_search_1.ser",)}
#: Largest JSON record a sample may produce (the format trees are bounded).
MAX_RECORD_CHARS = 128 * 1024
#: Bit-flipped copies per sample, and bits flipped in each.
FLIPPED_COPIES = 6
FLIPPED_BITS = 16


def quantity(value: float, unit: str | None) -> dict[str, Any]:
    return {"value": value, "unit": unit}


@dataclass(frozen=True)
class Expected:
    """What one sample's record must hold.

    Attributes:
        extractor: The extractor that describes it.
        normalized: Normalised fields and their exact values.
        instrument: Fields of ``normalized.instrument``.
        details: Dotted paths into ``details`` and their values.
    """

    extractor: str
    normalized: dict[str, Any]
    instrument: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


GATAN_2D = Expected(
    "rosettasciio",
    {
        "shape": [2, 2],
        "axes": ["y", "x"],
        "dtype": "int16",
        # DigitalMicrograph stores scale 1 and no unit: an uncalibrated image.
        "pixel_size": {"y": quantity(1.0, None), "x": quantity(1.0, None)},
    },
    {"software": "Gatan DigitalMicrograph"},
    {"reader": "rsciio.digitalmicrograph", "signals.0.title": "test"},
)
TIA_PIXEL = quantity(5.261214205047081, "nm")

EXPECTED: dict[str, Expected] = {
    "gatan_2d.dm3": GATAN_2D,
    "gatan_2d.dm4": GATAN_2D,
    "fei_helios_sem_8bit.tif": Expected(
        "tiff",
        {
            "acquired_at": "2016-06-13T17:06:40",
            "shape": [471, 512],
            "axes": ["y", "x"],
            "dtype": "uint8",
            "pixel_size": {"x": quantity(3.3724, "µm"), "y": quantity(3.3724, "µm")},
            "beam_energy": quantity(5.0, "keV"),
            "field_of_view": {
                "width": quantity(1.72667, "mm"),
                "height": quantity(1.4906, "mm"),
            },
            "detector": "ETD (SE)",
            "operator": "supervisor",
        },
        {
            "vendor": "FEI",
            "model": 'Helios NanoLab" 660',
            "serial_number": "9922607",
            "software": "5.5.1.3318",
        },
        {"fei_metadata.Beam.HV": 5000, "fei_metadata.Scan.PixelWidth": 3.3724e-06},
    ),
    "zeiss_sem_512.tif": Expected(
        "tiff",
        {
            "acquired_at": "2018-09-25T08:20:42",
            "shape": [384, 512],
            "dtype": "uint8",
            "pixel_size": {"x": quantity(5.825, "nm"), "y": quantity(5.825, "nm")},
            "beam_energy": quantity(5.0, "keV"),
            "magnification": 50000.0,
            "field_of_view": {
                "width": quantity(5.965, "µm"),
                "height": quantity(4.474, "µm"),
            },
            "detector": "InLens",
            "operator": "LIBERATO",
        },
        {"vendor": "Zeiss", "serial_number": "ULTRA 55-36-06"},
        {"sem_metadata.ap_mag": ["Mag", "50.00 K X"]},
    ),
    "zeiss_axiovision_bw.tif": Expected(
        "tiff",
        {
            "acquired_at": "2016-06-13T16:08:49",
            "shape": [10, 13],
            "dtype": "uint8",
            # 150 dpi is a display resolution, not a calibration: no pixel size.
            "pixel_size": {},
        },
        {"model": "AxioCamERc5s"},
        {"tags.HostComputer": "E-D07MNJME25PJ", "pages": 1},
    ),
    "imagej_scaled.tif": Expected(
        "tiff",
        {
            "shape": [68, 68],
            "dtype": "float32",
            # ImageJ: unit=micron, XResolution 5928571/1000000 pixels per micron.
            "pixel_size": {
                "x": quantity(0.168674711, "µm"),
                "y": quantity(0.168674711, "µm"),
            },
        },
        details={"imagej_metadata.unit": "micron", "imagej_metadata.ImageJ": "1.51a"},
    ),
    "fei_tia_tem_search.emi": Expected(
        "rosettasciio",
        {
            "acquired_at": "2016-02-22T18:50:01",
            "shape": [128, 128],
            "axes": ["y", "x"],
            "dtype": "int32",
            "pixel_size": {"y": TIA_PIXEL, "x": TIA_PIXEL},
            "beam_energy": quantity(200.0, "keV"),
            "magnification": 22500.0,
            "detector": "BM-Ceta",
            "operator": "ERIC",
        },
        {
            "vendor": "FEI",
            "model": "Microscope TalosF200X 200 kV D6308 XTwin",
            "software": "FEI TIA",
        },
        {"reader": "rsciio.tia"},
    ),
    "fei_tia_tem_search_1.ser": Expected(
        "rosettasciio",
        {
            "shape": [128, 128],
            "dtype": "int32",
            "pixel_size": {"y": TIA_PIXEL, "x": TIA_PIXEL},
        },
        {"software": "FEI TIA"},
        {"original_metadata.ser_header_parameters.ArraySizeX": 128},
    ),
    "berkeley_image.emd": Expected(
        "rosettasciio",
        {"shape": [3, 3], "axes": ["dim0", "dim1"], "dtype": "int32"},
        details={"reader": "rsciio.emd", "original_metadata.EMD_version": "0.2"},
    ),
    "roi_scan_sum.mrc": Expected(
        "rosettasciio",
        # The header's cell lengths are negative: no usable pixel size.
        {"shape": [29, 12], "axes": ["y", "x"], "dtype": "float32", "pixel_size": {}},
        details={
            "original_metadata.std_header.NX": 12,
            "original_metadata.std_header.NY": 29,
        },
    ),
    "simple_signal.nxs": Expected(
        "hdf5",
        {
            "shape": [15, 1, 40, 40],
            "axes": ["yaxis", "xaxis", "dim2", "dim3"],
            "dtype": "float64",
            "beam_energy": quantity(12.0, "keV"),
        },
        details={
            "nexus.default_signal": "/entry1/rocks/data",
            "root_attributes.file_writer": "hyperspy_nexus_v3",
        },
    ),
}


def sample_names() -> list[str]:
    if not SAMPLES.is_dir():
        return []
    return sorted(p.name for p in SAMPLES.iterdir() if p.name != "README.md")


def dig(tree: Any, dotted: str) -> Any:
    """``tree["a"]["b"][0]`` for ``"a.b.0"``."""
    for part in dotted.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def copy_sample(name: str, folder: Path, content: bytes | None = None) -> Path:
    """The sample (or ``content`` under its name) in ``folder``, with its companions."""
    folder.mkdir(parents=True, exist_ok=True)
    for companion in COMPANIONS.get(name, ()):
        shutil.copy(SAMPLES / companion, folder / companion)
    target = folder / name
    target.write_bytes((SAMPLES / name).read_bytes() if content is None else content)
    return target


def assert_generic_facts(meta: FileMetadata, content: bytes) -> None:
    assert meta.size == len(content)
    assert meta.sha256 == hashlib.sha256(content).hexdigest()
    assert meta.md5 is None
    json.dumps(meta.to_json_dict(), allow_nan=False)


@needs_samples
def test_every_sample_has_expected_values() -> None:
    assert sample_names() == sorted(EXPECTED)


@needs_samples
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_values(name: str) -> None:
    expected = EXPECTED[name]
    meta = extract_metadata(SAMPLES / name)

    assert meta.warnings == []
    assert meta.extractor == expected.extractor
    for key, value in expected.normalized.items():
        assert meta.normalized[key] == value, key
    instrument = meta.normalized["instrument"]
    assert isinstance(instrument, dict)
    for key, value in expected.instrument.items():
        assert instrument[key] == value, key
    for path, value in expected.details.items():
        assert dig(meta.details, path) == value, path
    assert_generic_facts(meta, (SAMPLES / name).read_bytes())


@needs_samples
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_record_is_bounded_json(name: str) -> None:
    meta = extract_metadata(SAMPLES / name)
    record = meta.to_json_bytes().decode("utf-8")
    assert len(record) < MAX_RECORD_CHARS
    data = json.loads(record)
    assert data == meta.to_json_dict()
    assert FileMetadata.from_json_dict(data) == meta
    json.dumps(data, allow_nan=False)


@needs_samples
def test_vendor_block_past_the_bound_is_cut_with_a_count() -> None:
    """ImageJ's ``Info`` text is 37 KB; the string limit keeps the first 2 KiB."""
    meta = extract_metadata(SAMPLES / "imagej_scaled.tif")
    info = dig(meta.details, "imagej_metadata.Info")
    assert isinstance(info, str) and info.startswith("root.ApplicationBounds") and len(info) <= 2048
    assert info.endswith("…")


@needs_samples
def test_relpath_names_a_staging_file(tmp_path: Path) -> None:
    """The file on disk keeps its real suffix in the destination; relpath is reported."""
    path = copy_sample("zeiss_sem_512.tif", tmp_path)
    meta = extract_metadata(path, "runs/2018/zeiss_sem_512.tif")
    assert meta.relpath == "runs/2018/zeiss_sem_512.tif"
    assert meta.normalized["magnification"] == 50000.0


def test_ome_tiff_physical_sizes(tmp_path: Path) -> None:
    import numpy as np
    import tifffile

    path = tmp_path / "cells.ome.tif"
    sizes = {"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.5}
    metadata = {"axes": "ZYX", **sizes, "PhysicalSizeXUnit": "µm", "PhysicalSizeZUnit": "nm"}
    tifffile.imwrite(path, np.zeros((3, 20, 30), np.uint16), ome=True, metadata=metadata)

    meta = extract_metadata(path)
    assert meta.warnings == []
    assert meta.normalized["shape"] == [3, 20, 30]
    assert meta.normalized["axes"] == ["z", "y", "x"]
    assert meta.normalized["pixel_size"] == {
        "x": quantity(0.25, "µm"),
        "y": quantity(0.25, "µm"),  # OME's default unit
        "z": quantity(1.5, "nm"),
    }
    assert dig(meta.details, "ome_metadata.OME.Image.Pixels.SizeZ") == 3


def test_imagej_hyperstack_spacing(tmp_path: Path) -> None:
    import numpy as np
    import tifffile

    path = tmp_path / "stack.tif"
    metadata = {"spacing": 0.5, "unit": "um", "axes": "ZYX"}
    tifffile.imwrite(
        path, np.zeros((4, 20, 30), np.uint8), imagej=True, resolution=(4.0, 4.0), metadata=metadata
    )

    meta = extract_metadata(path)
    assert meta.normalized["shape"] == [4, 20, 30]
    assert meta.normalized["pixel_size"] == {
        "x": quantity(0.25, "µm"),
        "y": quantity(0.25, "µm"),
        "z": quantity(0.5, "µm"),
    }


def test_nexus_default_chain_and_incident_energy(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    path = tmp_path / "scan.nxs"
    with h5py.File(path, "w") as h5:
        h5.attrs["default"] = "entry"
        entry = h5.create_group("entry")
        entry.attrs.update(NX_class="NXentry", default="map")
        other = entry.create_group("first")  # an NXdata that is not the default
        other.attrs.update(NX_class="NXdata", signal="junk")
        other["junk"] = np.zeros(3)
        data = entry.create_group("map")
        data.attrs.update(NX_class="NXdata", signal="counts", axes=["y", "x"])
        data["counts"] = np.zeros((4, 6), dtype=np.uint32)
        beam = entry.create_group("instrument/beam")
        beam["incident_energy"] = 8048.0
        beam["incident_energy"].attrs["units"] = "eV"
        source = entry.create_group("instrument/source")
        source["energy"] = 6.0
        source["energy"].attrs["units"] = "GeV"

    meta = extract_metadata(path)
    assert meta.warnings == []
    assert meta.details["nexus"] == {"default_signal": "/entry/map/counts", "nxdata": "/entry/map"}
    assert meta.normalized["shape"] == [4, 6] and meta.normalized["axes"] == ["y", "x"]
    assert meta.normalized["dtype"] == "uint32"
    assert meta.normalized["beam_energy"] == quantity(8.048, "keV")


# --------------------------------------------------------------------------- Pillow


def test_png_header_and_text_through_pillow(tmp_path: Path) -> None:
    from PIL import Image, PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("Title", "grain boundary")
    path = tmp_path / "overview.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(path, pnginfo=text)

    meta = extract_metadata(path)
    assert meta.extractor == "image" and meta.warnings == []
    assert meta.mime_type == "image/png"
    assert meta.normalized["shape"] == [30, 40, 3]
    assert meta.normalized["axes"] == ["y", "x", "channel"]
    assert meta.normalized["dtype"] == "uint8"
    assert meta.details["format"] == "PNG" and meta.details["mode"] == "RGB"
    assert dig(meta.details, "info.Title") == "grain boundary"


def test_jpeg_exif_fills_instrument_time_and_operator(tmp_path: Path) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[271], exif[272], exif[306], exif[315] = "Olympus", "DP74", "2024:03:01 09:15:00", "kim"
    path = tmp_path / "stage.jpg"
    Image.new("L", (64, 48), 128).save(path, exif=exif)

    meta = extract_metadata(path)
    assert meta.extractor == "image" and meta.warnings == []
    assert meta.normalized["shape"] == [48, 64]
    assert meta.normalized["instrument"] == {
        "vendor": "Olympus",
        "model": "DP74",
        "serial_number": None,
        "software": None,
    }
    assert meta.normalized["acquired_at"] == "2024-03-01T09:15:00"
    assert meta.normalized["operator"] == "kim"


def test_gif_and_bmp_are_described(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("a.gif", "a.bmp"):
        path = tmp_path / name
        Image.new("L", (7, 5), 3).save(path)
        meta = extract_metadata(path)
        assert meta.extractor == "image" and meta.warnings == [], name
        assert meta.normalized["shape"][:2] == [5, 7], name


# --------------------------------------------------------------------------- damaged copies


def cuts(size: int) -> list[int]:
    """Lengths of the cut-short copies: nothing, within the first header, and mid-file."""
    return sorted({0, 7, 32, 64, size // 4, size // 2})


@needs_samples
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_truncated_copies_get_generic_facts_and_a_note(tmp_path: Path, name: str) -> None:
    content = (SAMPLES / name).read_bytes()
    for length in [*cuts(len(content)), len(content) - 1]:
        copy = copy_sample(name, tmp_path / f"cut{length}", content[:length])
        meta = extract_metadata(copy)
        assert_generic_facts(meta, content[:length])
        if length in cuts(len(content)):
            # Cut within the headers or the data: the extractor says what it missed.
            assert meta.warnings, (name, length)
            assert all(w.split(":")[0] == meta.extractor for w in meta.warnings)


@needs_samples
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bit_flipped_copies_never_raise(tmp_path: Path, name: str) -> None:
    content = (SAMPLES / name).read_bytes()
    for seed in range(FLIPPED_COPIES):
        rng = random.Random(f"{name}-{seed}")
        damaged = bytearray(content)
        for _ in range(FLIPPED_BITS):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        copy = copy_sample(name, tmp_path / f"flip{seed}", bytes(damaged))
        meta = extract_metadata(copy)
        assert_generic_facts(meta, bytes(damaged))
        assert meta.extractor == EXPECTED[name].extractor
        assert len(meta.to_json_bytes()) < MAX_RECORD_CHARS


def made_file(folder: Path, name: str) -> Path:
    """A small file of a format no instrument sample has: Pillow images, CSV, JSON."""
    from PIL import Image

    path = folder / name
    if name.endswith(".csv"):
        rows = "".join(f"A{i},{i * 0.1:.1f},{1200 - i}\n" for i in range(40))
        path.write_text("sample,temperature_K,counts\n" + rows)
    elif name.endswith(".json"):
        path.write_text(json.dumps({"run": 7, "sample": {"id": "A1", "temps": [4.2, 4.3] * 20}}))
    else:
        ramp = Image.linear_gradient("L").resize((40, 30))
        ramp.save(path)
    return path


#: A cut at or before this many bytes falls within the fixed header of every made image.
HEADER_CUT = 32
#: Each of the extractors without an instrument sample, by a file it reads.
MADE_FILES = {
    "ramp.png": "image",
    "ramp.jpg": "image",
    "ramp.gif": "image",
    "ramp.bmp": "image",
    "table.csv": "csv",
    "record.json": "json",
}


@pytest.mark.parametrize("name", sorted(MADE_FILES))
def test_damaged_copies_of_made_files_get_generic_facts(tmp_path: Path, name: str) -> None:
    content = made_file(tmp_path, name).read_bytes()
    for length in [*cuts(len(content)), len(content) - 1]:
        copy = tmp_path / f"cut{length}" / name
        copy.parent.mkdir()
        copy.write_bytes(content[:length])
        meta = extract_metadata(copy)
        assert_generic_facts(meta, content[:length])
        assert len(meta.to_json_bytes()) < MAX_RECORD_CHARS
        # What could not be read is noted: a JSON document cut short, an image cut within
        # its header (its pixel data is not read to describe it).
        header_cut = MADE_FILES[name] == "image" and 0 < length <= HEADER_CUT
        if header_cut or (MADE_FILES[name] == "json" and 0 < length < len(content)):
            assert meta.warnings, (name, length)
    for seed in range(FLIPPED_COPIES):
        rng = random.Random(f"{name}-{seed}")
        damaged = bytearray(content)
        for _ in range(FLIPPED_BITS):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        copy = tmp_path / f"flip{seed}" / name
        copy.parent.mkdir()
        copy.write_bytes(bytes(damaged))
        meta = extract_metadata(copy)
        assert_generic_facts(meta, bytes(damaged))
        assert len(meta.to_json_bytes()) < MAX_RECORD_CHARS


# --------------------------------------------------------------------------- DM tags


def test_dm4_instrument_tags_fill_the_normalised_block(tmp_path: Path) -> None:
    """A DM4 stack with the tags DigitalMicrograph writes (made by the bench's writer)."""
    from bench.dm4_writer import StackSpec, write_dm4_stack

    spec = StackSpec(frames=3, rows=16, columns=8, voltage_v=300_000.0, magnification=8e5)
    path = tmp_path / "stack.dm4"
    write_dm4_stack(path, spec)

    meta = extract_metadata(path)

    assert meta.extractor == "rosettasciio" and meta.warnings == []
    normalized = meta.normalized
    assert normalized["shape"] == [3, 16, 8]
    assert normalized["axes"] == ["z", "y", "x"]
    assert normalized["dtype"] == "uint16"
    assert normalized["pixel_size"] == {"x": quantity(0.25, "nm"), "y": quantity(0.25, "nm")}
    # From the image's tags, through RosettaSciIO's mapping into HyperSpy's schema.
    assert normalized["beam_energy"] == quantity(300.0, "keV")
    assert normalized["magnification"] == 8e5
    assert normalized["operator"] == "bench"
    assert normalized["acquired_at"] == "2026-12-05T14:00:00"
    assert normalized["instrument"]["model"] == "Bench TEM"
