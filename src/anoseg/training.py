"""A training run: check the folder, load the images, loop over the steps with checkpoints, write the model.

Under torchrun every rank calls :func:`train`; the distributed concerns live in :class:`TrainingRun` (which rank
writes, barriers, agreed stop decisions).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import trainer as trainer_mod
from .calibrate import calibrate, holdout_split
from .checkpoint import deferred_interrupt, remove_resume_point
from .config import RESUMABLE, Config, resumed
from .data import TrainingImages, train_images
from .detector_training import remove_detector
from .distributed import DistContext, barrier, broadcast_flag, init_from_env, shard
from .errors import AnosegError
from .fileio import make_output_dir
from .image_store import remove_cache
from .inference import AnoSegModel
from .modelfolder import (
    CKPT_STATE,
    CKPT_STEM,
    CONFIG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    has_checkpoint,
    is_finished,
    read_config,
)
from .progress import bar as progress_bar
from .runtime import resolve_device
from .trainer import Trainer, TrainingUnstable


def prepare_folder(out: Path, cfg: Config, resume: bool, overwrite: bool) -> Config:
    """Check the output folder so that no finished work is overwritten by accident; returns the config to use
    (resuming: :func:`anoseg.config.resumed`, the saved recipe with RESUMABLE settings taken from `cfg`)."""
    has_ckpt, has_model = has_checkpoint(out), is_finished(out)
    if resume:
        if not has_ckpt:
            raise AnosegError(f"{out}: nothing to resume (no {CKPT_STATE})")
        return resumed(read_config(out / CONFIG_FILE, for_training=True), cfg, RESUMABLE)
    if (has_ckpt or has_model) and not overwrite:
        raise AnosegError(f"{out}: already holds a model or checkpoint; use --resume to continue it, "
                          "--overwrite to start again, or another --out")
    return cfg


@dataclass
class TrainingRun:
    """Everything one call of :func:`train` works with, made by :func:`_set_up`."""

    cfg: Config
    out: Path
    data: Path
    files: list[Path]
    train_idx: np.ndarray
    hold_idx: np.ndarray
    images: TrainingImages
    trainer: Trainer
    ctx: DistContext
    device: torch.device
    progress: bool
    elapsed_before: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def checkpoint(self) -> None:
        """Rank 0 writes; every rank waits, since a rollback on any rank reads this checkpoint."""
        if self.ctx.is_main:
            self.trainer.save(self.out, {"train_seconds": self.seconds(), "data": str(self.data),
                                         "world_size": self.ctx.world})
        barrier(self.ctx)

    def seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def agree(self, flag: bool) -> bool:
        """A stop decision every rank takes together (one process: the flag itself)."""
        return broadcast_flag(flag, self.ctx, self.device)


def train(cfg: Config, data: str | Path, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> AnoSegModel:
    """Train on the normal images of `data` (MVTec category or folder); write the model to `out`.

    The folder receives ``config.json``, periodic ``checkpoint.*`` files, ``train_log.csv`` and, at the
    end, ``model.safetensors`` + ``model.json`` (with the thresholds chosen from held-out normal images).
    """
    run = _set_up(cfg, Path(data), Path(out), resume, overwrite, progress)
    stopped_early = _loop(run)
    return _finish(run, stopped_early)


def _set_up(cfg: Config, data: Path, out: Path, resume: bool, overwrite: bool, progress: bool) -> TrainingRun:
    """Check the folder and the data, load the images, build (or resume) the networks."""
    ctx, rank_device = init_from_env(cfg.device)  # torchrun: one process per GPU or CPU worker
    cfg = prepare_folder(out, cfg, resume, overwrite)
    if ctx.enabled:
        shard(cfg.batch_size, ctx)  # the global batch must split evenly: fail before any work
    data = data.resolve()  # recorded with the model; train-detector finds the data from anywhere
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    files = train_images(data)
    train_idx, hold_idx = holdout_split(len(files), cfg)
    progress = progress and ctx.is_main
    # every file is decoded now, held-out ones included, so a bad file stops the run before training starts
    images = TrainingImages.load([files[i] for i in train_idx], cfg, desc="loading images", progress=progress,
                                 cache_dir=out, also_check=[files[i] for i in hold_idx])
    if ctx.is_main:  # only rank 0 writes
        _clear_old_outputs(out, resume)
        cfg.save(out / CONFIG_FILE)
    barrier(ctx)
    device = rank_device or resolve_device(cfg.device)
    trainer = Trainer(cfg, device, ctx)
    run = TrainingRun(cfg, out, data, files, train_idx, hold_idx, images, trainer, ctx, device, progress)
    if resume:
        run.elapsed_before = float(trainer.load(out).get("train_seconds", 0.0))
    run.start = time.perf_counter()
    return run


def _clear_old_outputs(out: Path, resume: bool) -> None:
    make_output_dir(out)
    remove_detector(out)
    if not resume:  # --overwrite: the old run's checkpoint and model go now, not mixed with the new run
        remove_resume_point(out, CKPT_STATE, CKPT_STEM)
        for old in (out / WEIGHTS_FILE, out / META_FILE):
            old.unlink(missing_ok=True)


def _loop(run: TrainingRun) -> bool:
    """Train until `steps` (checkpoints, rollbacks, Ctrl-C, time budget); True when the time budget stopped it."""
    cfg, trainer = run.cfg, run.trainer
    bar = progress_bar(total=cfg.steps, initial=trainer.step_done, desc="training", disable=not run.progress)
    with deferred_interrupt() as interrupted, contextlib.closing(bar):
        while trainer.step_done < cfg.steps:
            rng = np.random.default_rng([cfg.seed, trainer.step_done, 1])
            idx = rng.choice(len(run.images), cfg.batch_size, replace=len(run.images) < cfg.batch_size)
            try:
                losses = trainer.step(run.images.crops(idx, rng))
            except TrainingUnstable as e:
                _roll_back(trainer, run.out, e, bar)
                continue
            if trainer.log(losses):
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            bar.update(1)
            if trainer.step_done % cfg.checkpoint_every == 0:
                run.checkpoint()
            # Ctrl-C: stop between steps, so the checkpoint is an exact resume point (all ranks together)
            if run.agree(interrupted()):
                run.checkpoint()
                raise AnosegError(f"interrupted at step {trainer.step_done}; checkpoint saved in {run.out}, "
                                  "continue with --resume")
            if run.agree(bool(cfg.max_minutes) and (time.perf_counter() - run.start) / 60 > cfg.max_minutes):
                return True
    return False


def _finish(run: TrainingRun, stopped_early: bool) -> AnoSegModel:
    """The last checkpoint, the model with its thresholds from held-out normal images, written by rank 0."""
    run.checkpoint()
    trainer = run.trainer
    model = AnoSegModel(run.cfg, trainer.final_generator, meta={
        "steps_done": trainer.step_done, "stopped_early": stopped_early, "train_seconds": round(run.seconds(), 2),
        "n_train": len(run.train_idx), "data": str(run.data), "rollbacks": trainer.rollbacks,
        "lr_scale": trainer.lr_scale, "world_size": run.ctx.world,
        "precision": trainer.precision, "train_images": run.images.description})
    model.generator.eval()
    if run.ctx.is_main:
        calibrate(model, [run.files[i] for i in run.hold_idx] or [run.files[i] for i in run.train_idx])
        model.save(run.out)
        remove_cache(run.out)  # the run is complete: its image cache is not needed again
    barrier(run.ctx)
    return model


def _roll_back(trainer: Trainer, out: Path, error: TrainingUnstable, bar: Any) -> None:
    """Go back to the last checkpoint with a lower learning rate, or stop once the retries are spent."""
    where = trainer.rollback(out, error)
    msg = (f"training unstable: {error}; rolled back to {where} with the learning rate x{trainer.lr_scale:g} "
           f"(rollback {trainer.rollbacks} of at most {trainer_mod.MAX_ROLLBACKS})")
    warnings.warn(msg, stacklevel=2)
    bar.n = trainer.step_done
    bar.refresh()
