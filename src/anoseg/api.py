"""The Python API: the same four verbs as the command line.

>>> import anoseg
>>> model = anoseg.train(anoseg.profile_config("fast"), "mvtec/bottle", "runs/bottle")
>>> result = anoseg.evaluate(model, "mvtec/bottle", "runs/bottle/eval")
>>> records = anoseg.predict(model, ["new_photos/"], "runs/bottle/pred")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import calibrate as _calibrate
from . import detector_training as _detector_training
from . import training as _training
from .augment import Augmenter
from .config import Config, profile_config
from .data import TrainingImages, folder_test_samples, mvtec_test_samples, train_images
from .demo import make_demo_dataset
from .evaluate import evaluate as _evaluate
from .inference import AnoSegModel
from .predict import predict as _predict
from .visualize import synthetic_examples_grid


def train(config: Config, data: str | Path, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> AnoSegModel:
    """Train on normal images (MVTec category or folder) and save the model to `out`."""
    return _training.train(config, data, out, resume=resume, overwrite=overwrite, progress=progress)


def train_detector(folder: str | Path, data: str | Path | None = None, *, overrides: dict[str, Any] | None = None,
                   progress: bool = True, resume: bool = False, overwrite: bool = False) -> AnoSegModel:
    """Train the image-level anomaly detector (paper 3.4) for a trained model folder; saved beside it.

    `resume` continues a run that was interrupted (Ctrl-C or a kill) from its checkpoint; `overwrite`
    starts again although such a checkpoint exists.
    """
    return _detector_training.train_detector(folder, data, overrides, progress=progress, resume=resume,
                                             overwrite=overwrite)


def calibrate(folder: str | Path, *, overrides: dict[str, Any] | None = None) -> AnoSegModel:
    """Choose a trained model's map and image thresholds again from its held-out normal images.

    No training: `overrides` may change the settings of :data:`anoseg.config.MAP_SETTINGS`, which shape the
    maps, the image score and the thresholds, not the weights.
    """
    return _calibrate.recalibrate(folder, overrides)


def load(folder: str | Path, device: str | None = None) -> AnoSegModel:
    """Load a trained model folder (safetensors + JSON; nothing is unpickled)."""
    return AnoSegModel.load(folder, device=device)


def predict(model: AnoSegModel, inputs: list[str | Path], out: str | Path, *, map_threshold: float | None = None,
            image_threshold: float | None = None, map_format: str = "png",
            progress: bool = True, resume: bool = False, workers: int = 0) -> list[dict[str, Any]]:
    """Anomaly maps, overlays and verdicts for image files, folders or globs (written as they are made).

    For very many images use :func:`anoseg.predict.predict_stream`, which does not keep the rows.
    """
    return _predict(model, inputs, out, map_threshold=map_threshold, image_threshold=image_threshold,
                    map_format=map_format, progress=progress, resume=resume, workers=workers)


def evaluate(model: AnoSegModel, data: str | Path | None, out: str | Path | None, *,
             map_threshold: float | None = None, image_threshold: float | None = None,
             normal: str | Path | None = None,
             abnormal: str | Path | None = None, masks: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Metrics on an MVTec category's test split (`data`), or on plain folders (normal/abnormal/masks)."""
    samples = mvtec_test_samples(data) if data else folder_test_samples(normal, abnormal, masks)
    return _evaluate(model, samples, out, map_threshold=map_threshold, image_threshold=image_threshold,
                     progress=progress)


def save_synthetic_examples(config: Config, data: str | Path, path: str | Path, n: int = 16) -> None:
    """A PNG grid of synthetic anomalies (outlined in green) as training makes them."""
    files = train_images(data)[: max(n, 1) * 2]
    images = TrainingImages.load(files, config, progress=False)
    crops = images.crops(np.arange(len(images)), np.random.default_rng([config.seed, 98]))  # as training sees them
    rng = np.random.default_rng([config.seed, 99])
    idx = torch.from_numpy(rng.choice(len(images), n, replace=len(images) < n))
    coarse = None if crops.coarse is None else crops.coarse[idx]
    x, masks = Augmenter.from_config(config)(crops.images[idx].float() / 255.0, rng, coarse)
    synthetic_examples_grid(Path(path), x.numpy(), masks.numpy())


DEMO_STEPS = 800  # the tiny profile reaches a pixel AUROC of about 0.92 on the demo data in 800 steps


def demo(data: str | Path = "demo_data", out: str | Path = "demo_run", steps: int | None = None,
         progress: bool = True) -> dict[str, Any]:
    """Make the synthetic demo data set (if absent), train the tiny profile, evaluate and predict."""
    from .demo import CATEGORY

    category = Path(data) / CATEGORY
    if not (category / "train" / "good").is_dir():
        make_demo_dataset(data)
    cfg = profile_config("tiny", steps=steps or DEMO_STEPS)
    out = Path(out)
    save_synthetic_examples(cfg, category, out / "synthetic_examples.png", 16)
    model = train(cfg, category, out / "model", overwrite=True, progress=progress)
    result = evaluate(model, category, out / "eval", progress=progress)
    predict(model, [category / "test"], out / "predictions", progress=progress)
    return result
