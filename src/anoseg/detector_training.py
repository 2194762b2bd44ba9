"""Training the anomaly detector (paper section 3.4) on normal images and AnoSeg's maps of them.

Training-side code: the detector's networks and scores live in :mod:`anoseg.detector`, which inference
uses without importing any of this (nor the synthetic anomalies).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .augment import make_batch
from .detector import Detector
from .errors import AnosegError
from .progress import bar


def new_detector(cfg, device: torch.device) -> Detector:
    """A detector with initial weights drawn from the run's seed, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return Detector(cfg, device)


def _finite_or_stop(loss: torch.Tensor, step: int) -> None:
    """Checked before the optimiser step, so a non-finite value never reaches the weights."""
    if not torch.isfinite(loss):
        raise AnosegError(f"detector training diverged at step {step + 1} (non-finite loss; the weights before "
                          "it are kept); lower detector_lr")


def fit_detector(det: Detector, anoseg_map: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 progress: bool = True) -> float:
    """Train on normal images (uint8 N x 3 x S x S); `anoseg_map` maps [-1, 1] images to AnoSeg maps.

    Batches and synthetic anomalies come from per-step generators seeded with (seed, step). Returns the
    training time in seconds.
    """
    cfg = det.cfg
    det.generator.train()
    det.discriminator.train()
    opt_g = torch.optim.Adam(det.generator.parameters(), lr=cfg.detector_lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(det.discriminator.parameters(), lr=cfg.detector_lr, betas=(cfg.beta1, cfg.beta2))
    start = time.perf_counter()
    for step in bar(range(cfg.detector_steps), desc="training detector", disable=not progress):
        rng = np.random.default_rng([cfg.seed, step, 2])
        idx = rng.choice(len(images), cfg.batch_size, replace=len(images) < cfg.batch_size)
        x01 = images[torch.from_numpy(idx)].float() / 255.0
        # synthetic anomalies only feed the auxiliary classifier, never the "real" class
        syn01, syn_mask = make_batch(x01, cfg.replace(anomaly_ratio=1.0), rng)
        _detector_step(det, anoseg_map, x01, syn01, syn_mask, opt_g, opt_d, step)
    det.generator.eval()
    det.discriminator.eval()
    return time.perf_counter() - start


def _detector_step(det: Detector, anoseg_map, x01: torch.Tensor, syn01: torch.Tensor, syn_mask: torch.Tensor,
                   opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, step: int) -> None:
    cfg, bce = det.cfg, F.binary_cross_entropy_with_logits
    is_syn = (syn_mask.flatten(1).amax(1) > 0).long().to(det.device)
    x, syn = x01.to(det.device) * 2 - 1, syn01.to(det.device) * 2 - 1
    with torch.no_grad():
        amap, syn_map = anoseg_map(x), anoseg_map(syn)
    normal = torch.zeros_like(amap)
    recon = det.generator(x, amap)

    real_logit, _ = det.discriminator(x, normal)
    fake_logit, _ = det.discriminator(recon.detach(), amap)
    _, f_norm = det.discriminator(x, amap)
    _, f_syn = det.discriminator(syn, syn_map)
    cls_logits = det.discriminator.classify(torch.cat([f_norm, f_syn]))
    cls_target = torch.cat([torch.zeros_like(is_syn), is_syn])
    loss_d = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit)) \
        + cfg.detector_lambda_cls * F.cross_entropy(cls_logits, cls_target)
    _finite_or_stop(loss_d, step)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    fake_logit, f_fake = det.discriminator(recon, amap)
    with torch.no_grad():
        _, f_real = det.discriminator(x, normal)
    loss_g = cfg.detector_lambda_adv * bce(fake_logit, torch.ones_like(fake_logit)) \
        + cfg.detector_lambda_rec * (recon - x).abs().mean() \
        + cfg.detector_lambda_fm * (f_real.mean(0) - f_fake.mean(0)).pow(2).mean()
    _finite_or_stop(loss_g, step)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
