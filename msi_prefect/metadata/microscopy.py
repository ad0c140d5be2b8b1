"""Electron-microscopy and spectroscopy formats through RosettaSciIO, lazily.

RosettaSciIO (HyperSpy's readers) knows Gatan DigitalMicrograph, FEI TIA, EMD (Berkeley
and Velox), MRC, Phenom, Bruker, MSA and many more. Every reader is called with
``lazy=True``: the data comes back as a dask array whose shape and dtype are known from the
header and whose values are never computed here, so a 4 GiB DM4 costs its tag tree only.

The reader's own ``metadata`` (HyperSpy's schema: ``General``, ``Acquisition_instrument``),
completed by its ``mapping`` as HyperSpy completes it on loading (a DM file's
``Microscope Info.Voltage`` becomes ``Acquisition_instrument.TEM.beam_energy``, its
``DataBar`` acquisition date ``General.date``, ...), fills the normalised block; where a
reader leaves facts only in ``original_metadata`` (TIA's ``ExperimentalDescription``, EMD's
``microscope`` and ``user`` groups, DM's microscope name) they are taken from there.
Formats are chosen by suffix: their containers (HDF5, XML, raw binary) say too little for
content sniffing to be safe, and RosettaSciIO itself works by suffix.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

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
    text_or_none,
)

#: File suffix -> RosettaSciIO reader module. Only formats of the field: RosettaSciIO's
#: generic image, TIFF, CSV and plain-HDF5 readers are left to the other extractors.
READERS: Final[dict[str, str]] = {
    **dict.fromkeys((".dm3", ".dm4"), "rsciio.digitalmicrograph"),
    **dict.fromkeys((".emi", ".ser"), "rsciio.tia"),
    **dict.fromkeys((".emd", ".de5"), "rsciio.emd"),
    **dict.fromkeys((".mrc", ".ali"), "rsciio.mrc"),
    ".elid": "rsciio.phenom",
    **dict.fromkeys((".bcf", ".spx"), "rsciio.bruker"),
    **dict.fromkeys((".msa", ".ems", ".mas", ".emsa"), "rsciio.msa"),
    **dict.fromkeys((".spd", ".spc"), "rsciio.edax"),
    ".blo": "rsciio.blockfile",
    ".unf": "rsciio.semper",
    ".rpl": "rsciio.ripple",
    ".prz": "rsciio.pantarhei",
    ".mib": "rsciio.quantumdetector",
    ".tvips": "rsciio.tvips",
    **dict.fromkeys((".sur", ".pro"), "rsciio.digitalsurf"),
    ".wdf": "rsciio.renishaw",
    ".dens": "rsciio.dens",
    **dict.fromkeys((".asw", ".pts"), "rsciio.jeol"),
}
#: The software that writes each format, when the format implies it.
_SOFTWARE: Final[dict[str, str]] = {
    "rsciio.digitalmicrograph": "Gatan DigitalMicrograph",
    "rsciio.tia": "FEI TIA",
}
#: Size of an MRC file's fixed header, before the extended header and the data.
MRC_HEADER_BYTES: Final = 1024
#: Signals (datasets) of one file described in the details.
MAX_SIGNALS: Final = 16
#: A reader's mapping rule: (target path in HyperSpy's schema, converter or None).
MAPPING_RULE_LENGTH: Final = 2
#: Units of axes whose scale is not a pixel size: energy, time, reciprocal space, angle.
_NON_SPATIAL_UNITS: Final = frozenset({"ev", "kev", "s", "ms", "µs", "us", "ns", "1/nm", "mrad"})


def _axes_in_order(signal: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    axes = [a for a in signal.get("axes", ()) if isinstance(a, Mapping)]
    return sorted(axes, key=lambda a: int(a.get("index_in_array", axes.index(a))))


def _axis_name(axis: Mapping[str, Any], index: int) -> str:
    return text_or_none(axis.get("name")) or f"dim{index}"


def _signal_summary(signal: Mapping[str, Any]) -> dict[str, Any]:
    data = signal.get("data")
    general = signal.get("metadata", {}).get("General", {})
    return {
        "title": general.get("title"),
        "shape": [int(n) for n in getattr(data, "shape", ())],
        "dtype": str(getattr(data, "dtype", "")),
        "axes": [
            {key: axis.get(key) for key in ("name", "size", "scale", "offset", "units", "navigate")}
            for axis in _axes_in_order(signal)
        ],
    }


def _from_signal(signal: Mapping[str, Any], normalized: NormalizedMetadata) -> None:
    """Shape, axes, dtype and pixel sizes from the (lazy) data and its axes."""
    data = signal.get("data")
    axes = _axes_in_order(signal)
    normalized.shape = [int(n) for n in getattr(data, "shape", ())]
    normalized.dtype = str(getattr(data, "dtype", "")) or None
    names = [_axis_name(axis, index) for index, axis in enumerate(axes)]
    if len(names) == len(normalized.shape):
        normalized.axes = names
    for name, axis in zip(names, axes, strict=True):
        scale = as_float(axis.get("scale"))
        unit = length_unit(axis.get("units"))
        if scale is None or scale <= 0:  # no size, or a reader's placeholder (MRC's -1)
            continue
        if unit is not None and unit.lower() in _NON_SPATIAL_UNITS:
            continue
        normalized.pixel_size[name] = Quantity(scale, unit)


def _tree_item(tree: Any, dotted: str) -> Any:
    """The value at a mapping's dotted path of ``original_metadata``, or None.

    Readers name a level either as the format spells it (``Microscope Info``) or as
    attribute access does (``Microscope_Info``).
    """
    for part in dotted.split("."):
        if not isinstance(tree, Mapping):
            return None
        if part in tree:
            tree = tree[part]
            continue
        spelled = [key for key in tree if str(key).replace(" ", "_") == part]
        if not spelled:
            return None
        tree = tree[spelled[0]]
    return tree


def _mapped_metadata(signal: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """The reader's ``metadata`` with its ``mapping`` from ``original_metadata`` applied.

    RosettaSciIO leaves this step to HyperSpy: ``mapping`` says, per path of the format's
    tree, where the value goes in HyperSpy's schema and how to convert it. A conversion
    that fails is noted and skipped.
    """
    metadata = _plain_tree(signal.get("metadata") or {})
    mapping = signal.get("mapping") or {}
    original = signal.get("original_metadata") or {}
    if not isinstance(mapping, Mapping) or not isinstance(metadata, dict):
        return metadata if isinstance(metadata, dict) else {}
    for source, rule in mapping.items():
        value = _tree_item(original, str(source))
        if value is None or not isinstance(rule, tuple) or len(rule) != MAPPING_RULE_LENGTH:
            continue
        target, convert = rule
        if convert is not None:
            try:
                value = convert(value)
            except Exception as exc:  # a reader's converter on an odd value
                notes.append(f"{source}: not converted: {exc!r}")
                continue
        if value is None:
            continue
        *parents, leaf = str(target).split(".")
        branch = metadata
        for part in parents:
            nested = branch.setdefault(part, {})
            if not isinstance(nested, dict):
                break
            branch = nested
        else:
            branch[leaf] = value
    return metadata


def _plain_tree(tree: Any) -> Any:
    """A copy of nested mappings as dicts (readers return Box or DictionaryTreeBrowser)."""
    if isinstance(tree, Mapping):
        return {key: _plain_tree(value) for key, value in tree.items()}
    return tree


def _from_hyperspy_metadata(metadata: Mapping[str, Any], normalized: NormalizedMetadata) -> None:
    """The reader's mapping into HyperSpy's schema (General, Acquisition_instrument)."""
    general = metadata.get("General", {})
    when = " ".join(str(general[k]) for k in ("date", "time") if general.get(k))
    normalized.acquired_at = iso_time(when) or iso_time(general.get("date"))
    normalized.operator = text_or_none(general.get("authors"))
    instruments = metadata.get("Acquisition_instrument", {})
    for kind in ("TEM", "SEM"):
        instrument = instruments.get(kind)
        if not isinstance(instrument, Mapping):
            continue
        # HyperSpy stores beam_energy in keV.
        normalized.beam_energy = energy_kev(instrument.get("beam_energy"), "keV")
        mag = instrument.get("magnification")
        normalized.magnification = magnification(mag) if mag is not None else None
        normalized.instrument = replace(
            normalized.instrument, model=text_or_none(instrument.get("microscope"))
        )
        detector = instrument.get("Detector")
        if isinstance(detector, Mapping) and detector:
            first = next(iter(detector.values()))
            name = first.get("detector_type") if isinstance(first, Mapping) else None
            normalized.detector = text_or_none(name) or text_or_none(next(iter(detector)))


def _from_tia(original: Mapping[str, Any], normalized: NormalizedMetadata) -> None:
    """TIA's ObjectInfo (.emi): microscope, user, high tension, magnification, camera."""
    info = original.get("ObjectInfo", {})
    if not isinstance(info, Mapping):
        return
    described = info.get("ExperimentalDescription", {}) or {}
    acquire = info.get("AcquireInfo", {}) or {}
    normalized.instrument = replace(
        normalized.instrument,
        vendor=text_or_none(info.get("Manufacturer")) or normalized.instrument.vendor,
        model=text_or_none(described.get("Microscope")) or normalized.instrument.model,
    )
    normalized.operator = text_or_none(described.get("User")) or normalized.operator
    normalized.beam_energy = (
        energy_kev(described.get("High tension_kV"), "kV") or normalized.beam_energy
    )
    mag = described.get("Magnification_x")
    normalized.magnification = magnification(mag) if mag is not None else normalized.magnification
    normalized.detector = text_or_none(acquire.get("CameraNamePath")) or normalized.detector
    normalized.acquired_at = iso_time(info.get("AcquireDate")) or normalized.acquired_at


