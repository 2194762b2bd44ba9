"""Training AnoSeg: segmentation + masked reconstruction + adversarial losses, with checkpoints and resume."""

from __future__ import annotations

import csv
import dataclasses
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import make_batch
from .checkpoint import (
    load_json,
    load_module,
    load_optimizer,
    load_tensors,
    module_state,
    optimizer_state,
    save_json,
    save_tensors,
)
from .config import Config
from .data import load_stack, train_images
from .detector import DETECTOR_META, DETECTOR_WEIGHTS, Detector
from .errors import AnosegError, DataError
from .fileio import write_text_atomic
from .inference import CONFIG_FILE, WEIGHTS_FILE, AnoSegModel, resolve_device
from .models import Discriminator, Generator

CKPT_WEIGHTS = "checkpoint.safetensors"
CKPT_STATE = "checkpoint.json"
LOG_FILE = "train_log.csv"
# Settings that may change when a run is resumed; the rest must match the saved run.
RESUMABLE = ("steps", "device", "num_threads", "max_minutes", "checkpoint_every", "batch_size_infer")
# Settings that only matter after AnoSeg training (scoring, detector): taken from the user on resume too.
LATER = ("topk_fraction", "smoothing_sigma", "threshold_quantile") + tuple(
    f.name for f in dataclasses.fields(Config) if f.name.startswith("detector_"))


