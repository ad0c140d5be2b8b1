"""Raster images: TIFF and its microscope flavours through tifffile, the rest through Pillow.

tifffile decodes the vendor tags labs care about (FEI/Thermo, Zeiss SmartSEM, ImageJ,
OME-XML, Olympus SIS, Hamamatsu NDPI, …) from the IFDs alone, so a TIFF is described
without reading a pixel. Pillow's ``Image.open`` likewise reads only the header of a PNG,
JPEG, BMP or GIF; nothing here ever calls ``asarray`` or ``load``.

The normalised block is filled from the vendor tags when present (FEI, Zeiss SEM, ImageJ,
OME) and from the baseline TIFF / EXIF tags otherwise (Make, Model, DateTime, Artist).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from msi_prefect.metadata.detect import PNG_SIGNATURE, TIFF_MAGICS
from msi_prefect.metadata.model import (
    Extraction,
    ExtractionError,
    Instrument,
    NormalizedMetadata,
    Quantity,
)
from msi_prefect.metadata.units import (
    as_float,
    energy_kev,
    iso_time,
    length_unit,
    magnification,
    readable_length,
    text_or_none,
)

#: tifffile's axis letters, as the normalised block names them.
_TIFF_AXIS_NAMES: Final[dict[str, str]] = {
    "X": "x",
    "Y": "y",
    "Z": "z",
    "T": "time",
    "C": "channel",
    "S": "sample",
    "I": "frame",
    "Q": "unknown",
    "E": "lambda",
    "R": "tile",
    "H": "lifetime",
    "A": "angle",
    "P": "phase",
}
#: Baseline tags that locate or repeat pixel data: useless as metadata, and long.
_DATA_LAYOUT_TAGS: Final = frozenset(
    {"StripOffsets", "StripByteCounts", "TileOffsets", "TileByteCounts", "ColorMap"}
)
#: Tags whose content is decoded into a ``<flavour>_metadata`` entry instead.
_VENDOR_TAG_CODES: Final = frozenset({34118, 34680, 34682, 50838, 50839})
#: Most TIFF tags a page reports in the details.
MAX_TAGS: Final = 100


def _ome_quantity(pixels: Mapping[str, Any], axis: str) -> Quantity | None:
    value = as_float(pixels.get(f"PhysicalSize{axis}"))
    if value is None:
        return None
    # OME's default unit for physical sizes is the micrometre.
    return Quantity(value, length_unit(pixels.get(f"PhysicalSize{axis}Unit")) or "µm")


def _first(value: Any) -> Any:
    """OME-XML lists an element once or many times; the first."""
    return value[0] if isinstance(value, list) and value else value


@dataclass(frozen=True)
class TiffExtractor:
    """TIFF, BigTIFF, OME-TIFF, ImageJ and the vendor flavours tifffile knows.

    Details: ``pages`` (count), ``series`` (shape, axes, dtype of each image series, at
    most ``max_series``), ``flavours`` (tifffile's flags: ``fei``, ``sem``, ``imagej``,
    ``ome`` …), ``tags`` (the first page's tags by name, pixel-layout tags left out) and
    one ``<flavour>_metadata`` entry per decoded vendor block (XML ones as a tree).

    Attributes:
        max_series: Image series described.
    """

    max_series: int = 16

    name = "tiff"
    version = "2"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """TIFF signature (also BigTIFF) or MIME type."""
        return head[:4] in TIFF_MAGICS or mime == "image/tiff"

    def extract(self, path: Path) -> Extraction:
        """The IFDs and the vendor blocks, through tifffile; no pixel data."""
        import tifffile

        normalized = NormalizedMetadata()
        details: dict[str, Any] = {}
        try:
            with tifffile.TiffFile(path) as tif:
                self._describe(tif, normalized, details)
                truncation = _truncation(tif)
        except Exception as exc:
            raise ExtractionError(
                f"tifffile could not read the file: {exc!r}", details=details, normalized=normalized
            ) from exc
        if truncation:
            raise ExtractionError(truncation, details=details, normalized=normalized)
        return Extraction(normalized, details)

    def _describe(self, tif: Any, normalized: NormalizedMetadata, details: dict[str, Any]) -> None:
        page = tif.pages.first
        details["flavours"] = sorted(tif.flags)
        details["tags"] = {
            tag.name: tag.value
            for tag in list(page.tags.values())[:MAX_TAGS]
            if tag.name not in _DATA_LAYOUT_TAGS and tag.code not in _VENDOR_TAG_CODES
        }
        series = tif.series[: self.max_series]
        details["series"] = [
            {"shape": list(s.shape), "axes": s.axes, "dtype": str(s.dtype)} for s in series
        ]
        details["pages"] = len(tif.pages)
        if series:
            main = series[0]
            normalized.shape = [int(n) for n in main.shape]
            normalized.axes = [_TIFF_AXIS_NAMES.get(letter, letter.lower()) for letter in main.axes]
            normalized.dtype = str(main.dtype)
        self._baseline(page, normalized)
        for flavour in sorted(tif.flags):
            block = getattr(tif, f"{flavour}_metadata", None)
            if isinstance(block, str) and block.lstrip().startswith("<"):
                # XML (OME): as a tree, so consumers need no XML parser.
                block = tifffile_xml2dict(block) or block
            if block:
                details[f"{flavour}_metadata"] = block
        if tif.is_fei and tif.fei_metadata:
            _fei(tif.fei_metadata, normalized)
        if tif.is_sem and tif.sem_metadata:
            _zeiss_sem(tif.sem_metadata, normalized)
        if tif.is_imagej and tif.imagej_metadata is not None:
            _imagej(tif.imagej_metadata, page, normalized)
        if tif.is_ome and tif.ome_metadata:
            _ome(tifffile_xml2dict(tif.ome_metadata), normalized)

    @staticmethod
    def _baseline(page: Any, normalized: NormalizedMetadata) -> None:
        def tag(name: str) -> str | None:
            found = page.tags.get(name)
            return text_or_none(found.value) if found is not None else None

        normalized.instrument = Instrument(
            vendor=tag("Make"), model=tag("Model"), software=tag("Software")
        )
        normalized.acquired_at = iso_time(tag("DateTime"))
        normalized.operator = tag("Artist")


def _truncation(tif: Any) -> str | None:
    """A note when the first page's pixel data would lie past the end of the file."""
    page = tif.pages.first
    try:
        ends = [
            int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)
        ]
    except (TypeError, ValueError):  # damaged offsets: tifffile has logged them already
        return None
    end, size = max(ends, default=0), tif.filehandle.size
    if end <= size:
        return None
    return (
        f"pixel data of the first page ends at byte {end}, past the end of the file "
        f"({size} bytes): truncated?"
    )