#: Where DigitalMicrograph files name the microscope, in the image's ``ImageTags``.
_DM_MICROSCOPE_TAGS: Final = (
    "Session Info.Microscope",
    "Microscope Info.Name",
    "Microscope Info.Microscope",
)


def _from_digitalmicrograph(original: Mapping[str, Any], normalized: NormalizedMetadata) -> None:
    """The microscope's name, which DM keeps in the image's tags and no mapping carries."""
    image_tags = _tree_item(original, "ImageList.TagGroup0.ImageTags")
    for path in _DM_MICROSCOPE_TAGS:
        model = text_or_none(_tree_item(image_tags, path))
        if model:
            normalized.instrument = replace(normalized.instrument, model=model)
            return


def _from_berkeley_emd(original: Mapping[str, Any], normalized: NormalizedMetadata) -> None:
    """Berkeley EMD's ``microscope`` and ``user`` groups (often left blank by writers)."""
    microscope = original.get("microscope", {})
    user = original.get("user", {})
    if isinstance(microscope, Mapping):
        model = text_or_none(microscope.get("name"))
        if model:
            normalized.instrument = replace(normalized.instrument, model=model)
        normalized.beam_energy = energy_kev(microscope.get("voltage"), "V") or (
            normalized.beam_energy
        )
    if isinstance(user, Mapping):
        normalized.operator = text_or_none(user.get("name")) or normalized.operator


