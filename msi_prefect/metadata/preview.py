"""A preview picture of an image-like file: a PNG of at most 512 px, contrast-stretched.

What a person wants at a glance: the image itself, the middle frame of a stack, or the
curve of a 1-D spectrum. Unlike metadata extraction this reads pixel data, but never the
whole of a large dataset: one plane is chosen first (the middle one along every leading
axis), and of that plane only every k-th row and column, k chosen so the result is about
twice the preview's size. tifffile memory-maps uncompressed pages, RosettaSciIO's lazy
(dask) arrays and h5py datasets read only the slices asked for, so a 4 GiB stack costs
one strided plane.

Contrast is stretched between robust percentiles (0.5 % and 99.5 %), so a few hot pixels
or a dead border do not turn the picture black. Pillow draws the PNG and the line plot;
no plotting library is needed. Plain Python, no Prefect: ``msi-prefect inspect --preview``
and the flows use the same :func:`render_preview`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from msi_prefect.errors import MsiError
from msi_prefect.metadata.detect import PNG_SIGNATURE, TIFF_MAGICS, is_hdf5
from msi_prefect.metadata.microscopy import READERS
from msi_prefect.metadata.model import HEAD_SIZE, MIB

if TYPE_CHECKING:
    import numpy as np

#: Longest side of a preview, in pixels.
MAX_PREVIEW_SIDE: Final = 512
#: Tiny images are enlarged (nearest neighbour) until their longest side reaches this.
MIN_PREVIEW_SIDE: Final = 256
#: Height of a spectrum's line plot (its width is MAX_PREVIEW_SIDE).
PLOT_HEIGHT: Final = 256
PLOT_MARGIN: Final = 8
#: Percentiles of the contrast stretch.
LOW_PERCENTILE: Final = 0.5
HIGH_PERCENTILE: Final = 99.5
#: The plane read is at most this factor larger than the preview along each side.
OVERSAMPLING: Final = 2
#: Largest compressed TIFF page decoded whole (memory-mapped pages have no limit).
MAX_DECODED_PAGE_BYTES: Final = 128 * MIB
#: Largest PNG/BMP/GIF decoded for a preview (Pillow decodes them whole; JPEG scales down).
MAX_DECODED_PIXELS: Final = 32 * 1024 * 1024
GRAY_LEVELS: Final = 255
PLOT_BACKGROUND: Final = 255
PLOT_LINE: Final = 0
_PILLOW_SUFFIXES: Final = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})


class PreviewError(MsiError):
    """The file holds nothing a preview can show, or its data cannot be read."""


class PreviewKind(enum.StrEnum):
    """What the preview shows."""

    IMAGE = "image"
    MIDDLE_FRAME = "middle-frame"
    SPECTRUM = "spectrum"


@dataclass(frozen=True)
class Preview:
    """A preview written to disk.

    Attributes:
        path: The PNG file.
        kind: What it shows.
        width: Its width in pixels.
        height: Its height in pixels.
        source_shape: Shape of the data it was made from.
    """

    path: Path
    kind: PreviewKind
    width: int
    height: int
    source_shape: list[int]


@dataclass(frozen=True)
class _Plane:
    """The data chosen for the picture: a 1-D or 2-D array (RGB: 3-D, last axis colour)."""

    values: np.ndarray
    kind: PreviewKind
    source_shape: list[int]


def _step(size: int) -> int:
    """Stride that leaves about OVERSAMPLING x MAX_PREVIEW_SIDE samples of ``size``."""
    return max(1, size // (MAX_PREVIEW_SIDE * OVERSAMPLING))


def _middle_index(shape: Sequence[int], kept: int) -> tuple[Any, ...]:
    """Index of the middle along every axis but the last ``kept``, strided on those."""
    leading = tuple(max(0, size // 2) for size in shape[: len(shape) - kept])
    trailing = tuple(slice(None, None, _step(size)) for size in shape[len(shape) - kept :])
    return leading + trailing


def _plane_of(array: Any, signal_dims: int | None = None) -> _Plane:
    """One strided plane (or line) of a numpy, dask, memmap or h5py array."""
    import numpy as np

    shape = [int(n) for n in array.shape]
    if not shape or 0 in shape:
        raise PreviewError(f"no data to show (shape {shape})")
    if signal_dims is None:
        signal_dims = 1 if len(shape) == 1 else 2
    kept = 1 if signal_dims == 1 else min(2, len(shape))
    selected = array[_middle_index(shape, kept)]
    values = np.asarray(selected.compute() if hasattr(selected, "compute") else selected)
    if kept == 1:
        kind = PreviewKind.SPECTRUM
    else:
        kind = PreviewKind.IMAGE if len(shape) == kept else PreviewKind.MIDDLE_FRAME
    return _Plane(values, kind, shape)


def _tiff_plane(path: Path) -> _Plane:
    import numpy as np
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        page_count = len(series.pages)
        middle = page_count // 2
        page = series.pages[middle]
        keyframe: Any = getattr(page, "keyframe", page)
        shape = [int(n) for n in series.shape]
        if keyframe.is_memmappable:
            plane: Any = tif.asarray(key=middle, series=0, out="memmap")
        elif keyframe.nbytes <= MAX_DECODED_PAGE_BYTES:
            plane = tif.asarray(key=middle, series=0)
        else:
            raise PreviewError(
                f"page of {keyframe.nbytes} bytes is compressed and too large to decode "
                f"for a preview (limit {MAX_DECODED_PAGE_BYTES})"
            )
    page_shape = list(plane.shape)
    # tifffile puts samples (RGB) last; keep colour for 8-bit RGB(A), average otherwise.
    if plane.ndim == 3 and page_shape[-1] in (3, 4):
        rows, cols = _step(page_shape[0]), _step(page_shape[1])
        pixels = np.asarray(plane[::rows, ::cols, :3])
        if pixels.dtype != np.uint8:
            pixels = pixels.mean(axis=-1)
        kind = PreviewKind.IMAGE if page_count == 1 else PreviewKind.MIDDLE_FRAME
        return _Plane(pixels, kind, shape)
    strided = _plane_of(plane)
    kind = PreviewKind.MIDDLE_FRAME if page_count > 1 else strided.kind
    return _Plane(strided.values, kind, shape)


def _rosettasciio_plane(path: Path) -> _Plane:
    import importlib

    reader = importlib.import_module(READERS[path.suffix.lower()])
    signals = reader.file_reader(str(path), lazy=True)
    if not signals:
        raise PreviewError("the reader found no data")
    main = signals[0]
    axes = [a for a in main.get("axes", ()) if isinstance(a, dict)]
    signal_dims = sum(1 for a in axes if not a.get("navigate", False)) or None
    return _plane_of(main["data"], min(signal_dims, 2) if signal_dims else None)


def _hdf5_plane(path: Path) -> _Plane:
    import h5py

    from msi_prefect.metadata.hdf5 import nexus_default_signal

    with h5py.File(path, "r") as h5:
        dataset = nexus_default_signal(h5) or _largest_numeric_dataset(h5)
        if dataset is None:
            raise PreviewError("no numeric dataset to show")
        return _plane_of(dataset)


def _largest_numeric_dataset(h5: Any, max_objects: int = 200) -> Any:
    """The numeric dataset with the most elements among the first ``max_objects`` objects."""
    import h5py

    best: list[Any] = [None, 0]
    seen = [0]

    def visit(_name: str, obj: Any) -> bool | None:
        seen[0] += 1
        if seen[0] > max_objects:
            return True
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biuf" and obj.size > best[1]:
            best[:] = [obj, obj.size]
        return None

    h5.visititems(visit)
    return best[0]


def _pillow_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE))  # JPEG: decode scaled down
        width, height = image.size
        if width * height > MAX_DECODED_PIXELS:
            raise PreviewError(
                f"{width} x {height} pixels is too large to decode for a preview "
                f"(limit {MAX_DECODED_PIXELS} pixels)"
            )
        image.thumbnail((MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE))
        return image.convert("RGB" if image.mode in ("RGB", "RGBA", "P", "CMYK") else "L")


def stretch(values: np.ndarray) -> np.ndarray:
    """``values`` as uint8, linear between the robust low and high percentiles.

    Complex values show their magnitude; non-finite values are black. A flat image
    becomes mid-grey.
    """
    import numpy as np

    data = np.abs(values) if np.iscomplexobj(values) else values
    data = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.uint8)
    low, high = np.percentile(data[finite], [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:
        low, high = float(data[finite].min()), float(data[finite].max())
    if high <= low:
        return np.full(data.shape, GRAY_LEVELS // 2, dtype=np.uint8)
    scaled = (np.where(finite, data, low) - low) / (high - low)
    return np.asarray(np.clip(scaled, 0.0, 1.0) * GRAY_LEVELS, dtype=np.uint8)


def _fit(image: Any) -> Any:
    """Shrink to MAX_PREVIEW_SIDE, or enlarge a tiny image (nearest) to MIN_PREVIEW_SIDE."""
    from PIL import Image

    longest = max(image.size)
    if longest > MAX_PREVIEW_SIDE:
        image.thumbnail((MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE), Image.Resampling.LANCZOS)
    elif longest < MIN_PREVIEW_SIDE:
        factor = MIN_PREVIEW_SIDE // longest
        if factor > 1:
            size = (image.size[0] * factor, image.size[1] * factor)
            image = image.resize(size, Image.Resampling.NEAREST)
    return image


def _line_plot(values: np.ndarray) -> Any:
    """A spectrum as a line: per column, the range of the samples that fall into it."""
    import numpy as np
    from PIL import Image, ImageDraw

    data = np.asarray(np.abs(values) if np.iscomplexobj(values) else values, dtype=np.float64)
    data = np.where(np.isfinite(data), data, np.nan)
    image = Image.new("L", (MAX_PREVIEW_SIDE, PLOT_HEIGHT), PLOT_BACKGROUND)
    if np.isnan(data).all():
        return image
    low, high = np.nanmin(data), np.nanmax(data)
    span = (high - low) or 1.0
    usable_width = MAX_PREVIEW_SIDE - 2 * PLOT_MARGIN
    usable_height = PLOT_HEIGHT - 2 * PLOT_MARGIN
    columns = np.array_split(data, min(usable_width, data.size))
    step = usable_width / len(columns)
    draw = ImageDraw.Draw(image)
    points = []
    for index, column in enumerate(columns):
        if np.isnan(column).all():
            continue
        x = PLOT_MARGIN + index * step
        top = PLOT_MARGIN + (1 - (np.nanmax(column) - low) / span) * usable_height
        bottom = PLOT_MARGIN + (1 - (np.nanmin(column) - low) / span) * usable_height
        draw.line([(x, top), (x, bottom)], fill=PLOT_LINE)
        points.append((x, (top + bottom) / 2))
    if len(points) > 1:
        draw.line(points, fill=PLOT_LINE)
    return image


def _read_plane(path: Path, head: bytes) -> _Plane | Any:
    """The data to draw: a :class:`_Plane`, or a Pillow image for PNG/JPEG/BMP/GIF."""
    suffix = path.suffix.lower()
    if head[:4] in TIFF_MAGICS:
        return _tiff_plane(path)
    if suffix in READERS:
        return _rosettasciio_plane(path)
    if is_hdf5(head):
        return _hdf5_plane(path)
    if head.startswith(PNG_SIGNATURE) or suffix in _PILLOW_SUFFIXES:
        return _pillow_image(path)
    raise PreviewError(f"no preview for this kind of file ({path.name})")


def render_preview(path: Path | str, out: Path | str) -> Preview:
    """Write a preview PNG of ``path`` to ``out``.

    Args:
        path: An image, image stack or spectrum in a format the extractors know.
        out: Where the PNG goes (overwritten).

    Returns:
        What was written.

    Raises:
        PreviewError: Nothing to show, or the data could not be read.
        OSError: ``path`` cannot be opened or ``out`` cannot be written (damaged data is a
            :class:`PreviewError`).
    """
    from PIL import Image

    path, out = Path(path), Path(out)
    with path.open("rb") as f:
        head = f.read(HEAD_SIZE)
    try:
        source = _read_plane(path, head)
    except PreviewError:
        raise
    except Exception as exc:  # damaged data (h5py says OSError), a library's surprise
        raise PreviewError(f"could not read the data of {path.name}: {exc!r}") from exc
    if isinstance(source, _Plane):
        if source.kind is PreviewKind.SPECTRUM:
            picture = _line_plot(source.values)
        else:
            picture = _fit(Image.fromarray(stretch(source.values)))
        kind, shape = source.kind, source.source_shape
    else:
        picture = _fit(source)
        kind, shape = PreviewKind.IMAGE, [source.size[1], source.size[0]]
    picture.save(out, format="PNG")
    return Preview(out, kind, picture.size[0], picture.size[1], shape)
