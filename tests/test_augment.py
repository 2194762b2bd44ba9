"""Hard augmentation and coordinate channels."""

import math

import numpy as np
import torch

from anoseg import profile_config
from anoseg.augment import (
    CRACK_CONTRAST_MIN,
    Augmenter,
    color_jitter,
    grain,
    grain_direction,
    line_blur,
    permute_patches,
    region_mask,
)
from anoseg.models import coord_channels


def synthesize(target, source, cfg, rng):
    return Augmenter.from_config(cfg).synthesize(target, source, rng)


def make_batch(images, cfg, rng, coarse=None):
    return Augmenter.from_config(cfg)(images, rng, coarse)


def min_visible_change(target, cfg, family=""):
    return Augmenter.from_config(cfg).min_visible_change(target, family)


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_permutation_keeps_the_pixels():
    img = _images(1)[0]
    out = permute_patches(img, 4, np.random.default_rng(1))
    assert not torch.equal(out, img)
    assert torch.equal(out.flatten().sort().values, img.flatten().sort().values)


def test_jitter_stays_in_range():
    out = color_jitter(_images(1)[0], 0.8, np.random.default_rng(0))
    assert out.min() >= 0 and out.max() <= 1


def test_region_area_close_to_target():
    rng = np.random.default_rng(0)
    for shape in ("rect", "ellipse", "scar"):
        areas = [region_mask(128, shape, 0.02, rng).mean() for _ in range(20)]
        # a region partly outside the image may be cut; never larger than asked (+ rounding)
        assert max(areas) <= 0.03
        assert np.median(areas) >= 0.01 and min(areas) > 0  # most lie inside: about the area asked for


def test_mask_marks_exactly_the_changed_pixels():
    cfg = profile_config("tiny", anomaly_families=("paste",), region_min=0.05, region_max=0.1, mask_texture_factor=0.0)
    imgs = _images()
    out, mask = synthesize(imgs[0], imgs[1], cfg, np.random.default_rng(3))
    changed = (out - imgs[0]).abs().amax(0) > cfg.mask_min_diff
    assert mask.shape == (1, 32, 32)
    assert torch.equal(mask[0].bool(), changed)
    assert mask.sum() > 0


def test_grain_measures_pixel_to_pixel_variation():
    flat = torch.full((3, 32, 32), 0.4)
    smooth = torch.linspace(0, 1, 32).expand(3, 32, 32).clone()  # a gentle ramp: next to no grain
    noisy = flat + 0.1 * (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5)
    assert grain(flat) < 1e-6 and grain(smooth) < 0.002
    assert 0.01 < grain(noisy) < 0.05  # about the noise's own size (uniform in +-0.05)


def test_texture_factor_raises_the_least_change_on_grainy_images_only():
    grainy = _images(1, size=64)[0]  # uniform noise: grain about 0.25
    flat = torch.full((3, 64, 64), 0.5)
    off, on = profile_config("tiny", mask_texture_factor=0.0), profile_config("tiny", mask_texture_factor=0.5)
    assert min_visible_change(grainy, off) == off.mask_min_diff
    assert min_visible_change(flat, on) == on.mask_min_diff  # the floor stays on smooth surfaces
    assert min_visible_change(grainy, on) == 0.5 * grain(grainy) > 0.1
    assert min_visible_change(grainy, on, family="streak") == 0.5 * grain(grainy)  # a texture change: half the grain


def test_texture_factor_leaves_small_changes_unmarked():
    cfg = profile_config("tiny", anomaly_families=("noise",), opacity_min=0.2, region_min=0.1, region_max=0.2,
                         mask_texture_factor=0.5)
    imgs = _images(2, size=64, seed=4)
    least = min_visible_change(imgs[0], cfg)
    seen = 0
    for seed in range(6):
        out, mask = synthesize(imgs[0], imgs[1], cfg, np.random.default_rng(seed))
        change = (out - imgs[0]).abs().amax(0)
        assert torch.equal(mask[0].bool(), change > least)
        seen += int(((change > cfg.mask_min_diff) & (change <= least)).any())  # left out by the factor alone
        plain, plain_mask = synthesize(imgs[0], imgs[1], cfg.replace(mask_texture_factor=0.0),
                                       np.random.default_rng(seed))
        assert torch.equal(plain, out) and (plain_mask >= mask).all()  # the same image, a subset of its mask
    assert seen >= 3