def tifffile_xml2dict(xml: str) -> dict[str, Any]:
    """OME-XML as nested dicts (tifffile's parser), or {} when it does not parse."""
    import tifffile

    try:
        parsed: dict[str, Any] = tifffile.xml2dict(xml)
    except Exception:  # a damaged OME block: the rest of the TIFF is still described
        return {}
    return parsed


def _fei(block: Mapping[str, Any], normalized: NormalizedMetadata) -> None:
    """FEI/Thermo Fisher SEM and FIB (the FEI_HELIOS / FEI_SFEG tag), SI units."""
    user, system = block.get("User", {}), block.get("System", {})
    scan, beam = block.get("Scan", {}), block.get("EBeam") or block.get("IBeam") or {}
    normalized.instrument = Instrument(
        vendor="FEI",
        model=text_or_none(system.get("SystemType")) or text_or_none(system.get("Type")),
        serial_number=text_or_none(system.get("Dnumber")),
        software=text_or_none(system.get("Software")),
    )
    when = " ".join(str(v) for v in (user.get("Date"), user.get("Time")) if v)
    normalized.acquired_at = iso_time(when) or normalized.acquired_at
    normalized.operator = text_or_none(user.get("User")) or normalized.operator
    high_tension = beam.get("HV", block.get("Beam", {}).get("HV"))
    normalized.beam_energy = energy_kev(high_tension, "V")
    sizes = {
        "x": readable_length(scan.get("PixelWidth")),
        "y": readable_length(scan.get("PixelHeight")),
    }
    normalized.pixel_size = {axis: q for axis, q in sizes.items() if q is not None}
    field = {
        "width": readable_length(scan.get("HorFieldsize") or beam.get("HFW")),
        "height": readable_length(scan.get("VerFieldsize") or beam.get("VFW")),
    }
    normalized.field_of_view = {side: q for side, q in field.items() if q is not None}
    detectors = block.get("Detectors", {})
    name, mode = text_or_none(detectors.get("Name")), text_or_none(detectors.get("Mode"))
    normalized.detector = f"{name} ({mode})" if name and mode else name


