"""What every benchmark report shares: statistics, number formats and the machine's line.

The runners measure; this module turns their figures into the markdown of the reports
(``bench/*.md``), so that a median, a 90th percentile or a load average reads the same in
each of them.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

PERCENTILE_BUCKETS = 10
"""``statistics.quantiles`` buckets: deciles, of which the 9th cut is the 90th percentile."""

P90_INDEX = 8
"""Index of the 90th percentile among the decile cuts."""


def p90(values: Sequence[float]) -> float:
    """The 90th percentile (inclusive method); the value itself for a single sample."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=PERCENTILE_BUCKETS, method="inclusive")[P90_INDEX]


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the known values, or None when none is known."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def fmt_seconds(value: float | None) -> str:
    """Seconds with three decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def minus(a: float | None, b: float | None) -> float | None:
    """a - b, or None when either is unknown."""
    return None if a is None or b is None else a - b


def format_load(load: tuple[float, float, float]) -> str:
    """A load average triple as text."""
    return ", ".join(f"{v:.2f}" for v in load)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_lines(load_start: tuple[float, float, float], software: str = "") -> list[str]:
    """Markdown bullets on the machine a report was measured on.

    Args:
        load_start: ``os.getloadavg()`` when the run started (the end is read now).
        software: More versions worth naming after Python's (``", Prefect 3.8.1"``).

    Returns:
        Two bullets: cores, CPU, platform and versions; the load average at start and end.
    """
    return [
        f"- {os.cpu_count()} cores ({cpu_model()}), {platform.platform()}, Python "
        f"{platform.python_version()}{software}; a shared machine that may be busy.",
        f"- Load average (1, 5, 15 min) at start: {format_load(load_start)}; "
        f"at end: {format_load(os.getloadavg())}.",
    ]