def segmentation_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Pixel-wise loss between the predicted map and the reference mask (both in [0, 1])."""
    if kind == "l1":
        return (pred - target).abs().mean()
    bce = F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    if kind == "bce":
        return bce.mean()
    p_t = pred * target + (1 - pred) * (1 - target)
    return ((1 - p_t) ** 2 * bce).mean()  # focal loss, gamma = 2: rare defect pixels are not drowned out


def masked_reconstruction_loss(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 error over normal pixels only (mask 0), so the decoder never learns to draw defects."""
    normal = 1.0 - mask
    return ((recon - image).abs() * normal).sum() / (normal.sum() * image.shape[1]).clamp_min(1.0)


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
    generator: Generator = field(init=False)
    discriminator: Discriminator = field(init=False)
    step_done: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.generator = Generator(self.cfg).to(self.device)
        self.discriminator = Discriminator(self.cfg).to(self.device)
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr_d, betas=betas)

    def step(self, images: torch.Tensor) -> dict[str, float]:
        """One iteration on a batch of normal images (uint8 B x 3 x S x S)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.step_done])  # per-step stream: resume is exact
        x = images.float() / 255.0
        if cfg.train_augment_flip:
            flip = torch.from_numpy(rng.random(len(x)) < 0.5)
            x[flip] = x[flip].flip(-1)
        x, mask = make_batch(x, cfg, rng)
        x, mask = x.to(self.device) * 2.0 - 1.0, mask.to(self.device)
        recon, amap = self.generator(x)

        # discriminator: real (image, reference mask) against fake (reconstruction, predicted map)
        real, _ = self.discriminator(x, mask)
        fake, _ = self.discriminator(recon.detach(), amap.detach())
        loss_d = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        fake, _ = self.discriminator(recon, amap)
        loss_adv = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
        loss_seg = segmentation_loss(amap, mask, cfg.seg_loss)
        loss_rec = masked_reconstruction_loss(recon, x, mask)
        loss_g = cfg.lambda_seg * loss_seg + cfg.lambda_rec * loss_rec + cfg.lambda_adv * loss_adv
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        losses = {"seg": loss_seg.item(), "rec": loss_rec.item(), "adv": loss_adv.item(), "d": loss_d.item()}
        if not all(np.isfinite(v) for v in losses.values()):
            raise AnosegError(f"training diverged at step {self.step_done + 1} (losses {losses}); "
                              "lower --lr or resume from the last checkpoint")
        self.step_done += 1
        return losses

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, folder: Path, extra: dict) -> None:
        tg, pg = optimizer_state("opt_g", self.opt_g)
        td, pd = optimizer_state("opt_d", self.opt_d)
        tensors = {**module_state("generator", self.generator), **module_state("discriminator", self.discriminator),
                   **tg, **td}
        # weights first, then the JSON that points at them: a crash in between leaves the old pair readable
        save_tensors(folder / CKPT_WEIGHTS, tensors)
        save_json(folder / CKPT_STATE, {"step": self.step_done, "opt_g": pg, "opt_d": pd, **extra})
        write_text_atomic(folder / LOG_FILE, _history_csv(self.history))

    def load(self, folder: Path) -> dict:
        state = load_json(folder / CKPT_STATE)
        tensors = load_tensors(folder / CKPT_WEIGHTS)
        load_module(self.generator, tensors, "generator", folder / CKPT_WEIGHTS)
        load_module(self.discriminator, tensors, "discriminator", folder / CKPT_WEIGHTS)
        load_optimizer(self.opt_g, "opt_g", tensors, state["opt_g"])
        load_optimizer(self.opt_d, "opt_d", tensors, state["opt_d"])
        self.step_done = int(state["step"])
        self.history = _read_history(folder / LOG_FILE)
        return state


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
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _prepare_folder(out: Path, cfg: Config, resume: bool, overwrite: bool) -> Config:
    """Check the output folder so that no finished work is overwritten by accident; returns the config to use."""
    has_ckpt = (out / CKPT_STATE).is_file()
    has_model = (out / WEIGHTS_FILE).is_file()
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


def train(cfg: Config, data: str | Path, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> AnoSegModel:
    """Train on the normal images of `data` (MVTec category or folder); write the model to `out`.

    The folder receives ``config.json``, periodic ``checkpoint.*`` files, ``train_log.csv`` and, at the
    end, ``model.safetensors`` + ``model.json`` (with the threshold chosen from held-out normal images).
    """
    out = Path(out)
    cfg = _prepare_folder(out, cfg, resume, overwrite)
    data = Path(data).resolve()  # recorded with the model; train-detector finds the data from anywhere
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    files = train_images(data)
    train_idx, hold_idx = holdout_split(len(files), cfg)
    # every file is read now, held-out ones included, so a bad file stops the run before training starts
    images = torch.from_numpy(load_stack(files, cfg.image_size, desc="loading images", progress=progress)[train_idx])
    out.mkdir(parents=True, exist_ok=True)
    remove_detector(out)
    cfg.save(out / CONFIG_FILE)
    device = resolve_device(cfg.device)
    trainer = Trainer(cfg, device)
    elapsed_before = 0.0
    if resume:
        elapsed_before = float(trainer.load(out).get("train_seconds", 0.0))

    start = time.perf_counter()

    def checkpoint() -> None:
        trainer.save(out, {"train_seconds": elapsed_before + time.perf_counter() - start, "data": str(data)})

    bar = tqdm(total=cfg.steps, initial=trainer.step_done, desc="training", disable=not progress, dynamic_ncols=True)
    stopped_early = False
    try:
        while trainer.step_done < cfg.steps:
            rng = np.random.default_rng([cfg.seed, trainer.step_done, 1])
            idx = rng.choice(len(images), cfg.batch_size, replace=len(images) < cfg.batch_size)
            losses = trainer.step(images[torch.from_numpy(idx)])
            if trainer.step_done % 10 == 0 or trainer.step_done == 1:
                trainer.history.append({"step": trainer.step_done, **losses})
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
            bar.update(1)
            if trainer.step_done % cfg.checkpoint_every == 0:
                checkpoint()
            if cfg.max_minutes and (time.perf_counter() - start) / 60 > cfg.max_minutes:
                stopped_early = True
                break
    except KeyboardInterrupt:
        checkpoint()
        raise AnosegError(f"interrupted at step {trainer.step_done}; checkpoint saved in {out}, "
                          "continue with --resume") from None
    finally:
        bar.close()
    checkpoint()
    train_seconds = elapsed_before + time.perf_counter() - start

    model = AnoSegModel(cfg, trainer.generator, meta={
        "steps_done": trainer.step_done, "stopped_early": stopped_early, "train_seconds": round(train_seconds, 2),
        "n_train": len(train_idx), "data": str(data)})
    model.generator.eval()
    calibrate(model, [files[i] for i in hold_idx] or [files[i] for i in train_idx])
    model.save(out)
    return model


def calibrate(model: AnoSegModel, normal_files: list[Path]) -> dict:
    """Choose thresholds from normal images only: a high quantile of their scores.

    Sets the map threshold (maximum of the smoothed map) and, when the model has a detector, the
    detector's. Returns what was done, for the model's metadata.
    """
    preds = list(model.iter_predict_files(normal_files))
    q = model.config.threshold_quantile
    map_scores = np.array([p.map_score for p in preds])
    model.threshold = float(np.quantile(map_scores, q))
    info = {"threshold_source": f"quantile {q} of {len(preds)} held-out normal image scores",
            "holdout_scores": [round(float(s), 6) for s in map_scores],
            "holdout_files": [str(f) for f in normal_files]}
    model.meta.update(info)
    if model.detector is not None:
        det_scores = np.array([p.detector_score for p in preds])
        model.detector.threshold = float(np.quantile(det_scores, q))
        model.detector.meta.update({**info, "holdout_scores": [round(float(s), 6) for s in det_scores]})
    return info


def remove_detector(folder: Path) -> None:
    """A detector belongs to the generator it was trained on: drop it when the generator changes."""
    stale = [folder / DETECTOR_WEIGHTS, folder / DETECTOR_META]
    if any(p.exists() for p in stale):
        warnings.warn(f"{folder}: the AnoSeg model changes, so its detector is removed; "
                      "train a new one with train-detector", stacklevel=3)
        for p in stale:
            p.unlink(missing_ok=True)


def train_detector(folder: str | Path, data: str | Path | None = None, overrides: dict | None = None,
                   progress: bool = True) -> AnoSegModel:
    """Train the anomaly detector (paper section 3.4) for the AnoSeg model in `folder` and save it there.

    Uses the same normal training images and the same held-out split as the AnoSeg model.
    """
    folder = Path(folder)
    model = AnoSegModel.load(folder)
    cfg = model.config.replace(**(overrides or {}))
    model.config = cfg
    data = data if data is not None else model.meta.get("data")
    if data is None:
        raise AnosegError(f"{folder}: the model does not record its training data; give DATA")
    files = train_images(data)
    train_idx, hold_idx = holdout_split(len(files), cfg)
    images = torch.from_numpy(load_stack(files, cfg.image_size, desc="loading images", progress=progress)[train_idx])
    detector = Detector(cfg, model.device)
    seconds = detector.fit(model.generator.anomaly_map, images, progress=progress)
    model.detector = detector
    detector.meta = {"train_seconds": round(seconds, 2), "steps_done": cfg.detector_steps, "data": str(data)}
    calibrate(model, [files[i] for i in hold_idx] or [files[i] for i in train_idx])
    cfg.save(folder / CONFIG_FILE)
    detector.save(folder)
    return model
