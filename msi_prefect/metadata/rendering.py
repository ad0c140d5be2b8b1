"""The metadata of one file as markdown, for the Prefect UI's artifact.

Values come from the files themselves, so every one is escaped: a file must not be able to
form links, HTML or table cells in the UI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Final

from msi_prefect.metadata.model import (
    MAX_STRING_CHARS,
    MAX_WARNING_CHARS,
    FileMetadata,
    JSONValue,
    truncate,
)

# Values come from the files themselves: keep them from forming links, HTML or table cells.
_MARKDOWN_ESCAPES: Final = str.maketrans(
    {
        "\\": "\\\\",
        "|": "\\|",
        "`": "\\`",
        "*": "\\*",
        "_": "\\_",
        "[": "\\[",
        "]": "\\]",
        "#": "\\#",
        "<": "&lt;",
        ">": "&gt;",
        "&": "&amp;",
        "\n": " ",
        "\r": " ",
    }
)


def _md(value: JSONValue, limit: int = MAX_STRING_CHARS) -> str:
    if isinstance(value, str) and value.isprintable():
        text = value
    else:
        # json shows control characters (a TAB delimiter) and nested values unambiguously.
        text = json.dumps(value, ensure_ascii=False)
    return truncate(text, limit).translate(_MARKDOWN_ESCAPES)


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    amount = float(size)
    unit = "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):  # noqa: B007 -- the unit reached is used below
        amount /= 1024
        if amount < 1024:
            break
    return f"{amount:.1f} {unit}"


def _flatten(details: Mapping[str, JSONValue], prefix: str = "") -> Iterator[tuple[str, JSONValue]]:
    for key, value in details.items():
        if isinstance(value, dict) and value and not prefix:
            yield from _flatten(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def _quantity(value: JSONValue) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("value"), int | float):
        return None
    unit = value.get("unit")
    return f"{value['value']:g} {unit}" if unit else f"{value['value']:g} (uncalibrated)"


def normalized_rows(normalized: Mapping[str, JSONValue]) -> Iterator[tuple[str, str]]:
    """(label, text) for each normalised fact the file has."""
    instrument = normalized.get("instrument")
    if isinstance(instrument, dict):
        named = " ".join(str(v) for v in (instrument.get("vendor"), instrument.get("model")) if v)
        if named:
            yield "Instrument", named
        if instrument.get("software"):
            yield "Software", str(instrument["software"])
    for key, label in (("acquired_at", "Acquired"), ("dtype", "Data type")):
        if normalized.get(key):
            yield label, str(normalized[key])
    shape, axes = normalized.get("shape"), normalized.get("axes")
    if isinstance(shape, list):
        names = axes if isinstance(axes, list) and len(axes) == len(shape) else None
        yield (
            "Shape",
            " x ".join(
                f"{size} ({name})" if names and name else str(size)
                for size, name in zip(shape, names or [None] * len(shape), strict=True)
            ),
        )
    for key, label in (("pixel_size", "Pixel size"), ("field_of_view", "Field of view")):
        per_axis = normalized.get(key)
        if isinstance(per_axis, dict) and per_axis:
            yield label, ", ".join(f"{axis} {_quantity(q)}" for axis, q in per_axis.items())
    energy = _quantity(normalized.get("beam_energy"))
    if energy:
        yield "Beam energy", energy
    if normalized.get("magnification") is not None:
        yield "Magnification", f"{normalized['magnification']:g} x"
    for key, label in (("detector", "Detector"), ("operator", "Operator")):
        if normalized.get(key):
            yield label, str(normalized[key])


def metadata_markdown(meta: FileMetadata, max_detail_rows: int = 60) -> str:
    """A markdown summary (two tables and any warnings), e.g. for a Prefect artifact.

    Args:
        meta: The metadata to show.
        max_detail_rows: Detail rows shown; nested dicts are flattened one level.
    """
    lines = [
        f"### {_md(meta.relpath)}",
        "",
        "| Field | Value |",
        "| --- | --- |",
        f"| Size | {human_size(meta.size)} ({meta.size:,} bytes) |",
        f"| MIME type | {_md(meta.mime_type)} |",
        f"| SHA-256 | `{meta.sha256}` |",
        *([f"| MD5 | `{meta.md5}` |"] if meta.md5 else []),
        f"| Modified | {_md(meta.modified_at)} |",
        f"| Extracted | {_md(meta.extracted_at)} |",
        f"| Extractor | {_md(meta.extractor)} {_md(meta.extractor_version)} |",
    ]
    facts = list(normalized_rows(meta.normalized))
    if facts:
        lines += ["", "| Fact | Value |", "| --- | --- |"]
        lines += [f"| {label} | {_md(value)} |" for label, value in facts]
    rows = list(_flatten(meta.details))
    if rows:
        lines += ["", "| Detail | Value |", "| --- | --- |"]
        lines += [f"| {_md(key)} | {_md(value)} |" for key, value in rows[:max_detail_rows]]
        if len(rows) > max_detail_rows:
            lines.append(f"| … | {len(rows) - max_detail_rows} more |")
    if meta.warnings:
        lines += ["", "**Warnings**", ""]
        lines += [f"- {_md(w, MAX_WARNING_CHARS)}" for w in meta.warnings[:20]]
        if len(meta.warnings) > 20:
            lines.append(f"- … {len(meta.warnings) - 20} more")
    return "\n".join(lines) + "\n"
