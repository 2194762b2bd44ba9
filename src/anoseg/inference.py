"""A trained AnoSeg model: load it, and turn images into anomaly maps and image scores."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import finite_weights, load_module, load_tensors, module_state, save_json, save_tensors
from .config import Config
from .data import resize_rgb
from .detector import Detector
from .errors import ModelFileError
from .fileio import load_image, make_output_dir
from .geometry import Geometry
from .modelfolder import (
    CONFIG_FILE,
    DETECTOR_WEIGHTS,
    META_FILE,
    WEIGHTS_FILE,
    has_checkpoint,
    is_finished,
    read_model_config,
    read_model_meta,
)
from .models import Generator
from .postprocess import MapPostprocessor, fuse_scales
from .runtime import autocast, resolve_device
from .scoring import ImageScorer, OutlineLevels, Thresholds, check_threshold, outline_levels, outline_region, verdict


def model_input(images: list[np.ndarray], shape: int | tuple[int, int]) -> np.ndarray:
    """RGB uint8 images of any sizes as the network's input: B x 3 x H x W float32 in [-1, 1].

    `shape` is the working (height, width), or one int for a square.
    """
    batch = np.stack([resize_rgb(im, shape).transpose(2, 0, 1) for im in images])
    return batch.astype(np.float32) / 127.5 - 1.0


def by_working_shape(images: list[np.ndarray], geometry: Geometry,
                     run: Callable[[list[np.ndarray], tuple[tuple[int, int], ...]], list[Prediction]]
                     ) -> list[Prediction]:
    """Call ``run(group, shapes)`` once per group of images that share their working shapes; results in input order.

    In square mode all images form one group; in aspect mode images of other shapes need their own pass.
    `shapes` holds one working shape per scale.
    """
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(geometry.working_shapes(*im.shape[:2]), []).append(i)
    out: list[Prediction] = [None] * len(images)  # type: ignore[list-item]
    for shapes, idx in groups.items():
        for i, pred in zip(idx, run([images[i] for i in idx], shapes)):
            out[i] = pred
    return out


def predictions_from_maps(maps: torch.Tensor, images: list[np.ndarray], scorer: ImageScorer,
                          det_scores: np.ndarray | None = None) -> list[Prediction]:
    """Scores of finished B x 1 x S x S maps, and each map resized back to its image's size."""
    map_scores, max_scores, topk_scores = (t.cpu().numpy() for t in scorer(maps))
    out = []
    for i, (m, im) in enumerate(zip(maps, images)):
        h, w = im.shape[:2]
        full = F.interpolate(m[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1)
        d = None if det_scores is None else float(det_scores[i])
        s = float(map_scores[i])
        out.append(Prediction(None, full.cpu().numpy(), s if d is None else d, s, float(max_scores[i]),
                              float(topk_scores[i]), d))
    return out


@dataclass
class Prediction:
    """One image's result: the map at the image's own size (1 = defect) and its image-level scores.

    `score` is the one that decides the verdict: the detector's when the model has a detector, else
    `map_score`, the map's image score (:class:`anoseg.scoring.ImageScorer`), made of `max_score` and `topk_score`.
    """

    path: Path | None
    anomaly_map: np.ndarray  # float32 H x W in [0, 1]
    score: float
    map_score: float
    max_score: float
    topk_score: float
    detector_score: float | None = None

    def to_record(self, thresholds: Thresholds) -> dict[str, Any]:
        """The result fields every output shares (predictions.csv/.jsonl, the server's answer), scores rounded."""
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 6)

        h, w = self.anomaly_map.shape[:2]
        levels = self.outline_levels(thresholds)
        return {"score": r(self.score), "verdict": verdict(self.score, thresholds.image),
                "image_threshold": thresholds.image, "map_score": r(self.map_score), "max_score": r(self.max_score),
                "topk_score": r(self.topk_score),
                "detector_score": r(self.detector_score), "map_threshold": thresholds.map,
                "outline_threshold": None if levels is None else levels.edge,
                "outline_reach": None if levels is None else levels.reach, "width": w, "height": h}

    def outline_levels(self, thresholds: Thresholds) -> OutlineLevels | None:
        """This image's outline levels; None: no outline (see :func:`anoseg.scoring.outline_levels`)."""
        return outline_levels(thresholds, self.max_score, self.score)

    def outline(self, thresholds: Thresholds) -> np.ndarray | None:
        """The pixels this image's outline holds (bool, the map's shape); None without a map threshold."""
        levels = self.outline_levels(thresholds)
        return None if levels is None else outline_region(self.anomaly_map, levels)


