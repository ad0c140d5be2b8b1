"""The shapes of metadata: the extractor protocol, the normalised block and the file record.

Kept apart from the extractors so that a plugin, the Prefect layer and ``msi-prefect
inspect`` can use the types without importing tifffile, RosettaSciIO or h5py.

Every extractor fills the same :class:`NormalizedMetadata` where the file has the facts
(instrument, acquisition time, shape and axes, dtype, pixel size, beam energy,
magnification, field of view, detector, operator) and puts the format's own metadata,
made JSON-safe and bounded, beside it in :attr:`FileMetadata.details`. docs/metadata.md
lists the fields and where each format's values come from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"

KIB: Final = 1024
MIB: Final = 1024 * KIB
#: How much of the file's start ``matches`` sees and MIME refinement looks at.
HEAD_SIZE: Final = 64 * KIB
#: Longest string any built-in extractor reports (descriptions get more).
MAX_STRING_CHARS: Final = 200
MAX_WARNING_CHARS: Final = 500
OCTET_STREAM: Final = "application/octet-stream"


def truncate(text: str, limit: int = MAX_STRING_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Quantity:
    """A number with its unit, as the file states it (``unit`` None: the file gives none).

    Attributes:
        value: The number.
        unit: Its unit (``nm``, ``µm``, ``keV`` …), or None for an uncalibrated value.
    """

    value: float
    unit: str | None


@dataclass(frozen=True)
class Instrument:
    """Who made the instrument and which one it is.

    Attributes:
        vendor: Manufacturer (``FEI``, ``Zeiss``, ``Gatan`` …).
        model: Model name as the instrument writes it.
        serial_number: Serial or system number.
        software: Acquisition software and its version.
    """

    vendor: str | None = None
    model: str | None = None
    serial_number: str | None = None
    software: str | None = None

    def is_empty(self) -> bool:
        """Whether no field is known."""
        return not any(asdict(self).values())


@dataclass
class NormalizedMetadata:
    """The facts a lab looks for, the same fields whatever the format (None: not in the file).

    Attributes:
        instrument: Vendor, model, serial number, software.
        acquired_at: Acquisition time, ISO 8601 (with an offset only when the file has one).
        shape: Array shape, slowest axis first.
        axes: Axis names, one per entry of ``shape`` (``y``, ``x``, ``z``, ``channel`` …).
        dtype: Element type (numpy's name: ``uint8``, ``float32`` …).
        pixel_size: Size of one pixel (voxel) along each calibrated axis, by axis name.
        beam_energy: Electron (or X-ray) beam energy, in keV.
        magnification: Magnification as the instrument reports it (a plain factor).
        field_of_view: Width (and height) of the imaged area, by ``width`` / ``height``.
        detector: Detector or signal name.
        operator: The user who acquired the data.
    """

    instrument: Instrument = field(default_factory=Instrument)
    acquired_at: str | None = None
    shape: list[int] | None = None
    axes: list[str] | None = None
    dtype: str | None = None
    pixel_size: dict[str, Quantity] = field(default_factory=dict)
    beam_energy: Quantity | None = None
    magnification: float | None = None
    field_of_view: dict[str, Quantity] = field(default_factory=dict)
    detector: str | None = None
    operator: str | None = None

    def to_json_dict(self) -> dict[str, JSONValue]:
        """Every field, unknown ones as null, so consumers see one stable schema."""
        data: dict[str, JSONValue] = json.loads(json.dumps(asdict(self)))
        return data

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any] | None) -> NormalizedMetadata:
        """Rebuild from :meth:`to_json_dict` output (missing fields stay unknown)."""
        data = data or {}

        def quantity(value: Any) -> Quantity | None:
            return Quantity(value["value"], value.get("unit")) if value else None

        def quantities(value: Any) -> dict[str, Quantity]:
            return {str(k): Quantity(v["value"], v.get("unit")) for k, v in (value or {}).items()}

        return cls(
            instrument=Instrument(**(data.get("instrument") or {})),
            acquired_at=data.get("acquired_at"),
            shape=data.get("shape"),
            axes=data.get("axes"),
            dtype=data.get("dtype"),
            pixel_size=quantities(data.get("pixel_size")),
            beam_energy=quantity(data.get("beam_energy")),
            magnification=data.get("magnification"),
            field_of_view=quantities(data.get("field_of_view")),
            detector=data.get("detector"),
            operator=data.get("operator"),
        )


@dataclass
class Extraction:
    """What a built-in extractor returns: the normalised block and the format's own metadata.

    A plugin may return a plain mapping instead; it becomes ``details`` and the normalised
    block stays empty.

    Attributes:
        normalized: The normalised facts.
        details: The format's own metadata (made JSON-safe and bounded by the caller).
    """

    normalized: NormalizedMetadata = field(default_factory=NormalizedMetadata)
    details: dict[str, Any] = field(default_factory=dict)


class ExtractionError(Exception):
    """Malformed content met by an extractor.

    Args:
        *messages: One warning per problem found.
        details: What the extractor did manage to read; kept in the result.
        normalized: The normalised facts read before the problem; kept in the result.
    """

    def __init__(
        self,
        *messages: str,
        details: Mapping[str, Any] | None = None,
        normalized: NormalizedMetadata | None = None,
    ) -> None:
        super().__init__("; ".join(messages) or "malformed content")
        self.messages: tuple[str, ...] = messages or ("malformed content",)
        self.details: dict[str, Any] = dict(details or {})
        self.normalized = normalized


@runtime_checkable
class Extractor(Protocol):
    """A type-specific metadata extractor.

    Implementations may use plain class attributes for ``name`` and ``version``.
    """

    @property
    def name(self) -> str:
        """Short unique name, reported in :attr:`FileMetadata.extractor`."""
        ...

    @property
    def version(self) -> str:
        """Version of the extractor's output schema, bumped when ``details`` changes."""
        ...

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """Whether this extractor handles the file.

        Args:
            path: The file on disk (its name may be a staging name; prefer ``mime``).
            head: The first bytes of the file (up to :data:`HEAD_SIZE`).
            mime: The refined MIME type, guessed from the file's relative path and content.
        """
        ...

    def extract(self, path: Path) -> Mapping[str, Any] | Extraction:
        """The file's metadata; raise :class:`ExtractionError` for malformed content."""
        ...


@dataclass(frozen=True)
class FileMetadata:
    """Everything known about one file: the record the metadata topic receives.

    Attributes:
        relpath: The file's relative POSIX path (or its name).
        size: Size in bytes, as hashed.
        sha256: Hex SHA-256 of the content.
        md5: Hex MD5 of the content, or None when not computed.
        mime_type: MIME type from the name, refined by the content.
        modified_at: Modification time, ISO 8601 UTC (``...Z``).
        extracted_at: When extraction finished, ISO 8601 UTC.
        extractor: Name of the extractor that produced ``details`` (``"generic"`` if none).
        extractor_version: That extractor's version.
        details: The format's own metadata, JSON-compatible and bounded.
        warnings: Problems met; non-empty means ``details`` may be partial.
        normalized: The normalised facts (:class:`NormalizedMetadata` as JSON).
    """

    relpath: str
    size: int
    sha256: str
    md5: str | None
    mime_type: str
    modified_at: str
    extracted_at: str
    extractor: str
    extractor_version: str
    details: dict[str, JSONValue] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    normalized: dict[str, JSONValue] = field(
        default_factory=lambda: NormalizedMetadata().to_json_dict()
    )

    def to_json_dict(self) -> dict[str, JSONValue]:
        """A plain dict that :func:`json.dumps` accepts (nested values copied)."""
        return {
            "relpath": self.relpath,
            "size": self.size,
            "sha256": self.sha256,
            "md5": self.md5,
            "mime_type": self.mime_type,
            "modified_at": self.modified_at,
            "extracted_at": self.extracted_at,
            "extractor": self.extractor,
            "extractor_version": self.extractor_version,
            "normalized": json.loads(json.dumps(self.normalized)),
            "details": json.loads(json.dumps(self.details)),
            "warnings": list(self.warnings),
        }

    def to_json_bytes(self) -> bytes:
        """The record as the metadata topic receives it (UTF-8 JSON), and ``inspect --json``."""
        return json.dumps(self.to_json_dict(), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> FileMetadata:
        """Rebuild from :meth:`to_json_dict` output.

        Raises:
            KeyError: A required field is missing.
        """
        return cls(
            relpath=str(data["relpath"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            md5=None if data.get("md5") is None else str(data["md5"]),
            mime_type=str(data["mime_type"]),
            modified_at=str(data["modified_at"]),
            extracted_at=str(data["extracted_at"]),
            extractor=str(data["extractor"]),
            extractor_version=str(data["extractor_version"]),
            details=dict(data.get("details") or {}),
            warnings=[str(w) for w in data.get("warnings") or ()],
            normalized=NormalizedMetadata.from_json_dict(data.get("normalized")).to_json_dict(),
        )
