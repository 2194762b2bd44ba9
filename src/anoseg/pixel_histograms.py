"""Pixel metrics from fixed-size histograms, so that evaluation memory does not grow with the test set.

Each group of images (the normal images; the images of each defect type) keeps, over `BINS` equal bins of the
map's range [0, 1], the counts of its defect and normal pixels and the PRO weight of its defect pixels (1 / the
size of the pixel's connected defect region). Curves are read at the bin edges: pixels in one bin count as tied.
Counts of the outline (the pixels each image's outline holds) are exact (taken from each map). AUPIMO
needs the false positive rates of the normal images before it reads an anomalous image, so normal images must be
added first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from . import metrics

BINS = 1 << 16


@dataclass
class _Group:
    defect: np.ndarray
    normal: np.ndarray
    region_weight: np.ndarray
    n_regions: int = 0
    outline: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))  # tp, fp, fn of the outlines
    aupimo: list[float] = field(default_factory=list)

    @classmethod
    def empty(cls, bins: int) -> _Group:
        return cls(np.zeros(bins, np.int64), np.zeros(bins, np.int64), np.zeros(bins, np.float64))


class PixelHistograms:
    """Accumulates maps and masks image by image; `metrics(groups)` gives what `metrics.exact_pixel_metrics`
    gives for the same images."""

    def __init__(self, outlines: bool = False, bins: int = BINS):
        self.outlines = outlines  # count each image's outline (IoU, seg_f1, precision, recall)
        self.bins = bins
        self.groups: dict[str | None, _Group] = {}  # None: the normal images
        self._normal_fpr_mass = np.zeros(bins, np.float64)  # sum over normal images of 1/size per pixel
        self._normal_images = 0
        self._aupimo_thresholds: np.ndarray | None = None
        self._edges = np.arange(bins - 1, -1, -1) / bins  # bin edges, descending (curves run from the top)

    def bin_index(self, amap: np.ndarray) -> np.ndarray:
        a = np.asarray(amap).ravel()
        if a.size and not (a.min() >= 0.0 and a.max() <= 1.0):  # NaN fails both comparisons
            raise ValueError("anomaly maps must hold finite values in [0, 1]")
        scaled = np.multiply(a, self.bins, dtype=np.float64 if a.dtype == np.float64 else np.float32)
        return np.minimum(scaled.astype(np.int64), self.bins - 1)

    def add(self, group: str | None, amap: np.ndarray, mask: np.ndarray, outline: np.ndarray | None = None) -> None:
        """Add one image: its map in [0, 1] and its mask (1 = defect) of the same shape; `group` is
        None for a normal image, else its defect type; `outline` is the image's outlined region (bool, the map's
        shape; None: nothing outlined)."""
        if np.shape(amap) != np.shape(mask):
            raise ValueError(f"map and mask differ in shape: {np.shape(amap)} vs {np.shape(mask)}")
        if group is None and self._aupimo_thresholds is not None:
            raise RuntimeError("normal images must be added before anomalous ones (AUPIMO)")
        g = self.groups.setdefault(group, _Group.empty(self.bins))
        idx = self.bin_index(amap)
        every = np.bincount(idx, minlength=self.bins)  # one pass over all pixels; defect pixels are few
        mask = np.asarray(mask).astype(bool)
        flat_mask = mask.ravel()
        defect = flat_mask.any()
        if defect:
            labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
            flat = labels.ravel()[flat_mask]
            hit = idx[flat_mask]
            in_defect = np.bincount(hit, minlength=self.bins)
            g.defect += in_defect
            every -= in_defect
            g.region_weight += np.bincount(hit, weights=1.0 / np.bincount(flat)[flat], minlength=self.bins)
            g.n_regions += n
        g.normal += every
        if self.outlines:
            g.outline += metrics.outline_counts(flat_mask, outline)
        if group is None:
            self._normal_fpr_mass += every / max(idx.size, 1)
            self._normal_images += 1
        else:
            self._add_aupimo(g, mask, amap)

    def _add_aupimo(self, g: _Group, mask: np.ndarray, amap: np.ndarray) -> None:
        if self._normal_images == 0:
            return
        if self._aupimo_thresholds is None:
            fpr = np.cumsum(self._normal_fpr_mass[::-1]) / self._normal_images
            # fpr[i] is the rate of normal-image scores >= self._edges[i]
            self._aupimo_thresholds = metrics.thresholds_at_fprs(fpr, self._edges, metrics.aupimo_fprs(),
                                                                     1.0 / self.bins)
        score = metrics.aupimo_of(mask, amap, self._aupimo_thresholds)
        if score is not None:
            g.aupimo.append(score)

    def merged(self, names: list[str | None] | None = None) -> _Group:
        """The groups named (all by default; None is the normal images) as one."""
        total = _Group.empty(self.bins)
        for name in list(self.groups) if names is None else names:
            g = self.groups.get(name)
            if g is None:
                continue
            total.defect += g.defect
            total.normal += g.normal
            total.region_weight += g.region_weight
            total.n_regions += g.n_regions
            total.outline += g.outline
            total.aupimo += g.aupimo
        return total

    def _reached(self, g: _Group) -> np.ndarray:
        """Which bins, from the top, some pixel of `g` falls in: the curves have a point at each."""
        return (g.defect[::-1] + g.normal[::-1]) > 0

    def curve(self, g: _Group) -> metrics.Curve:
        """The threshold curve at every bin edge that some pixel reaches."""
        seen = self._reached(g)
        return metrics.Curve(self._edges[seen], np.cumsum(g.defect[::-1])[seen], np.cumsum(g.normal[::-1])[seen],
                             int(g.defect.sum()), int(g.normal.sum()))

    def pro_curve(self, g: _Group) -> tuple[np.ndarray, np.ndarray]:
        """PRO against the false positive rate at every bin edge some pixel reaches (as `metrics.pro_curve`)."""
        if g.n_regions == 0 or g.normal.sum() == 0:
            raise ValueError("PRO needs images with defect regions and normal pixels")
        pro = np.r_[0.0, np.cumsum(g.region_weight[::-1])[self._reached(g)] / g.n_regions]
        return np.clip(self.curve(g).fpr, 0.0, 1.0), np.clip(pro, 0.0, 1.0)

    def metrics(self, names: list[str | None] | None = None, fpr_limit: float = 0.3) -> dict[str, float | None]:
        """Pixel metrics of the groups named (all by default); None where the pixels do not allow one."""
        g = self.merged(names)
        keys = ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max", "best_iou", "iou", "seg_f1", "seg_precision",
                "seg_recall", "aupimo")
        out: dict[str, float | None] = dict.fromkeys(keys)
        if g.aupimo:
            out["aupimo"] = float(np.mean(g.aupimo))
        if g.defect.sum() == 0 or g.normal.sum() == 0:
            return out
        c = self.curve(g)
        out.update(pixel_auroc=c.auroc(), pixel_ap=c.average_precision(), pixel_f1_max=c.f1_max()[0],
                   best_iou=c.best_iou()[0])
        out["aupro"] = metrics.trapezoid_to(*self.pro_curve(g), fpr_limit) / fpr_limit if g.n_regions else None
        if self.outlines:
            out.update(metrics.outline_scores(*(int(v) for v in g.outline)))
        return out
