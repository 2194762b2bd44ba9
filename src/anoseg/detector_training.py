"""Training the anomaly detector (paper section 3.4) on normal images and AnoSeg's maps of them.

Training-side code: the detector's networks and scores live in :mod:`anoseg.detector`, which inference
uses without importing any of this (nor the synthetic anomalies).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import Augmenter
from .calibrate import calibrate, holdout_split
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
from .config import Config, resumed
from .data import TrainingImages, train_images
from .detector import Detector
from .errors import AnosegError, ConfigError, ModelFileError
from .inference import AnoSegModel
from .modelfolder import CONFIG_FILE, DETECTOR_CKPT_STATE, DETECTOR_CKPT_STEM, DETECTOR_META, DETECTOR_WEIGHTS
from .progress import bar

# the paper's loss weights (appendix A): adversarial, reconstruction, synthetic-anomaly classification, feature matching
LAMBDA_ADV, LAMBDA_REC, LAMBDA_CLS, LAMBDA_FM = 1.0, 10.0, 1.0, 1.0
BETAS = (0.5, 0.999)
# the detector run's recipe: a resumed run keeps these (detector_steps may grow: train longer)
RECIPE_KEYS = ("seed", "detector_batch_size", "detector_lr")
SAVED_KEYS = (*RECIPE_KEYS, "detector_steps")  # what a checkpoint records


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
    same weights as one that ran through. Returns the training time in seconds, the interrupted runs' included.
    """
    cfg = det.cfg
    det.generator.train()
    det.discriminator.train()
    opt_g = torch.optim.Adam(det.generator.parameters(), lr=cfg.detector_lr, betas=BETAS)
    opt_d = torch.optim.Adam(det.discriminator.parameters(), lr=cfg.detector_lr, betas=BETAS)
    augment = Augmenter.from_config(cfg, anomaly_ratio=1.0)  # synthetic anomalies feed the auxiliary classifier only
    step, before = load_checkpoint(folder, det, opt_g, opt_d) if resume and folder is not None else (0, 0.0)
    start = time.perf_counter()
    progress_bar = bar(range(step, cfg.detector_steps), desc="training detector", disable=not progress)
    batch = cfg.detector_batch_size
    with deferred_interrupt() as interrupted:
        for step in progress_bar:
            rng = np.random.default_rng([cfg.seed, step, 2])
            idx = rng.choice(len(images), batch, replace=len(images) < batch)
            x01 = images[torch.from_numpy(idx)].float() / 255.0
            syn01, syn_mask = augment(x01, rng)
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
    """Restore a detector run (its settings are the checkpoint's, :func:`train_detector`); returns (steps done,
    seconds spent)."""
    if not (folder / DETECTOR_CKPT_STATE).is_file():
        raise AnosegError(f"{folder}: no detector checkpoint to resume (train-detector without --resume starts one)")
    state = load_json(folder / DETECTOR_CKPT_STATE)
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
    bce = F.binary_cross_entropy_with_logits
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
        + LAMBDA_CLS * F.cross_entropy(cls_logits, cls_target)
    _finite_or_stop(loss_d, step)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    fake_logit, f_fake = det.discriminator(recon, amap)
    with torch.no_grad():
        _, f_real = det.discriminator(x, normal)
    loss_g = LAMBDA_ADV * bce(fake_logit, torch.ones_like(fake_logit)) \
        + LAMBDA_REC * (recon - x).abs().mean() \
        + LAMBDA_FM * (f_real.mean(0) - f_fake.mean(0)).pow(2).mean()
    _finite_or_stop(loss_g, step)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()


def remove_detector(folder: Path) -> None:
    """A detector belongs to the generator it was trained on: drop it when the generator changes."""
    stale = [folder / DETECTOR_WEIGHTS, folder / DETECTOR_META, folder / DETECTOR_CKPT_STATE]
    if any(p.exists() for p in stale):
        warnings.warn(f"{folder}: the AnoSeg model changes, so its detector is removed; "
                      "train a new one with train-detector", stacklevel=3)
        for p in stale:
            p.unlink(missing_ok=True)
    remove_checkpoint(folder)  # a detector run's resume point, and weights a kill left without their JSON


def train_detector(folder: str | Path, data: str | Path | None = None, overrides: dict | None = None,
                   progress: bool = True, resume: bool = False, overwrite: bool = False) -> AnoSegModel:
    """Train the anomaly detector (paper section 3.4) for the AnoSeg model in `folder` and save it there.

    Uses the same normal training images and the same held-out split as the AnoSeg model. It checkpoints
    like AnoSeg training: `resume` continues an interrupted run; a run's checkpoint is never replaced
    unless `overwrite` is given.
    """
    folder = Path(folder)
    model = AnoSegModel.load(folder)
    cfg = model.config.replace(**(overrides or {}))
    if resume:  # the interrupted run's recipe, as AnoSeg training resumes; settings not given are the run's
        saved = model.config.replace(**checkpoint_settings(folder))
        cfg = resumed(saved, saved.replace(**(overrides or {})),
                      {f.name for f in dataclasses.fields(Config)} - set(RECIPE_KEYS))
    model.config = cfg
    if (folder / DETECTOR_CKPT_STATE).is_file() and not (resume or overwrite):
        raise AnosegError(f"{folder}: an interrupted detector run left a checkpoint; continue it with --resume "
                          "or start again with --overwrite")
    data = data if data is not None else model.meta.get("data")
    if data is None:
        raise AnosegError(f"{folder}: the model does not record its training data; give DATA")
    files = train_images(data)
    train_idx, hold_idx = holdout_split(len(files), cfg)
    images = TrainingImages.load(files, cfg, desc="loading images", progress=progress, one_scale=True).subset(train_idx)
    # the detector trains on one fixed crop per image (the whole image in square mode), at the first scale:
    # at inference it sees the first scale's input with the map of all scales
    images = images.crops(np.arange(len(images)), np.random.default_rng([cfg.seed, 3]))[0]
    detector = new_detector(cfg, model.device)
    seconds = fit_detector(detector, model.crop_raw_maps, images, progress=progress, folder=folder, resume=resume)
    model.detector = detector
    detector.meta = {"train_seconds": round(seconds, 2), "steps_done": cfg.detector_steps, "data": str(data)}
    calibrate(model, [files[i] for i in hold_idx] or [files[i] for i in train_idx])
    cfg.save(folder / CONFIG_FILE, keep=model.retired_settings)
    detector.save(folder)
    remove_checkpoint(folder)  # the detector is written: its resume point is no longer needed
    return model
