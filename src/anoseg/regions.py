"""The 8-connected regions of a map above one level that reach another, found band by band of rows.

Labelling a whole map at once holds 4 bytes of labels a pixel beside it (a 9000 x 9000 map: 324 MB, and about as
much again inside scipy). Here each band is labelled on its own, the labels that touch across a band's edge are
joined (union-find), and a second pass marks the regions that reach: memory is one band's labels and the answer.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BAND_PIXELS = 1_000_000  # a band holds about this many pixels (at least one row)
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def regions_reaching(amap: np.ndarray, edge: float, reach: float, band_pixels: int = BAND_PIXELS) -> np.ndarray:
    """The pixels of `amap` (H x W) above `edge` whose 8-connected region holds a pixel at `reach` or above."""
    amap = np.asarray(amap)
    out = np.zeros(amap.shape, dtype=bool)
    if amap.size == 0:
        return out
    rows = max(1, band_pixels // max(1, amap.shape[1]))
    starts = range(0, amap.shape[0], rows)
    parent, reaches, bands = [0], [False], []  # bands: (first row, label offset, label count) of each
    previous_row = None
    for start in starts:
        band = amap[start:start + rows]
        labels, n = ndimage.label(band > edge, structure=_EIGHT_NEIGHBOURS)
        offset = len(parent) - 1
        bands.append((start, offset, n))
        parent.extend(range(offset + 1, offset + n + 1))
        hit = np.zeros(n + 1, dtype=bool)
        hit[labels[band >= reach]] = True
        reaches.extend(hit[1:].tolist())
        first_row = np.where(labels[0] > 0, labels[0] + offset, 0)
        if previous_row is not None:
            for a, b in _touching(previous_row, first_row):
                _union(parent, a, b)
        previous_row = np.where(labels[-1] > 0, labels[-1] + offset, 0)
    roots = _roots(np.asarray(parent))
    keep = np.zeros(len(roots), dtype=bool)
    keep[roots[np.asarray(reaches)]] = True
    keep = keep[roots]
    keep[0] = False
    for start, offset, n in bands:
        if not keep[offset + 1:offset + n + 1].any():  # nothing kept in this band: it stays empty, unlabelled
            continue
        labels, _ = ndimage.label(amap[start:start + rows] > edge, structure=_EIGHT_NEIGHBOURS)
        out[start:start + rows] = keep[labels + offset] & (labels > 0)
    return out


def _touching(upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Distinct (upper label, lower label) pairs of two adjacent rows that touch, diagonals included."""
    pairs = [np.stack([upper[max(0, -d):len(upper) - max(0, d)], lower[max(0, d):len(lower) - max(0, -d)]], 1)
             for d in (-1, 0, 1)]
    both = np.concatenate(pairs)
    both = both[(both[:, 0] > 0) & (both[:, 1] > 0)]
    return np.unique(both, axis=0) if len(both) else both


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: list[int], a: int, b: int) -> None:
    ra, rb = _find(parent, int(a)), _find(parent, int(b))
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


def _roots(parent: np.ndarray) -> np.ndarray:
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up