def test_batch_ratio_and_normal_masks():
    cfg = profile_config("tiny", anomaly_ratio=0.0)
    imgs = _images(8)
    out, masks = make_batch(imgs, cfg, np.random.default_rng(0))
    assert torch.equal(out, imgs) and masks.sum() == 0
    cfg = profile_config("tiny", anomaly_ratio=1.0, mask_texture_factor=0.0)  # noise images: all grain
    out, masks = make_batch(imgs, cfg, np.random.default_rng(0))
    assert (masks.flatten(1).sum(1) > 0).all()


def test_coarse_crops_get_regions_up_to_coarse_region_max():
    cfg = profile_config("fast", anomaly_ratio=1.0, anomaly_families=("noise",), region_max=0.02, opacity_min=1.0,
                         mask_texture_factor=0.0, coarse_region_max=0.5)
    imgs = _images(16, size=64)
    fine, fine_masks = make_batch(imgs, cfg, np.random.default_rng(0), torch.zeros(16, dtype=torch.bool))
    plain, plain_masks = make_batch(imgs, cfg, np.random.default_rng(0))
    assert torch.equal(fine, plain) and torch.equal(fine_masks, plain_masks)  # fine crops: as with one scale
    assert fine_masks.mean((1, 2, 3)).max() <= 0.03
    coarse = torch.arange(16) % 2 == 0
    _, masks = make_batch(imgs, cfg, np.random.default_rng(0), coarse)
    areas = masks.mean((1, 2, 3))
    assert areas[~coarse].max() <= 0.03 and areas[coarse].max() > 0.1


def test_examples_grid_outlines_the_synthetic_regions(tmp_path):
    from PIL import Image

    from anoseg.visualize import OUTLINE_RGB, synthetic_examples_grid

    images = _images(4, size=32).numpy()
    masks = np.zeros((4, 1, 32, 32), dtype=np.float32)
    masks[1, 0, 8:20, 8:20] = 1
    synthetic_examples_grid(tmp_path / "grid.png", images, masks)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert (grid == OUTLINE_RGB).all(-1).sum() >= 4 * 11  # the square's outline, once