def _zeiss_value(block: Mapping[str, Any], key: str) -> tuple[Any, str | None]:
    """(value, unit) of a SmartSEM parameter, stored as (label, value[, unit])."""
    entry = block.get(key)
    if not isinstance(entry, tuple | list) or len(entry) < 2:
        return None, None
    unit = entry[2] if len(entry) > 2 else None
    return entry[1], unit


def _zeiss_sem(block: Mapping[str, Any], normalized: NormalizedMetadata) -> None:
    """Zeiss SmartSEM (tag 34118, ``CZ_SEM``), values with their units."""
    serial, _ = _zeiss_value(block, "sv_serial_number")
    version, _ = _zeiss_value(block, "sv_version")
    normalized.instrument = Instrument(
        vendor="Zeiss", serial_number=text_or_none(serial), software=text_or_none(version)
    )
    date, _ = _zeiss_value(block, "ap_date")
    clock, _ = _zeiss_value(block, "ap_time")
    normalized.acquired_at = iso_time(f"{date} {clock}") or normalized.acquired_at
    for key in ("ap_actualkv", "ap_manualkv"):
        value, unit = _zeiss_value(block, key)
        energy = energy_kev(value, unit or "kV")
        if energy is not None:
            normalized.beam_energy = energy
            break
    mag, _ = _zeiss_value(block, "ap_mag")
    normalized.magnification = magnification(mag) if mag is not None else None
    size, unit = _zeiss_value(block, "ap_pixel_size")
    if as_float(size) is not None:
        pixel = Quantity(float(size), length_unit(unit))
        normalized.pixel_size = {"x": pixel, "y": pixel}
    field: dict[str, Quantity] = {}
    for side, key in (("width", "ap_width"), ("height", "ap_height")):
        value, unit = _zeiss_value(block, key)
        if as_float(value) is not None:
            field[side] = Quantity(float(value), length_unit(unit))
    normalized.field_of_view = field
    detector, _ = _zeiss_value(block, "dp_detector_channel")
    normalized.detector = text_or_none(detector)
    operator, _ = _zeiss_value(block, "sv_operator")
    user, _ = _zeiss_value(block, "sv_user_name")
    normalized.operator = text_or_none(operator) or text_or_none(user)


def _imagej(block: Mapping[str, Any], page: Any, normalized: NormalizedMetadata) -> None:
    """ImageJ's calibration: ``unit`` in the description, pixels per unit in X/YResolution."""
    unit = length_unit(block.get("unit"))
    sizes: dict[str, Quantity] = {}
    for axis, tag_name in (("x", "XResolution"), ("y", "YResolution")):
        tag = page.tags.get(tag_name)
        if tag is None or not isinstance(tag.value, tuple) or len(tag.value) != 2:
            continue
        numerator, denominator = tag.value
        if numerator and denominator:
            sizes[axis] = Quantity(round(denominator / numerator, 9), unit)
    spacing = as_float(block.get("spacing"))
    if spacing is not None:
        sizes["z"] = Quantity(spacing, unit)
    if unit is not None:  # without a unit ImageJ's resolution is only a display scale
        normalized.pixel_size = sizes


def _ome(tree: Mapping[str, Any], normalized: NormalizedMetadata) -> None:
    """OME-XML: the first image's pixels, acquisition date, instrument and experimenter."""
    ome = tree.get("OME", {})
    image = _first(ome.get("Image", {})) or {}
    pixels = image.get("Pixels", {}) if isinstance(image, Mapping) else {}
    sizes = {axis.lower(): _ome_quantity(pixels, axis) for axis in ("X", "Y", "Z")}
    normalized.pixel_size = {axis: q for axis, q in sizes.items() if q is not None}
    normalized.acquired_at = iso_time(image.get("AcquisitionDate")) or normalized.acquired_at
    microscope = (_first(ome.get("Instrument", {})) or {}).get("Microscope", {})
    if isinstance(microscope, Mapping) and microscope:
        normalized.instrument = Instrument(
            vendor=text_or_none(microscope.get("Manufacturer")),
            model=text_or_none(microscope.get("Model")),
            serial_number=text_or_none(microscope.get("SerialNumber")),
        )
    experimenter = _first(ome.get("Experimenter", {})) or {}
    if isinstance(experimenter, Mapping):
        names = (experimenter.get("FirstName"), experimenter.get("LastName"))
        full = " ".join(str(n) for n in names if n) or experimenter.get("UserName")
        normalized.operator = text_or_none(full) or normalized.operator


