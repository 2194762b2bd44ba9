"""Hard augmentation: synthetic anomalies made from normal images only (paper section 3.1).

An augmented copy of a normal image (rotation, patch permutation, colour jitter, each with
probability 0.5) is pasted into a random region of a normal image; that region is the mask.
All functions take a NumPy ``Generator`` so that a run is repeatable from its seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config


def rotate(img: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Rotate a C x H x W image about its centre, reflecting at the borders."""
    a = math.radians(angle_deg)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=img.dtype)
    grid = F.affine_grid(theta[None], [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def permute_patches(img: torch.Tensor, grid: int, rng: np.random.Generator) -> torch.Tensor:
    """Cut the image into grid x grid patches and shuffle them (the paper's 'permutation')."""
    c, h, w = img.shape
    ph, pw = h // grid, w // grid
    if grid < 2 or ph == 0 or pw == 0:
        return img
    core = img[:, : ph * grid, : pw * grid]
    patches = core.reshape(c, grid, ph, grid, pw).permute(1, 3, 0, 2, 4).reshape(grid * grid, c, ph, pw)
    patches = patches[torch.from_numpy(rng.permutation(grid * grid))]
    core = patches.reshape(grid, grid, c, ph, pw).permute(2, 0, 3, 1, 4).reshape(c, ph * grid, pw * grid)
    out = img.clone()
    out[:, : ph * grid, : pw * grid] = core
    return out


def color_jitter(img: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue change of an RGB image in [0, 1]."""
    def factor() -> float:
        return float(rng.uniform(max(0.0, 1 - strength), 1 + strength))

    out = img * factor()
    mean = out.mean()
    out = (out - mean) * factor() + mean
    grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None]
    out = (out - grey) * factor() + grey
    # hue: rotate the chroma plane in YIQ space
    h = float(rng.uniform(-strength / 4, strength / 4)) * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.tensor([[1.0, 0, 0], [0, math.cos(h), -math.sin(h)], [0, math.sin(h), math.cos(h)]])
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    out = torch.einsum("ij,jhw->ihw", m, out)
    return out.clamp(0.0, 1.0)


def region_mask(size: int, shape: str, area: float, rng: np.random.Generator) -> np.ndarray:
    """A bool size x size mask of one region covering about `area` of the image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    target = area * size * size
    if shape == "scar":  # long thin rotated rectangle, like a scratch or crack
        aspect = rng.uniform(6.0, 20.0)
    else:
        aspect = math.exp(rng.uniform(-math.log(3.0), math.log(3.0)))
    if shape == "ellipse":
        target /= math.pi / 4
    h = math.sqrt(target / aspect)
    w = h * aspect
    w, h = min(w, size * 1.4), min(h, size * 0.9)
    cy, cx = rng.uniform(0, size, size=2)
    angle = rng.uniform(0, math.pi) if shape == "scar" else 0.0
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    if shape == "ellipse":
        return (u / (w / 2)) ** 2 + (v / (h / 2)) ** 2 <= 1.0
    return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)


def augmented_copy(img: torch.Tensor, cfg: Config, rng: np.random.Generator) -> torch.Tensor:
    """The hard-augmented source: rotation, permutation and colour jitter, each with its probability."""
    out = img
    if rng.random() < cfg.p_rotate:
        out = rotate(out, float(rng.uniform(-180.0, 180.0)))
    if rng.random() < cfg.p_permute:
        out = permute_patches(out, cfg.permute_grid, rng)
    if rng.random() < cfg.p_jitter:
        out = color_jitter(out, cfg.jitter_strength, rng)
    return out


def synthesize(target: torch.Tensor, source: torch.Tensor, cfg: Config,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a random region of the augmented `source` into `target` (both 3 x H x W in [0, 1]).

    Returns the new image and its mask (1 x H x W, 1 = defect). Pixels the paste left
    (almost) unchanged are not marked, so the mask never claims a defect that cannot be seen.
    """
    size = target.shape[-1]
    shape = cfg.region_shapes[int(rng.integers(len(cfg.region_shapes)))]
    area = math.exp(rng.uniform(math.log(cfg.region_min), math.log(cfg.region_max)))
    mask = torch.from_numpy(region_mask(size, shape, area, rng))
    src = augmented_copy(source, cfg, rng)
    shift = tuple(int(s) for s in rng.integers(0, size, size=2))
    src = torch.roll(src, shifts=shift, dims=(1, 2))  # a random region of the source lands in the mask
    out = torch.where(mask, src, target)
    changed = (out - target).abs().amax(dim=0) > cfg.mask_min_diff
    return out, (mask & changed).float()[None]


def make_batch(images: torch.Tensor, cfg: Config, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a batch of normal images (B x 3 x H x W in [0, 1]) into a mix of normal and synthetic anomalies.

    Each image becomes a synthetic anomaly with probability ``cfg.anomaly_ratio``; normal images
    keep an all-normal mask. Returns (images, masks).
    """
    b = images.shape[0]
    out = images.clone()
    masks = torch.zeros(b, 1, *images.shape[-2:])
    for i in range(b):
        if rng.random() < cfg.anomaly_ratio:
            j = int(rng.integers(b))
            out[i], masks[i] = synthesize(images[i], images[j], cfg, rng)
    return out, masks