def _mrc_truncation(original: Mapping[str, Any], data: Any, file_size: int) -> str | None:
    """A note when an MRC file is shorter than its header says (the reader maps it silently)."""
    header = original.get("std_header", {})
    counts = [as_float(header.get(key)) for key in ("NX", "NY", "NZ")]
    extended = as_float(header.get("NEXT")) or 0
    itemsize = getattr(getattr(data, "dtype", None), "itemsize", None)
    if None in counts or not itemsize:
        return None
    expected = MRC_HEADER_BYTES + int(extended) + math.prod(int(c or 0) for c in counts) * itemsize
    if file_size >= expected:
        return None
    return f"the header describes {expected} bytes, the file has {file_size}: truncated?"


@dataclass(frozen=True)
class RosettaSciioExtractor:
    """The formats of :data:`READERS`, read by RosettaSciIO with ``lazy=True``.

    Details: ``reader`` (the RosettaSciIO module), ``signals`` (title, shape, dtype and axes
    of each dataset in the file, at most :data:`MAX_SIGNALS`), ``metadata`` (the reader's
    mapping, HyperSpy's schema) and ``original_metadata`` (the format's own tree), both
    bounded.
    """

    name = "rosettasciio"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """A suffix RosettaSciIO reads (see :data:`READERS`)."""
        return path.suffix.lower() in READERS

    def extract(self, path: Path) -> Extraction:
        """Read the headers lazily and describe the first signal; list the others."""
        module_name = READERS[path.suffix.lower()]
        normalized = NormalizedMetadata(instrument=Instrument(software=_SOFTWARE.get(module_name)))
        details: dict[str, Any] = {"reader": module_name}
        try:
            reader = importlib.import_module(module_name)
            signals = reader.file_reader(str(path), lazy=True)
        except Exception as exc:
            raise ExtractionError(
                f"{module_name} could not read the file: {exc!r}",
                details=details,
                normalized=normalized,
            ) from exc
        if not signals:
            raise ExtractionError(f"{module_name} found no data in the file", details=details)
        details["signals"] = [_signal_summary(s) for s in signals[:MAX_SIGNALS]]
        details["signal_count"] = len(signals)
        main = signals[0]
        notes: list[str] = []
        metadata = _mapped_metadata(main, notes)
        original = main.get("original_metadata", {}) or {}
        details["metadata"] = metadata
        details["original_metadata"] = original
        _from_signal(main, normalized)
        _from_hyperspy_metadata(metadata, normalized)
        if module_name == "rsciio.digitalmicrograph":
            _from_digitalmicrograph(original, normalized)
        elif module_name == "rsciio.tia":
            _from_tia(original, normalized)
        elif module_name == "rsciio.emd":
            _from_berkeley_emd(original, normalized)
        elif module_name == "rsciio.mrc":
            truncation = _mrc_truncation(original, main.get("data"), path.stat().st_size)
            if truncation:
                raise ExtractionError(truncation, details=details, normalized=normalized)
        if notes:
            raise ExtractionError(*notes, details=details, normalized=normalized)
        return Extraction(normalized, details)
