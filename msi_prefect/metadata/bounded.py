"""Turn any library's metadata tree into JSON that is safe to publish and bounded in size.

tifffile, RosettaSciIO and h5py hand back numpy scalars and arrays, dask arrays, bytes,
enums, nested dicts thousands of entries wide and free-text blobs of megabytes (an ImageJ
``Info`` string, a DigitalMicrograph tag tree). The metadata topic and the Prefect UI need
plain JSON of a predictable size, so :func:`bounded_json` converts every value and stops
at limits on depth, entries per container, string length and total size, saying where it
cut. Arrays are described (shape, dtype), never materialised unless tiny: a dask array's
values would mean reading the pixel data.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, Final

from msi_prefect.metadata.model import KIB, MAX_STRING_CHARS, JSONValue, truncate

#: Key under which a container notes how many of its entries were left out.
OMITTED_KEY: Final = "…omitted"
#: Arrays with at most this many elements are listed; larger ones are described.
MAX_INLINE_ARRAY_ITEMS: Final = 16


@dataclass(frozen=True)
class JsonLimits:
    """How much of a metadata tree :func:`bounded_json` keeps.

    Attributes:
        max_depth: Containers nested deeper are shown as a short string.
        max_items: Entries kept per dict or list.
        max_string_chars: Longest string kept (cut with an ellipsis).
        max_total_chars: Approximate JSON size of the whole result; entries past it are
            counted in ``…omitted`` instead.
    """

    max_depth: int = 12
    max_items: int = 200
    max_string_chars: int = 2 * KIB
    max_total_chars: int = 64 * KIB


DEFAULT_LIMITS: Final = JsonLimits()


@dataclass
class _Budget:
    remaining: int
    converted_types: set[str] = field(default_factory=set)
    cut: bool = False


def _array_summary(value: Any, limits: JsonLimits, budget: _Budget) -> JSONValue:
    """``{"array": {"shape", "dtype"}}`` for an array-like, its values only when tiny and eager."""
    shape = [int(n) for n in getattr(value, "shape", ())]
    dtype = str(getattr(value, "dtype", ""))
    count = math.prod(shape) if shape else 1
    is_lazy = type(value).__module__.startswith("dask")  # values would read the data
    if not is_lazy and count <= MAX_INLINE_ARRAY_ITEMS and hasattr(value, "tolist"):
        try:
            listed: Any = value.tolist()
        except Exception:  # an exotic array type: describe it instead
            listed = None
        if listed is not None:
            # tolist() still holds bytes (a NeXus attribute array): convert the items too.
            return _convert(listed, limits, budget, depth=0)
    summary: dict[str, JSONValue] = {"shape": list[JSONValue](shape), "dtype": dtype}
    return {"array": summary}


def _scalar(value: Any, limits: JsonLimits, budget: _Budget) -> tuple[bool, JSONValue]:
    """(handled, JSON value) for the leaf types; (False, None) for containers."""
    if value is None or isinstance(value, bool):
        return True, value
    if isinstance(value, enum.Enum):
        return True, truncate(str(value.name), limits.max_string_chars)
    if isinstance(value, int):
        return True, int(value)
    if isinstance(value, float):
        return True, float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return True, truncate(value, limits.max_string_chars)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[: limits.max_string_chars])
        return True, truncate(raw.decode("utf-8", "replace").rstrip("\0"), limits.max_string_chars)
    if isinstance(value, (datetime, date, time)):
        return True, value.isoformat()
    type_module = type(value).__module__
    if type_module == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        # A numpy scalar (np.float64, np.bytes_ …): its Python value.
        return _scalar(value.item(), limits, budget)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return True, _array_summary(value, limits, budget)
    return False, None


def _convert(value: Any, limits: JsonLimits, budget: _Budget, depth: int) -> JSONValue:
    handled, scalar = _scalar(value, limits, budget)
    if handled:
        budget.remaining -= len(str(scalar)) + 2
        return scalar
    if isinstance(value, (Mapping, list, tuple)):
        if depth >= limits.max_depth:
            budget.cut = True
            return f"<{type(value).__name__} nested too deep>"
        if isinstance(value, Mapping):
            return _convert_mapping(value, limits, budget, depth)
        return _convert_sequence(list(value), limits, budget, depth)
    budget.converted_types.add(type(value).__name__)
    text = truncate(str(value), MAX_STRING_CHARS)
    budget.remaining -= len(text) + 2
    return text


def _convert_mapping(
    value: Mapping[Any, Any], limits: JsonLimits, budget: _Budget, depth: int
) -> dict[str, JSONValue]:
    result: dict[str, JSONValue] = {}
    total = len(value)
    for index, (key, item) in enumerate(value.items()):
        if index >= limits.max_items or budget.remaining <= 0:
            result[OMITTED_KEY] = total - index
            budget.cut = True
            break
        name = truncate(str(key), MAX_STRING_CHARS)
        budget.remaining -= len(name) + 4
        result[name] = _convert(item, limits, budget, depth + 1)
    return result


def _convert_sequence(
    items: list[Any], limits: JsonLimits, budget: _Budget, depth: int
) -> list[JSONValue]:
    result: list[JSONValue] = []
    for index, item in enumerate(items):
        if index >= limits.max_items or budget.remaining <= 0:
            result.append({OMITTED_KEY: len(items) - index})
            budget.cut = True
            break
        result.append(_convert(item, limits, budget, depth + 1))
    return result


@dataclass(frozen=True)
class BoundedJson:
    """The result of :func:`bounded_json`.

    Attributes:
        value: The JSON-safe, bounded value.
        converted_types: Names of types that had no JSON form and became strings.
        was_cut: Whether a limit left something out.
    """

    value: JSONValue
    converted_types: frozenset[str]
    was_cut: bool


def bounded_json(value: Any, limits: JsonLimits = DEFAULT_LIMITS) -> BoundedJson:
    """``value`` as JSON types, within ``limits``.

    Non-finite floats become None; numpy scalars their Python value; arrays (numpy, dask,
    h5py datasets) ``{"array": {"shape", "dtype"}}`` unless small and already in memory;
    bytes are decoded as UTF-8 (replacing errors); enums their name; any other type (a
    set, a path) its ``str``, noted in ``converted_types``.
    """
    budget = _Budget(remaining=limits.max_total_chars)
    converted = _convert(value, limits, budget, depth=0)
    return BoundedJson(converted, frozenset(budget.converted_types), budget.cut)
