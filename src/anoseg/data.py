"""Finding images and masks on disk (MVTec AD layout or plain folders) and loading them at model size."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .config import Config
from .errors import DataError
from .fileio import IMAGE_SUFFIXES, image_files, image_shape, load_image, load_mask
from .geometry import Geometry, axis
from .image_store import MEMORY_SHARE, ImageStore, available_memory, fingerprint
from .progress import bar


@dataclass(frozen=True)
class Sample:
    """One test image: label 1 = defect, with its mask file when it has one."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


def is_mvtec_category(root: Path) -> bool:
    return (Path(root) / "train" / "good").is_dir()


def train_images(root: str | Path) -> list[Path]:
    """Normal training images: ``root/train/good`` (MVTec layout) or the images inside ``root``."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    folder = root / "train" / "good" if is_mvtec_category(root) else root
    files = image_files(folder)
    if not files and any(is_mvtec_category(p) for p in root.iterdir() if p.is_dir()):
        example = next(p for p in sorted(root.iterdir()) if p.is_dir() and is_mvtec_category(p))
        raise DataError(f"{root}: holds several MVTec categories; train one at a time, e.g. {example}")
    if not files:
        raise DataError(f"{folder}: no training images (looked for the image types Pillow reads: "
                        f"{', '.join(IMAGE_SUFFIXES[:8])}, ...)")
    return files


def _find_mask(image: Path, mask_dir: Path) -> Path | None:
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png", f"{image.stem}_mask{image.suffix}", image.name):
        candidate = mask_dir / name
        if candidate.is_file():
            return candidate
    return None


def _mask_stem(mask: Path) -> str:
    return mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem


def _check_no_orphan_masks(mask_dir: Path, images: list[Path]) -> None:
    stems = {p.stem for p in images}
    for mask in image_files(mask_dir):
        if _mask_stem(mask) not in stems:
            raise DataError(f"{mask}: mask has no matching image (expected an image named {_mask_stem(mask)}.*)")


def mvtec_test_samples(root: str | Path) -> list[Sample]:
    """Labelled test samples of an MVTec AD category: ``test/<type>/*`` with ``ground_truth/<type>/<name>_mask.png``."""
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: folder not found (expected MVTec layout CATEGORY/test/<type>)")
    samples: list[Sample] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        files = image_files(type_dir)
        if type_dir.name == "good":
            samples += [Sample(f, 0, "good") for f in files]
            continue
        mask_dir = root / "ground_truth" / type_dir.name
        for f in files:
            mask = _find_mask(f, mask_dir) if mask_dir.is_dir() else None
            if mask is None:
                raise DataError(f"{f}: defect image has no mask (expected {mask_dir / (f.stem + '_mask.png')})")
            samples.append(Sample(f, 1, type_dir.name, mask))
        if mask_dir.is_dir():
            _check_no_orphan_masks(mask_dir, files)
    if not samples:
        raise DataError(f"{test_dir}: no test images")
    return samples


def folder_test_samples(normal_dir: str | Path | None, abnormal_dir: str | Path | None,
                        mask_dir: str | Path | None) -> list[Sample]:
    """Labelled samples from plain folders: normal images, defect images, and masks named like the defect images."""
    samples: list[Sample] = []
    if normal_dir is not None:
        samples += [Sample(f, 0, "good") for f in image_files(normal_dir)]
    if abnormal_dir is not None:
        if mask_dir is None:
            raise DataError("defect images need a mask folder (--masks) for pixel metrics")
        abnormal = image_files(abnormal_dir)
        for f in abnormal:
            mask = _find_mask(f, Path(mask_dir))
            if mask is None:
                raise DataError(f"{f}: defect image has no mask in {mask_dir} "
                                f"(expected {f.stem}_mask.png or {f.stem}.png)")
            samples.append(Sample(f, 1, "defect", mask))
        _check_no_orphan_masks(Path(mask_dir), abnormal)
    if not samples:
        raise DataError("no test images given")
    return samples


def resize_rgb(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 image to size x size, or to (height, width) when `size` is a pair."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


class Crops(NamedTuple):
    """A batch of training crops: uint8 B x 3 x S x S images, their B x 2 x S x S coordinates (None when whole),
    and which came from the coarser of two scales (bool B, None with one scale)."""

    images: torch.Tensor
    coords: torch.Tensor | None = None
    coarse: torch.Tensor | None = None


class TrainingImages:
    """Normal training images at their working shape; hands out square image_size crops with their coordinates.

    In ``square`` mode every image is already image_size x image_size, so a crop is the whole image.
    In ``aspect`` mode a crop is a random image_size x image_size window, and its coordinate channels
    are the window's place in the whole image, as the model sees it when it maps the whole image.
    With ``second_short_side`` each image is also kept at that scale, and half of the crops come from it.
    The images live in one :class:`~anoseg.image_store.ImageStore` (in memory, or a cache file for large sets).
    """

    def __init__(self, images: list[np.ndarray], geometry: Geometry, second: list[np.ndarray] | None = None) -> None:
        """`images` uint8 3 x H x W each; `second` the same images at the second scale, or None."""
        arrays = images if second is None else [a for pair in zip(images, second) for a in pair]
        store = ImageStore([a.shape for a in arrays])
        for i, a in enumerate(arrays):
            store.put(i, a)
        self._use(store, geometry, 1 if second is None else 2, np.arange(len(images)))

    def _use(self, store: ImageStore, geometry: Geometry, n_scales: int, index: np.ndarray) -> None:
        self.store, self.geometry, self.n_scales, self.index = store, geometry, n_scales, index
        self.size = geometry.image_size
        self.all_square = n_scales == 1 and all(store.shapes[j] == (3, self.size, self.size) for j in index)
        self.description = f"{len(index)} images, {store.nbytes / 1e6:.0f} MB at working size, " + (
            "in memory" if store.in_memory else f"in the cache file {store.path}")

    @classmethod
    def _of(cls, store: ImageStore, geometry: Geometry, n_scales: int, index: np.ndarray) -> TrainingImages:
        images = cls.__new__(cls)
        images._use(store, geometry, n_scales, index)
        return images

    @classmethod
    def load(cls, paths: list[Path], cfg: Config, desc: str = "loading", progress: bool = True,
             one_scale: bool = False, cache_dir: Path | None = None, also_check: list[Path] = ()) -> TrainingImages:
        """The images at the working shape of each scale (of the first only with `one_scale`).

        `also_check` are decoded too (a bad file stops the run now) but not kept. With `cache_dir`, a set larger
        than image_store.MEMORY_SHARE of the memory available is kept in a cache file there (used again while
        the inputs are unchanged); without, always in memory."""
        geometry = Geometry.from_config(cfg)
        if one_scale:
            geometry = Geometry(geometry.image_size, geometry.resize_mode)
        n = len(geometry.scales)
        shapes = [(3, *shape) for p in paths for shape in geometry.working_shapes(*_planned_shape(p))]
        store, key = None, ""
        if cache_dir is not None and ImageStore.sizes(shapes).sum() > MEMORY_SHARE * available_memory():
            key = fingerprint([*paths, *also_check], shapes)
            store = ImageStore.open_cache(cache_dir, key)
            if store is not None:
                images = cls._of(store, geometry, n, np.arange(len(paths)))
                _say(f"images for training: {images.description} (built before, used again)", progress)
                return images
            store = ImageStore.create_cache(cache_dir, shapes)
        store = store or ImageStore(shapes)
        _fill(store, geometry, paths, also_check, bar_options={"desc": desc, "leave": False,
                                                               "disable": not progress or len(paths) < 50})
        if key:
            store.seal(key)
        images = cls._of(store, geometry, n, np.arange(len(paths)))
        _say(f"images for training: {images.description}", progress)
        return images

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int, scale: int = 0) -> np.ndarray:
        """Image i (of this set) at the given scale, uint8 3 x H x W."""
        return self.store[int(self.index[i]) * self.n_scales + scale]

    def subset(self, indices: np.ndarray) -> TrainingImages:
        return self._of(self.store, self.geometry, self.n_scales, self.index[np.asarray(indices, dtype=np.int64)])

    def crops(self, indices: np.ndarray, rng: np.random.Generator) -> Crops:
        """Random image_size crops of the given images (the whole images in square mode)."""
        s = self.size
        if self.all_square:
            return Crops(torch.from_numpy(np.stack([self.image(i) for i in indices])))
        crops, coords, from_second = [], [], []
        for i in indices:
            from_second.append(self.n_scales == 2 and rng.random() < 0.5)
            im = self.image(i, int(from_second[-1]))
            h, w = im.shape[1:]
            top, left = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
            crops.append(im[:, top:top + s, left:left + s])
            ys, xs = axis(h)[top:top + s], axis(w)[left:left + s]
            coords.append(torch.stack([xs[None, :].expand(s, s), ys[:, None].expand(s, s)]))
        # the second scale has the longer short side: crops of the first see more of the image, coarser
        coarse = None if self.n_scales == 1 else ~torch.tensor(from_second)
        return Crops(torch.from_numpy(np.stack(crops)), torch.stack(coords), coarse)


def _fill(store: ImageStore, geometry: Geometry, paths: list[Path], also_check: list[Path],
          bar_options: dict) -> None:
    """Decode every file; put those of `paths` into the store at each scale."""
    n = len(geometry.scales)
    for j, p in enumerate(bar([*paths, *also_check], **bar_options)):
        im = load_image(p)
        if j < len(paths):
            for k, side in enumerate(geometry.scales):
                store.put(j * n + k, _chw(resize_rgb(im, geometry.working_shape(*im.shape[:2], side))))


def _planned_shape(path: Path) -> tuple[int, int]:
    """The image's (height, width) from its header; a file whose header cannot be read is decoded now, so that
    its error stops the run before any work."""
    shape = image_shape(path)
    return shape if shape is not None else load_image(path).shape[:2]


def _say(line: str, progress: bool) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)


def _chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def load_sample_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """The sample's mask (all normal for good images), checked against the image's height and width."""
    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool)
    mask = load_mask(sample.mask_path)
    if mask.shape != shape:
        raise DataError(
            f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.path.name} "
            f"is {shape[1]}x{shape[0]}"
        )
    return mask
