"""Synthetic anomalies made from normal images only.

The paper's hard augmentation (section 3.1, family ``paste``): an augmented copy of a normal image
(rotation, patch permutation, colour jitter, each with probability 0.5) is pasted into a random region
of a normal image; that region is the mask. Other families (``anomaly_families``) add defect-like
regions the paper does not have: noise-shaped foreign regions, thin cracks, large shading changes,
bands across the surface, regions whose texture runs more strongly along one direction.
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


def region_area(cfg: Config, rng: np.random.Generator, largest: float = 0.0) -> float:
    """A region's share of the image, log-uniform between region_min and `largest` (0: region_max)."""
    return math.exp(rng.uniform(math.log(cfg.region_min), math.log(largest or cfg.region_max)))


def paste(target: torch.Tensor, source: torch.Tensor, cfg: Config,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's hard augmentation: a region of the augmented `source` replaces the same region of `target`."""
    size = target.shape[-1]
    shape = cfg.region_shapes[int(rng.integers(len(cfg.region_shapes)))]
    area = region_area(cfg, rng)
    mask = torch.from_numpy(region_mask(size, shape, area, rng))
    src = augmented_copy(source, cfg, rng)
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


def _fill(target: torch.Tensor, source: torch.Tensor, cfg: Config, rng: np.random.Generator) -> torch.Tensor:
    """What a noise-shaped region shows: another image strongly jittered, a texture, or a brightness shift."""
    kind = int(rng.integers(3))
    if kind == 0:
        return color_jitter(augmented_copy(source, cfg, rng), max(cfg.jitter_strength, 0.8), rng)
    if kind == 1:
        return procedural_texture(target.shape[-1], rng)
    return (target + float(rng.choice([-1, 1]) * rng.uniform(0.15, 0.5))).clamp(0, 1)


def noise_region(target: torch.Tensor, source: torch.Tensor, cfg: Config,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An irregular noise-shaped region (DRAEM-like) of any size from region_min to region_max."""
    area = region_area(cfg, rng)
    return _fill(target, source, cfg, rng), _blob(target.shape[-1], area, int(rng.integers(2, 8)), rng)


CRACK_TURN = 0.25  # the most a crack turns from one point to the next (radians, standard deviation)


def crack(target: torch.Tensor, source: torch.Tensor, cfg: Config,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A thin curved crack or scratch, 1-3 pixels wide, darker or brighter than the surface (by a share of at
    least ``cfg.crack_contrast_min`` of the way to black or white), along a random walk of 20 to
    ``cfg.crack_points_max`` points that turns by ``cfg.crack_turn_min`` to 0.25 radians a point."""
    size = target.shape[-1]
    n = int(rng.integers(20, cfg.crack_points_max))
    turn = CRACK_TURN if cfg.crack_turn_min >= CRACK_TURN else \
        math.exp(rng.uniform(math.log(cfg.crack_turn_min), math.log(CRACK_TURN)))  # from straight to curly
    angle = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, turn, n))  # a smoothly turning random walk
    step = rng.uniform(0.3, 1.5)
    pts = rng.uniform(0, size, 2) + np.cumsum(step * np.stack([np.cos(angle), np.sin(angle)], 1), 0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d2 = np.full((size, size), np.inf, dtype=np.float32)
    for x, y in pts:
        d2 = np.minimum(d2, (xx - x) ** 2 + (yy - y) ** 2)
    width = rng.uniform(0.5, 1.5)
    if cfg.crack_soft:
        profile = _soft_crack_profile(torch.from_numpy(d2), width, rng)
        mask = (profile > 0).float()
    else:
        profile = mask = torch.from_numpy(d2 <= width**2).float()
    if rng.random() < 0.7:  # most cracks are dark
        cracked = target * float(rng.uniform(0.0, 1.0 - cfg.crack_contrast_min))
    else:
        cracked = target + (1 - target) * float(rng.uniform(cfg.crack_contrast_min, 1.0))
    return (target + profile * (cracked - target) if cfg.crack_soft else cracked), mask


def _soft_crack_profile(d2: torch.Tensor, width: float, rng: np.random.Generator) -> torch.Tensor:
    """How strongly each pixel shows a crack whose centre line lies at squared distance `d2`: an edge
    anti-aliased over one pixel, a strength that fades in and out along the crack, and half the time a
    slight blur, as a real crack looks once photographed and resized (not a hard-edged, uniform line)."""
    edge = (width + 0.5 - d2.sqrt()).clamp(0, 1)
    size = d2.shape[-1]
    along = (0.6 + 0.3 * smooth_noise(size, size, int(rng.integers(2, 6)), rng)).clamp(0.2, 1.0)
    profile = edge * along
    return box_blur(profile, 1) if rng.random() < 0.5 else profile


def shading(target: torch.Tensor, source: torch.Tensor, cfg: Config,  # noqa: ARG001
            rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A large, low-contrast change of shading (10-50% of the image) with soft edges, like uneven surfaces."""
    size = target.shape[-1]
    region = _blob(size, float(rng.uniform(0.1, 0.5)), int(rng.integers(1, 4)), rng)
    soft = box_blur(region, 4)
    shift = float(rng.choice([-1, 1]) * rng.uniform(0.08, 0.25))
    return (target + shift * soft).clamp(0, 1), (soft > 0.5).float()


def _band_mask(size: int, rng: np.random.Generator) -> torch.Tensor:
    """A band across the whole image (10-50% of it) with a slightly wavy border, at an edge or inside."""
    across = torch.arange(size, dtype=torch.float32)[:, None].expand(size, size)  # distance along the band's normal
    thick = float(rng.uniform(0.1, 0.5)) * size
    wave = smooth_noise(1, size, int(rng.integers(2, 6)), rng)[0] * float(rng.uniform(0.0, 0.015)) * size
    at_edge = rng.random() < 0.5  # half of the bands start at the image's border
    start = 0.0 if at_edge else float(rng.uniform(0, size - thick))
    inside = across < start + thick + wave
    mask = (inside if at_edge else inside & (across >= start + wave)).float()
    mask = torch.flip(mask, (0,)) if rng.random() < 0.5 else mask
    return mask.T.contiguous() if rng.random() < 0.5 else mask


def band(target: torch.Tensor, source: torch.Tensor, cfg: Config,
         rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A band across the image where the surface differs: another part's texture, restretched or re-lit.

    Like uneven grinding, a coating stripe or a worn edge: large, straight-bordered, low in contrast.
    """
    size = target.shape[-1]
    mask = _band_mask(size, rng)
    kind = int(rng.integers(3))
    if kind == 0:  # another normal image in the same orientation, lightly jittered
        fill = color_jitter(source, cfg.jitter_strength / 2, rng)
    elif kind == 1:  # the same surface, its texture stretched along one axis
        factor = float(rng.uniform(1.5, 3.0))
        dims = (size, int(size * factor)) if rng.random() < 0.5 else (int(size * factor), size)
        fill = F.interpolate(target[None], size=dims, mode="bilinear", align_corners=False)[0, :, :size, :size]
    else:  # the same surface with its brightness and contrast changed
        mean = target.mean()
        fill = ((target - mean) * float(rng.uniform(0.5, 1.8)) + mean * float(rng.uniform(0.75, 1.3))).clamp(0, 1)
    return fill, mask


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


def streak(target: torch.Tensor, source: torch.Tensor, cfg: Config,  # noqa: ARG001
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A region whose texture runs more strongly along one direction: ground deeper, brushed or smeared.

    The surface is averaged along a line (along its own grain for a share ``cfg.streak_own_grain`` of
    them, else at any angle) and that streaked texture's contrast raised. Real `uneven` grinding (magnetic
    tile) is such a region: its streaks are more directional than any normal tile's, at the same brightness,
    over a band across the whole tile; a share ``cfg.streak_band`` of the regions are such bands.
    """
    size = target.shape[-1]
    if cfg.streak_band and rng.random() < cfg.streak_band:  # at 0 nothing is drawn: earlier runs stay as they were
        region = _band_mask(size, rng)
    else:
        region = _blob(size, region_area(cfg, rng, cfg.streak_region_max), int(rng.integers(2, 8)), rng)
    angle = grain_direction(target) if rng.random() < cfg.streak_own_grain else float(rng.uniform(0, math.pi))
    length = int(rng.integers(5, 16))
    streaked = line_blur(target, angle, length)
    local = box_blur(target, length // 2)
    gain = float(rng.uniform(2.0, 4.0))
    return (local + gain * (streaked - local)).clamp(0, 1), region


FAMILIES = {"paste": paste, "noise": noise_region, "crack": crack, "shading": shading, "band": band,
            "streak": streak}
AREA_FAMILIES = ("band", "streak")  # low-contrast changes of texture: many single pixels barely move
# changes of the texture itself: visible once they are large against the surface's own grain, however faint
TEXTURE_FAMILIES = ("streak",)
FEATHERED_FAMILIES = ("paste", "noise")  # cracks are too thin to soften; shading and band have soft edges already


def feather(mask: torch.Tensor, max_width: int, rng: np.random.Generator) -> torch.Tensor:
    """The region's mask with its edge softened over a width drawn from [0, max_width] pixels (a box blur).

    A sharp seam is a cue no real defect has; softened, the map must learn the region's content instead.
    """
    radius = int(rng.integers(max_width + 1)) // 2
    if radius == 0:
        return mask
    return box_blur(mask, radius)


def grain(image: torch.Tensor) -> float:
    """How much a 3 x H x W image in [0, 1] varies from pixel to pixel: the median of |x - its 5 px mean|."""
    return float((image - box_blur(image, 2)).abs().amax(dim=0).median())


def min_visible_change(target: torch.Tensor, cfg: Config, family: str = "") -> float:
    """The least change of a pixel that the mask calls a defect.

    ``mask_min_diff`` everywhere; with ``mask_texture_factor`` also that many times the target's own
    grain, so a change no larger than the surface's normal pixel-to-pixel variation is not called a defect
    on a grainy surface, while a smooth one keeps the fixed floor. The change of a `family` in AREA_FAMILIES
    is averaged over a neighbourhood, which evens out the grain already, so it keeps the fixed floor too. A
    change of the texture itself (TEXTURE_FAMILIES) counts from half the grain: on a faint texture, made
    stronger or streakier, no pixel moves far, yet the region looks different.
    """
    if family in TEXTURE_FAMILIES:
        return max(cfg.mask_min_diff / 4, grain(target) / 2)
    if cfg.mask_texture_factor <= 0 or family in AREA_FAMILIES:
        return cfg.mask_min_diff
    return max(cfg.mask_min_diff, cfg.mask_texture_factor * grain(target))


def synthesize(target: torch.Tensor, source: torch.Tensor, cfg: Config,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic anomaly in `target` (3 x H x W in [0, 1]) of a family drawn from ``cfg.anomaly_families``.

    Returns the new image and its mask (1 x H x W, 1 = defect). The family gives a region and what
    it shows; that is blended in with an opacity drawn from [opacity_min, 1]. Pixels the blend left
    (almost) unchanged are not marked, so the mask never claims a defect that cannot be seen.
    """
    families = cfg.anomaly_families
    # one family draws nothing (nor does an opacity of 1): the paper's recipe keeps its random stream
    family = families[int(rng.integers(len(families)))] if len(families) > 1 else families[0]
    src, region = FAMILIES[family](target, source, cfg, rng)  # every family's region is 0 / 1
    feathered = cfg.edge_feather and family in FEATHERED_FAMILIES
    alpha = feather(region, cfg.edge_feather, rng) if feathered else region
    opacity = 1.0 if cfg.opacity_min >= 1.0 else float(rng.uniform(cfg.opacity_min, 1.0))
    out = target + opacity * alpha[None] * (src - target)
    change = (out - target).abs().amax(dim=0)
    if family in AREA_FAMILIES:  # a large region counts where it changed on average, not pixel by pixel
        change = box_blur(change, 4)
    changed = change > min_visible_change(target, cfg, family)
    return out, ((alpha >= 0.5) & changed).float()[None]  # a soft edge counts where it is at least half in


def make_batch(images: torch.Tensor, cfg: Config, rng: np.random.Generator,
               coarse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a batch of normal images (B x 3 x H x W in [0, 1]) into a mix of normal and synthetic anomalies.

    Each image becomes a synthetic anomaly with probability ``cfg.anomaly_ratio``; normal images
    keep an all-normal mask. Where `coarse` marks a crop from the coarser of two scales, its regions
    span up to ``coarse_region_max``. Returns (images, masks).
    """
    b = images.shape[0]
    out = images.clone()
    masks = torch.zeros(b, 1, *images.shape[-2:])
    some_coarse = coarse is not None and bool(coarse.any())  # the detector's batches and square images have none
    coarse_cfg = cfg.replace(region_max=cfg.coarse_region_max) if cfg.coarse_region_max and some_coarse else cfg
    for i in range(b):
        if rng.random() < cfg.anomaly_ratio:
            j = int(rng.integers(b))
            own = coarse_cfg if coarse is not None and bool(coarse[i]) else cfg
            out[i], masks[i] = synthesize(images[i], images[j], own, rng)
    return out, masks
