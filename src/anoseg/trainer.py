"""The AnoSeg training step and the state it keeps: networks, optimisers, weight average, checkpoints, log.

One call of :meth:`Trainer.step` is one iteration: a batch of normal crops, the augmenter's synthetic
anomalies, the generator, the loss, the optimiser step. Around it: the discriminator's step (with the
adversarial loss), the learning-rate schedule, the weight average, and the checks that stop a diverging run
before a non-finite value reaches the weights.
"""

from __future__ import annotations

import copy
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .augment import Augmenter
from .checkpoint import (
    load_json,
    load_module,
    load_optimizer,
    load_tensors,
    module_state,
    optimizer_state,
    resume_weights,
    save_resume_point,
)
from .config import Config
from .data import Crops
from .distributed import DistContext, all_reduce_sum, broadcast_flag, convert_batchnorm, shard, wrap
from .errors import AnosegError, ModelFileError
from .fileio import temp_files, write_text_atomic
from .losses import AnoSegLoss, fooled_loss, real_fake_loss
from .modelfolder import CKPT_STATE, CKPT_STEM, CKPT_WEIGHTS, CONFIG_FILE, LOG_FILE, has_checkpoint
from .models import Discriminator, Generator
from .runtime import autocast, maybe_compile, resolve_precision

BETAS = (0.5, 0.999)  # Adam's betas, as usual for GANs
EMA_WARMUP = 10  # the average's decay at step t is min(ema_decay, (1 + t) / (EMA_WARMUP + t))
MAX_ROLLBACKS = 3  # on a non-finite loss or a collapsed discriminator, go back to the last checkpoint ...
ROLLBACK_LR_FACTOR = 0.5  # ... with the learning rate times this; after MAX_ROLLBACKS, stop with an error
COLLAPSE_D_LOSS = 1e-3  # the discriminator counts as collapsed when its loss stays below this ...
COLLAPSE_PATIENCE = 200  # ... for this many steps in a row
LOG_EVERY = 10  # the training log keeps every LOG_EVERY-th step's losses


class TrainingUnstable(AnosegError):
    """A non-finite loss, non-finite weights or a collapsed discriminator: roll back or stop."""


def schedule_factor(cfg: Config, step: int) -> float:
    """The learning rate's factor at `step` (0-based) under `lr_schedule`; a function of the step alone, so
    a resumed run continues the same curve."""
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return 1.0


