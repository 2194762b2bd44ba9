"""Anomaly detection and segmentation metrics (MVTec AD protocol), in plain NumPy.

Labels and masks use 1 = defect; higher scores mean more anomalous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Curve:
    """Counts at every distinct threshold, from the highest score down (a score >= t counts as defect)."""

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    n_pos: int
    n_neg: int

    @property
    def tpr(self) -> np.ndarray:
        return np.r_[0.0, self.tps / max(self.n_pos, 1)]

    @property
    def fpr(self) -> np.ndarray:
        return np.r_[0.0, self.fps / max(self.n_neg, 1)]

    def _need_both(self, what: str) -> None:
        if self.n_pos == 0 or self.n_neg == 0:
            raise ValueError(f"{what} needs both defect and normal samples")

    def auroc(self) -> float:
        self._need_both("AUROC")
        return float(np.trapezoid(self.tpr, self.fpr))

    def average_precision(self) -> float:
        """Sum over thresholds of precision times the recall step (as scikit-learn)."""
        self._need_both("average precision")
        precision = self.tps / (self.tps + self.fps)
        return float(np.sum(np.diff(np.r_[0.0, self.tps / self.n_pos]) * precision))

    def f1_max(self) -> tuple[float, float]:
        """Best F1 over thresholds, and the threshold that gives it."""
        self._need_both("F1")
        f1 = 2 * self.tps / (2 * self.tps + self.fps + (self.n_pos - self.tps))
        i = int(np.argmax(f1))
        return float(f1[i]), float(self.thresholds[i])

    def best_iou(self) -> tuple[float, float]:
        """The highest set-level IoU over thresholds (an upper bound: the threshold uses the labels)."""
        self._need_both("IoU")
        iou = self.tps / (self.n_pos + self.fps)
        i = int(np.argmax(iou))
        return float(iou[i]), float(self.thresholds[i])


def threshold_curve(labels: np.ndarray, scores: np.ndarray) -> Curve:
    """True and false positives when calling every score >= t a defect, for each distinct t."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = last + 1 - tps
    return Curve(s[last], tps, fps, int(y.sum()), int(y.size - y.sum()))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve."""
    return threshold_curve(labels, scores).auroc()


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step-wise)."""
    return threshold_curve(labels, scores).average_precision()


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over thresholds, and the threshold that gives it."""
    return threshold_curve(labels, scores).f1_max()


def best_iou(masks: np.ndarray, maps: np.ndarray) -> tuple[float, float]:
    """The highest set-level IoU over thresholds, and its threshold."""
    return threshold_curve(masks, maps).best_iou()


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max], interpolating at x_max (x ascending)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    inside = x <= x_max
    area = float(np.trapezoid(y[inside], x[inside]))
    j = int(np.count_nonzero(inside))
    if 0 < j < x.size and x[j - 1] < x_max:
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def pro_curve(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against the false positive rate, exact at every distinct threshold.

    As in the official MVTec AD evaluation: each connected defect region (8-connectivity) counts
    equally, its overlap being the share of its pixels above the threshold; the false positive rate
    is over all normal pixels of all images.
    """
    n_regions = 0
    region_sizes: list[np.ndarray] = []
    labelled: list[np.ndarray] = []
    for m in masks:
        lab, n = ndimage.label(np.asarray(m).astype(bool), structure=np.ones((3, 3), dtype=int))
        labelled.append(lab)
        region_sizes.append(np.bincount(lab.ravel(), minlength=n + 1)[1:])
        n_regions += n
    n_normal = sum(int((lab == 0).sum()) for lab in labelled)
    if n_regions == 0 or n_normal == 0:
        raise ValueError("PRO needs images with defect regions and normal pixels")
    scores = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in maps])
    fpr_w = np.empty_like(scores)
    pro_w = np.empty_like(scores)
    pos = 0
    for lab, sizes in zip(labelled, region_sizes):
        flat = lab.ravel()
        sl = slice(pos, pos + flat.size)
        fpr_w[sl] = np.where(flat == 0, 1.0 / n_normal, 0.0)
        w = np.r_[0.0, 1.0 / (sizes.astype(np.float64) * n_regions)] if sizes.size else np.zeros(1)
        pro_w[sl] = w[flat]
        pos += flat.size
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    fpr = np.r_[0.0, np.cumsum(fpr_w[order])[last]]
    pro = np.r_[0.0, np.cumsum(pro_w[order])[last]]
    return np.clip(fpr, 0.0, 1.0), np.clip(pro, 0.0, 1.0)


