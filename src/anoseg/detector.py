"""Anomaly detector on top of AnoSeg's maps: image-level scores (paper section 3.4, appendix A).

A second GAN whose input is the image stacked with AnoSeg's map. Its generator reconstructs the
image; its discriminator judges pairs, real = (normal image, all-normal mask) against fake =
(reconstruction, AnoSeg's map), and has an auxiliary head that tells normal images from
hard-augmented synthetic anomalies. Trained on normal images only. Score at test time:

    score = w_mse * MSE(real pair, fake pair) + w_feat * || f(real pair) - f(fake pair) ||

with f the discriminator's penultimate layer (flattened) and the norm the L2 norm.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import make_batch
from .checkpoint import load_json, load_module, load_tensors, module_state, pop_threshold, save_json, save_tensors
from .config import Config
from .errors import AnosegError
from .models import Decoder, Discriminator, Encoder, stage_channels
from .progress import bar

DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_META = "detector.json"


class DetectorGenerator(nn.Module):
    """Image + map (4 channels) to a reconstructed image: an encoder shaped like the discriminator, a decoder."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        widths = stage_channels(cfg)
        self.encoder = Encoder(4, widths)
        self.decoder = Decoder(widths, 3, 4, skips=False)

    def forward(self, image: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, amap * 2.0 - 1.0], dim=1)
        return torch.tanh(self.decoder(self.encoder(x), x))


def pair_scores(disc: Discriminator, image: torch.Tensor, recon: torch.Tensor, amap: torch.Tensor,
                w_mse: float, w_feat: float) -> torch.Tensor:
    """Per-image detector score: the real pair is (image, all-normal mask), the fake pair (recon, map)."""
    normal = torch.zeros_like(amap)
    real = torch.cat([image, normal * 2.0 - 1.0], dim=1)
    fake = torch.cat([recon, amap * 2.0 - 1.0], dim=1)
    mse = (real - fake).pow(2).flatten(1).mean(1)
    _, f_real = disc(image, normal)
    _, f_fake = disc(recon, amap)
    feat = (f_real - f_fake).flatten(1).norm(dim=1)
    return w_mse * mse + w_feat * feat


class Detector:
    """The detector's two networks, its training and its scores; lives beside an AnoSeg model."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.generator = DetectorGenerator(cfg).to(device)
        self.discriminator = Discriminator(cfg, in_channels=4, aux_classes=2).to(device)
        self.threshold: float | None = None
        self.meta: dict = {}

    @torch.no_grad()
    def score(self, x: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        """Scores for images x in [-1, 1] (B x 3 x S x S) with AnoSeg's raw maps (B x 1 x S x S)."""
        self.generator.eval()
        self.discriminator.eval()
        recon = self.generator(x, amap)
        return pair_scores(self.discriminator, x, recon, amap, self.cfg.detector_w_mse, self.cfg.detector_w_feat)

    # --- training ------------------------------------------------------------------------
    def fit(self, anoseg_map, images: torch.Tensor, progress: bool = True) -> float:
        """Train on normal images (uint8 N x 3 x S x S); `anoseg_map` maps [-1, 1] images to AnoSeg maps.

        Returns the training time in seconds.
        """
        cfg = self.cfg
        torch.manual_seed(cfg.seed + 1)
        self.generator.train()
        self.discriminator.train()
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.detector_lr, betas=(cfg.beta1, cfg.beta2))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.detector_lr, betas=(cfg.beta1, cfg.beta2))
        bce = F.binary_cross_entropy_with_logits
        start = time.perf_counter()
        for step in bar(range(cfg.detector_steps), desc="training detector", disable=not progress):
            rng = np.random.default_rng([cfg.seed, step, 2])
            idx = rng.choice(len(images), cfg.batch_size, replace=len(images) < cfg.batch_size)
            x01 = images[torch.from_numpy(idx)].float() / 255.0
            # synthetic anomalies only feed the auxiliary classifier, never the "real" class
            syn01, syn_mask = make_batch(x01, cfg.replace(anomaly_ratio=1.0), rng)
            is_syn = (syn_mask.flatten(1).amax(1) > 0).long().to(self.device)
            x = x01.to(self.device) * 2 - 1
            syn = syn01.to(self.device) * 2 - 1
            with torch.no_grad():
                amap, syn_map = anoseg_map(x), anoseg_map(syn)
            normal = torch.zeros_like(amap)
            recon = self.generator(x, amap)

            real_logit, _ = self.discriminator(x, normal)
            fake_logit, _ = self.discriminator(recon.detach(), amap)
            _, f_norm = self.discriminator(x, amap)
            _, f_syn = self.discriminator(syn, syn_map)
            cls_logits = self.discriminator.classify(torch.cat([f_norm, f_syn]))
            cls_target = torch.cat([torch.zeros_like(is_syn), is_syn])
            loss_d = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit)) \
                + cfg.detector_lambda_cls * F.cross_entropy(cls_logits, cls_target)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            fake_logit, f_fake = self.discriminator(recon, amap)
            with torch.no_grad():
                _, f_real = self.discriminator(x, normal)
            loss_g = cfg.detector_lambda_adv * bce(fake_logit, torch.ones_like(fake_logit)) \
                + cfg.detector_lambda_rec * (recon - x).abs().mean() \
                + cfg.detector_lambda_fm * (f_real.mean(0) - f_fake.mean(0)).pow(2).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if not (torch.isfinite(loss_d) and torch.isfinite(loss_g)):
                raise AnosegError(f"detector training diverged at step {step + 1}; lower detector_lr")
        self.generator.eval()
        self.discriminator.eval()
        return time.perf_counter() - start

    # --- persistence -----------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        save_tensors(folder / DETECTOR_WEIGHTS, {**module_state("generator", self.generator),
                                                 **module_state("discriminator", self.discriminator)})
        save_json(folder / DETECTOR_META, {**self.meta, "threshold": self.threshold})

    @classmethod
    def load(cls, folder: Path, cfg: Config, device: torch.device) -> Detector:
        det = cls(cfg, device)
        tensors = load_tensors(folder / DETECTOR_WEIGHTS)
        load_module(det.generator, tensors, "generator", folder / DETECTOR_WEIGHTS)
        load_module(det.discriminator, tensors, "discriminator", folder / DETECTOR_WEIGHTS)
        meta = load_json(folder / DETECTOR_META)
        det.threshold = pop_threshold(meta, folder / DETECTOR_META)
        det.meta = meta
        det.generator.eval()
        det.discriminator.eval()
        return det
