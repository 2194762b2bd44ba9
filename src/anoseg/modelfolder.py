"""The trained-model folder: the one place that names its files, and the thresholds a model carries.

A model folder holds ``config.json`` (all settings), ``model.safetensors`` + ``model.json`` (generator
weights; threshold and metadata), while training ``checkpoint.json`` + ``checkpoint-<step>.safetensors``
and ``train_log.csv``, and with an anomaly detector ``detector.safetensors`` + ``detector.json`` (while it
trains, ``detector-checkpoint.json`` + ``detector-checkpoint-<step>.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # written last: its presence marks a finished model
META_FILE = "model.json"
CKPT_STEM = "checkpoint"  # checkpoint weights are <stem>-<step>.safetensors, named by the state JSON
CKPT_WEIGHTS = "checkpoint.safetensors"  # the name older checkpoints used; new ones add the step
CKPT_STATE = "checkpoint.json"
LOG_FILE = "train_log.csv"
DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_META = "detector.json"
DETECTOR_CKPT_STEM = "detector-checkpoint"  # while the detector trains: its resume point, named the same way
DETECTOR_CKPT_STATE = "detector-checkpoint.json"


def is_finished(folder: Path) -> bool:
    return (Path(folder) / WEIGHTS_FILE).is_file()


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CKPT_STATE).is_file()


@dataclass(frozen=True)
class Thresholds:
    """The two decision thresholds of a model; one name, one meaning.

    `map` outlines defect pixels (map values above it); `image` decides the verdict on the image score (the
    detector's score when there is a detector, else the map's image score; models saved before the two had
    their own values use `map` for both).
    """

    map: float | None
    image: float | None

    def __iter__(self):  # t_map, t_img = model.thresholds()
        return iter((self.map, self.image))
