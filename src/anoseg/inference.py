"""A trained AnoSeg model: load it, and turn images into anomaly maps and image scores."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_json, load_module, load_tensors, module_state, save_json, save_tensors
from .config import Config
from .data import resize_rgb
from .errors import AnosegError, ModelFileError
from .fileio import load_image
from .models import Generator

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AnosegError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of B x 1 x H x W maps (reflecting borders)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    out = F.pad(maps, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1))


@dataclass
class Prediction:
    """One image's result: the map at the image's own size (1 = defect) and its score."""

    path: Path | None
    anomaly_map: np.ndarray  # float32 H x W in [0, 1]
    score: float


class AnoSegModel:
    """A trained generator with its configuration and decision threshold."""

    def __init__(self, config: Config, generator: Generator | None = None, threshold: float | None = None,
                 meta: dict | None = None, device: str | None = None) -> None:
        self.config = config
        self.device = resolve_device(device or config.device)
        self.generator = (generator or Generator(config)).to(self.device).eval()
        self.threshold = threshold
        self.meta = dict(meta or {})

    # --- persistence -------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(folder / WEIGHTS_FILE, module_state("generator", self.generator))
        self.config.save(folder / CONFIG_FILE)
        save_json(folder / META_FILE, {**self.meta, "threshold": self.threshold})

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> AnoSegModel:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFileError(f"{folder}: model folder not found")
        if not (folder / WEIGHTS_FILE).is_file():
            unfinished = (folder / "checkpoint.json").exists()
            hint = " (training has not finished; resume it with --resume)" if unfinished else ""
            raise ModelFileError(f"{folder / WEIGHTS_FILE}: no trained model here{hint}")
        config = Config.load(folder / CONFIG_FILE)
        meta = load_json(folder / META_FILE) if (folder / META_FILE).exists() else {}
        generator = Generator(config)
        load_module(generator, load_tensors(folder / WEIGHTS_FILE), "generator", folder / WEIGHTS_FILE)
        threshold = meta.pop("threshold", None)
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise ModelFileError(f"{folder / META_FILE}: threshold must be a number")
        return cls(config, generator, threshold, meta, device)

    # --- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def maps_for_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        """Maps and scores for RGB uint8 images of any sizes (one forward pass)."""
        size = self.config.image_size
        batch = np.stack([resize_rgb(im, size).transpose(2, 0, 1) for im in images])
        x = torch.from_numpy(batch).to(self.device, torch.float32) / 127.5 - 1.0
        maps = gaussian_blur(self.generator.anomaly_map(x), self.config.smoothing_sigma)
        scores = maps.amax(dim=(1, 2, 3)).cpu().numpy()
        out = []
        for m, im, s in zip(maps, images, scores):
            h, w = im.shape[:2]
            full = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            out.append(Prediction(None, full.clamp(0, 1).cpu().numpy().astype(np.float32), float(s)))
        return out

    def predict_images(self, images: Iterable[np.ndarray]) -> list[Prediction]:
        """Maps for in-memory RGB uint8 images."""
        images = list(images)
        out: list[Prediction] = []
        bs = self.config.batch_size_infer
        for i in range(0, len(images), bs):
            out += self.maps_for_batch(images[i:i + bs])
        return out

    def iter_predict_files(self, paths: Iterable[Path]) -> Iterator[Prediction]:
        """Maps for image files, batched; unreadable files raise DataError naming them."""
        pending: list[tuple[Path, np.ndarray]] = []
        for p in paths:
            pending.append((Path(p), load_image(p)))
            if len(pending) == self.config.batch_size_infer:
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)

    def _flush(self, pending: list[tuple[Path, np.ndarray]]) -> Iterator[Prediction]:
        for (p, _), pred in zip(pending, self.maps_for_batch([im for _, im in pending])):
            pred.path = p
            yield pred

    def is_defect(self, score: float, threshold: float | None = None) -> bool:
        t = self.threshold if threshold is None else threshold
        if t is None:
            raise AnosegError("the model has no threshold; give one with --threshold")
        return score > t
