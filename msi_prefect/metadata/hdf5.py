"""Any HDF5 file through h5py: a bounded summary of its tree, and NeXus's default signal.

HDF5 holds anything from a 4D-STEM data cube to a synchrotron scan, so the extractor does
not guess the science: it lists groups and datasets (shape, dtype, attributes) up to a
fixed number of objects, and reads only metadata: h5py opens datasets without reading
them, and scalar datasets (a few bytes each) are the only values read. For NeXus files it
follows the ``default`` attributes (or the first ``NXdata`` group with a ``signal``) to the
plottable signal, whose shape, axes and dtype fill the normalised block, and takes a beam
energy from an ``energy`` dataset with units under the instrument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from msi_prefect.metadata.detect import HDF5_MIME, is_hdf5
from msi_prefect.metadata.model import Extraction, ExtractionError, NormalizedMetadata
from msi_prefect.metadata.units import energy_kev, text_or_none

#: Suffixes of HDF5-based files (the signature decides for the rest).
HDF5_SUFFIXES: Final = frozenset({".h5", ".hdf5", ".hdf", ".he5", ".nxs", ".nx5", ".cxi"})
#: NeXus's "no axis here" placeholder in an NXdata group's ``axes`` attribute.
_NEXUS_NO_AXIS: Final = "."
#: Names of datasets that hold a beam energy in NeXus-style files.
_ENERGY_NAMES: Final = frozenset({"energy", "incident_energy", "beam_energy"})
#: Bytes of a scalar dataset's value read for the summary.
MAX_SCALAR_BYTES: Final = 1024


def _text(value: Any) -> str | None:
    """An HDF5 attribute (bytes, numpy bytes or str) as text."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return text_or_none(value)


def _attrs(obj: Any, limit: int) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for index, key in enumerate(obj.attrs):
        if index >= limit:
            attrs["…omitted"] = len(obj.attrs) - limit
            break
        try:
            attrs[key] = obj.attrs[key]
        except Exception as exc:  # an attribute of a type h5py cannot read
            attrs[key] = f"<unreadable: {exc}>"
    return attrs


def nexus_default_signal(h5: Any) -> Any:
    """The dataset NeXus names as the file's plottable data, or None.

    Follows ``root@default`` -> ``NXentry@default`` -> ``NXdata@signal`` as NeXus defines
    it, else takes the first ``NXdata`` group with a ``signal`` attribute.
    """
    import h5py

    group = h5
    for _ in range(2):
        target = _text(group.attrs.get("default"))
        if not target or not isinstance(group.get(target), h5py.Group):
            break
        group = group[target]
        signal = _signal_of(group) if _text(group.attrs.get("NX_class")) == "NXdata" else None
        if signal is not None:
            return signal
    found: list[Any] = []

    def visit(_name: str, obj: Any) -> bool | None:
        if (
            isinstance(obj, h5py.Group)
            and _text(obj.attrs.get("NX_class")) == "NXdata"
            and obj.attrs.get("signal") is not None
        ):
            found.append(obj)
            return True  # a non-None return stops h5py's visit
        return None

    h5.visititems(visit)
    return _signal_of(found[0]) if found else None


def _signal_of(nxdata: Any) -> Any:
    """The dataset an NXdata group's ``signal`` attribute names, or None."""
    import h5py

    name = _text(nxdata.attrs.get("signal"))
    dataset = nxdata.get(name) if name else None
    return dataset if isinstance(dataset, h5py.Dataset) else None


@dataclass(frozen=True)
class Hdf5Extractor:
    """HDF5 and NeXus files.

    Details: ``root_attributes``, ``objects`` (path, ``group``/``dataset``, shape, dtype,
    attributes; scalar datasets with their value), ``object_count_capped`` and for NeXus
    ``nexus`` (``default_signal`` path, its ``NX_class`` chain).

    Attributes:
        max_objects: Groups and datasets listed.
        max_attributes: Attributes listed per object.
    """

    max_objects: int = 200
    max_attributes: int = 20

    name = "hdf5"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """HDF5 signature, MIME type or suffix."""
        return is_hdf5(head) or mime == HDF5_MIME or path.suffix.lower() in HDF5_SUFFIXES

    def extract(self, path: Path) -> Extraction:
        """Walk the tree's metadata (bounded); follow NeXus's default signal."""
        import h5py

        normalized = NormalizedMetadata()
        details: dict[str, Any] = {}
        try:
            with h5py.File(path, "r") as h5:
                details["root_attributes"] = _attrs(h5, self.max_attributes)
                self._walk(h5, details, normalized)
                self._nexus(h5, details, normalized)
        except Exception as exc:
            raise ExtractionError(
                f"h5py could not read the file: {exc!r}", details=details, normalized=normalized
            ) from exc
        return Extraction(normalized, details)

    def _walk(self, h5: Any, details: dict[str, Any], normalized: NormalizedMetadata) -> None:
        import h5py

        objects: list[dict[str, Any]] = []
        details["objects"] = objects
        details["object_count_capped"] = False

        def visit(name: str, obj: Any) -> bool | None:
            if len(objects) >= self.max_objects:
                details["object_count_capped"] = True
                return True  # a non-None return stops h5py's visit
            entry: dict[str, Any] = {"path": name, "attributes": _attrs(obj, self.max_attributes)}
            if isinstance(obj, h5py.Dataset):
                entry.update(kind="dataset", shape=list(obj.shape), dtype=str(obj.dtype))
                if obj.shape == () and obj.dtype.itemsize <= MAX_SCALAR_BYTES:
                    entry["value"] = obj[()]
                    self._energy(name, obj, entry["value"], normalized)
            else:
                entry["kind"] = "group"
            objects.append(entry)
            return None

        h5.visititems(visit)

    @staticmethod
    def _energy(name: str, dataset: Any, value: Any, normalized: NormalizedMetadata) -> None:
        """A beam energy: an ``energy`` dataset with units, under an instrument group.

        A source's energy (a storage ring's electrons, in GeV) is not the beam's: skipped.
        """
        leaf = name.rsplit("/", 1)[-1].lower()
        unit = _text(dataset.attrs.get("units"))
        path = name.lower()
        under_instrument = "instrument" in path and "source" not in path
        if normalized.beam_energy is None and leaf in _ENERGY_NAMES and unit and under_instrument:
            normalized.beam_energy = energy_kev(value, unit)

    @staticmethod
    def _nexus(h5: Any, details: dict[str, Any], normalized: NormalizedMetadata) -> None:
        signal = nexus_default_signal(h5)
        if signal is None:
            return
        group = signal.parent
        details["nexus"] = {"default_signal": signal.name, "nxdata": group.name}
        normalized.shape = [int(n) for n in signal.shape]
        normalized.dtype = str(signal.dtype)
        raw_axes = group.attrs.get("axes")
        names = [_text(a) for a in raw_axes] if raw_axes is not None else []
        if isinstance(raw_axes, str | bytes):
            names = [_text(raw_axes)]
        if len(names) == len(signal.shape):
            normalized.axes = [
                name if name and name != _NEXUS_NO_AXIS else f"dim{index}"
                for index, name in enumerate(names)
            ]
