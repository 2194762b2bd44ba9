"""The trained-model folder: the one place that names its files and reads what older versions wrote there.

A model folder holds ``config.json`` (all settings), ``model.safetensors`` + ``model.json`` (generator
weights; thresholds and metadata), while training ``checkpoint.json`` + ``checkpoint-<step>.safetensors``
and ``train_log.csv``, and with an anomaly detector ``detector.safetensors`` + ``detector.json`` (while it
trains, ``detector-checkpoint.json`` + ``detector-checkpoint-<step>.safetensors``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import load_json
from .config import CHOICES, Config
from .errors import ConfigError, ModelFileError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # written last: its presence marks a finished model
META_FILE = "model.json"
CKPT_STEM = "checkpoint"  # checkpoint weights are <stem>-<step>.safetensors, named by the state JSON
CKPT_WEIGHTS = "checkpoint.safetensors"  # the one fixed name of checkpoints written by anoseg before 0.1
CKPT_STATE = "checkpoint.json"
LOG_FILE = "train_log.csv"
DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_META = "detector.json"
DETECTOR_CKPT_STEM = "detector-checkpoint"  # while the detector trains: its resume point, named the same way
DETECTOR_CKPT_STATE = "detector-checkpoint.json"

# Settings older configurations hold that are now fixed: the value today's code behaves as. A saved value that
# differs cannot be reproduced: in a setting that shapes a trained model's maps it is refused on load, in one
# that only shaped training it is refused on resume.
RETIRED_FOR_MAPS: dict[str, Any] = {
    "seg_skips_drop_fine": 0, "map_sees_residual": False, "short_side": 0, "max_aspect": 4.0, "tta_flips": "none",
    "peak_sigma": 2.0, "topk_fraction": 0.01, "detector_w_mse": 1.0, "detector_w_feat": 0.1,
}
RETIRED_FOR_TRAINING: dict[str, Any] = {
    "crop_overhang": 0.0, "crack_contrast_min": 0.4, "crack_points_max": 240, "crack_turn_min": 0.02,
    "crack_soft": True, "region_shapes": ["rect", "ellipse", "scar"], "p_rotate": 0.5, "p_permute": 0.5,
    "p_jitter": 0.5, "permute_grid": 4, "jitter_strength": 0.4, "streak_own_grain": 1.0, "streak_band": 0.0,
    "streak_region_max": 0.0, "edge_feather": 0, "beta1": 0.5, "beta2": 0.999, "seg_defect_inset": 0,
    "seg_dice_weight": 0.0, "seg_label_smoothing": 0.0, "focal_gamma": 2.0, "lambda_seg": 10.0, "ema_warmup": 10,
    "train_augment_flip": False, "holdout_min": 2, "detector_lambda_adv": 1.0, "detector_lambda_rec": 10.0,
    "detector_lambda_cls": 1.0, "detector_lambda_fm": 1.0,
}
# What older versions did where their config.json lacks a setting (written before it existed): its default then.
OLD_DEFAULTS: dict[str, Any] = {
    "resize_mode": "square", "second_short_side": 0, "anomaly_families": ["paste"], "opacity_min": 1.0,
    "region_max": 0.08, "coarse_region_max": 0.0, "mask_texture_factor": 0.0, "steps": 2000, "batch_size": 16,
    "lr": 2e-4, "lr_schedule": "constant", "seg_loss": "focal", "seg_defect_weight": 1.0, "lambda_rec": 1.0,
    "lambda_adv": 0.1, "smoothing_sigma": 4.0, "broad_weight": 0.0, "broad_sigma": 12.0, "peak_boost": 0.0,
    "image_score_topk_weight": 0.0, "detector_batch_size": 0, "precision": "fp32", "crack_soft": False,
    "crack_points_max": 80, "crack_turn_min": 0.25,
}
# Choices older versions offered for settings that only shape training. A model trained with one loads for
# inference (the choice read as today's default, or left out of a list) and is refused where it would train.
RETIRED_CHOICES: dict[str, tuple[str, ...]] = {"seg_loss": ("l1", "asymmetric", "balanced"),
                                               "anomaly_families": ("shading", "band")}
# No effect on what a model computes (robustness limits, memory order, free notes): dropped.
RETIRED_QUIETLY = ("max_rollbacks", "rollback_lr_factor", "collapse_d_loss", "collapse_patience", "channels_last",
                   "extra")


def is_finished(folder: Path) -> bool:
    return (Path(folder) / WEIGHTS_FILE).is_file()


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CKPT_STATE).is_file()


def read_config(path: str | Path, for_training: bool = False) -> Config:
    """A saved config.json, converted from the form older versions wrote (see :func:`upgrade_settings`)."""
    return read_model_config(path, for_training)[0]


def read_model_config(path: str | Path, for_training: bool = False) -> tuple[Config, dict[str, Any]]:
    """A saved config.json as :func:`read_config` reads it, and the entries of it that today's settings cannot
    hold (see :func:`upgrade_settings`): ``Config.save(path, keep=...)`` writes them back, so that rewriting a
    model's config.json never loses how it was trained."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as e:  # a folder, no permission, ...
        raise ConfigError(f"{path}: cannot read the configuration ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: configuration must be a JSON object")
    try:
        settings, retired = upgrade_settings(data, for_training)
        return Config.from_dict(settings), retired
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def upgrade_settings(data: dict[str, Any], for_training: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings of an older config.json in today's form, and the entries today's settings cannot hold.

    Retired settings whose saved value today's code reproduces are dropped, and "0 means inherit" values are made
    explicit. A retired setting or choice that only shaped training is set aside for inference (returned as the
    second dict, to be written back unchanged) and refused `for_training`; one that shapes maps is refused."""
    data = dict(data)
    if "hard_augmentation" not in data:  # written by a version before this one: what it lacks, it did by default
        data = {**OLD_DEFAULTS, **data}
    if data.get("detector_batch_size") == 0:
        data["detector_batch_size"] = data.get("batch_size", 16)
    if data.get("coarse_region_max") == 0:
        data["coarse_region_max"] = data.get("region_max", 0.25)
    retired = {name: data[name] for name in ("lr_d", *RETIRED_FOR_TRAINING) if name in data}
    lr_d = data.pop("lr_d", data.get("lr"))
    fixed = {**RETIRED_FOR_MAPS, **(RETIRED_FOR_TRAINING if for_training else {})}
    if for_training and lr_d != data.get("lr"):
        raise ConfigError(_refusal("lr_d", lr_d, "the discriminator now trains at lr", for_training))
    for name in [*RETIRED_FOR_MAPS, *RETIRED_FOR_TRAINING, *RETIRED_QUIETLY]:
        if name in data:
            value = data.pop(name)
            same = value == fixed.get(name) or (name == "short_side" and value == data.get("image_size"))
            if name in fixed and not same:
                why = f"today's anoseg behaves as {name}={fixed[name]!r}"
                raise ConfigError(_refusal(name, value, why, for_training))
    return data, {**retired, **_set_aside_retired_choices(data, for_training)}


def _set_aside_retired_choices(data: dict[str, Any], for_training: bool) -> dict[str, Any]:
    """Replace in `data` the choices of RETIRED_CHOICES (a model loaded for inference); returns the saved values."""
    saved = {}
    for name, gone in RETIRED_CHOICES.items():
        value, default = data.get(name), getattr(Config, name)
        is_list = isinstance(default, tuple) and isinstance(value, list | tuple)
        old = [v for v in (value if is_list else [value]) if isinstance(v, str) and v in gone]
        if not old:
            continue  # today's choices, or a malformed value that Config refuses by name
        if for_training:
            raise ConfigError(f"{name}={value!r}: {', '.join(map(repr, old))} can no longer be trained (choose "
                              f"from {', '.join(CHOICES[name])}); a model trained with it still predicts")
        saved[name] = value
        data[name] = ([v for v in value if v not in gone] or list(default)) if is_list else default
    return saved


def _refusal(name: str, value: Any, why: str, for_training: bool) -> str:
    advice = "this version cannot train with it" if for_training else "train the model again with this version"
    return f"saved by an older anoseg with {name}={value!r}, a setting that no longer exists ({why}); {advice}"


def pop_threshold(meta: dict, path: Path, key: str) -> float | None:
    """Take the stored threshold `key` out of a model's metadata; anything but a finite number is refused.

    Files written before thresholds had two names store it as plain ``threshold``; that is read too.
    """
    legacy = meta.pop("threshold", None)
    return _stored_number(meta.pop(key, legacy), path, key, "a finite number", math.isfinite)


def _stored_number(value: Any, path: Path, key: str, what: str, test: Callable[[float], bool]) -> float | None:
    """A number read from `path` (None stays None); a bool, text or a number failing `test` is refused by name."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
        raise ModelFileError(f"{path}: {key} {value!r} must be {what}")
    return float(value)


def read_model_meta(folder: Path) -> tuple[dict, float | None, float | None, float | None]:
    """model.json: (metadata, map threshold, threshold of the map's image score, map background). Models saved
    before the two thresholds had their own values use the map threshold for both; models calibrated before the map
    background existed have none (their outlines keep the map threshold as the floor in every image)."""
    path = Path(folder) / META_FILE
    meta = load_json(path) if path.exists() else {}
    map_threshold = pop_threshold(dict(meta), path, "map_threshold")
    score_threshold = pop_threshold(meta, path, "map_score_threshold")
    meta.pop("map_threshold", None)
    background = _stored_number(meta.pop("map_background", None), path, "map_background", "a number in [0, 1]",
                                lambda v: 0.0 <= v <= 1.0)
    score_threshold = map_threshold if score_threshold is None else score_threshold
    return meta, map_threshold, score_threshold, background
