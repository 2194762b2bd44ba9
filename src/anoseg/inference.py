"""A trained AnoSeg model: load it, and turn images into anomaly maps and image scores."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_json, load_module, load_tensors, module_state, pop_threshold, save_json, save_tensors
from .config import TTA_FLIPS, Config
from .data import resize_rgb, working_shape
from .detector import Detector
from .errors import AnosegError, DataError, ModelFileError
from .fileio import load_image, make_output_dir
from .modelfolder import CONFIG_FILE, DETECTOR_WEIGHTS, META_FILE, WEIGHTS_FILE, Thresholds, has_checkpoint, is_finished
from .models import Generator


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AnosegError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated, slower than fp32.
    """
    if device.type == "cuda":  # emulated bf16 (GPUs before Ampere) counts as not native
        return torch.cuda.is_available() and torch.cuda.get_device_properties(device).major >= 8
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision the networks run in: `precision` itself, or for "auto" bf16 where native, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bfloat16 autocast for the networks when `precision` is (or resolves to) bf16.

    In fp32 no autocast region is entered at all, so traced graphs (ONNX export) stay as they were.
    """
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class _CompiledOrEager:
    """A torch.compile'd callable that falls back to the plain one, with a warning, if compiling fails.

    torch.compile is lazy: it fails at the first call, not when asked for, so the fallback lives here.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn, self.compiled = fn, torch.compile(fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly instead
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running without it",
                              stacklevel=2)
                self.compiled = None
        return self.fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # parameters(), train(), ... of the wrapped module
        return getattr(self.fn, name)


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    return _CompiledOrEager(fn) if enabled else fn


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


def add_broad(maps: torch.Tensor, sigma: float, weight: float) -> torch.Tensor:
    """(m + weight * blur(m, sigma)) / (1 + weight): the map plus a broad share of itself, kept in [0, 1].

    A large defect (a band of uneven grinding, a stain) answers over its whole area, not only where its
    texture is strongest: the broad share raises the region as one. A small defect's peak keeps most of its
    height, and peak_boost (applied after) raises it again.
    """
    if weight <= 0:
        return maps
    return (maps + weight * gaussian_blur(maps, sigma)) / (1 + weight)


def boost_peaks(maps: torch.Tensor, sigma: float, boost: float) -> torch.Tensor:
    """Maps raised where they stand above their Gaussian surroundings, kept in [0, 1].

    A small defect's response is a narrow peak that smoothing flattens; a broad raised area (a large
    defect, or a noisy surface) is left as it is relative to its neighbours. Returns
    (m + boost * max(m - blur(m), 0)) / (1 + boost).
    """
    if boost <= 0:
        return maps
    excess = (maps - gaussian_blur(maps, sigma)).clamp_min(0)
    return (maps + boost * excess) / (1 + boost)


def model_input(images: list[np.ndarray], shape: int | tuple[int, int]) -> np.ndarray:
    """RGB uint8 images of any sizes as the network's input: B x 3 x H x W float32 in [-1, 1].

    `shape` is the working (height, width), or one int for a square.
    """
    batch = np.stack([resize_rgb(im, shape).transpose(2, 0, 1) for im in images])
    return batch.astype(np.float32) / 127.5 - 1.0


def working_shapes(height: int, width: int, cfg: Config) -> tuple[tuple[int, int], ...]:
    """The image's working shape, and with ``second_short_side`` its shape at that second scale too."""
    first = working_shape(height, width, cfg)
    return (first, working_shape(height, width, cfg, cfg.second_short_side)) if cfg.second_short_side else (first,)


def shape_groups(images: list[np.ndarray], cfg: Config) -> dict[tuple[tuple[int, int], ...], list[int]]:
    """Indices of the images per :func:`working_shapes` (one forward pass per group)."""
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(working_shapes(*im.shape[:2], cfg), []).append(i)
    return groups


