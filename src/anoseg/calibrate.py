"""Choosing a model's thresholds from normal images only: at the end of training, and again later (`calibrate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import MAP_SETTINGS, Config
from .errors import AnosegError, ConfigError, DataError
from .inference import AnoSegModel
from .modelfolder import META_FILE
from .scoring import quantile_thresholds

HOLDOUT_MIN = 2  # at least this many held-out images (when holdout_fraction > 0)
PIXEL_SAMPLE = 1 << 16  # map pixels per held-out image that choose the map threshold (a random sample)
PIXEL_BUDGET = 1 << 24  # and at most this many in all (64 MB): with thousands of held-out images, fewer each


def holdout_split(n: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and held-out normal images (held-out ones choose the thresholds)."""
    order = np.random.default_rng([cfg.seed, 7]).permutation(n)
    n_hold = 0 if cfg.holdout_fraction == 0 else max(HOLDOUT_MIN, round(cfg.holdout_fraction * n))
    if n - n_hold < 1:
        raise DataError(f"only {n} normal image(s): need at least {n_hold + 1} (some are held out for the threshold)")
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def calibrate(model: AnoSegModel, normal_files: list[Path]) -> dict:
    """Set the model's thresholds from normal images (:func:`anoseg.scoring.quantile_thresholds`).

    The map threshold, the map background, the threshold of the map's image score and, when the model has a
    detector, the detector's. Returns what was done, for the model's metadata.
    """
    rng = np.random.default_rng([model.config.seed, 4])
    per_image = max(1, min(PIXEL_SAMPLE, PIXEL_BUDGET // max(len(normal_files), 1)))
    map_scores, pixels, det_scores = [], [], []
    for p in model.iter_predict_files(normal_files):
        map_scores.append(p.map_score)
        det_scores.append(p.detector_score)
        flat = p.anomaly_map.ravel()  # a sample of each map's pixels: a huge image must not hold the memory
        pixels.append(flat if flat.size <= per_image else rng.choice(flat, per_image, replace=False))
    chosen = quantile_thresholds(model.config, map_scores, np.concatenate(pixels))
    model.map_threshold, model.map_score_threshold = chosen.map, chosen.image
    model.map_background = chosen.background
    q, qm = model.config.threshold_quantile, model.config.map_threshold_quantile
    info = {"threshold_source": f"quantile {q} of {len(map_scores)} held-out normal image scores",
            "map_threshold_source": f"quantile {qm} of the map pixels of {len(map_scores)} held-out normal images",
            "map_background_source": f"median of the map pixels of {len(map_scores)} held-out normal images",
            "holdout_scores": [round(float(s), 6) for s in map_scores],
            "holdout_files": [str(f) for f in normal_files]}
    model.meta.update(info)
    if model.detector is not None:
        model.detector.image_threshold = float(np.quantile(det_scores, q))
        model.detector.meta.update({**info, "holdout_scores": [round(float(s), 6) for s in det_scores]})
    return info


def recalibrate(folder: str | Path, overrides: dict | None = None) -> AnoSegModel:
    """Choose a trained model's thresholds again from its held-out normal images (no training).

    `overrides` may change the settings of :data:`anoseg.config.MAP_SETTINGS` (they shape the maps, the image
    score and the thresholds, not the weights). The detector, if any, is kept (it reads the unsmoothed maps).
    """
    folder = Path(folder)
    bad = sorted(set(overrides or {}) - set(MAP_SETTINGS))
    if bad:
        raise ConfigError(f"calibrate changes {', '.join(MAP_SETTINGS)} only, not {', '.join(bad)}")
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
