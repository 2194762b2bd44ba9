"""Synthetic anomalies made from normal images only: the :class:`Augmenter` and the families it draws from.

The paper's hard augmentation (section 3.1, family ``paste``): an augmented copy of a normal image
(rotation, patch permutation, colour jitter, each with probability 0.5) is pasted into a random region
of a normal image; that region is the mask. Three more families add defect-like regions the paper does not
have: noise-shaped foreign regions (``noise``), thin cracks (``crack``) and regions whose texture runs more
strongly along one direction (``streak``). Every function takes a NumPy ``Generator``: a run is repeatable
from its seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config

P_ROTATE = P_PERMUTE = P_JITTER = 0.5  # the paper's probabilities of each hard augmentation
PERMUTE_GRID = 4  # the augmented copy is cut into PERMUTE_GRID x PERMUTE_GRID patches and shuffled
JITTER_STRENGTH = 0.4  # brightness/contrast/saturation range of the colour jitter; hue is a quarter of it
REGION_SHAPES = ("rect", "ellipse", "scar")  # shapes of pasted regions, one drawn per anomaly
CRACK_POINTS = (20, 240)  # a crack's random walk has this many points (0.3-1.5 px apart)
CRACK_TURN = (0.02, 0.25)  # a crack turns by this many radians a point (log-uniform: from straight to curly)
CRACK_CONTRAST_MIN = 0.4  # a crack darkens or brightens the surface by a share drawn from [this, 1]
STREAK_ANY_ANGLE = 0.0  # share of streaks at a random angle rather than along the surface's own grain


@dataclass(frozen=True)
class Augmenter:
    """Turns a batch of normal images into a mix of normal images and synthetic anomalies, with their masks.

    Built once from the settings (:meth:`from_config`); a call takes B x 3 x H x W images in [0, 1] and a
    random generator, and returns (images, masks), masks B x 1 x H x W with 1 = defect.
    """

    families: tuple[str, ...]
    anomaly_ratio: float = 0.5
    hard: bool = True
    opacity_min: float = 1.0
    region_min: float = 0.005
    region_max: float = 0.25
    coarse_region_max: float = 0.5
    mask_min_diff: float = 0.02
    mask_texture_factor: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config, **changes: float) -> Augmenter:
        """The augmenter a run's settings describe; `changes` replace single fields (the detector's batches are
        all synthetic: ``anomaly_ratio=1.0``)."""
        aug = cls(cfg.anomaly_families, cfg.anomaly_ratio, cfg.hard_augmentation, cfg.opacity_min, cfg.region_min,
                  cfg.region_max, cfg.coarse_region_max, cfg.mask_min_diff, cfg.mask_texture_factor)
        return dataclasses.replace(aug, **changes)

    def __call__(self, images: torch.Tensor, rng: np.random.Generator,
                 coarse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image becomes a synthetic anomaly with probability ``anomaly_ratio``, its source another image
        of the batch; where `coarse` marks a crop from the coarser of two scales, regions span up to
        ``coarse_region_max``."""
        out = images.clone()
        masks = torch.zeros(images.shape[0], 1, *images.shape[-2:])
        for i in range(images.shape[0]):
            if rng.random() < self.anomaly_ratio:
                j = int(rng.integers(images.shape[0]))
                largest = self.coarse_region_max if coarse is not None and bool(coarse[i]) else self.region_max
                out[i], masks[i] = self.synthesize(images[i], images[j], rng, largest)
        return out, masks

    def synthesize(self, target: torch.Tensor, source: torch.Tensor, rng: np.random.Generator,
                   largest: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One synthetic anomaly in `target` (3 x H x W in [0, 1]) of a family drawn from ``families``.

        Returns the new image and its mask (1 x H x W). The family gives a region and what it shows; that is
        blended in with an opacity drawn from [opacity_min, 1]. Pixels the blend left (almost) unchanged are
        not marked, so the mask never claims a defect that cannot be seen.
        """
        family = self.families[int(rng.integers(len(self.families)))]
        src, region = FAMILIES[family](target, source, self, rng, largest or self.region_max)
        opacity = float(rng.uniform(self.opacity_min, 1.0))
        out = target + opacity * region[None] * (src - target)
        change = (out - target).abs().amax(dim=0)
        if family in AREA_FAMILIES:  # a large region counts where it changed on average, not pixel by pixel
            change = box_blur(change, 4)
        changed = change > self.min_visible_change(target, family)
        return out, ((region >= 0.5) & changed).float()[None]

    def min_visible_change(self, target: torch.Tensor, family: str = "") -> float:
        """The least change of a pixel that the mask calls a defect.

        ``mask_min_diff`` everywhere; with ``mask_texture_factor`` also that many times the target's own
        grain, so a change no larger than the surface's normal pixel-to-pixel variation is not called a defect
        on a grainy surface, while a smooth one keeps the fixed floor. An area family's change is averaged over
        a neighbourhood, which evens out the grain already, so it keeps the fixed floor too. A change of the
        texture itself (TEXTURE_FAMILIES) counts from half the grain: on a faint texture, made stronger or
        streakier, no pixel moves far, yet the region looks different.
        """
        if family in TEXTURE_FAMILIES:
            return max(self.mask_min_diff / 4, grain(target) / 2)
        if self.mask_texture_factor <= 0 or family in AREA_FAMILIES:
            return self.mask_min_diff
        return max(self.mask_min_diff, self.mask_texture_factor * grain(target))

    def augmented_copy(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The hard-augmented source: rotation, permutation and colour jitter, each with its probability
        (the image as it is without hard augmentation)."""
        if not self.hard:
            return img
        out = img
        if rng.random() < P_ROTATE:
            out = rotate(out, float(rng.uniform(-180.0, 180.0)))
        if rng.random() < P_PERMUTE:
            out = permute_patches(out, PERMUTE_GRID, rng)
        if rng.random() < P_JITTER:
            out = color_jitter(out, JITTER_STRENGTH, rng)
        return out

    def region_area(self, rng: np.random.Generator, largest: float) -> float:
        """A region's share of the crop, log-uniform between region_min and `largest`."""
        return math.exp(rng.uniform(math.log(self.region_min), math.log(largest)))


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


def paste(target: torch.Tensor, source: torch.Tensor, aug: Augmenter, rng: np.random.Generator,
          largest: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's hard augmentation: a region of the augmented `source` replaces the same region of `target`."""
    size = target.shape[-1]
    shape = REGION_SHAPES[int(rng.integers(len(REGION_SHAPES)))]
    mask = torch.from_numpy(region_mask(size, shape, aug.region_area(rng, largest), rng))
    src = aug.augmented_copy(source, rng)
    shift = tuple(int(s) for s in rng.integers(0, size, size=2))
    src = torch.roll(src, shifts=shift, dims=(1, 2))  # a random region of the source lands in the mask
    return src, mask.float()


def smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator, octaves: int = 1) -> torch.Tensor:
    """Smooth random field (H x W, about zero mean, unit scale): bicubic-upsampled random grids, summed over octaves."""
    out = torch.zeros(h, w)
    for o in range(octaves):
        n = max(2, cells * 2**o)
        grid = torch.from_numpy(rng.standard_normal((1, 1, n + 1, n + 1)).astype(np.float32))
        out += F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)[0, 0] / 2**o
    return out / out.std().clamp_min(1e-6)


