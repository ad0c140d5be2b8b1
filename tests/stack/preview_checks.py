"""The stack journey's look at a preview: its image artifact, its URL, the browser's picture.

The journey (`test_stack.py`) drops one sample image into the inbox; these helpers find
the preview artifact of its metadata run on the server, fetch the picture as a browser
does (no credentials) and tell whether a screenshot of the artifact page shows it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx

from tests.flow_helpers import REPO
from tests.stack_helpers import API_TIMEOUT_S

SAMPLES = (REPO / "../shared/samples").resolve()
#: The image the journey drops: a Zeiss SEM TIFF of 512 x 384 px, whose preview keeps that
#: size.
PREVIEW_SAMPLE = SAMPLES / "zeiss_sem_512.tif"
PREVIEW_SIZE = (512, 384)
PREVIEW_SCREENSHOT = REPO / "test-artifacts" / "prefect-ui-preview.png"
# The SEM picture is grey (red = green = blue) in mid tones the UI's own white, black and
# bluish greys never use in large areas; anti-aliased text has some, in thin strokes.
MID_GREY = range(32, 224)
# A screen row "crosses the picture" when at least this share of the picture's width is
# mid-grey in it: text lines never come near.
ROW_SHARE = 0.5
# Most rows of the picture must cross it (the SEM's dark corners and data bar not all).
MIN_PICTURE_ROWS_SHARE = 0.75


def preview_artifact(api: str, flow_run_id: str) -> dict[str, Any] | None:
    """The image artifact of a flow run, as the API returns it, or None."""
    artifacts = httpx.post(
        f"{api}/artifacts/filter",
        json={
            "artifacts": {"type": {"any_": ["image"]}},
            "flow_runs": {"id": {"any_": [flow_run_id]}},
        },
        timeout=API_TIMEOUT_S,
    ).json()
    return artifacts[0] if artifacts else None


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG (fails on anything that is not one)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG", image.format
        return image.size


def picture_rows_shown(screenshot: Path, picture_width: int) -> int:
    """How many screen rows cross a grey picture about ``picture_width`` px wide.

    A row crosses it when at least ROW_SHARE of ``picture_width`` of its pixels are
    neutral mid-grey. A page without the picture (a broken image icon, an empty card,
    the run list) has next to none.
    """
    import numpy as np
    from PIL import Image

    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    grey = (red == green) & (green == blue) & (red >= MID_GREY.start) & (red < MID_GREY.stop)
    per_row = grey.sum(axis=1)
    return int((per_row >= ROW_SHARE * picture_width).sum())


def shows_picture(screenshot: Path, size: tuple[int, int] = PREVIEW_SIZE) -> bool:
    """Whether the screenshot shows a grey picture of ``size`` (width, height) px."""
    width, height = size
    return picture_rows_shown(screenshot, width) >= MIN_PICTURE_ROWS_SHARE * height