#: Pillow modes, as numpy dtypes and channel counts.
_PILLOW_MODES: Final[dict[str, tuple[str, int]]] = {
    "1": ("bool", 1),
    "L": ("uint8", 1),
    "P": ("uint8", 1),
    "LA": ("uint8", 2),
    "RGB": ("uint8", 3),
    "RGBA": ("uint8", 4),
    "CMYK": ("uint8", 4),
    "YCbCr": ("uint8", 3),
    "I;16": ("uint16", 1),
    "I;16B": ("uint16", 1),
    "I": ("int32", 1),
    "F": ("float32", 1),
}
_PILLOW_MIMES: Final = frozenset(
    {"image/png", "image/jpeg", "image/bmp", "image/x-ms-bmp", "image/gif"}
)
_JPEG_SIGNATURE: Final = b"\xff\xd8\xff"
_GIF_SIGNATURES: Final = (b"GIF87a", b"GIF89a")
#: EXIF tag numbers of the facts the normalised block takes from a photo.
_EXIF_MAKE, _EXIF_MODEL, _EXIF_SOFTWARE, _EXIF_DATETIME, _EXIF_ARTIST = 271, 272, 305, 306, 315


@dataclass(frozen=True)
class PillowImageExtractor:
    """PNG, JPEG, BMP and GIF headers through Pillow.

    Details: ``format``, ``mode``, ``width``, ``height``, ``frames`` (GIF/PNG animation
    frames; for GIF only whether there is more than one, as counting would decode them),
    ``info`` (text chunks, DPI …) and ``exif`` (EXIF tags by number).
    """

    name = "image"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """A PNG, JPEG or GIF signature, or their MIME types (BMP's "BM" is too short alone)."""
        signatures = (PNG_SIGNATURE, _JPEG_SIGNATURE, *_GIF_SIGNATURES)
        return head.startswith(signatures) or mime in _PILLOW_MIMES

    def extract(self, path: Path) -> Extraction:
        """Open the header only (Pillow decodes pixels on ``load``, which is never called)."""
        from PIL import Image, UnidentifiedImageError

        normalized = NormalizedMetadata()
        details: dict[str, Any] = {}
        try:
            with Image.open(path) as image:
                self._describe(image, normalized, details)
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise ExtractionError(f"Pillow could not read the header: {exc}") from exc
        except Exception as exc:
            raise ExtractionError(
                f"Pillow stopped reading: {exc!r}", details=details, normalized=normalized
            ) from exc
        return Extraction(normalized, details)

    @staticmethod
    def _describe(image: Any, normalized: NormalizedMetadata, details: dict[str, Any]) -> None:
        width, height = image.size
        details.update(format=image.format, mode=image.mode, width=width, height=height)
        dtype, channels = _PILLOW_MODES.get(image.mode, (None, 1))
        normalized.shape = [height, width] + ([channels] if channels > 1 else [])
        normalized.axes = ["y", "x"] + (["channel"] if channels > 1 else [])
        normalized.dtype = dtype
        if image.format == "GIF":
            details["animated"] = bool(getattr(image, "is_animated", False))
        else:
            details["frames"] = int(getattr(image, "n_frames", 1))
        details["info"] = {str(k): v for k, v in image.info.items() if k != "exif"}
        exif = image.getexif()
        details["exif"] = {str(k): v for k, v in exif.items()}
        normalized.instrument = Instrument(
            vendor=text_or_none(exif.get(_EXIF_MAKE)),
            model=text_or_none(exif.get(_EXIF_MODEL)),
            software=text_or_none(exif.get(_EXIF_SOFTWARE)),
        )
        normalized.acquired_at = iso_time(exif.get(_EXIF_DATETIME))
        normalized.operator = text_or_none(exif.get(_EXIF_ARTIST))