def box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The mean over a (2 * radius + 1)-pixel square around each pixel of an H x W plane or of each plane of
    a C x H x W image (edges: the pixels inside)."""
    planes = x.reshape(-1, 1, *x.shape[-2:])
    return F.avg_pool2d(planes, 2 * radius + 1, 1, radius, count_include_pad=False).reshape(x.shape)


def _blob(size: int, area: float, cells: int, rng: np.random.Generator) -> torch.Tensor:
    """An irregular region of about `area` of the image: the top `area` quantile of a smooth noise field."""
    field_ = smooth_noise(size, size, cells, rng, octaves=2)
    return (field_ >= torch.quantile(field_.flatten(), 1.0 - area)).float()


def procedural_texture(size: int, rng: np.random.Generator) -> torch.Tensor:
    """A foreign-looking RGB texture in [0, 1], made from noise (nothing downloaded)."""
    cells = int(rng.integers(2, 24))
    base = torch.stack([smooth_noise(size, size, cells, rng, octaves=3) for _ in range(3)])
    if rng.random() < 0.5:  # grey texture, as on most inspected surfaces
        base = base[:1].expand(3, -1, -1)
    return (torch.from_numpy(rng.uniform(0.1, 0.9, (3, 1, 1)).astype(np.float32)) + 0.15 * base).clamp(0, 1)


def _fill(target: torch.Tensor, source: torch.Tensor, aug: Augmenter, rng: np.random.Generator) -> torch.Tensor:
    """What a noise-shaped region shows: another image strongly jittered, a texture, or a brightness shift."""
    kind = int(rng.integers(3))
    if kind == 0:
        return color_jitter(aug.augmented_copy(source, rng), max(JITTER_STRENGTH, 0.8), rng)
    if kind == 1:
        return procedural_texture(target.shape[-1], rng)
    return (target + float(rng.choice([-1, 1]) * rng.uniform(0.15, 0.5))).clamp(0, 1)


def noise_region(target: torch.Tensor, source: torch.Tensor, aug: Augmenter, rng: np.random.Generator,
                 largest: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An irregular noise-shaped region (DRAEM-like) of any size from region_min to `largest`."""
    area = aug.region_area(rng, largest)
    return _fill(target, source, aug, rng), _blob(target.shape[-1], area, int(rng.integers(2, 8)), rng)