def aupro(masks: list[np.ndarray], maps: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (1.0 is perfect)."""
    fpr, pro = pro_curve(masks, maps)
    return trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


AUPIMO_FPR_RANGE = (1e-5, 1e-4)
AUPIMO_POINTS = 100  # FPR values evenly spaced in log between the bounds, where each image's overlap is taken


def aupimo_fprs() -> np.ndarray:
    """The false positive rates (on normal images) at which AUPIMO reads each image's overlap."""
    lo, hi = AUPIMO_FPR_RANGE
    return np.logspace(np.log10(lo), np.log10(hi), AUPIMO_POINTS)


def aupimo_of(mask: np.ndarray, amap: np.ndarray, thresholds: np.ndarray) -> float | None:
    """One image's area under its per-image overlap curve: the mean (trapezoid in log FPR) of the share of its
    defect pixels scoring >= each threshold; None for an image without defect pixels."""
    defect = np.asarray(amap)[np.asarray(mask).astype(bool)]
    if defect.size == 0:
        return None
    overlap = (defect[None, :] >= np.asarray(thresholds)[:, None]).mean(axis=1)
    return float(np.trapezoid(overlap, dx=1.0 / (len(overlap) - 1)))


def thresholds_at_fprs(fpr: np.ndarray, thresholds: np.ndarray, targets: np.ndarray,
                       resolution: float = 0.0) -> np.ndarray:
    """For each target, the threshold just above the highest score that would take the false positive rate over
    the target: the next float up, or `resolution` up where scores are known to that resolution (histograms).

    `thresholds` descend and `fpr[i]` is the rate of scores >= thresholds[i] (so it ascends)."""
    j = np.searchsorted(fpr, targets, side="right")  # first index with fpr > target
    over = thresholds[np.minimum(j, len(thresholds) - 1)]
    above = over + resolution if resolution else np.nextafter(over, np.inf)
    return np.where(j < len(thresholds), above, thresholds[-1])


def exact_pixel_metrics(masks: list[np.ndarray], maps: list[np.ndarray], normal_image: list[bool],
                        outlines: list[np.ndarray | None] | None = None,
                        fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Every pixel metric from all pixels at once (the reference the streaming histograms are checked against).

    `normal_image` says which images are normal ones (AUPIMO's false positive rate is measured on them);
    `outlines` gives each image's outlined region (:func:`anoseg.scoring.outline_region`; None: no outline) for
    the outline's figures (IoU, seg_f1, precision, recall)."""
    flat_masks = np.concatenate([np.asarray(m).ravel() for m in masks]).astype(bool)
    flat_maps = np.concatenate([np.asarray(a).ravel() for a in maps])
    curve = threshold_curve(flat_masks, flat_maps)
    out: dict[str, float | None] = {
        "pixel_auroc": curve.auroc(), "pixel_ap": curve.average_precision(), "pixel_f1_max": curve.f1_max()[0],
        "best_iou": curve.best_iou()[0], "aupro": aupro(masks, maps, fpr_limit)}
    if outlines is not None:
        counts = [outline_counts(m, o) for m, o in zip(masks, outlines, strict=True)]
        out.update(outline_scores(*(sum(c) for c in zip(*counts))))
    out["aupimo"] = None
    normal = [np.asarray(a, np.float64).ravel() for a, n in zip(maps, normal_image) if n]
    if normal:
        values = np.concatenate(normal)
        weights = np.concatenate([np.full(a.size, 1.0 / (a.size * len(normal))) for a in normal])
        order = np.argsort(-values, kind="stable")
        values = values[order]
        last = np.r_[np.flatnonzero(np.diff(values)), values.size - 1]
        fpr = np.cumsum(weights[order])[last]
        t = thresholds_at_fprs(fpr, values[last], aupimo_fprs())
        scores = [aupimo_of(m, a, t) for m, a, n in zip(masks, maps, normal_image) if not n]
        scores = [s for s in scores if s is not None]
        out["aupimo"] = float(np.mean(scores)) if scores else None
    return out


def outline_counts(masks: np.ndarray, region: np.ndarray | None) -> tuple[int, int, int]:
    """True positive, false positive and false negative pixels of an outlined `region` (bool, the masks' shape;
    None: nothing outlined)."""
    m = np.asarray(masks).astype(bool).ravel()
    if region is None:
        return 0, 0, int(np.count_nonzero(m))
    if np.size(region) != m.size:
        raise ValueError(f"outline and mask differ in shape: {np.shape(region)} vs {np.shape(masks)}")
    p = np.asarray(region, dtype=bool).ravel()
    tp = int(np.count_nonzero(p[m]))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(m)) - tp


def outline_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """IoU, F1, precision and recall of an outline from its pixel counts (1.0 where nothing was to be found
    and nothing was found)."""
    def ratio(a: int, b: int) -> float:
        return a / b if b else 1.0

    return {"iou": ratio(tp, tp + fp + fn), "seg_f1": ratio(2 * tp, 2 * tp + fp + fn),
            "seg_precision": ratio(tp, tp + fp), "seg_recall": ratio(tp, tp + fn)}
