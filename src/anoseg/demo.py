"""A small synthetic inspection data set (MVTec layout) so the project can be tried without downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import save_png_atomic

CATEGORY = "demo_tile"


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A brushed-metal-like tile: fine stripes, slow shading and sensor noise (RGB float in [0, 1])."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.06 * np.sin(2 * np.pi * 24 * yy + phase + 0.8 * np.sin(2 * np.pi * 2 * xx))
    shade = 0.08 * (xx - 0.5) + 0.05 * np.cos(2 * np.pi * (yy + rng.uniform(0, 1)))
    base = 0.55 + stripes + shade + rng.normal(0, 0.015, (size, size))
    tint = np.array([1.0, 0.97, 0.9])
    return np.clip(base[..., None] * tint, 0, 1)


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "scratch":
        x0, y0 = rng.uniform(0.2, 0.8, 2) * size
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.5) * size
        u = (xx - x0) * np.cos(angle) + (yy - y0) * np.sin(angle)
        v = -(xx - x0) * np.sin(angle) + (yy - y0) * np.cos(angle)
        mask = (np.abs(u) < length / 2) & (np.abs(v) < 1.5)
        img = img.copy()
        img[mask] *= 0.35
    else:  # spot: a stain of another colour
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.05, 0.1) * size
        mask = (xx - cx) ** 2 / r**2 + (yy - cy) ** 2 / (r * rng.uniform(0.5, 1.0)) ** 2 < 1
        img = img.copy()
        img[mask] = img[mask] * 0.5 + np.array([0.45, 0.2, 0.05])
    return np.clip(img, 0, 1), mask


def make_demo_dataset(root: str | Path, size: int = 128, n_train: int = 60, n_test_good: int = 10,
                      n_test_defect: int = 10, seed: int = 0) -> Path:
    """Write ``root/demo_tile`` in MVTec layout (train/good, test/{good,scratch,spot}, ground_truth) and return it."""
    rng = np.random.default_rng(seed)
    cat = Path(root) / CATEGORY

    def save(path: Path, arr: np.ndarray) -> None:
        save_png_atomic(path, Image.fromarray(arr))

    for i in range(n_train):
        save(cat / "train" / "good" / f"{i:03d}.png", (_texture(rng, size) * 255).astype(np.uint8))
    for i in range(n_test_good):
        save(cat / "test" / "good" / f"{i:03d}.png", (_texture(rng, size) * 255).astype(np.uint8))
    for kind in ("scratch", "spot"):
        for i in range(n_test_defect):
            img, mask = _defect(rng, _texture(rng, size), kind)
            save(cat / "test" / kind / f"{i:03d}.png", (img * 255).astype(np.uint8))
            save(cat / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return cat