def crack(target: torch.Tensor, source: torch.Tensor, aug: Augmenter, rng: np.random.Generator,  # noqa: ARG001
          largest: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A thin curved crack or scratch, 1-3 pixels wide, darker or brighter than the surface (by a share of at
    least CRACK_CONTRAST_MIN of the way to black or white), along a smoothly turning random walk."""
    size = target.shape[-1]
    n = int(rng.integers(*CRACK_POINTS))
    turn = math.exp(rng.uniform(math.log(CRACK_TURN[0]), math.log(CRACK_TURN[1])))  # from straight to curly
    angle = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, turn, n))
    step = rng.uniform(0.3, 1.5)
    pts = rng.uniform(0, size, 2) + np.cumsum(step * np.stack([np.cos(angle), np.sin(angle)], 1), 0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d2 = np.full((size, size), np.inf, dtype=np.float32)
    for x, y in pts:
        d2 = np.minimum(d2, (xx - x) ** 2 + (yy - y) ** 2)
    profile = _soft_crack_profile(torch.from_numpy(d2), rng.uniform(0.5, 1.5), rng)
    if rng.random() < 0.7:  # most cracks are dark
        cracked = target * float(rng.uniform(0.0, 1.0 - CRACK_CONTRAST_MIN))
    else:
        cracked = target + (1 - target) * float(rng.uniform(CRACK_CONTRAST_MIN, 1.0))
    return target + profile * (cracked - target), (profile > 0).float()


def _soft_crack_profile(d2: torch.Tensor, width: float, rng: np.random.Generator) -> torch.Tensor:
    """How strongly each pixel shows a crack whose centre line lies at squared distance `d2`: an edge
    anti-aliased over one pixel, a strength that fades in and out along the crack, and half the time a
    slight blur, as a real crack looks once photographed and resized (not a hard-edged, uniform line)."""
    edge = (width + 0.5 - d2.sqrt()).clamp(0, 1)
    size = d2.shape[-1]
    along = (0.6 + 0.3 * smooth_noise(size, size, int(rng.integers(2, 6)), rng)).clamp(0.2, 1.0)
    profile = edge * along
    return box_blur(profile, 1) if rng.random() < 0.5 else profile


def grain_direction(image: torch.Tensor) -> float:
    """The angle (radians) along which a 3 x H x W image's texture runs: across its mean gradient's main
    direction (the structure tensor's), so along grinding streaks or brush marks."""
    grey = image.mean(dim=0)
    gx, gy = grey[:, 1:] - grey[:, :-1], grey[1:, :] - grey[:-1, :]
    jxx, jyy = float((gx**2).mean()), float((gy**2).mean())
    jxy = float((gx[1:, :] * gy[:, 1:]).mean())
    return 0.5 * math.atan2(2 * jxy, jxx - jyy) + math.pi / 2


def line_blur(image: torch.Tensor, angle: float, length: int) -> torch.Tensor:
    """A 3 x H x W image averaged along a line of `length` pixels at `angle` (a motion blur; edges reflected)."""
    t = np.arange(length) - (length - 1) / 2
    offsets = sorted({(round(v * math.sin(angle)), round(v * math.cos(angle))) for v in t})  # (dy, dx)
    r = (length + 1) // 2
    padded = F.pad(image[None], (r, r, r, r), mode="reflect")[0]
    h, w = image.shape[-2:]
    return sum(padded[:, r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in offsets) / len(offsets)


def streak(target: torch.Tensor, source: torch.Tensor, aug: Augmenter, rng: np.random.Generator,  # noqa: ARG001
           largest: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A region whose texture runs more strongly along one direction: ground deeper, brushed or smeared.

    The surface is averaged along a line (along its own grain, or at any angle for a share STREAK_ANY_ANGLE of
    them) and that streaked texture's contrast raised, as in the uneven grinding of a magnetic tile: streaks
    more directional than any normal part's, at the same brightness.
    """
    size = target.shape[-1]
    region = _blob(size, aug.region_area(rng, largest), int(rng.integers(2, 8)), rng)
    angle = float(rng.uniform(0, math.pi)) if rng.random() < STREAK_ANY_ANGLE else grain_direction(target)
    length = int(rng.integers(5, 16))
    streaked = line_blur(target, angle, length)
    local = box_blur(target, length // 2)
    gain = float(rng.uniform(2.0, 4.0))
    return (local + gain * (streaked - local)).clamp(0, 1), region


FAMILIES = {"paste": paste, "noise": noise_region, "crack": crack, "streak": streak}
AREA_FAMILIES = ("streak",)  # low-contrast changes of texture: many single pixels barely move
TEXTURE_FAMILIES = ("streak",)  # changes of the texture itself: visible once large against the surface's grain


def grain(image: torch.Tensor) -> float:
    """How much a 3 x H x W image in [0, 1] varies from pixel to pixel: the median of |x - its 5 px mean|."""
    return float((image - box_blur(image, 2)).abs().amax(dim=0).median())
