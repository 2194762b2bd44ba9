"""Training the anomaly detector (paper section 3.4) on normal images and AnoSeg's maps of them.

Training-side code: the detector's networks and scores live in :mod:`anoseg.detector`, which inference
uses without importing any of this (nor the synthetic anomalies).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import make_batch
from .checkpoint import (
    deferred_interrupt,
    load_json,
    load_module,
    load_optimizer,
    load_tensors,
    module_state,
    optimizer_state,
    remove_resume_point,
    resume_weights,
    save_resume_point,
)
from .detector import Detector
from .errors import AnosegError, ConfigError, ModelFileError
from .modelfolder import DETECTOR_CKPT_STATE, DETECTOR_CKPT_STEM
from .progress import bar

# settings a resumed detector run must share with its checkpoint (detector_steps may grow: train longer)
RESUME_KEYS = ("seed", "batch_size", "detector_batch_size", "detector_lr", "detector_lambda_adv", "detector_lambda_rec",
               "detector_lambda_cls", "detector_lambda_fm", "beta1", "beta2")
SAVED_KEYS = (*RESUME_KEYS, "detector_steps")  # what a checkpoint records; a resumed run starts from these


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
                 progress: bool = True, folder: Path | None = None, resume: bool = False) -> float:
    """Train on normal images (uint8 N x 3 x S x S); `anoseg_map` maps [-1, 1] images to AnoSeg maps.

    Batches and synthetic anomalies come from per-step generators seeded with (seed, step), so a run
    resumed from its checkpoint (`folder`, every ``checkpoint_every`` steps and on Ctrl-C) ends with the
    same weights as one that ran through. Returns the training time in seconds, earlier sessions included.
    """
    cfg = det.cfg
    det.generator.train()
    det.discriminator.train()
    opt_g = torch.optim.Adam(det.generator.parameters(), lr=cfg.detector_lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(det.discriminator.parameters(), lr=cfg.detector_lr, betas=(cfg.beta1, cfg.beta2))
    step, before = load_checkpoint(folder, det, opt_g, opt_d) if resume and folder is not None else (0, 0.0)
    start = time.perf_counter()
    progress_bar = bar(range(step, cfg.detector_steps), desc="training detector", disable=not progress)
    batch = cfg.detector_batch_size or cfg.batch_size
    with deferred_interrupt() as interrupted:
        for step in progress_bar:
            rng = np.random.default_rng([cfg.seed, step, 2])
            idx = rng.choice(len(images), batch, replace=len(images) < batch)
            x01 = images[torch.from_numpy(idx)].float() / 255.0
            # synthetic anomalies only feed the auxiliary classifier, never the "real" class
            syn01, syn_mask = make_batch(x01, cfg.replace(anomaly_ratio=1.0), rng)
            _detector_step(det, anoseg_map, x01, syn01, syn_mask, opt_g, opt_d, step)
            done = step + 1
            stop = interrupted()
            if folder is not None and (done % cfg.checkpoint_every == 0 or stop) and done < cfg.detector_steps:
                save_checkpoint(folder, det, opt_g, opt_d, done, before + time.perf_counter() - start)
            if stop and done < cfg.detector_steps:
                where = f"checkpoint saved in {folder}, continue with train-detector --resume" if folder else \
                    "no checkpoint (no folder given)"
                raise AnosegError(f"detector training interrupted at step {done}; {where}")
    det.generator.eval()
    det.discriminator.eval()
    return before + time.perf_counter() - start


def save_checkpoint(folder: Path, det: Detector, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                    step: int, seconds: float) -> None:
    """Networks and optimiser states, crash-safe like AnoSeg's checkpoints (:func:`save_resume_point`)."""
    tg, pg = optimizer_state("opt_g", opt_g)
    td, pd = optimizer_state("opt_d", opt_d)
    tensors = {**module_state("generator", det.generator), **module_state("discriminator", det.discriminator),
               **tg, **td}
    save_resume_point(folder, DETECTOR_CKPT_STATE, DETECTOR_CKPT_STEM, step, tensors, {
        "train_seconds": round(seconds, 2), "opt_g": pg, "opt_d": pd,
        "settings": {k: getattr(det.cfg, k) for k in SAVED_KEYS}})


def load_checkpoint(folder: Path, det: Detector, opt_g: torch.optim.Optimizer,
                    opt_d: torch.optim.Optimizer) -> tuple[int, float]:
    """Restore a detector run; returns (steps done, seconds spent). Refuses other settings than its own."""
    if not (folder / DETECTOR_CKPT_STATE).is_file():
        raise AnosegError(f"{folder}: no detector checkpoint to resume (train-detector without --resume starts one)")
    state = load_json(folder / DETECTOR_CKPT_STATE)
    changed = [k for k, v in state.get("settings", {}).items() if k in RESUME_KEYS and getattr(det.cfg, k, v) != v]
    if changed:
        raise ConfigError(f"{folder}: the detector checkpoint was made with other settings ({', '.join(changed)}); "
                          "resume with the same settings or start again without --resume")
    path = resume_weights(folder, DETECTOR_CKPT_STATE, f"{DETECTOR_CKPT_STEM}.safetensors")
    tensors = load_tensors(path)
    load_module(det.generator, tensors, "generator", path)
    load_module(det.discriminator, tensors, "discriminator", path)
    try:
        load_optimizer(opt_g, "opt_g", tensors, state["opt_g"])
        load_optimizer(opt_d, "opt_d", tensors, state["opt_d"])
        step, seconds = int(state["step"]), float(state.get("train_seconds", 0.0))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelFileError(f"{folder / DETECTOR_CKPT_STATE}: damaged checkpoint state ({e})") from None
    if step > det.cfg.detector_steps:
        raise ConfigError(f"{folder}: the detector checkpoint is at step {step}, past detector_steps="
                          f"{det.cfg.detector_steps}; give at least that many steps")
    return step, seconds


def checkpoint_settings(folder: Path) -> dict:
    """The settings an interrupted detector run was started with (empty when there is no checkpoint)."""
    path = folder / DETECTOR_CKPT_STATE
    settings = load_json(path).get("settings", {}) if path.is_file() else {}
    if not isinstance(settings, dict):
        raise ModelFileError(f"{path}: damaged checkpoint state (settings)")
    return {k: v for k, v in settings.items() if k in SAVED_KEYS}


def remove_checkpoint(folder: Path) -> None:
    remove_resume_point(folder, DETECTOR_CKPT_STATE, DETECTOR_CKPT_STEM)


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
