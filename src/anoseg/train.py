"""Training AnoSeg: segmentation + masked reconstruction + adversarial losses, with checkpoints and resume."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from .config import IMAGE_SCORING, MAP_SHAPING, Config
from .data import TrainingImages, train_images
from .detector_training import checkpoint_settings, fit_detector, new_detector, remove_checkpoint
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    convert_batchnorm,
    init_from_env,
    shard,
    wrap,
)
from .errors import AnosegError, ConfigError, DataError, ModelFileError
from .fileio import make_output_dir, temp_files, write_text_atomic
from .inference import AnoSegModel, autocast, maybe_compile, resolve_device, resolve_precision
from .modelfolder import (
    CKPT_STATE,
    CKPT_STEM,
    CKPT_WEIGHTS,
    CONFIG_FILE,
    DETECTOR_CKPT_STATE,
    DETECTOR_META,
    DETECTOR_WEIGHTS,
    LOG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    has_checkpoint,
    is_finished,
)
from .models import Discriminator, Generator
from .progress import bar as progress_bar

# Settings that may change when a run is resumed; the rest must match the saved run.
RESUMABLE = ("steps", "device", "precision", "compile", "channels_last",
             "num_threads", "max_minutes", "checkpoint_every", "batch_size_infer", "max_rollbacks",
             "rollback_lr_factor", "collapse_d_loss", "collapse_patience")
# Settings that only matter after AnoSeg training (scoring, detector): taken from the user on resume too.
LATER = (*IMAGE_SCORING, *MAP_SHAPING, "threshold_quantile", "map_threshold_quantile") + tuple(
    f.name for f in dataclasses.fields(Config) if f.name.startswith("detector_"))


PIXEL_SAMPLE = 1 << 16  # map pixels per held-out image that choose the map threshold (a random sample)


class TrainingUnstable(AnosegError):
    """A non-finite loss, non-finite weights or a collapsed discriminator: roll back or stop."""


def segmentation_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, gamma: float,
                      defect_weight: float = 1.0, inset: int = 0, smoothing: float = 0.0) -> torch.Tensor:
    """Pixel-wise loss between the predicted map and the reference mask (same shape, in [0, 1]; B x 1 x H x W
    when inset > 0).

    gamma: the focal exponent (focal: every pixel; asymmetric: normal pixels only, defect pixels get plain
    cross-entropy); defect_weight: how many times a defect pixel counts as much as a normal one; inset > 0:
    only defect pixels at least `inset` pixels inside their region get that weight (the mask eroded by a
    square of side 2 * inset + 1), so thin cracks and region rims count once while wide regions count more;
    smoothing e: the map is asked for e/2 on normal and 1 - e/2 on defect pixels (label smoothing).
    """
    core = target if inset == 0 else -F.max_pool2d(-target, 2 * inset + 1, stride=1, padding=inset)
    weight = 1.0 + (defect_weight - 1.0) * core
    goal = target if smoothing == 0 else smoothing / 2 + (1.0 - smoothing) * target  # what the map is asked for
    if kind == "l1":
        return (weight * (pred - goal).abs()).mean()
    bce = F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), goal, reduction="none")
    if kind == "bce":
        return (weight * bce).mean()
    p_t = pred * goal + (1 - pred) * (1 - goal)
    focal = (1 - p_t) ** gamma  # rare defect pixels are not drowned out by the many easy normal ones
    if kind == "asymmetric":  # defect pixels (the mask's, not the smoothed goal's) keep their full gradient
        focal = target + (1 - target) * focal
    return (weight * focal * bce).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the images of 1 - soft Dice, (2 sum(p y) + 1) / (sum(p) + sum(y) + 1), of B x ... maps.

    Per image, so each image's defect weighs the same whatever its area (as AUPRO weighs regions), and the
    mean over images splits exactly over processes; on a normal image it is sum(p) / (sum(p) + 1), a penalty
    on any response at all.
    """
    p, y = pred.flatten(1), target.flatten(1)
    return (1.0 - (2.0 * (p * y).sum(1) + 1.0) / (p.sum(1) + y.sum(1) + 1.0)).mean()