def test_same_seed_same_batch():
    cfg = profile_config("tiny")
    a = make_batch(_images(), cfg, np.random.default_rng([5, 1]))
    b = make_batch(_images(), cfg, np.random.default_rng([5, 1]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_coord_channels():
    x = coord_channels(torch.zeros(2, 3, 4, 6))
    assert x.shape == (2, 5, 4, 6)
    xs, ys = x[0, 3], x[0, 4]
    assert xs[0, 0] == -1 and xs[0, -1] == 1 and torch.all(xs[0] == xs[-1])
    assert ys[0, 0] == -1 and ys[-1, 0] == 1 and torch.all(ys[:, 0] == ys[:, -1])


def test_every_family_marks_a_visible_region():
    for family in ("paste", "noise", "crack"):
        cfg = profile_config("tiny", anomaly_families=(family,), region_min=0.05, region_max=0.1,
                             mask_texture_factor=0.0)
        imgs = _images(2, size=64, seed=1) * 0.5 + 0.25  # mid-grey: every family can change it visibly
        hits = 0
        for seed in range(5):
            out, mask = synthesize(imgs[0], imgs[1], cfg, np.random.default_rng(seed))
            changed = (out - imgs[0]).abs().amax(0) > cfg.mask_min_diff
            assert torch.equal(mask[0].bool(), changed), family  # marked = visibly changed, nothing else
            assert out.min() >= 0 and out.max() <= 1
            hits += int(mask.sum() > 0)
        assert hits >= 4, f"{family}: too many empty masks"


def test_family_sizes_span_thin_to_large():
    size, rng = 128, np.random.default_rng(0)
    flat = torch.full((3, size, size), 0.5)
    cfg = profile_config("fast", opacity_min=1.0)

    def mean_area(family, **change):
        c = cfg.replace(anomaly_families=(family,), **change)
        return np.mean([synthesize(flat, flat, c, rng)[1].mean().item() for _ in range(8)])

    assert 0 < mean_area("crack") < 0.02  # thin lines, with their anti-aliased rims
    assert mean_area("noise", region_min=0.1) > 0.08  # large regions


def test_cracks_fade_softly_are_mostly_dark_and_are_marked_where_visible():
    flat = torch.full((3, 64, 64), 0.5)
    cfg = profile_config("fast", anomaly_families=("crack",), opacity_min=1.0)
    rng, levels, dark = np.random.default_rng(1), [], []
    for _ in range(20):
        img, mask = synthesize(flat, flat, cfg, rng)
        change = (img - flat)[0]
        assert torch.equal(mask[0] > 0, change.abs() > cfg.mask_min_diff)  # marked exactly where it visibly changed
        if mask.sum() > 0:
            levels.append(len(torch.unique(change[mask[0] > 0])))
            strongest = change.flatten()[change.abs().argmax()]
            dark.append(bool(strongest < 0))
            assert abs(float(strongest)) <= 0.5 + 1e-6  # never past black or white
    assert min(levels) > 5  # an anti-aliased edge and a strength that fades along the crack
    assert 0.5 < np.mean(dark) < 1.0  # most cracks are dark, some bright
    assert 0 < CRACK_CONTRAST_MIN < 1


def test_opacity_blends_the_region():
    cfg = profile_config("tiny", anomaly_families=("noise",), opacity_min=0.3, mask_min_diff=0.0,
                         mask_texture_factor=0.0)
    imgs = _images(2, size=64)
    out, mask = synthesize(imgs[0], imgs[1], cfg, np.random.default_rng(2))
    inside = mask[0].bool()
    assert inside.any() and torch.equal(out[:, ~inside], imgs[0][:, ~inside])


def test_paper_profile_keeps_the_papers_augmentation():
    cfg = profile_config("paper")
    assert cfg.anomaly_families == ("paste",) and cfg.opacity_min == 1.0 and cfg.resize_mode == "square"
    assert cfg.mask_texture_factor == 0.0 < profile_config("fast").mask_texture_factor  # the grain rule is ours
    assert set(profile_config("fast").anomaly_families) == {"paste", "noise", "crack", "streak"}


def _streaked(size=64, seed=0):
    """Vertical grinding streaks: each column its own brightness, with faint noise along them."""
    g = torch.Generator().manual_seed(seed)
    columns = 0.5 + 0.05 * torch.randn(1, 1, size, generator=g)
    return (columns + 0.01 * torch.randn(1, size, size, generator=g)).expand(3, size, size).clamp(0, 1).contiguous()


def _directionality(img, sel):
    """mean |d/dx| over mean |d/dy| inside `sel`: above 1 for vertical streaks."""
    grey = img.mean(0)
    dx = (grey[:, 1:] - grey[:, :-1]).abs()[sel[:, 1:]].mean()
    dy = (grey[1:] - grey[:-1]).abs()[sel[1:]].mean()
    return float(dx / dy)


def test_line_blur_smooths_along_its_line_only():
    img = _streaked()
    along, across = line_blur(img, math.pi / 2, 9), line_blur(img, 0.0, 9)
    flat = torch.full((3, 16, 16), 0.3)
    assert torch.allclose(line_blur(flat, 1.0, 7), flat)
    assert along.shape == img.shape
    everywhere = torch.ones(64, 64, dtype=torch.bool)
    assert _directionality(along, everywhere) > 2 * _directionality(img, everywhere)
    assert (across[:, :, 10:-10].std(dim=2).mean() < 0.5 * img[:, :, 10:-10].std(dim=2).mean())  # columns evened out


def test_grain_direction_runs_along_the_streaks():
    assert abs(math.sin(grain_direction(_streaked()) - math.pi / 2)) < 0.1
    assert abs(math.sin(grain_direction(_streaked().transpose(1, 2))) - 0.0) < 0.1


def test_streak_family_makes_its_region_streakier_and_marks_it():
    cfg = profile_config("fast", anomaly_families=("streak",), opacity_min=1.0, region_min=0.1, region_max=0.2)
    img = _streaked()
    for seed in range(6):  # every streak runs along the surface's own grain: the streaks grow each time
        out, mask = synthesize(img, img, cfg, np.random.default_rng(seed))
        m = mask[0].bool()
        assert out.min() >= 0 and out.max() <= 1 and mask.shape == (1, 64, 64)
        assert 0 < m.float().mean() < 0.5  # a region, not the whole image
        change = (out - img).abs().amax(0)
        assert change[~m].mean() < 0.5 * change[m].mean()  # the change lies in the marked region
        assert _directionality(out, m) > 1.2 * _directionality(img, m)


def test_streak_family_marks_nothing_on_a_flat_surface():
    cfg = profile_config("fast", anomaly_families=("streak",), opacity_min=1.0)
    flat = torch.full((3, 64, 64), 0.5)
    for seed in range(4):
        out, mask = synthesize(flat, flat, cfg, np.random.default_rng(seed))
        assert torch.allclose(out, flat) and mask.sum() == 0  # nothing to streak: no change, no label
