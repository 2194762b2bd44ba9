"""AnoSeg networks: a generator (one encoder, two decoders) and a discriminator on (image, mask) pairs.

At input size S the encoder halves the resolution log2(S/8) times, so the code is always 8 x 8
(8 x 8 x 512 in the ``paper`` profile at 256 px). Images are in [-1, 1]; the map is in [0, 1], 1 = defect.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from .config import Config


def _axis(n: int, like: torch.Tensor) -> torch.Tensor:
    """n coordinates from -1 to 1 (arange, not linspace: the ONNX export keeps the length dynamic)."""
    return torch.arange(n, device=like.device, dtype=like.dtype) * 2.0 / max(n - 1, 1) - 1.0


def coord_channels(x: torch.Tensor) -> torch.Tensor:
    """x (B x C x H x W) with two more channels: the pixel's x and y coordinate in [-1, 1]."""
    _, _, h, w = x.shape
    zero = torch.zeros_like(x[:, :1])  # broadcasting, not expand: exports with dynamic height and width
    ys = zero + _axis(h, x).view(1, 1, h, 1)
    xs = zero + _axis(w, x).view(1, 1, 1, w)
    return torch.cat([x, xs, ys], dim=1)


def use_memory_format(module: nn.Module, cfg: Config) -> None:
    """Store the module's 4-D weights channels-last when ``cfg.channels_last``: convolutions then run in that
    order (oneDNN on CPU, NHWC kernels on GPU), the same maths in fewer passes over memory."""
    if cfg.channels_last:
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
    """8 x 8 code back to full size. With skips, each stage also sees the encoder features of its size."""

    def __init__(self, widths: list[int], out_channels: int, in_channels: int, skips: bool,
                 head_extra: int = 0, drop_fine: int = 0) -> None:
        super().__init__()
        n = len(widths)
        # skip i, finest first: 0 is the input (into the head), i >= 1 is encoder stage i - 1 (into stage n - i)
        self.kept = [skips and i >= drop_fine for i in range(n)]
        outs = [widths[n - 2 - j] if j < n - 1 else max(widths[0] // 2, 8) for j in range(n)]
        cins = [widths[-1], *outs[:-1]]
        cins = [c + (widths[n - 1 - j] if j > 0 and self.kept[n - j] else 0) for j, c in enumerate(cins)]
        self.head_in = outs[-1] + (in_channels if self.kept[0] else 0) + head_extra  # head_extra: see Generator
        self.stages = nn.ModuleList(_up(ci, co) for ci, co in zip(cins, outs))
        self.head = nn.Conv2d(self.head_in, out_channels, 3, 1, 1)

    def forward(self, feats: list[torch.Tensor], x_in: torch.Tensor,
                head_extra: torch.Tensor | None = None) -> torch.Tensor:
        x = feats[-1]
        n = len(self.stages)
        for j, stage in enumerate(self.stages):
            if j > 0 and self.kept[n - j]:
                x = torch.cat([x, feats[n - 1 - j]], dim=1)
            x = stage(x)
        if self.kept[0]:
            x = torch.cat([x, x_in], dim=1)
        if head_extra is not None:
            x = torch.cat([x, head_extra], dim=1)
        return self.head(x)


class Generator(nn.Module):
    """AnoSeg generator: shared encoder, an image decoder (tanh) and an anomaly-map decoder (sigmoid)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.coords = cfg.coord_channels
        self.residual = cfg.map_sees_residual
        widths = stage_channels(cfg)
        cin = 5 if cfg.coord_channels else 3
        self.encoder = Encoder(cin, widths)
        self.image_decoder = Decoder(widths, 3, cin, skips=False)  # skips would let it copy defects through
        self.map_decoder = Decoder(widths, 1, cin, skips=cfg.seg_skips, head_extra=int(self.residual),
                                   drop_fine=cfg.seg_skips_drop_fine)
        use_memory_format(self, cfg)

    def _input(self, x: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
        if not self.coords:
            return x
        return coord_channels(x) if coords is None else torch.cat([x, coords.to(x.dtype)], dim=1)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None,
                reconstruct: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x in [-1, 1], B x 3 x H x W -> (reconstruction in [-1, 1], anomaly map in [0, 1]).

        `coords` (B x 2 x H x W) places a crop in its whole image; by default x is a whole image.
        With ``reconstruct=False`` the reconstruction is None and the image decoder runs only if the map
        sees the residual (training without reconstruction or adversarial loss needs no reconstruction).
        """
        x_in = self._input(x, coords)
        feats = self.encoder(x_in)
        recon = torch.tanh(self.image_decoder(feats, x_in)) if reconstruct or self.residual else None
        residual = self._residual(x, recon) if recon is not None else None
        return (recon if reconstruct else None), torch.sigmoid(self.map_decoder(feats, x_in, residual))

    def _residual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
        """|input - reconstruction| (mean over colours) for the map head, when the map sees it.

        The reconstruction is detached: it is trained on normal pixels only and must not learn to
        differ where the map wants it to.
        """
        return (x - recon.detach()).abs().mean(dim=1, keepdim=True) if self.residual else None

    def anomaly_map(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Only the map (skips the image decoder unless the map sees the residual: faster inference)."""
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
        use_memory_format(self, cfg)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(torch.cat([image, mask * 2.0 - 1.0], dim=1))
        return self.head(f), f

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.aux is None:
            raise RuntimeError("this discriminator has no auxiliary head")
        return self.aux(features.mean(dim=(2, 3)))