class AnoSegModel:
    """A trained generator with its configuration and decision thresholds."""

    def __init__(self, config: Config, generator: Generator | None = None, map_threshold: float | None = None,
                 meta: dict | None = None, device: str | None = None, map_score_threshold: float | None = None,
                 map_background: float | None = None) -> None:
        self.config = config
        self.device = resolve_device(device or config.device)
        self.generator = (generator or Generator(config)).to(self.device).eval()
        self.map_threshold = map_threshold  # an outline's floor in images judged normal
        self.map_score_threshold = map_score_threshold  # the map's image score above it: verdict "defect"
        self.map_background = map_background  # the normal surface's map level: outline edges are measured from it
        self.meta = dict(meta or {})
        self.detector: Detector | None = None
        self.retired_settings: dict[str, Any] = {}  # how an older anoseg trained it, kept in config.json

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """New settings rebuild the components made from them."""
        self._config = config
        self.geometry = Geometry.from_config(config)
        self.postprocess = MapPostprocessor.from_config(config)
        self.scorer = ImageScorer.from_config(config)

    @property
    def image_threshold(self) -> float | None:
        """The threshold of `Prediction.score`: the detector's when there is one, else the map image score's."""
        return self.detector.image_threshold if self.detector is not None else self.map_score_threshold

    # --- persistence -------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        self.save_settings(folder)
        # the weights file marks a finished model, so it is written last
        save_tensors(Path(folder) / WEIGHTS_FILE, module_state("generator", self.generator))

    def save_settings(self, folder: str | Path) -> None:
        """config.json and model.json (metadata and thresholds): everything but the weights."""
        folder = Path(folder)
        make_output_dir(folder)
        self.config.save(folder / CONFIG_FILE, keep=self.retired_settings)
        save_json(folder / META_FILE, {**self.meta, "map_threshold": self.map_threshold,
                                       "map_score_threshold": self.map_score_threshold,
                                       "map_background": self.map_background})

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> AnoSegModel:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFileError(f"{folder}: model folder not found")
        if not is_finished(folder):
            unfinished = has_checkpoint(folder)
            hint = " (training has not finished; resume it with --resume)" if unfinished else ""
            raise ModelFileError(f"{folder / WEIGHTS_FILE}: no trained model here{hint}")
        config, retired = read_model_config(folder / CONFIG_FILE)
        meta, threshold, score_threshold, background = read_model_meta(folder)
        generator = Generator(config)
        tensors = finite_weights(load_tensors(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
        load_module(generator, tensors, "generator", folder / WEIGHTS_FILE)
        model = cls(config, generator, threshold, meta, device, score_threshold, background)
        model.retired_settings = retired
        if (folder / DETECTOR_WEIGHTS).exists():
            model.detector = Detector.load(folder, config, model.device)
        return model

    # --- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def maps_for_batch(self, images: list[np.ndarray], precision: str | None = None) -> list[Prediction]:
        """Maps and scores for RGB uint8 images of any sizes (one forward pass per working shape), in the model's
        precision unless one is given."""
        return by_working_shape(images, self.geometry, functools.partial(self._maps_same_shape, precision=precision))

    def _maps_same_shape(self, images: list[np.ndarray], shapes: tuple[tuple[int, int], ...],
                         precision: str | None = None) -> list[Prediction]:
        inputs = [torch.from_numpy(model_input(images, shape)).to(self.device) for shape in shapes]
        raw, maps = self.fused_maps(inputs, precision)
        det_scores = self.detector.score(inputs[0], raw).cpu().numpy() if self.detector is not None else None
        return predictions_from_maps(maps, images, self.scorer, det_scores)

    def fused_maps(self, inputs: list[torch.Tensor], precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps averaged over the scales, and the finished maps (:class:`MapPostprocessor`), of one
        normalised batch per scale, at the first scale's shape."""
        raw = [self.raw_maps(x, precision) for x in inputs]
        return fuse_scales(raw), self.postprocess(raw)

    def crop_raw_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Raw maps of a normalised batch at the first scale, fused over the scales as :meth:`fused_maps` does.

        For crops, which have no image at the second scale: the crop itself is resized to it.
        """
        if not self.geometry.second_short_side:
            return self.raw_maps(x)
        size = self.geometry.second_scale_size(*x.shape[-2:])
        x2 = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=size[0] < x.shape[-2])
        return fuse_scales([self.raw_maps(x), self.raw_maps(x2)])

    def raw_maps(self, x: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Unsmoothed maps of a normalised batch (in the model's precision unless one is given)."""
        with autocast(precision or self.config.precision, self.device):
            return self.generator.anomaly_map(x).float()

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

    def thresholds(self, map_threshold: float | None = None, image_threshold: float | None = None) -> Thresholds:
        """The model's thresholds and map background, the thresholds overridden where given.

        The image threshold decides the verdict on `Prediction.score` (the detector's score when the model has a
        detector, else the map's image score). A map threshold given here is the outlines' floor in every image:
        the model's background is then not used."""
        t_map = self.map_threshold if map_threshold is None else \
            check_threshold(map_threshold, "--map-threshold", in_unit_range=True)
        t_img = self.image_threshold if image_threshold is None else \
            check_threshold(image_threshold, "--image-threshold", in_unit_range=self.detector is None)
        return Thresholds(t_map, t_img, self.map_background if map_threshold is None else None)