@dataclass
class Trainer:
    """Networks, optimisers and the step counter; one call of :meth:`step` is one training iteration."""

    cfg: Config
    device: torch.device
    dist: DistContext = field(default_factory=DistContext)
    step_done: int = 0
    history: list[dict] = field(default_factory=list)
    lr_scale: float = 1.0  # lowered by each rollback
    rollbacks: int = 0
    d_low_steps: int = 0  # consecutive steps with the discriminator loss under COLLAPSE_D_LOSS

    def __post_init__(self) -> None:
        self.augment = Augmenter.from_config(self.cfg)
        self.loss = AnoSegLoss.from_config(self.cfg)
        # under several processes the image decoder always runs: DistributedDataParallel expects every
        # parameter to get a gradient (zero here) on every step
        self.reconstruct = self.loss.needs_reconstruction or self.dist.enabled
        self.precision = self._agreed_precision()
        self._build()

    def _agreed_precision(self) -> str:
        """The precision the networks train in. Under several processes each rank resolves `auto` on its own
        hardware; bf16 is kept only where every rank chose it, so that all ranks round alike."""
        mine = resolve_precision(self.cfg.precision, self.device)
        return "fp32" if broadcast_flag(mine == "fp32", self.dist, self.device) else mine

    def _build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.generator = Generator(self.cfg)
        if self.dist.enabled:  # batch statistics over the global batch, as in one process
            convert_batchnorm(self.generator)
        self.generator = self.generator.to(self.device)
        # what the training step calls: DistributedDataParallel wrappers under torchrun, else the modules
        self.g_step = maybe_compile(wrap(self.generator, self.dist, self.device), self.cfg.compile)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr, betas=BETAS)
        self.discriminator = self.d_step = self.opt_d = None
        if self.loss.adversarial:  # without the adversarial loss there is no discriminator to train
            self.discriminator = Discriminator(self.cfg).to(self.device)
            self.d_step = maybe_compile(wrap(self.discriminator, self.dist, self.device), self.cfg.compile)
            self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr, betas=BETAS)
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False) if self.cfg.ema_decay > 0 else None

    @property
    def final_generator(self) -> Generator:
        """The generator the model keeps: the weight average when ema_decay > 0."""
        return self.ema if self.ema is not None else self.generator

    def step(self, crops: Crops) -> dict[str, float]:
        """One iteration on a batch of normal crops: synthetic anomalies, maps, losses, optimiser steps."""
        rng = np.random.default_rng([self.cfg.seed, self.step_done])  # per-step stream: resume is exact
        self._apply_lr()  # a function of the step: set every step, right after a resume or rollback too
        x, mask = self.augment(crops.images.float() / 255.0, rng, crops.coarse)  # the global batch
        x, mask, coords = self._my_share(x, mask, crops.coords)
        with autocast(self.precision, self.device):  # the losses are computed in fp32
            recon, amap = self.g_step(x, coords, reconstruct=self.reconstruct)
        amap, recon = amap.float(), None if recon is None else recon.float()
        d_loss, adv = self._adversarial(x, mask, recon, amap)
        total, parts = self.loss(amap, mask, x, recon, adv, self.dist)
        losses = {**self._check_finite(parts), **d_loss}
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        self.opt_g.step()
        if self.ema is not None:
            self._update_ema()
        self._count_step(losses["d"])
        return losses

    def _my_share(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None):
        """This process's part of the global batch, on the device, images in [-1, 1]."""
        if self.dist.enabled:
            mine = torch.tensor(shard(len(x), self.dist))
            x, mask = x[mine], mask[mine]
            coords = None if coords is None else coords[mine]
        coords = None if coords is None else coords.to(self.device)
        return x.to(self.device) * 2.0 - 1.0, mask.to(self.device), coords

    def _count_step(self, d_loss: float) -> None:
        self.d_low_steps = self.d_low_steps + 1 if self.loss.adversarial and d_loss < COLLAPSE_D_LOSS else 0
        self.step_done += 1
        if self.d_low_steps >= COLLAPSE_PATIENCE:
            raise TrainingUnstable(f"the discriminator collapsed (loss under {COLLAPSE_D_LOSS} for "
                                   f"{self.d_low_steps} steps, at step {self.step_done})")

    def _adversarial(self, x: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor | None,
                     amap: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """Train the discriminator one step; return its loss and the generator's adversarial loss.

        Real pairs are (image, reference mask), fake ones (reconstruction, predicted map). Without the
        adversarial loss nothing runs and the loss is 0.
        """
        if self.discriminator is None:
            return {"d": 0.0}, torch.zeros((), device=x.device)
        with autocast(self.precision, self.device):
            real, _ = self.d_step(x, mask)
            fake, _ = self.d_step(recon.detach(), amap.detach())
        loss_d = real_fake_loss(real.float(), fake.float())
        d_value = self._check_finite({"d": loss_d})
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        self.discriminator.requires_grad_(False)  # the generator's step needs no discriminator gradients
        with autocast(self.precision, self.device):
            fake, _ = self.discriminator(recon, amap)
        self.discriminator.requires_grad_(True)
        return d_value, fooled_loss(fake.float())

    @torch.no_grad()
    def _update_ema(self) -> None:
        # short warm-up so that the average does not remember the random initial weights for long
        decay = min(self.cfg.ema_decay, (1 + self.step_done) / (EMA_WARMUP + self.step_done))
        live = self.generator.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(live[name], 1.0 - decay)
            else:
                value.copy_(live[name])

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

    def _apply_lr(self) -> None:
        lr = self.cfg.lr * self.lr_scale * schedule_factor(self.cfg, self.step_done)
        for opt in self._optimizers().values():
            for group in opt.param_groups:
                group["lr"] = lr

    def _networks(self) -> dict[str, torch.nn.Module]:
        nets = {"generator": self.generator, "discriminator": self.discriminator, "ema": self.ema}
        return {k: v for k, v in nets.items() if v is not None}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in {"opt_g": self.opt_g, "opt_d": self.opt_d}.items() if v is not None}

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for n in self._networks().values() for t in n.state_dict().values()
                   if t.dtype.is_floating_point)

    def rollback(self, folder: Path, error: TrainingUnstable) -> str:
        """Back to the last checkpoint in `folder` (or to the start) with a lower learning rate, after `error`;
        once MAX_ROLLBACKS are spent, stop with an error that says what is kept."""
        if self.rollbacks >= MAX_ROLLBACKS:
            kept = f"the last good checkpoint is kept in {folder}" if has_checkpoint(folder) else "no checkpoint yet"
            raise AnosegError(f"training is unstable: {error}; gave up after {self.rollbacks} rollback(s) "
                              f"({kept}); try a lower --lr or other settings") from None
        scale, rollbacks = self.lr_scale * ROLLBACK_LR_FACTOR, self.rollbacks + 1
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

    def log(self, losses: dict[str, float]) -> bool:
        """Keep the losses of every LOG_EVERY-th step (and the first) in the log; True when kept."""
        if self.step_done % LOG_EVERY == 0 or self.step_done == 1:
            self.history.append({"step": self.step_done, **losses})
            return True
        return False

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, folder: Path, extra: dict) -> None:
        """Write a checkpoint that survives a kill at any moment (see :func:`save_resume_point`)."""
        if not self.weights_finite():
            raise TrainingUnstable(f"non-finite weights at step {self.step_done}; checkpoint not written")
        tensors, states = {}, {}
        for name, net in self._networks().items():
            tensors.update(module_state(name, net))
        for name, opt in self._optimizers().items():
            t, states[name] = optimizer_state(name, opt)
            tensors.update(t)
        write_text_atomic(folder / LOG_FILE, _history_csv(self.history))  # rows past the step are dropped on load
        for stale in [*temp_files(folder, LOG_FILE), *temp_files(folder, CONFIG_FILE)]:
            stale.unlink(missing_ok=True)
        save_resume_point(folder, CKPT_STATE, CKPT_STEM, self.step_done, tensors, {
            **states, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "d_low_steps": self.d_low_steps,
            **extra})

    def load(self, folder: Path) -> dict:
        state = load_json(folder / CKPT_STATE)
        path = checkpoint_weights(folder)
        tensors = load_tensors(path)
        for name, net in self._networks().items():
            load_module(net, tensors, name, path)
        try:
            for name, opt in self._optimizers().items():
                load_optimizer(opt, name, tensors, state[name])
            self.step_done = int(state["step"])
        except (KeyError, ValueError, TypeError) as e:
            raise ModelFileError(f"{folder / CKPT_STATE}: damaged checkpoint state ({e})") from None
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.d_low_steps = int(state.get("d_low_steps", 0))
        self.history = [r for r in _read_history(folder / LOG_FILE) if r["step"] <= self.step_done]
        return state


def checkpoint_weights(folder: Path) -> Path:
    """The weights file that checkpoint.json names."""
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