def masked_reconstruction_loss(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                               ctx: DistContext | None = None) -> torch.Tensor:
    """Mean L1 error over normal pixels only (mask 0), so the decoder never learns to draw defects.

    Under several processes the mean is over the normal pixels of the global batch (scaled so that the
    gradient average DistributedDataParallel takes gives the one-process gradient).
    """
    normal = 1.0 - mask
    count = (normal.sum() * image.shape[1]).detach()
    world = 1
    if ctx is not None and ctx.enabled:
        count, world = all_reduce_sum(count.clone(), ctx), ctx.world
    return ((recon - image).abs() * normal).sum() * world / count.clamp_min(1.0)


def schedule_factor(cfg: Config, step: int) -> float:
    """The learning rates' factor at `step` (0-based) under `lr_schedule`; a function of the step alone, so
    a resumed run continues the same curve."""
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return 1.0


def holdout_split(n: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and held-out normal images (held-out ones choose the threshold)."""
    order = np.random.default_rng([cfg.seed, 7]).permutation(n)
    n_hold = 0 if cfg.holdout_fraction == 0 else max(cfg.holdout_min, round(cfg.holdout_fraction * n))
    if n - n_hold < 1:
        raise DataError(f"only {n} normal image(s): need at least {n_hold + 1} (some are held out for the threshold)")
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


@dataclass
class Trainer:
    """Networks, optimisers and the step counter; one call of :meth:`step` is one training iteration."""

    cfg: Config
    device: torch.device
    dist: DistContext = field(default_factory=DistContext)
    generator: Generator = field(init=False)
    discriminator: Discriminator = field(init=False)
    step_done: int = 0
    history: list[dict] = field(default_factory=list)
    lr_scale: float = 1.0  # lowered by each rollback
    rollbacks: int = 0
    d_low_steps: int = 0  # consecutive steps with the discriminator loss under collapse_d_loss

    def __post_init__(self) -> None:
        self._build()

    def _build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.generator = Generator(self.cfg)
        if self.dist.enabled:  # batch statistics over the global batch, as in one process
            convert_batchnorm(self.generator)
        self.generator = self.generator.to(self.device)
        self.discriminator = Discriminator(self.cfg).to(self.device)
        # what the training step calls: DistributedDataParallel wrappers under torchrun, else the modules
        self.g_step = maybe_compile(wrap(self.generator, self.dist, self.device), self.cfg.compile)
        self.d_step = maybe_compile(wrap(self.discriminator, self.dist, self.device), self.cfg.compile)
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr_d, betas=betas)
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False) if self.cfg.ema_decay > 0 else None

    @property
    def final_generator(self) -> Generator:
        """The generator the model keeps: the weight average when ema_decay > 0."""
        return self.ema if self.ema is not None else self.generator

    @torch.no_grad()
    def _update_ema(self) -> None:
        # short warm-up so that the average does not remember the random initial weights for long
        decay = min(self.cfg.ema_decay, (1 + self.step_done) / (self.cfg.ema_warmup + self.step_done))
        live = self.generator.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(live[name], 1.0 - decay)
            else:
                value.copy_(live[name])

    def step(self, images: torch.Tensor, coords: torch.Tensor | None = None,
             coarse: torch.Tensor | None = None) -> dict[str, float]:
        """One iteration on a batch of normal images (uint8 B x 3 x S x S), with crop coordinates when cropped
        and, at two scales, which crops came from the coarser one."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.step_done])  # per-step stream: resume is exact
        x = images.float() / 255.0
        if cfg.train_augment_flip:
            flip = torch.from_numpy(rng.random(len(x)) < 0.5)
            x[flip] = x[flip].flip(-1)
        self._apply_lr()  # the schedule is a function of the step: set every step, right after a resume or rollback too
        x, mask = make_batch(x, cfg, rng, coarse)  # the global batch: the same on every rank
        if self.dist.enabled:
            mine = torch.tensor(shard(len(x), self.dist))
            x, mask = x[mine], mask[mine]
            coords = None if coords is None else coords[mine]
        x, mask = x.to(self.device) * 2.0 - 1.0, mask.to(self.device)
        with autocast(cfg.precision, self.device):  # losses below are computed in fp32
            recon, amap = self.g_step(x, None if coords is None else coords.to(self.device),
                                      reconstruct=self._needs_reconstruction())
        amap = amap.float()
        recon = None if recon is None else recon.float()
        d_value, loss_adv = self._adversarial(x, mask, recon, amap)
        loss_seg = segmentation_loss(amap, mask, cfg.seg_loss, cfg.focal_gamma, cfg.seg_defect_weight,
                                      cfg.seg_defect_inset, cfg.seg_label_smoothing)
        if cfg.seg_dice_weight:
            loss_seg = loss_seg + cfg.seg_dice_weight * dice_loss(amap, mask)
        loss_rec = torch.zeros((), device=x.device) if recon is None else \
            masked_reconstruction_loss(recon, x, mask, self.dist)
        loss_g = cfg.lambda_seg * loss_seg + cfg.lambda_rec * loss_rec + cfg.lambda_adv * loss_adv
        g_values = self._check_finite({"seg": loss_seg, "rec": loss_rec, "adv": loss_adv})
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        if self.ema is not None:
            self._update_ema()

        losses = {**g_values, **d_value}
        adversarial = cfg.lambda_adv > 0  # without the adversarial loss the discriminator is not trained
        self.d_low_steps = self.d_low_steps + 1 if adversarial and losses["d"] < cfg.collapse_d_loss else 0
        self.step_done += 1
        if cfg.collapse_patience and self.d_low_steps >= cfg.collapse_patience:
            raise TrainingUnstable(f"the discriminator collapsed (loss under {cfg.collapse_d_loss} for "
                                   f"{self.d_low_steps} steps, at step {self.step_done})")
        return losses

    def _needs_reconstruction(self) -> bool:
        """Whether a loss reads the reconstruction. Without one the image decoder is skipped, which makes a
        step about a quarter cheaper. Under several processes it always runs: DistributedDataParallel expects
        every parameter to get a gradient (zero here) on every step."""
        return self.cfg.lambda_rec > 0 or self.cfg.lambda_adv > 0 or self.dist.enabled

    def _adversarial(self, x: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor | None,
                     amap: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """Train the discriminator one step; return its loss and the generator's adversarial loss.

        Real pairs are (image, reference mask), fake ones (reconstruction, predicted map). With
        ``lambda_adv == 0`` nothing runs (the loss is 0 and the discriminator keeps its weights).
        """
        if self.cfg.lambda_adv == 0:
            return {"d": 0.0}, torch.zeros((), device=x.device)
        with autocast(self.cfg.precision, self.device):
            real, _ = self.d_step(x, mask)
            fake, _ = self.d_step(recon.detach(), amap.detach())
        real, fake = real.float(), fake.float()
        loss_d = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        d_value = self._check_finite({"d": loss_d})
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        self.discriminator.requires_grad_(False)  # the generator's step needs no discriminator gradients
        with autocast(self.cfg.precision, self.device):
            fake, _ = self.discriminator(recon, amap)
        self.discriminator.requires_grad_(True)
        return d_value, F.binary_cross_entropy_with_logits(fake.float(), torch.ones_like(fake.float()))

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss values (averaged over ranks); raises before the optimiser step, so a NaN never reaches the
        weights. Every rank sees the same values, so all ranks roll back together."""
        values = torch.stack([v.detach().float() for v in losses.values()])
        if self.dist.enabled:
            values = all_reduce_sum(values, self.dist) / self.dist.world
        out = dict(zip(losses, values.tolist()))
        bad = {k: v for k, v in out.items() if not math.isfinite(v)}
        if bad:
            raise TrainingUnstable(f"non-finite loss at step {self.step_done + 1} ({bad})")
        return out

    def weights_finite(self) -> bool:
        nets = [self.generator, self.discriminator] + ([self.ema] if self.ema is not None else [])
        return all(bool(torch.isfinite(t).all()) for n in nets for t in n.state_dict().values()
                   if t.dtype.is_floating_point)

    def rollback(self, folder: Path) -> str:
        """Back to the last checkpoint in `folder` (or to the start) with lower learning rates."""
        scale = self.lr_scale * self.cfg.rollback_lr_factor
        rollbacks = self.rollbacks + 1
        if has_checkpoint(folder):
            self.load(folder)
            where = f"the checkpoint at step {self.step_done}"
        else:
            self._build()
            self.step_done, self.history, self.d_low_steps = 0, [], 0
            where = "the start"
        self.lr_scale, self.rollbacks = scale, rollbacks
        self._apply_lr()
        return where

    def _apply_lr(self) -> None:
        factor = self.lr_scale * schedule_factor(self.cfg, self.step_done)
        for opt, lr in ((self.opt_g, self.cfg.lr), (self.opt_d, self.cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * factor

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, folder: Path, extra: dict) -> None:
        """Write a checkpoint that survives a kill at any moment (see :func:`save_resume_point`)."""
        if not self.weights_finite():
            raise TrainingUnstable(f"non-finite weights at step {self.step_done}; checkpoint not written")
        tg, pg = optimizer_state("opt_g", self.opt_g)
        td, pd = optimizer_state("opt_d", self.opt_d)
        tensors = {**module_state("generator", self.generator), **module_state("discriminator", self.discriminator),
                   **tg, **td, **(module_state("ema", self.ema) if self.ema is not None else {})}
        write_text_atomic(folder / LOG_FILE, _history_csv(self.history))  # rows past the step are dropped on load
        for stale in [*temp_files(folder, LOG_FILE), *temp_files(folder, CONFIG_FILE)]:
            stale.unlink(missing_ok=True)
        save_resume_point(folder, CKPT_STATE, CKPT_STEM, self.step_done, tensors, {
            "opt_g": pg, "opt_d": pd, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
            "d_low_steps": self.d_low_steps, **extra})

    def load(self, folder: Path) -> dict:
        state = load_json(folder / CKPT_STATE)
        path = checkpoint_weights(folder)
        tensors = load_tensors(path)
        load_module(self.generator, tensors, "generator", path)
        load_module(self.discriminator, tensors, "discriminator", path)
        if self.ema is not None:
            load_module(self.ema, tensors, "ema", path)
        try:
            load_optimizer(self.opt_g, "opt_g", tensors, state["opt_g"])
            load_optimizer(self.opt_d, "opt_d", tensors, state["opt_d"])
            self.step_done = int(state["step"])
        except (KeyError, ValueError, TypeError) as e:
            raise ModelFileError(f"{folder / CKPT_STATE}: damaged checkpoint state ({e})") from None
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.d_low_steps = int(state.get("d_low_steps", 0))
        self.history = [r for r in _read_history(folder / LOG_FILE) if r["step"] <= self.step_done]
        return state


def checkpoint_weights(folder: Path) -> Path:
    """The weights file that checkpoint.json names (older checkpoints used one fixed name)."""
    return resume_weights(folder, CKPT_STATE, CKPT_WEIGHTS)


def _history_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: int(float(v)) if k == "step" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _prepare_folder(out: Path, cfg: Config, resume: bool, overwrite: bool) -> Config:
    """Check the output folder so that no finished work is overwritten by accident; returns the config to use."""
    has_ckpt, has_model = has_checkpoint(out), is_finished(out)
    if resume:
        if not has_ckpt:
            raise AnosegError(f"{out}: nothing to resume (no {CKPT_STATE})")
        saved = Config.load(out / CONFIG_FILE)
        ignored = [k for k, v in cfg.to_dict().items()
                   if k not in RESUMABLE + LATER and k != "profile" and saved.to_dict()[k] != v]
        if ignored:
            warnings.warn(f"resuming with the saved settings; ignored: {', '.join(ignored)}", stacklevel=3)
        return saved.replace(**{k: getattr(cfg, k) for k in RESUMABLE + LATER})
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
    end, ``model.safetensors`` + ``model.json`` (with the threshold chosen from held-out normal images).
    Under torchrun every rank calls this; the distributed concerns live in :func:`_set_up` and
    :class:`TrainingRun` (which rank writes, barriers, agreed stop decisions).
    """
    run = _set_up(cfg, Path(data), Path(out), resume, overwrite, progress)
    stopped_early = _loop(run)
    return _finish(run, stopped_early)


def _set_up(cfg: Config, data: Path, out: Path, resume: bool, overwrite: bool, progress: bool) -> TrainingRun:
    """Check the folder and the data, load the images, build (or resume) the networks."""
    ctx, rank_device = init_from_env(cfg.device)  # torchrun: one process per GPU or CPU worker
    cfg = _prepare_folder(out, cfg, resume, overwrite)
    if ctx.enabled:
        shard(cfg.batch_size, ctx)  # the global batch must split evenly: fail before any work
    data = data.resolve()  # recorded with the model; train-detector finds the data from anywhere
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    files = train_images(data)
    train_idx, hold_idx = holdout_split(len(files), cfg)
    progress = progress and ctx.is_main
    # every file is read now, held-out ones included, so a bad file stops the run before training starts
    images = TrainingImages.load(files, cfg, desc="loading images", progress=progress).subset(train_idx)
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
                losses = trainer.step(*run.images.crops(idx, rng))
            except TrainingUnstable as e:
                _roll_back(trainer, run.out, e, bar)
                continue
            if trainer.step_done % 10 == 0 or trainer.step_done == 1:
                trainer.history.append({"step": trainer.step_done, **losses})
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
    """The last checkpoint, the model with its threshold from held-out normal images, written by rank 0."""
    run.checkpoint()
    trainer = run.trainer
    model = AnoSegModel(run.cfg, trainer.final_generator, meta={
        "steps_done": trainer.step_done, "stopped_early": stopped_early, "train_seconds": round(run.seconds(), 2),
        "n_train": len(run.train_idx), "data": str(run.data), "rollbacks": trainer.rollbacks,
        "lr_scale": trainer.lr_scale, "world_size": run.ctx.world,
        "precision": resolve_precision(run.cfg.precision, trainer.device)})
    model.generator.eval()
    if run.ctx.is_main:
        calibrate(model, [run.files[i] for i in run.hold_idx] or [run.files[i] for i in run.train_idx])
        model.save(run.out)
    barrier(run.ctx)
    return model


def _roll_back(trainer: Trainer, out: Path, error: TrainingUnstable, bar: Any) -> None:
    """Go back to the last checkpoint with lower learning rates, or stop once the retries are spent."""
    cfg = trainer.cfg
    if trainer.rollbacks >= cfg.max_rollbacks:
        kept = f"the last good checkpoint is kept in {out}" if has_checkpoint(out) else "no checkpoint yet"
        raise AnosegError(f"training is unstable: {error}; gave up after {trainer.rollbacks} rollback(s) "
                          f"({kept}); try a lower --lr or other settings") from None
    where = trainer.rollback(out)
    msg = (f"training unstable: {error}; rolled back to {where} with learning rates x{trainer.lr_scale:g} "
           f"(rollback {trainer.rollbacks} of at most {cfg.max_rollbacks})")
    warnings.warn(msg, stacklevel=2)
    bar.n = trainer.step_done
    bar.refresh()


def calibrate(model: AnoSegModel, normal_files: list[Path]) -> dict:
    """Choose thresholds from normal images only: high quantiles of their scores and map pixels.

    Sets the map threshold (a quantile of the held-out maps' pixels: outlined pixels), the threshold of the
    map's maximum (the verdict without a detector) and, when the model has a detector, the detector's.
    Returns what was done, for the model's metadata.
    """
    cfg = model.config
    rng = np.random.default_rng([cfg.seed, 4])
    map_scores, pixels, det_scores = [], [], []
    for p in model.iter_predict_files(normal_files):
        map_scores.append(p.map_score)
        det_scores.append(p.detector_score)
        flat = p.anomaly_map.ravel()  # a sample of each map's pixels: a huge image must not hold the memory
        pixels.append(flat if flat.size <= PIXEL_SAMPLE else rng.choice(flat, PIXEL_SAMPLE, replace=False))
    q, qm = cfg.threshold_quantile, cfg.map_threshold_quantile
    model.map_score_threshold = float(np.quantile(map_scores, q))
    model.map_threshold = float(np.quantile(np.concatenate(pixels), qm))
    info = {"threshold_source": f"quantile {q} of {len(map_scores)} held-out normal image scores",
            "map_threshold_source": f"quantile {qm} of the map pixels of {len(map_scores)} held-out normal images",
            "holdout_scores": [round(float(s), 6) for s in map_scores],
            "holdout_files": [str(f) for f in normal_files]}
    model.meta.update(info)
    if model.detector is not None:
        model.detector.image_threshold = float(np.quantile(det_scores, q))
        model.detector.meta.update({**info, "holdout_scores": [round(float(s), 6) for s in det_scores]})
    return info


CALIBRATION = ("threshold_quantile", "map_threshold_quantile", *MAP_SHAPING, *IMAGE_SCORING)  # recalibrate may change


def recalibrate(folder: str | Path, overrides: dict | None = None) -> AnoSegModel:
    """Choose a trained model's thresholds again from its held-out normal images (no training).

    `overrides` may change the quantiles (``threshold_quantile``, ``map_threshold_quantile``), the settings
    that shape the maps without touching the weights (:data:`anoseg.config.MAP_SHAPING`) and those that make
    the image score from the map (:data:`anoseg.config.IMAGE_SCORING`); a model saved
    before the map had its own threshold gets one this way. The detector, if any, is kept (it reads the
    unsmoothed maps).
    """
    folder = Path(folder)
    bad = sorted(set(overrides or {}) - set(CALIBRATION))
    if bad:
        raise ConfigError(f"calibrate changes {', '.join(CALIBRATION)} only, not {', '.join(bad)}")
    model = AnoSegModel.load(folder)
    files = model.meta.get("holdout_files")
    if not files:
        raise AnosegError(f"{folder / META_FILE}: the model does not list the normal images its thresholds came "
                          "from (holdout_files); train it again")
    model.config = model.config.replace(**(overrides or {}))
    calibrate(model, [Path(f) for f in files])
    model.save_settings(folder)  # the weights are unchanged: not written again
    if model.detector is not None:
        model.detector.save_meta(folder)
    return model


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
    # resuming: the interrupted run's settings, unless given again (a different value is refused later)
    earlier = checkpoint_settings(folder) if resume else {}
    cfg = model.config.replace(**{**earlier, **(overrides or {})})
    model.config = cfg
    if (folder / DETECTOR_CKPT_STATE).is_file() and not (resume or overwrite):
        raise AnosegError(f"{folder}: an interrupted detector run left a checkpoint; continue it with --resume "
                          "or start again with --overwrite")
    data = data if data is not None else model.meta.get("data")
    if data is None:
        raise AnosegError(f"{folder}: the model does not record its training data; give DATA")
    files = train_images(data)
    train_idx, hold_idx = holdout_split(len(files), cfg)
    images = TrainingImages.load(files, cfg.replace(second_short_side=0), desc="loading images",
                                 progress=progress).subset(train_idx)
    # the detector trains on one fixed crop per image (the whole image in square mode), at the first scale:
    # at inference it sees the first scale's input with the map of all scales
    images = images.crops(np.arange(len(images)), np.random.default_rng([cfg.seed, 3]))[0]
    detector = new_detector(cfg, model.device)
    seconds = fit_detector(detector, model.crop_raw_maps, images, progress=progress, folder=folder, resume=resume)
    model.detector = detector
    detector.meta = {"train_seconds": round(seconds, 2), "steps_done": cfg.detector_steps, "data": str(data)}
    calibrate(model, [files[i] for i in hold_idx] or [files[i] for i in train_idx])
    cfg.save(folder / CONFIG_FILE)
    detector.save(folder)
    remove_checkpoint(folder)  # the detector is written: its resume point is no longer needed
    return model
