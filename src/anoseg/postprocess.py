"""The map post-processor: from the networks' raw maps to the smoothed map a user sees (the ONNX graph runs it too).

Each scale's raw map is smoothed in its own pixels, the scales are averaged at the first scale's shape, a broad
share of the map is added and peaks are raised:

    m = mean over scales of blur(raw, smoothing_sigma)
    m = (m + broad_weight x blur(m, broad_sigma)) / (1 + broad_weight)
    m = (m + peak_boost x max(m - blur(m, PEAK_SIGMA), 0)) / (1 + peak_boost)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config

PEAK_SIGMA = 2.0  # the surroundings peak_boost compares a pixel with: a Gaussian of this sigma, in first-scale pixels


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of B x 1 x H x W maps (reflecting borders)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    out = F.pad(maps, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1))


def at_shape(maps: list[torch.Tensor], shape: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Maps of one batch made at several scales, each resized to the first scale's shape (or to `shape`)."""
    size = maps[0].shape[-2:] if shape is None else shape

    def resized(m: torch.Tensor) -> torch.Tensor:
        return F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=True)

    return [maps[0] if shape is None else resized(maps[0]), *(resized(m) for m in maps[1:])]


def fuse_scales(maps: list[torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The mean of maps of one batch made at several scales, at the first scale's shape (or at `shape`)."""
    resized = at_shape(maps, shape)
    total = resized[0]
    for m in resized[1:]:
        total = total + m
    return total / len(maps)


@dataclass(frozen=True)
class MapPostprocessor:
    """Smoothing, the broad share and the peak boost, built once from the settings."""

    smoothing_sigma: float = 0.0
    broad_weight: float = 0.0
    broad_sigma: float = 16.0
    peak_boost: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> MapPostprocessor:
        return cls(cfg.smoothing_sigma, cfg.broad_weight, cfg.broad_sigma, cfg.peak_boost)

    def __call__(self, raw: list[torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
        """The finished B x 1 x H x W map of one batch from its raw maps, one per scale, in [0, 1], at the first
        scale's shape (or at `shape`)."""
        smooth = fuse_scales([gaussian_blur(r, self.smoothing_sigma) for r in raw], shape)
        return self.boost_peaks(self.add_broad(smooth))

    def add_broad(self, maps: torch.Tensor) -> torch.Tensor:
        """(m + w blur(m)) / (1 + w): a large defect (a band of uneven grinding, a stain) answers over its whole
        area, not only where its texture is strongest; a small defect's peak keeps most of its height."""
        if self.broad_weight <= 0:
            return maps
        return (maps + self.broad_weight * gaussian_blur(maps, self.broad_sigma)) / (1 + self.broad_weight)

    def boost_peaks(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps raised where they stand above their Gaussian surroundings: a small defect's narrow peak, which
        smoothing flattens, rises again; a broad raised area is left as it is relative to its neighbours."""
        if self.peak_boost <= 0:
            return maps
        excess = (maps - gaussian_blur(maps, PEAK_SIGMA)).clamp_min(0)
        return (maps + self.peak_boost * excess) / (1 + self.peak_boost)
