"""Units and times as instruments write them, turned into the normalised block's forms.

Instruments disagree: FEI writes metres and volts, Zeiss ``5.825 nm`` and ``50.00 K X``,
ImageJ ``micron``, TIA kV and ``Mon Feb 22 18:50:01 2016``. These helpers put each into one
spelling (lengths in the unit a person would pick, energies in keV, times in ISO 8601)
and return None for anything they do not understand rather than guess.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final

from msi_prefect.metadata.model import Quantity

#: Spellings of length units, to one form each.
_LENGTH_UNIT_NAMES: Final[dict[str, str]] = {
    "m": "m",
    "mm": "mm",
    "um": "µm",
    "µm": "µm",
    "μm": "µm",  # Greek mu, as some writers use it
    "micron": "µm",
    "microns": "µm",
    "nm": "nm",
    "pm": "pm",
    "a": "Å",
    "å": "Å",
    "angstrom": "Å",
}
#: Metres per unit, for choosing a readable unit for SI values.
_METRES_PER_UNIT: Final[dict[str, float]] = {"m": 1.0, "mm": 1e-3, "µm": 1e-6, "nm": 1e-9}
#: Energies in electronvolts per unit (an accelerating voltage in kV is a beam energy in keV).
_EV_PER_UNIT: Final[dict[str, float]] = {
    "ev": 1.0,
    "v": 1.0,
    "kev": 1e3,
    "kv": 1e3,
    "mev": 1e6,
    "mv": 1e6,
}
_EV_PER_KEV: Final = 1e3
#: Zeiss writes magnifications like ``50.00 K X`` (K: thousand).
_MAGNIFICATION = re.compile(r"^\s*([0-9.]+)\s*([kKmM]?)\s*[xX\u00d7]?\s*$")
_MAGNIFICATION_PREFIXES: Final[dict[str, float]] = {"": 1.0, "k": 1e3, "m": 1e6}
#: Date and time layouts met in instrument files, tried in order.
_TIME_LAYOUTS: Final = (
    "%Y-%m-%dT%H:%M:%S.%f",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
    "%Y:%m:%d %H:%M:%S",  # TIFF DateTime
    "%m/%d/%Y %I:%M:%S %p",  # FEI
    "%d %b %Y %H:%M:%S",  # Zeiss SmartSEM
    "%a %b %d %H:%M:%S %Y",  # TIA
    "%d/%m/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M:%S",
)


def as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (strings like ``"200000"`` included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def length_unit(unit: Any) -> str | None:
    """A length unit in one spelling (``micron`` -> ``µm``), others unchanged; None if blank."""
    if not isinstance(unit, str):
        return None
    text = unit.strip().strip("[]").strip()
    if not text:
        return None
    return _LENGTH_UNIT_NAMES.get(text.lower(), text)


def readable_length(metres: Any) -> Quantity | None:
    """A length given in metres, in nm, µm, mm or m, whichever keeps the number >= 1."""
    value = as_float(metres)
    if value is None:
        return None
    for unit in ("nm", "µm", "mm"):
        scaled = value / _METRES_PER_UNIT[unit]
        if abs(scaled) < 1000:
            return Quantity(round(scaled, 9), unit)
    return Quantity(value, "m")


def energy_kev(value: Any, unit: str) -> Quantity | None:
    """An energy (or accelerating voltage) in keV; None for an unknown unit or a zero."""
    number = as_float(value)
    factor = _EV_PER_UNIT.get(unit.strip().lower())
    if number is None or factor is None or number == 0:
        return None
    return Quantity(round(number * factor / _EV_PER_KEV, 9), "keV")


def magnification(value: Any) -> float | None:
    """A magnification factor from a number or a text like ``50.00 K X``."""
    if isinstance(value, int | float):
        return as_float(value)
    match = _MAGNIFICATION.match(str(value))
    if match is None:
        return None
    number = as_float(match.group(1))
    if number is None:
        return None
    return number * _MAGNIFICATION_PREFIXES[match.group(2).lower()]


def iso_time(text: Any) -> str | None:
    """A date-time text in one of the instruments' layouts, as ISO 8601; None if none fits."""
    if not isinstance(text, str) or not text.strip():
        return None
    cleaned = " ".join(text.split())
    try:
        return datetime.fromisoformat(cleaned).isoformat()
    except ValueError:
        pass
    for layout in _TIME_LAYOUTS:
        try:
            return datetime.strptime(cleaned, layout).isoformat()
        except ValueError:
            continue
    return None


def text_or_none(value: Any) -> str | None:
    """A non-blank string value stripped, or None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None or isinstance(value, dict | list | tuple):
        return None
    text = str(value).strip().rstrip("\0")
    return text or None
