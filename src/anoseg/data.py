"""Finding images and masks on disk (MVTec AD layout or plain folders) and loading them at model size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataError
from .fileio import IMAGE_SUFFIXES, image_files, load_image, load_mask


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
        raise DataError(f"{folder}: no training images (looked for {', '.join(IMAGE_SUFFIXES)})")
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


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Square-resize an RGB uint8 image to size x size (aspect ratio is not kept, as in MVTec practice)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def load_stack(paths: list[Path], size: int, desc: str = "loading", progress: bool = True) -> np.ndarray:
    """Load images as one uint8 array N x 3 x size x size."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, leave=False, disable=not progress or len(paths) < 50)):
        out[i] = resize_rgb(load_image(p), size).transpose(2, 0, 1)
    return out


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
