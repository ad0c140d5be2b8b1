"""The real instrument files the tests read: ``../shared/samples`` beside the work tree."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
SAMPLES = (REPO / "../shared/samples").resolve()
needs_samples = pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"sample instrument files not found at {SAMPLES}"
)
