"""Anomaly detector on top of AnoSeg's maps: image-level scores (paper section 3.4, appendix A).

A second GAN whose input is the image stacked with AnoSeg's map. Its generator reconstructs the
image; its discriminator judges pairs, real = (normal image, all-normal mask) against fake =
(reconstruction, AnoSeg's map), and has an auxiliary head that tells normal images from
hard-augmented synthetic anomalies. Trained on normal images only. Score at test time:

    score = W_MSE * MSE(real pair, fake pair) + W_FEAT * || f(real pair) - f(fake pair) ||

with f the discriminator's penultimate layer (flattened) and the norm the L2 norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import finite_weights, load_json, load_module, load_tensors, module_state, save_json, save_tensors
from .config import Config
from .modelfolder import DETECTOR_META, DETECTOR_WEIGHTS, pop_threshold
from .models import Decoder, Discriminator, Encoder, channels_last, stage_channels

W_MSE, W_FEAT = 1.0, 0.1  # the paper's weights of the score's two terms (appendix A)


class DetectorGenerator(nn.Module):
    """Image + map (4 channels) to a reconstructed image: an encoder shaped like the discriminator, a decoder."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        widths = stage_channels(cfg)
        self.encoder = Encoder(4, widths)
        self.decoder = Decoder(widths, 3, 4, skips=False)
        channels_last(self)

    def forward(self, image: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, amap * 2.0 - 1.0], dim=1)
        return torch.tanh(self.decoder(self.encoder(x), x))


def pair_scores(disc: Discriminator, image: torch.Tensor, recon: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
    """Per-image detector score: the real pair is (image, all-normal mask), the fake pair (recon, map)."""
    normal = torch.zeros_like(amap)
    real = torch.cat([image, normal * 2.0 - 1.0], dim=1)
    fake = torch.cat([recon, amap * 2.0 - 1.0], dim=1)
    mse = (real - fake).pow(2).flatten(1).mean(1)
    _, f_real = disc(image, normal)
    _, f_fake = disc(recon, amap)
    feat = (f_real - f_fake).flatten(1).norm(dim=1)
    return W_MSE * mse + W_FEAT * feat


class Detector:
    """The detector's two networks, its training and its scores; lives beside an AnoSeg model."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.generator = DetectorGenerator(cfg).to(device)
        self.discriminator = Discriminator(cfg, in_channels=4, aux_classes=2).to(device)
        self.image_threshold: float | None = None  # on its score: the image verdict
        self.meta: dict = {}

    @torch.no_grad()
    def score(self, x: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        """Scores for images x in [-1, 1] (B x 3 x S x S) with AnoSeg's raw maps (B x 1 x S x S)."""
        self.generator.eval()
        self.discriminator.eval()
        recon = self.generator(x, amap)
        return pair_scores(self.discriminator, x, recon, amap)

    # --- persistence -----------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        save_tensors(folder / DETECTOR_WEIGHTS, {**module_state("generator", self.generator),
                                                 **module_state("discriminator", self.discriminator)})
        self.save_meta(folder)

    def save_meta(self, folder: Path) -> None:
        """detector.json (metadata and the image threshold) alone."""
        save_json(folder / DETECTOR_META, {**self.meta, "image_threshold": self.image_threshold})

    @classmethod
    def load(cls, folder: Path, cfg: Config, device: torch.device) -> Detector:
        det = cls(cfg, device)
        tensors = finite_weights(load_tensors(folder / DETECTOR_WEIGHTS), folder / DETECTOR_WEIGHTS)
        load_module(det.generator, tensors, "generator", folder / DETECTOR_WEIGHTS)
        load_module(det.discriminator, tensors, "discriminator", folder / DETECTOR_WEIGHTS)
        meta = load_json(folder / DETECTOR_META)
        det.image_threshold = pop_threshold(meta, folder / DETECTOR_META, "image_threshold")
        det.meta = meta
        det.generator.eval()
        det.discriminator.eval()
        return det
