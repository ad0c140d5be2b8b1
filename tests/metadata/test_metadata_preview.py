"""Preview pictures: size, contrast, the middle frame of a stack, spectra, and bounded memory.

The samples come from ``../shared/samples`` (skipped when absent); stacks, spectra and the
large file are made in ``tmp_path``.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from msi_prefect.metadata import extract_metadata
from msi_prefect.metadata.preview import (
    MAX_PREVIEW_SIDE,
    PLOT_HEIGHT,
    PreviewError,
    PreviewKind,
    render_preview,
    stretch,
)
from tests.samples import SAMPLES, needs_samples

# The repository's root, found upwards so the file may move into a sub-folder of tests/.
#: The NeXus sample's signal is all zeros: its faithful preview is flat grey.
FLAT_SAMPLES = {"simple_signal.nxs"}
MIB = 1024 * 1024


def sample_names() -> list[str]:
    if not SAMPLES.is_dir():
        return []
    return sorted(p.name for p in SAMPLES.iterdir() if p.name != "README.md")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture.convert("L"))


@needs_samples
@pytest.mark.parametrize("name", sample_names())
def test_every_sample_gets_a_preview(tmp_path: Path, name: str) -> None:
    out = tmp_path / "preview.png"
    preview = render_preview(SAMPLES / name, out)

    values = pixels(out)
    assert values.shape == (preview.height, preview.width)
    assert max(preview.width, preview.height) <= MAX_PREVIEW_SIDE
    if name in FLAT_SAMPLES:
        assert values.std() == 0
    else:
        assert values.std() > 0, "a preview of real data is not a flat picture"
        assert values.min() == 0 and values.max() == 255, "stretched to the full range"


def test_middle_frame_of_a_stack(tmp_path: Path) -> None:
    stack = np.zeros((5, 60, 80), dtype=np.uint16)
    stack[2] = np.arange(80, dtype=np.uint16)[None, :] * 100  # only the middle frame varies
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)

    preview = render_preview(path, tmp_path / "p.png")
    assert preview.kind is PreviewKind.MIDDLE_FRAME
    assert preview.source_shape == [5, 60, 80]
    values = pixels(preview.path)
    assert values[:, 0].max() < values[:, -1].min()  # the gradient, left dark, right bright


def test_spectrum_is_a_line_plot(tmp_path: Path) -> None:
    energy = np.linspace(0, 20, 2048)
    counts = 100 + 5000 * np.exp(-((energy - 8.04) ** 2) / 0.01)  # a Cu K-alpha peak
    path = tmp_path / "spectrum.h5"
    with h5py.File(path, "w") as h5:
        h5["counts"] = counts

    preview = render_preview(path, tmp_path / "p.png")
    assert preview.kind is PreviewKind.SPECTRUM
    assert (preview.width, preview.height) == (MAX_PREVIEW_SIDE, PLOT_HEIGHT)
    values = pixels(preview.path)
    dark_columns = np.flatnonzero((values < 128).any(axis=0))
    assert dark_columns.size > MAX_PREVIEW_SIDE // 2  # a line across the plot
    dark = values < 128
    top_of_line = np.where(dark.any(axis=0), dark.argmax(axis=0), values.shape[0])
    peak_column = int(np.argmin(top_of_line))
    assert abs(peak_column / MAX_PREVIEW_SIDE - 8.04 / 20) < 0.05


def test_stretch_ignores_outliers_and_flat_images() -> None:
    image = np.full((100, 100), 1000.0)
    image[:, 50:] = 2000.0
    image[0, 0] = 1e9  # a hot pixel
    stretched = stretch(image)
    assert stretched[50, 10] == 0 and stretched[50, 90] == 255
    assert (stretch(np.ones((4, 4))) == 127).all()
    assert (stretch(np.full((3, 3), np.nan)) == 0).all()


def test_file_without_a_picture_says_so(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(PreviewError, match="no preview for this kind of file"):
        render_preview(path, tmp_path / "p.png")


@needs_samples
@pytest.mark.parametrize("name", sample_names())
def test_damaged_copies_raise_only_preview_errors(tmp_path: Path, name: str) -> None:
    content = (SAMPLES / name).read_bytes()
    for length in (0, 64, len(content) // 2):
        folder = tmp_path / f"cut{length}"
        folder.mkdir()
        if name.endswith(".emi"):
            (folder / "fei_tia_tem_search_1.ser").write_bytes(
                (SAMPLES / "fei_tia_tem_search_1.ser").read_bytes()
            )
        copy = folder / name
        copy.write_bytes(content[:length])
        try:
            preview = render_preview(copy, folder / "p.png")
        except PreviewError as exc:
            assert str(exc)
        else:
            assert max(preview.width, preview.height) <= MAX_PREVIEW_SIDE


def test_large_stack_is_described_and_previewed_in_bounded_memory(tmp_path: Path) -> None:
    """A 256 MiB stack: headers only for metadata, one strided frame for the preview."""
    path = tmp_path / "large.tif"
    frames, rows, cols = 128, 1024, 1024
    stack = tifffile.memmap(path, shape=(frames, rows, cols), dtype=np.uint16)
    stack[frames // 2, :, : cols // 2] = 1000  # the middle frame is half bright
    stack.flush()
    del stack
    assert path.stat().st_size >= frames * rows * cols * 2

    tracemalloc.start()
    try:
        meta = extract_metadata(path, known_sha256="0" * 64)
        _, extract_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        preview = render_preview(path, tmp_path / "p.png")
        _, preview_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert meta.normalized["shape"] == [frames, rows, cols]
    assert meta.warnings == []
    assert extract_peak < 8 * MIB
    assert preview_peak < 48 * MIB  # one frame as float64 is 8 MiB; the stack is 256
    assert preview.kind is PreviewKind.MIDDLE_FRAME
    values = pixels(preview.path)
    assert values[:, : values.shape[1] // 3].mean() > values[:, -values.shape[1] // 3 :].mean()
