"""The image score and the two thresholds: the one place that defines them.

The image score of a map is (1 - w) x its maximum + w x the mean of its highest TOPK_FRACTION pixels, with
w = ``image_score_topk_weight``. The model carries two thresholds, both chosen from held-out normal images only
(:mod:`anoseg.calibrate`): the **image threshold** decides the verdict on the image score (on the detector's score
when the model has a detector), the **map threshold** is the lowest map value an outline may hold in an image judged
normal. With them comes the **map background**, where a normal surface's map lies. An image's outline is drawn
around its own peak (:func:`outline_levels`, :func:`outline_region`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import Config
from .errors import DataError
from .regions import regions_reaching

TOPK_FRACTION = 0.01  # the top-k mean averages this share of a map's highest pixels
# An outline's edge lies this share of the way from the normal surface's map level (the model's map background) up
# to the image's map maximum, so its extent follows the defect's own peak, not one height for strong and faint
# defects alike; and it holds only the regions whose own maximum reaches OUTLINE_REACH of the image's, so weaker
# bumps elsewhere in a defect image stay unmarked (docs/design.md, "The outline").
OUTLINE_EDGE = 0.35
OUTLINE_REACH = 0.9
OUTLINE_RULE = (f"the regions of the map above the edge, {OUTLINE_EDGE:g} of the way from the map background to the "
                f"map's maximum (in images judged normal, or without a map background, not below the map threshold), "
                f"whose own maximum reaches {OUTLINE_REACH:g} x the image's")


@dataclass(frozen=True)
class ImageScorer:
    """Turns maps into image scores; built once from the settings."""

    topk_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> ImageScorer:
        return cls(cfg.image_score_topk_weight)

    @property
    def kind(self) -> str:
        """The score's short name in outputs: map_max (the maximum alone) or map_blend."""
        return "map_max" if self.topk_weight == 0 else "map_blend"

    def describe(self) -> str:
        w = self.topk_weight
        return "map maximum" if w == 0 else f"map: {1 - w:g} x maximum + {w:g} x top-{TOPK_FRACTION:g} mean"

    def __call__(self, maps: torch.Tensor, exportable: bool = False) -> tuple[torch.Tensor, ...]:
        """(image score, maximum, top-k mean) of each of B maps.

        `exportable` writes the top-k mean with a sort and a mask (3x slower), so that the ONNX graph keeps k a
        function of the map's dynamic size, which ``topk`` does not export; it skips the top-k mean when the
        score does not use it."""
        flat = maps.flatten(1)
        peak = flat.amax(1)
        if exportable and self.topk_weight == 0:
            return peak, peak, peak
        top = _topk_mean_exportable(flat) if exportable else \
            flat.topk(max(1, round(TOPK_FRACTION * flat.shape[1])), dim=1).values.mean(1)
        return (1 - self.topk_weight) * peak + self.topk_weight * top, peak, top


def _topk_mean_exportable(flat: torch.Tensor) -> torch.Tensor:
    k = torch.clamp(torch.round(torch.tensor(TOPK_FRACTION, dtype=torch.float64) * flat.shape[1]), min=1)
    k = k.to(device=flat.device, dtype=flat.dtype)  # rounded in double precision, as Python's round
    ranked = torch.sort(flat, dim=1, descending=True).values
    return (ranked * (torch.arange(flat.shape[1], device=flat.device) < k)).sum(1) / k


@dataclass(frozen=True)
class Thresholds:
    """A model's thresholds. `image` decides the verdict; `map` is the lowest value an outline holds in an image
    judged normal; `background`, the normal surface's map level, is where an outline's edge is measured from (None:
    from 0, with `map` the floor in every image)."""

    map: float | None
    image: float | None
    background: float | None = None

    def __iter__(self):  # t_map, t_img = model.thresholds()
        return iter((self.map, self.image))


def quantile_thresholds(cfg: Config, image_scores: list[float], map_pixels: np.ndarray) -> Thresholds:
    """Thresholds from normal images: quantiles of their image scores and of their map pixels, and the median of
    their map pixels as the map background."""
    return Thresholds(float(np.quantile(map_pixels, cfg.map_threshold_quantile)),
                      float(np.quantile(image_scores, cfg.threshold_quantile)), float(np.median(map_pixels)))


def check_threshold(threshold: float, option: str, in_unit_range: bool) -> float:
    """A user-given threshold: a finite number, and in [0, 1] where it applies to map values."""
    if not np.isfinite(threshold) or (in_unit_range and not 0.0 <= threshold <= 1.0):
        where = "a number in [0, 1] (map values lie there)" if in_unit_range else \
            "a finite number (detector scores may exceed 1)"
        raise DataError(f"{option} {threshold}: must be {where}")
    return float(threshold)


def verdict(score: float, threshold: float | None) -> str | None:
    """'defect' when the score exceeds the threshold, else 'normal'; None without a threshold."""
    if threshold is None:
        return None
    return "defect" if score > threshold else "normal"


@dataclass(frozen=True)
class OutlineLevels:
    """One image's outline: the regions of map values above `edge` whose maximum reaches `reach`."""

    edge: float
    reach: float


def outline_levels(thresholds: Thresholds, peak: float, score: float) -> OutlineLevels | None:
    """The outline of an image whose map maximum is `peak` and whose image score is `score`; None (nothing
    outlined) without a map threshold.

    The edge lies OUTLINE_EDGE of the way from the map background up to `peak`; in an image judged normal, or
    without a background, it is not below the map threshold. A region is kept where it reaches OUTLINE_REACH x
    `peak`."""
    if thresholds.map is None:
        return None
    base = thresholds.background or 0.0
    edge = base + OUTLINE_EDGE * (float(peak) - base)
    if thresholds.background is None or verdict(score, thresholds.image) != "defect":
        edge = max(edge, thresholds.map)
    return OutlineLevels(edge, max(edge, OUTLINE_REACH * float(peak)))


def outline_region(amap: np.ndarray, levels: OutlineLevels | None) -> np.ndarray:
    """The pixels `levels` outline in `amap` (bool, the map's shape; none without levels). The region of `amap`'s
    own maximum always reaches: resized to the image, a map may lose a little of the peak its levels came from."""
    if levels is None or np.size(amap) == 0:
        return np.zeros(np.shape(amap), dtype=bool)
    return regions_reaching(amap, levels.edge, min(levels.reach, float(np.max(amap))))
