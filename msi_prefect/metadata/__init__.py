"""Metadata of rebuilt lab data files: generic facts, a normalised block, the format's own tree.

Plain Python (no Prefect), used by the ``extract-metadata`` flow, the analysis step and
``msi-prefect inspect`` alike. One module per job:

- :mod:`~msi_prefect.metadata.model`: :class:`FileMetadata` (the record the metadata topic
  receives), :class:`NormalizedMetadata`, the :class:`Extractor` protocol;
- :mod:`~msi_prefect.metadata.extraction`: :func:`extract_metadata`, hashing and the
  never-raise contract;
- :mod:`~msi_prefect.metadata.registry`: the built-ins in priority order and the plug-ins;
- :mod:`~msi_prefect.metadata.detect`: the MIME type from name and first bytes;
- one module per family of formats: :mod:`~msi_prefect.metadata.images` (tifffile,
  Pillow), :mod:`~msi_prefect.metadata.microscopy` (RosettaSciIO),
  :mod:`~msi_prefect.metadata.hdf5` (h5py), :mod:`~msi_prefect.metadata.text` (CSV/TSV,
  JSON);
- :mod:`~msi_prefect.metadata.bounded` (JSON-safe, bounded trees),
  :mod:`~msi_prefect.metadata.units` (units and times), and
  :mod:`~msi_prefect.metadata.rendering` (the markdown artifact).

docs/metadata.md lists the normalised fields and where each format's values come from.

Plugging in an extractor
------------------------

An extractor is any object with ``name`` and ``version`` strings and the two methods of
:class:`Extractor`; ``extract`` returns a mapping of JSON-compatible values (anything else
is converted to a string, with a warning) or an :class:`Extraction` with a normalised
block. Research code registers one at run time::

    from msi_prefect.metadata import register_extractor

    class ImzmlExtractor:
        name = "imzml"
        version = "1"

        def matches(self, path, head, mime):
            return path.suffix.lower() == ".imzml"

        def extract(self, path):
            return {"spectra": count_spectra(path)}

    register_extractor(ImzmlExtractor())           # first=True: ahead of the built-ins

An installed package can instead declare it in the entry point group
``msi_prefect.extractors``; the value is an extractor instance, an extractor class or a
zero-argument factory returning one::

    # pyproject.toml of the plugin package
    [project.entry-points."msi_prefect.extractors"]
    imzml = "my_lab.extractors:ImzmlExtractor"

Entry points are loaded once, on the first :func:`extract_metadata` or
:func:`register_extractor` call (or explicitly with :func:`load_entry_point_extractors`),
and placed ahead of the built-ins in entry point name order, so a lab's extractor wins
over a built-in one whenever it says it handles the file. A plugin that fails to load is
logged and skipped. An extractor registered under a name already in use replaces it.
"""

from msi_prefect.metadata.detect import PNG_SIGNATURE, detect_mime, sniff_delimiter
from msi_prefect.metadata.extraction import extract_metadata
from msi_prefect.metadata.hdf5 import Hdf5Extractor
from msi_prefect.metadata.images import PillowImageExtractor, TiffExtractor
from msi_prefect.metadata.microscopy import RosettaSciioExtractor
from msi_prefect.metadata.model import (
    HEAD_SIZE,
    Extraction,
    ExtractionError,
    Extractor,
    FileMetadata,
    Instrument,
    JSONValue,
    NormalizedMetadata,
    Quantity,
)
from msi_prefect.metadata.registry import (
    ENTRY_POINT_GROUP,
    EXTRACTORS,
    GENERIC_EXTRACTOR,
    GenericExtractor,
    load_entry_point_extractors,
    register_extractor,
    unregister_extractor,
)
from msi_prefect.metadata.rendering import metadata_markdown
from msi_prefect.metadata.text import CsvExtractor, JsonExtractor

__all__ = [
    "ENTRY_POINT_GROUP",
    "EXTRACTORS",
    "GENERIC_EXTRACTOR",
    "HEAD_SIZE",
    "PNG_SIGNATURE",
    "CsvExtractor",
    "Extraction",
    "ExtractionError",
    "Extractor",
    "FileMetadata",
    "GenericExtractor",
    "Hdf5Extractor",
    "Instrument",
    "JSONValue",
    "JsonExtractor",
    "NormalizedMetadata",
    "PillowImageExtractor",
    "Quantity",
    "RosettaSciioExtractor",
    "TiffExtractor",
    "detect_mime",
    "extract_metadata",
    "load_entry_point_extractors",
    "metadata_markdown",
    "register_extractor",
    "sniff_delimiter",
    "unregister_extractor",
]
