"""Pictures a user can open: heat-map overlays, outlined defect regions, synthetic-anomaly grids, curves."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from .fileio import _write_atomic, save_png_atomic, save_png_bands

OUTLINE_RGB = np.array([0, 255, 0], dtype=np.uint8)


ROWS_PER_CHUNK = 512  # large images are blended in bands of rows, so memory stays a few copies of one band
BAND_PIXELS = 1_000_000  # ... and a band of a wide image has fewer rows: about this many pixels at most


def _band_rows(width: int) -> int:
    return max(1, min(ROWS_PER_CHUNK, BAND_PIXELS // max(1, width)))


@functools.cache
def _jet_lut() -> np.ndarray:
    """matplotlib's 256-colour 'jet' as a uint8 table (256 x 3); matplotlib is imported on first use only."""
    import matplotlib

    return (matplotlib.colormaps["jet"](np.arange(256))[:, :3] * 255).astype(np.uint8)


def _lut_index(amap: np.ndarray) -> np.ndarray:
    # the colour matplotlib picks for a value: floor(value * 256), the top value included in the last colour
    return np.minimum((np.clip(amap, 0, 1).astype(np.float32) * 256).astype(np.int32), 255)


def outline(region: np.ndarray, width: int = 2) -> np.ndarray:
    """The boundary pixels of a bool region."""
    inner = ndimage.binary_erosion(region, iterations=width, border_value=0)
    return region & ~inner


def _overlay_bands(image: np.ndarray, amap: np.ndarray, region: np.ndarray | None,
                   alpha: float) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, RGB uint8 band) of the overlay, top to bottom: the whole overlay is never held as floats."""
    lut = _jet_lut().astype(np.float32) * alpha
    width = max(1, round(max(image.shape[:2]) / 256))
    step = _band_rows(image.shape[1])
    for r in range(0, image.shape[0], step):
        rows = slice(r, r + step)
        band = (image[rows].astype(np.float32) * (1 - alpha) + lut[_lut_index(amap[rows])]).astype(np.uint8)
        if region is not None:
            band[_outline_rows(region, width, r, len(band))] = OUTLINE_RGB
        yield r, band


def _outline_rows(region: np.ndarray, width: int, start: int, n: int) -> np.ndarray:
    """Rows start..start+n of ``outline(region, width)``, computed from those rows and `width` more on each side:
    an erosion of `width` steps reaches no further, so the rows are exactly the whole-map ones."""
    lo, hi = max(0, start - width), min(region.shape[0], start + n + width)
    rows = region[lo:hi]
    inner = ndimage.binary_erosion(rows, iterations=width, border_value=0)
    edge = rows & ~inner  # wrong only within `width` rows of a cut that is not the image border: dropped here
    return edge[start - lo:start - lo + n]


def overlay(image: np.ndarray, amap: np.ndarray, region: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """Image blended with the heat map, `region` (bool, the image's shape; None: nothing) outlined in green."""
    out = np.empty_like(image)
    for r, band in _overlay_bands(image, amap, region, alpha):
        out[r:r + len(band)] = band
    return out


def save_overlay(path: Path, image: np.ndarray, amap: np.ndarray, region: np.ndarray | None,
                 alpha: float = 0.45) -> None:
    """:func:`overlay` written to a PNG band by band: neither the overlay nor its picture is held whole."""
    save_png_bands(path, image.shape[0], image.shape[1], (band for _, band in _overlay_bands(image, amap, region,
                                                                                             alpha)))


def map_to_uint8(amap: np.ndarray) -> np.ndarray:
    """A [0, 1] map as 8-bit grey (value x 255), made in bands of rows."""
    out = np.empty(amap.shape, dtype=np.uint8)
    step = _band_rows(amap.shape[1])
    for r in range(0, amap.shape[0], step):
        out[r:r + step] = np.round(np.clip(amap[r:r + step], 0, 1) * 255)
    return out


def save_map_png16(path: Path, amap: np.ndarray) -> None:
    """The raw map as a 16-bit grey PNG: value / 65535 is the map value (1 = defect). Written in bands."""
    step = _band_rows(amap.shape[1])
    bands = (np.round(np.clip(amap[r:r + step], 0, 1) * 65535).astype(np.uint16) for r in range(0, amap.shape[0], step))
    save_png_bands(path, amap.shape[0], amap.shape[1], bands)


def save_grid(path: Path, tiles: list[np.ndarray], columns: int) -> None:
    """Tile same-size RGB images into one PNG."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = t
    save_png_atomic(path, Image.fromarray(grid))


def new_figure() -> tuple[Any, Any]:
    """A figure and its axes, without pyplot: no global figure list and no change of the user's backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    return fig, fig.subplots()


def save_figure(path: Path, fig: Any) -> None:
    _write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> None:
    """ROC curves: name -> (fpr, tpr, auroc)."""
    fig, ax = new_figure()
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {area:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title="ROC")
    ax.legend(loc="lower right")
    save_figure(path, fig)


def plot_pro(path: Path, fpr: np.ndarray, pro: np.ndarray, limit: float, area: float) -> None:
    fig, ax = new_figure()
    keep = fpr <= min(1.0, limit * 1.5)
    ax.plot(fpr[keep], pro[keep], label=f"AUPRO@{limit} = {area:.3f}")
    ax.axvline(limit, ls=":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="per-region overlap", ylim=(0, 1.01), title="PRO curve")
    ax.legend(loc="lower right")
    save_figure(path, fig)


def synthetic_examples_grid(path: Path, images: np.ndarray, masks: np.ndarray) -> None:
    """Save what training sees: images (float N x 3 x S x S in [0, 1]) with their synthetic anomalies outlined
    (masks N x 1 x S x S, 1 = defect)."""
    tiles = []
    for img, m in zip(images, masks):
        tile = (img.transpose(1, 2, 0) * 255).astype(np.uint8)
        tile[outline(m[0] > 0.5, 1)] = OUTLINE_RGB
        tiles.append(tile)
    save_grid(path, tiles, columns=int(np.ceil(np.sqrt(len(tiles)))))
