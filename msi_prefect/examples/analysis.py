"""An example analysis: a byte-level summary of any file.

Use it as the ``analysis`` parameter of the ``analyze-file`` deployment,
``msi_prefect.examples.analysis:summarize``, or as a template for your own: a function of
the file's path and its metadata that returns JSON-compatible values.

It reads the file in 1 MiB blocks (memory stays flat whatever the file size) and at most
:data:`MAX_SCAN_BYTES` of it (time stays bounded too); the result says how much was read.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["MAX_SCAN_BYTES", "summarize"]

BLOCK_SIZE = 1024 * 1024
#: Bytes read at most; a larger file is summarised from its first part.
MAX_SCAN_BYTES = 64 * BLOCK_SIZE
#: How many of the most frequent byte values are reported.
TOP_BYTES = 5
#: Decimal places of the reported fractions and entropy.
PRECISION = 4
BITS_PER_BYTE = 8
# Bytes of printable ASCII plus TAB, LF, CR: a high share suggests a text file.
_TEXT_BYTES = frozenset({9, 10, 13, *range(32, 127)})


def summarize(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Byte histogram summary: entropy, zero and text share, most frequent bytes.

    Args:
        path: The file.
        metadata: The file's metadata (its ``mime_type`` is echoed in the result).

    Returns:
        ``bytes_scanned``, ``complete`` (whether the whole file was read), ``mime_type``,
        ``distinct_bytes``, ``entropy_bits_per_byte`` (0 = constant, 8 = random),
        ``mean_byte``, ``zero_fraction``, ``text_fraction`` and ``top_bytes``
        (``[{"byte": "0x00", "count": n}, ...]``).
    """
    counts: Counter[int] = Counter()
    scanned = 0
    with open(path, "rb") as stream:
        while scanned < MAX_SCAN_BYTES:
            block = stream.read(min(BLOCK_SIZE, MAX_SCAN_BYTES - scanned))
            if not block:
                break
            counts.update(block)
            scanned += len(block)
        complete = not stream.read(1)
    total = max(scanned, 1)  # an empty file: every share is 0
    entropy = -sum(count / total * math.log2(count / total) for count in counts.values())
    most_common = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_BYTES]
    return {
        "bytes_scanned": scanned,
        "complete": complete,
        "mime_type": metadata.get("mime_type"),
        "distinct_bytes": len(counts),
        "entropy_bits_per_byte": round(min(abs(entropy), float(BITS_PER_BYTE)), PRECISION),
        "mean_byte": round(
            sum(value * count for value, count in counts.items()) / total, PRECISION
        ),
        "zero_fraction": round(counts[0] / total, PRECISION),
        "text_fraction": round(sum(counts[b] for b in _TEXT_BYTES) / total, PRECISION),
        "top_bytes": [{"byte": f"0x{value:02x}", "count": count} for value, count in most_common],
    }