def by_working_shape(images: list[np.ndarray], cfg: Config,
                     run: Callable[[list[np.ndarray], tuple[tuple[int, int], ...]], list[Prediction]]
                     ) -> list[Prediction]:
    """Call ``run(group, shapes)`` once per group of images that share their working shapes; results in input order.

    In square mode all images form one group; in aspect mode images of other shapes need their own pass.
    `shapes` holds one working shape per scale (two with ``second_short_side``).
    """
    out: list[Prediction] = [None] * len(images)  # type: ignore[list-item]
    for shapes, idx in shape_groups(images, cfg).items():
        for i, pred in zip(idx, run([images[i] for i in idx], shapes)):
            out[i] = pred
    return out


def fuse_scales(maps: list[torch.Tensor]) -> torch.Tensor:
    """The mean of maps of one batch made at several scales, at the first scale's shape."""
    shape = maps[0].shape[-2:]
    total = maps[0]
    for m in maps[1:]:
        total = total + F.interpolate(m, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return total / len(maps)


def map_image_scores(maps: torch.Tensor, topk_fraction: float, topk_weight: float,
                     exportable: bool = False) -> tuple[torch.Tensor, ...]:
    """(image score, maximum, top-k mean) of each of B maps: the score is (1 - w) max + w top-k mean.

    `exportable` writes the top-k mean with a sort and a mask (3x slower), so that the ONNX graph keeps k a
    function of the map's dynamic size, which ``topk`` does not export."""
    flat = maps.flatten(1)
    peak = flat.amax(1)
    if exportable:
        k = torch.clamp(torch.round(torch.tensor(topk_fraction, dtype=torch.float64) * flat.shape[1]), min=1)
        k = k.to(device=flat.device, dtype=flat.dtype)  # rounded in double precision, as Python's round
        ranked = torch.sort(flat, dim=1, descending=True).values
        top = (ranked * (torch.arange(flat.shape[1], device=flat.device) < k)).sum(1) / k
    else:
        top = flat.topk(max(1, round(topk_fraction * flat.shape[1])), dim=1).values.mean(1)
    return (1 - topk_weight) * peak + topk_weight * top, peak, top


def predictions_from_maps(maps: torch.Tensor, images: list[np.ndarray], topk_fraction: float,
                          det_scores: np.ndarray | None = None, topk_weight: float = 0.0) -> list[Prediction]:
    """Scores of smoothed B x 1 x S x S maps, and each map resized back to its image's size."""
    map_scores, max_scores, topk_scores = (t.cpu().numpy() for t in map_image_scores(maps, topk_fraction, topk_weight))
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

    `score` is the one that decides the verdict: the detector's when the model has a detector,
    else `map_score`, the map's image score: its maximum (`max_score`) blended with the mean of its highest
    pixels (`topk_score`) by the setting ``image_score_topk_weight`` (0: the maximum alone).
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
        return {"score": r(self.score), "verdict": verdict(self.score, thresholds.image),
                "image_threshold": thresholds.image, "map_score": r(self.map_score), "max_score": r(self.max_score),
                "topk_score": r(self.topk_score),
                "detector_score": r(self.detector_score), "map_threshold": thresholds.map, "width": w, "height": h}


class AnoSegModel:
    """A trained generator with its configuration and decision thresholds."""

    def __init__(self, config: Config, generator: Generator | None = None, map_threshold: float | None = None,
                 meta: dict | None = None, device: str | None = None, map_score_threshold: float | None = None) -> None:
        self.config = config
        self.device = resolve_device(device or config.device)
        self.generator = (generator or Generator(config)).to(self.device).eval()
        self.map_threshold = map_threshold  # map pixels above it are defect (outlined)
        # the map's image score above it makes the verdict "defect" (without a detector); models saved before the
        # two had their own values used the map threshold for both
        self.map_score_threshold = map_threshold if map_score_threshold is None else map_score_threshold
        self.meta = dict(meta or {})
        self.detector: Detector | None = None

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
        self.config.save(folder / CONFIG_FILE)
        save_json(folder / META_FILE, {**self.meta, "map_threshold": self.map_threshold,
                                       "map_score_threshold": self.map_score_threshold})

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> AnoSegModel:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFileError(f"{folder}: model folder not found")
        if not is_finished(folder):
            unfinished = has_checkpoint(folder)
            hint = " (training has not finished; resume it with --resume)" if unfinished else ""
            raise ModelFileError(f"{folder / WEIGHTS_FILE}: no trained model here{hint}")
        config = Config.load(folder / CONFIG_FILE)
        meta = load_json(folder / META_FILE) if (folder / META_FILE).exists() else {}
        generator = Generator(config)
        load_module(generator, load_tensors(folder / WEIGHTS_FILE), "generator", folder / WEIGHTS_FILE)
        threshold = pop_threshold(meta, folder / META_FILE, "map_threshold")
        score_threshold = pop_threshold(meta, folder / META_FILE, "map_score_threshold")
        model = cls(config, generator, threshold, meta, device, score_threshold)
        if (folder / DETECTOR_WEIGHTS).exists():
            model.detector = Detector.load(folder, config, model.device)
        return model

    # --- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def maps_for_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        """Maps and scores for RGB uint8 images of any sizes (one forward pass per working shape)."""
        return by_working_shape(images, self.config, self._maps_same_shape)

    def _maps_same_shape(self, images: list[np.ndarray], shapes: tuple[tuple[int, int], ...]) -> list[Prediction]:
        inputs = [torch.from_numpy(model_input(images, shape)).to(self.device) for shape in shapes]
        raw, maps = self.fused_maps(inputs)
        det_scores = self.detector.score(inputs[0], raw).cpu().numpy() if self.detector is not None else None
        return predictions_from_maps(maps, images, self.config.topk_fraction, det_scores,
                                     self.config.image_score_topk_weight)

    def fused_maps(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw and smoothed maps of one normalised batch per scale, averaged at the first scale's shape.

        Each scale is smoothed in its own pixels, as the model was trained; the broad share is added and peaks
        are boosted after fusing, in pixels of the first scale.
        """
        cfg = self.config
        raw = [self.raw_maps(x) for x in inputs]
        smooth = fuse_scales([gaussian_blur(r, cfg.smoothing_sigma) for r in raw])
        smooth = add_broad(smooth, cfg.broad_sigma, cfg.broad_weight)
        return fuse_scales(raw), boost_peaks(smooth, cfg.peak_sigma, cfg.peak_boost)

    def crop_raw_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Raw maps of a normalised batch at the first scale, fused over the scales as :meth:`fused_maps` does.

        For crops, which have no image at the second scale: the crop itself is resized to it.
        """
        if not self.config.second_short_side:
            return self.raw_maps(x)
        cfg = self.config
        ratio, unit = cfg.second_short_side / cfg.first_short_side, cfg.image_size // 8
        size = [max(unit, round(n * ratio / unit) * unit) for n in x.shape[-2:]]
        x2 = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=ratio < 1)
        return fuse_scales([self.raw_maps(x), self.raw_maps(x2)])

    def raw_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Unsmoothed maps of a normalised batch, averaged over the flips of `tta_flips`."""
        flips = TTA_FLIPS[self.config.tta_flips]
        total = None
        for dims in flips:
            with autocast(self.config.precision, self.device):
                m = self.generator.anomaly_map(x.flip(dims) if dims else x).float()
            m = m.flip(dims) if dims else m
            total = m if total is None else total + m
        return total / len(flips)

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
        """The map and image thresholds, the model's own unless overridden.

        The map threshold outlines defect pixels; the image threshold decides the verdict on
        `Prediction.score` (the detector's score when the model has a detector, else the map's maximum).
        """
        t_map = self.map_threshold if map_threshold is None else check_threshold(map_threshold)
        t_img = self.image_threshold if image_threshold is None else check_threshold(image_threshold)
        return Thresholds(t_map, t_img)


def check_threshold(threshold: float) -> float:
    """A user-given threshold must be a finite number."""
    if not np.isfinite(threshold):
        raise DataError(f"threshold {threshold}: must be a finite number (maps lie in [0, 1])")
    return float(threshold)


def verdict(score: float, threshold: float | None) -> str | None:
    """'defect' when the score exceeds the threshold, else 'normal'; None without a threshold."""
    if threshold is None:
        return None
    return "defect" if score > threshold else "normal"
