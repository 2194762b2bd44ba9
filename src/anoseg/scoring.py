"""The image score and the two thresholds: the one place that defines them.

The image score of a map is (1 - w) x its maximum + w x the mean of its highest TOPK_FRACTION pixels, with
w = ``image_score_topk_weight``. The model carries two thresholds, both chosen from held-out normal images only
(:mod:`anoseg.calibrate`): the **image threshold** decides the verdict on the image score (on the detector's score
when the model has a detector), the **map threshold** is the lowest map value an outline may hold: an image's
outline holds the pixels above it that reach OUTLINE_FRACTION of the image's map maximum (:func:`outline_threshold`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import Config
from .errors import DataError

TOPK_FRACTION = 0.01  # the top-k mean averages this share of a map's highest pixels
# A defect's outline keeps the pixels whose map reaches this share of the image's maximum: its extent then follows
# the defect's own peak, not one height for strong and faint defects alike (docs/design.md, "The outline").
OUTLINE_FRACTION = 0.4


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
    """The two thresholds of a model. `map` is the lowest value an outline holds; `image` decides the verdict."""

    map: float | None
    image: float | None

    def __iter__(self):  # t_map, t_img = model.thresholds()
        return iter((self.map, self.image))


def quantile_thresholds(cfg: Config, image_scores: list[float], map_pixels: np.ndarray) -> Thresholds:
    """Thresholds from normal images: quantiles of their image scores and of their map pixels."""
    return Thresholds(float(np.quantile(map_pixels, cfg.map_threshold_quantile)),
                      float(np.quantile(image_scores, cfg.threshold_quantile)))


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


def outline_threshold(thresholds: Thresholds, peak: float) -> float | None:
    """The map value above which one image's pixels are outlined: the map threshold or OUTLINE_FRACTION x `peak`
    (the image's map maximum), whichever is higher; None (nothing outlined) without a map threshold."""
    if thresholds.map is None:
        return None
    return max(thresholds.map, OUTLINE_FRACTION * float(peak))
