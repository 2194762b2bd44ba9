"""AnoSeg networks: a generator (one encoder, two decoders) and a discriminator on (image, mask) pairs.

At input size S the encoder halves the resolution log2(S/8) times, so the code is always 8 x 8
(8 x 8 x 512 in the ``paper`` profile at 256 px). Images are in [-1, 1]; the map is in [0, 1], 1 = defect.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from .config import Config
from .geometry import axis


def coord_channels(x: torch.Tensor) -> torch.Tensor:
    """x (B x C x H x W) with two more channels: the pixel's x and y coordinate in [-1, 1]."""
    _, _, h, w = x.shape
    zero = torch.zeros_like(x[:, :1])  # broadcasting, not expand: exports with dynamic height and width
    ys = zero + axis(h, x).view(1, 1, h, 1)
    xs = zero + axis(w, x).view(1, 1, 1, w)
    return torch.cat([x, xs, ys], dim=1)


def channels_last(module: nn.Module) -> None:
    """Store the module's 4-D weights channels-last: convolutions then run in that order (oneDNN on CPU, NHWC
    kernels on GPU), the same maths in fewer passes over memory (CPU training steps about 1.3x faster)."""
    module.to(memory_format=torch.channels_last)


def stage_channels(cfg: Config) -> list[int]:
    """Width of each encoder stage, from the first (S/2) to the code (8 x 8)."""
    return [min(cfg.base_channels * 2**i, cfg.max_channels) for i in range(cfg.encoder_stages)]


def _down(cin: int, cout: int, norm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers += [nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
               nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(*layers)


def _up(cin: int, cout: int) -> nn.Sequential:
    # upsample + conv rather than transposed conv: no checkerboard artefacts in the map
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Image (+ coordinates) to an 8 x 8 code; also returns every stage's features for skips."""

    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        cins = [in_channels, *widths[:-1]]
        self.stages = nn.ModuleList(_down(ci, co, norm=i > 0) for i, (ci, co) in enumerate(zip(cins, widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """8 x 8 code back to full size. With skips, each stage also sees the encoder features of its size, and the
    head sees the input."""

    def __init__(self, widths: list[int], out_channels: int, in_channels: int, skips: bool) -> None:
        super().__init__()
        n = len(widths)
        self.skips = skips
        outs = [widths[n - 2 - j] if j < n - 1 else max(widths[0] // 2, 8) for j in range(n)]
        cins = [widths[-1], *outs[:-1]]
        cins = [c + (widths[n - 1 - j] if j > 0 and skips else 0) for j, c in enumerate(cins)]
        self.stages = nn.ModuleList(_up(ci, co) for ci, co in zip(cins, outs))
        self.head = nn.Conv2d(outs[-1] + (in_channels if skips else 0), out_channels, 3, 1, 1)

    def forward(self, feats: list[torch.Tensor], x_in: torch.Tensor) -> torch.Tensor:
        x = feats[-1]
        n = len(self.stages)
        for j, stage in enumerate(self.stages):
            if j > 0 and self.skips:
                x = torch.cat([x, feats[n - 1 - j]], dim=1)
            x = stage(x)
        if self.skips:
            x = torch.cat([x, x_in], dim=1)
        return self.head(x)


class Generator(nn.Module):
    """AnoSeg generator: shared encoder, an image decoder (tanh) and an anomaly-map decoder (sigmoid)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.coords = cfg.coord_channels
        widths = stage_channels(cfg)
        cin = 5 if cfg.coord_channels else 3
        self.encoder = Encoder(cin, widths)
        self.image_decoder = Decoder(widths, 3, cin, skips=False)  # skips would let it copy defects through
        self.map_decoder = Decoder(widths, 1, cin, skips=cfg.seg_skips)
        channels_last(self)

    def _input(self, x: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
        if not self.coords:
            return x
        return coord_channels(x) if coords is None else torch.cat([x, coords.to(x.dtype)], dim=1)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None,
                reconstruct: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x in [-1, 1], B x 3 x H x W -> (reconstruction in [-1, 1], anomaly map in [0, 1]).

        `coords` (B x 2 x H x W) places a crop in its whole image; by default x is a whole image.
        With ``reconstruct=False`` the image decoder does not run and the reconstruction is None.
        """
        x_in = self._input(x, coords)
        feats = self.encoder(x_in)
        recon = torch.tanh(self.image_decoder(feats, x_in)) if reconstruct else None
        return recon, torch.sigmoid(self.map_decoder(feats, x_in))

    def anomaly_map(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Only the map (the image decoder does not run: faster inference)."""
        return self.forward(x, coords, reconstruct=False)[1]


class Discriminator(nn.Module):
    """Judges (image, mask) pairs; patch logits plus the penultimate features (for feature matching).

    Spectral normalisation keeps the GAN stable on small batches without batch statistics.
    """

    def __init__(self, cfg: Config, in_channels: int = 4, aux_classes: int = 0) -> None:
        super().__init__()
        widths = stage_channels(cfg)
        layers: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            layers += [spectral_norm(nn.Conv2d(cin, w, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = spectral_norm(nn.Conv2d(cin, 1, 3, 1, 1))
        self.aux = nn.Linear(cin, aux_classes) if aux_classes else None
        channels_last(self)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(torch.cat([image, mask * 2.0 - 1.0], dim=1))
        return self.head(f), f

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.aux is None:
            raise RuntimeError("this discriminator has no auxiliary head")
        return self.aux(features.mean(dim=(2, 3)))
