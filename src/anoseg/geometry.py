"""Where an image sits inside the model: its working shape at each scale, and the coordinate channels.

``square``: every image is squashed to image_size x image_size. ``aspect``: the short side becomes the scale's
short side (image_size, and ``second_short_side`` for a second scale) and the long side keeps the aspect ratio
up to MAX_ASPECT, rounded to a multiple of image_size / 8 so that the encoder's halvings come out even.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config

MAX_ASPECT = 4.0  # the long side is at most this many times the short side; longer images are squashed


def axis(n: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """n coordinates from -1 to 1, the values of a coordinate channel (arange, not linspace: the ONNX export
    keeps the length dynamic)."""
    device, dtype = (like.device, like.dtype) if like is not None else (None, torch.float32)
    return torch.arange(n, device=device, dtype=dtype) * 2.0 / max(n - 1, 1) - 1.0


@dataclass(frozen=True)
class Geometry:
    """The settings that decide the model's input shapes (also read from an ONNX export's sidecar)."""

    image_size: int
    resize_mode: str = "square"
    second_short_side: int = 0

    @classmethod
    def from_config(cls, cfg: Config) -> Geometry:
        return cls(cfg.image_size, cfg.resize_mode, cfg.second_short_side)

    @property
    def unit(self) -> int:
        """Working sides are multiples of this: image_size / 8."""
        return self.image_size // 8

    @property
    def scales(self) -> tuple[int, ...]:
        """The short side of each scale: image_size, then second_short_side when set."""
        return (self.image_size, self.second_short_side) if self.second_short_side else (self.image_size,)

    def working_shape(self, height: int, width: int, short_side: int | None = None) -> tuple[int, int]:
        """The (height, width) an image of this size has inside the model, at `short_side` (default the first
        scale's)."""
        if self.resize_mode == "square":
            return self.image_size, self.image_size
        s = short_side or self.image_size
        ratio = min(max(height, width) / max(min(height, width), 1), MAX_ASPECT)
        long = max(s, int(round(s * ratio / self.unit)) * self.unit)
        return (long, s) if height > width else (s, long)

    def working_shapes(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        """The image's working shape at each scale."""
        return tuple(self.working_shape(height, width, side) for side in self.scales)

    def second_scale_size(self, height: int, width: int) -> list[int]:
        """A first-scale crop's size at the second scale, for a crop that has no image at that scale."""
        ratio = self.second_short_side / self.image_size
        return [max(self.unit, round(n * ratio / self.unit) * self.unit) for n in (height, width)]
