"""Which extractor handles a file: the built-ins in priority order, plus the labs' plug-ins.

A lab's own extractor goes ahead of the built-ins (registered with
:func:`register_extractor`, or installed through the ``msi_prefect.extractors`` entry
point), so it wins whenever its ``matches`` says it handles the file. The built-ins
import their libraries (tifffile, RosettaSciIO, h5py, Pillow) only when they extract, so
loading the registry stays cheap.
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Final

from msi_prefect.metadata.hdf5 import Hdf5Extractor
from msi_prefect.metadata.images import PillowImageExtractor, TiffExtractor
from msi_prefect.metadata.microscopy import RosettaSciioExtractor
from msi_prefect.metadata.model import Extractor
from msi_prefect.metadata.text import CsvExtractor, JsonExtractor

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "msi_prefect.extractors"


class GenericExtractor:
    """Fallback: generic facts only, no details."""

    name = "generic"
    version = "1"

    def matches(self, path: Path, head: bytes, mime: str) -> bool:
        """Matches every file."""
        return True

    def extract(self, path: Path) -> dict[str, Any]:
        """No details."""
        return {}


GENERIC_EXTRACTOR: Final = GenericExtractor()
#: Extractors in priority order; the first whose ``matches`` is true wins. Mutate it through
#: :func:`register_extractor` / :func:`unregister_extractor`. The electron-microscopy
#: formats come before HDF5 so an EMD file gets RosettaSciIO's reading, not a bare summary.
EXTRACTORS: list[Extractor] = [
    TiffExtractor(),
    RosettaSciioExtractor(),
    Hdf5Extractor(),
    PillowImageExtractor(),
    JsonExtractor(),
    CsvExtractor(),
]
_REGISTRY_LOCK = threading.RLock()
_entry_points_loaded = False


def _check_extractor(obj: object) -> Extractor:
    if not isinstance(obj, Extractor) or not isinstance(getattr(obj, "name", None), str):
        raise TypeError(f"{obj!r} is not an extractor (needs name, version, matches, extract)")
    return obj


def _insert(extractor: Extractor, first: bool) -> None:
    with _REGISTRY_LOCK:
        EXTRACTORS[:] = [e for e in EXTRACTORS if e.name != extractor.name]
        EXTRACTORS.insert(0 if first else len(EXTRACTORS), extractor)


def register_extractor(extractor: Extractor, first: bool = True) -> Extractor:
    """Add an extractor to :data:`EXTRACTORS`, replacing one of the same name.

    Entry point plugins are loaded first, so an explicit registration with ``first=True``
    takes priority over them too.

    Args:
        extractor: Object following the :class:`Extractor` protocol.
        first: Put it ahead of all others (default) rather than last.

    Returns:
        The extractor, unchanged.

    Raises:
        TypeError: ``extractor`` lacks part of the protocol.
    """
    _check_extractor(extractor)
    ensure_entry_points_loaded()
    _insert(extractor, first)
    return extractor


def unregister_extractor(name: str) -> bool:
    """Remove the extractor called ``name``; returns whether one was registered."""
    with _REGISTRY_LOCK:
        before = len(EXTRACTORS)
        EXTRACTORS[:] = [e for e in EXTRACTORS if e.name != name]
        return len(EXTRACTORS) != before


def load_entry_point_extractors(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Register the extractors installed packages declare in an entry point group.

    Each entry point may name an extractor instance, an extractor class or a zero-argument
    factory. They go ahead of everything registered so far, in entry point name order.
    Failures are logged and skipped.

    Returns:
        Names of the extractors registered.
    """
    loaded: list[Extractor] = []
    for ep in sorted(entry_points(group=group), key=lambda ep: ep.name):
        try:
            obj = ep.load()
            if isinstance(obj, type) or not isinstance(obj, Extractor):
                obj = obj()  # a class or factory
            loaded.append(_check_extractor(obj))
        except Exception:
            logger.warning("Skipping metadata extractor plugin %r", ep.value, exc_info=True)
    for extractor in reversed(loaded):
        _insert(extractor, first=True)
    return [e.name for e in loaded]


def ensure_entry_points_loaded() -> None:
    global _entry_points_loaded
    with _REGISTRY_LOCK:
        if _entry_points_loaded:
            return
        # Set first: a plugin's import may itself call register_extractor.
        _entry_points_loaded = True
        load_entry_point_extractors()


def registered_extractors() -> tuple[Extractor, ...]:
    """A snapshot of :data:`EXTRACTORS`, entry point plug-ins loaded first."""
    ensure_entry_points_loaded()
    with _REGISTRY_LOCK:
        return tuple(EXTRACTORS)
