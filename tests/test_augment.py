"""Hard augmentation and coordinate channels."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anoseg import profile_config
from anoseg.augment import (
    color_jitter,
    grain,
    grain_direction,
    line_blur,
    make_batch,
    min_visible_change,
    permute_patches,
    region_mask,
    synthesize,
)
from anoseg.config import Config
from anoseg.errors import ConfigError
from anoseg.models import coord_channels


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
    cfg = profile_config("tiny", region_min=0.05, region_max=0.1)
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
    off, on = profile_config("tiny"), profile_config("tiny", mask_texture_factor=0.5)
    assert min_visible_change(grainy, off) == off.mask_min_diff
    assert min_visible_change(flat, on) == on.mask_min_diff  # the floor stays on smooth surfaces
    assert min_visible_change(grainy, on) == 0.5 * grain(grainy) > 0.1
    assert min_visible_change(grainy, on, family="band") == on.mask_min_diff  # averaging evened out the grain


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


def test_texture_factor_is_checked_and_older_configs_load_without_it():
    with pytest.raises(ConfigError, match="mask_texture_factor=-1.0: must not be negative"):
        profile_config("fast", mask_texture_factor=-1.0)
    with pytest.raises(ConfigError, match=r"mask_min_diff=1.0: must lie in \[0, 1\) \(pixels lie in"):
        profile_config("fast", mask_min_diff=1.0)
    saved = {k: v for k, v in profile_config("fast").to_dict().items() if k != "mask_texture_factor"}
    assert Config.from_dict(saved).mask_texture_factor == 0.0


def test_batch_ratio_and_normal_masks():
    cfg = profile_config("tiny", anomaly_ratio=0.0)
    imgs = _images(8)
    out, masks = make_batch(imgs, cfg, np.random.default_rng(0))
    assert torch.equal(out, imgs) and masks.sum() == 0
    cfg = profile_config("tiny", anomaly_ratio=1.0)
    out, masks = make_batch(imgs, cfg, np.random.default_rng(0))
    assert (masks.flatten(1).sum(1) > 0).all()


def test_coarse_crops_get_regions_up_to_coarse_region_max():
    cfg = profile_config("fast", anomaly_ratio=1.0, anomaly_families=("noise",), region_max=0.02, opacity_min=1.0,
                         mask_texture_factor=0.0, coarse_region_max=0.5)
    imgs = _images(16, size=64)
    fine, fine_masks = make_batch(imgs, cfg, np.random.default_rng(0), torch.zeros(16, dtype=torch.bool))
    plain, plain_masks = make_batch(imgs, cfg.replace(coarse_region_max=0.0), np.random.default_rng(0))
    assert torch.equal(fine, plain) and torch.equal(fine_masks, plain_masks)  # fine crops: the same draws as before
    assert fine_masks.mean((1, 2, 3)).max() <= 0.03
    coarse = torch.arange(16) % 2 == 0
    _, masks = make_batch(imgs, cfg, np.random.default_rng(0), coarse)
    areas = masks.mean((1, 2, 3))
    assert areas[~coarse].max() <= 0.03 and areas[coarse].max() > 0.1


def test_examples_grid_draws_coarse_crops_as_training_does(tmp_path):
    from PIL import Image

    from anoseg.visualize import OUTLINE_RGB, synthetic_examples_grid

    cfg = profile_config("fast", anomaly_ratio=1.0, anomaly_families=("noise",), region_max=0.02, opacity_min=1.0,
                         mask_texture_factor=0.0, coarse_region_max=0.5)
    images = (_images(4, size=64).numpy() * 255).astype(np.uint8)
    grids = {}
    for flag in (False, True):
        synthetic_examples_grid(tmp_path / f"{flag}.png", images, cfg, 4, 0, np.full(4, flag))
        grids[flag] = np.asarray(Image.open(tmp_path / f"{flag}.png"))
    outlined = {flag: int((grid == OUTLINE_RGB).all(-1).sum()) for flag, grid in grids.items()}
    assert outlined[True] > outlined[False] > 0  # larger regions, longer outlines


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
    for family in ("paste", "noise", "crack", "shading"):
        cfg = profile_config("tiny", anomaly_families=(family,), region_min=0.05, region_max=0.1)
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

    assert 0 < mean_area("crack", crack_soft=False) < 0.01  # thin lines
    assert 0 < mean_area("crack") < 0.02  # soft cracks (fast's) are thin too, and also mark their anti-aliased rims
    assert mean_area("shading") > 0.08  # large diffuse regions


def test_crack_contrast_min_bounds_how_far_a_crack_moves_the_surface():
    flat = torch.full((3, 64, 64), 0.5)

    def contrasts(c_min):
        cfg = profile_config("fast", anomaly_families=("crack",), opacity_min=1.0, crack_contrast_min=c_min,
                             crack_soft=False)  # one strength along the crack: the contrast drawn
        rng, out = np.random.default_rng(0), []
        for _ in range(40):
            img, mask = synthesize(flat, flat, cfg, rng)
            moved = (img - flat)[0][mask[0] > 0]  # the share of the way to black (negative) or to white
            if len(moved):  # else a crack that left the image at once
                out.append(float(moved[0] / 0.5))
        return np.array(out)

    default, faint, full = contrasts(0.4), contrasts(0.15), contrasts(1.0)
    assert np.abs(default).min() >= 0.4 - 1e-6 and np.abs(faint).min() >= 0.15 - 1e-6
    assert np.abs(faint).min() < 0.4  # faint cracks are drawn too
    assert np.allclose(np.abs(full), 1.0)  # at 1 every crack is black or white
    assert (default < 0).mean() > 0.5  # most cracks are dark


def test_crack_settings_reach_longer_and_straighter_cracks():
    flat = torch.full((3, 128, 128), 0.5)

    def shapes(**change):
        cfg = profile_config("fast", anomaly_families=("crack",), opacity_min=1.0, crack_soft=False, **change)
        rng, areas, elongations = np.random.default_rng(0), [], []
        for _ in range(60):
            mask = synthesize(flat, flat, cfg, rng)[1][0]
            yx = torch.nonzero(mask).float()
            if len(yx) < 10:  # a crack that left the image at once
                continue
            eig = torch.linalg.eigvalsh(torch.cov(yx.T))  # spread along and across the crack
            areas.append(len(yx))
            elongations.append(float(eig[1] / eig[0].clamp_min(1e-3)))
        return np.median(areas), np.median(elongations)

    area, elongation = shapes(crack_points_max=80, crack_turn_min=0.25)  # short and curly (before session 18)
    long_area, _ = shapes(crack_points_max=240, crack_turn_min=0.25)
    _, straight = shapes(crack_points_max=80, crack_turn_min=0.02)
    assert long_area > 1.5 * area
    assert straight > 2 * elongation


def test_soft_cracks_fade_at_their_edges_and_along_and_are_marked_where_visible():
    flat = torch.full((3, 64, 64), 0.5)
    hard_cfg = profile_config("fast", anomaly_families=("crack",), opacity_min=1.0, crack_soft=False)
    soft_cfg = hard_cfg.replace(crack_soft=True)
    levels = {}
    for name, cfg in (("hard", hard_cfg), ("soft", soft_cfg)):
        rng, counts = np.random.default_rng(1), []
        for _ in range(10):
            img, mask = synthesize(flat, flat, cfg, rng)
            change = (img - flat).abs()[0]
            assert torch.equal(mask[0] > 0, change > cfg.mask_min_diff)  # marked exactly where it visibly changed
            if mask.sum() > 0:
                counts.append(len(torch.unique(change[mask[0] > 0])))
        levels[name] = counts
    assert max(levels["hard"]) == 1  # a hard crack moves every pixel it covers by the same amount
    assert min(levels["soft"]) > 5  # a soft one by many different amounts


def test_band_spans_the_image_with_one_solid_region():
    cfg = profile_config("fast", anomaly_families=("band",), opacity_min=1.0)
    imgs = _images(2, size=64, seed=3) * 0.5 + 0.25
    rng, spans = np.random.default_rng(0), 0
    for _ in range(10):
        out, mask = synthesize(imgs[0], imgs[1], cfg, rng)
        m = mask[0].bool()
        if not m.any():
            continue
        spans += int(m.any(0).all() or m.any(1).all())  # it reaches from one side of the image to the other
        assert 0.03 < m.float().mean() < 0.7
        local = F.avg_pool2d((out - imgs[0]).abs().amax(0)[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
        near = F.max_pool2d(m.float()[None, None], 9, 1, 4)[0, 0].bool()
        assert (local[m] > cfg.mask_min_diff).all()  # marked = changed on average nearby ...
        assert (local[~near] <= cfg.mask_min_diff).all()  # ... and what changed visibly is marked
    assert spans >= 7


def test_opacity_blends_the_region():
    cfg = profile_config("tiny", anomaly_families=("noise",), opacity_min=0.3, mask_min_diff=0.0)
    imgs = _images(2, size=64)
    out, mask = synthesize(imgs[0], imgs[1], cfg, np.random.default_rng(2))
    inside = mask[0].bool()
    assert inside.any() and torch.equal(out[:, ~inside], imgs[0][:, ~inside])


def test_paper_profile_keeps_the_papers_augmentation():
    cfg = profile_config("paper")
    assert cfg.anomaly_families == ("paste",) and cfg.opacity_min == 1.0 and cfg.resize_mode == "square"
    assert cfg.mask_texture_factor == 0.0 < profile_config("fast").mask_texture_factor  # the grain rule is ours
    assert set(profile_config("fast").anomaly_families) == {"paste", "noise", "crack", "streak"}


def test_fast_profile_draws_soft_cracks_and_older_configs_keep_hard_ones():
    assert profile_config("fast").crack_soft and not profile_config("tiny").crack_soft
    saved = {k: v for k, v in profile_config("fast").to_dict().items() if k != "crack_soft"}
    assert Config.from_dict(saved).crack_soft is False  # a model saved before the twentieth session resumes as trained


def test_feathered_edges_blend_softly_and_label_the_inner_half():
    target, source = torch.zeros(3, 64, 64), torch.ones(3, 64, 64)
    sharp = profile_config("tiny", anomaly_families=("paste",), p_rotate=0.0, p_permute=0.0, p_jitter=0.0,
                           region_min=0.1, region_max=0.2)
    out, mask = synthesize(target, source, sharp, np.random.default_rng(0))
    assert set(out.unique().tolist()) == {0.0, 1.0}  # without feathering: a sharp seam
    soft = sharp.replace(edge_feather=12)
    partial = 0
    for seed in range(6):
        out, mask = synthesize(target, source, soft, np.random.default_rng(seed))
        alpha = out[0]  # with target 0 and source 1, the image is the blend's alpha
        partial += int(((alpha > 0) & (alpha < 1)).sum())
        assert torch.equal(mask[0].bool(), alpha >= 0.5) and mask.sum() > 0
    assert partial > 0  # most draws soften the edge (a width of 0 or 1 keeps it sharp)
    crack = sharp.replace(anomaly_families=("crack",), edge_feather=12)
    assert torch.equal(synthesize(target + 0.5, source, crack, np.random.default_rng(3))[1],
                       synthesize(target + 0.5, source, crack.replace(edge_feather=0), np.random.default_rng(3))[1])


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
    cfg = profile_config("fast", anomaly_families=("streak",), opacity_min=1.0, region_min=0.1, region_max=0.2,
                         streak_own_grain=0.5)
    img = _streaked()
    raised = 0
    for seed in range(8):
        out, mask = synthesize(img, img, cfg, np.random.default_rng(seed))
        m = mask[0].bool()
        assert out.min() >= 0 and out.max() <= 1 and mask.shape == (1, 64, 64)
        assert 0 < m.float().mean() < 0.5  # a region, not the whole image
        change = (out - img).abs().amax(0)
        assert change[~m].mean() < 0.5 * change[m].mean()  # the change lies in the marked region
        raised += _directionality(out, m) > _directionality(img, m) * 1.2
    assert raised >= 3  # about half the draws follow the surface's own grain, so its streaks grow
    along = cfg.replace(streak_own_grain=1.0)
    for seed in range(4):  # every draw along the grain: the streaks grow each time
        out, mask = synthesize(img, img, along, np.random.default_rng(seed))
        assert _directionality(out, mask[0].bool()) > 1.2 * _directionality(img, mask[0].bool())


def _spans_the_image(mask):
    """True where a mask is a band across the image: every row, or every column, holds a marked pixel."""
    return bool(mask.any(dim=1).all()) or bool(mask.any(dim=0).all())


def test_streak_bands_cross_the_whole_image_and_leave_the_default_draws_alone():
    cfg = profile_config("fast", anomaly_families=("streak",), opacity_min=1.0, region_min=0.01, region_max=0.05,
                         streak_region_max=0.0)
    img = _streaked()
    bands = cfg.replace(streak_band=1.0)
    for seed in range(6):
        out, mask = synthesize(img, img, bands, np.random.default_rng(seed))
        m = mask[0].bool()
        assert _spans_the_image(m) and 0.05 < m.float().mean() < 0.6  # a band, 10-50% of the image
        assert _directionality(out, m) > 1.2 * _directionality(img, m)
    # blobs of at most 5% never span the image; streak_band 0 draws exactly what the setting's absence drew
    assert not any(_spans_the_image(synthesize(img, img, cfg, np.random.default_rng(s))[1][0].bool())
                   for s in range(6))
    half = [_spans_the_image(synthesize(img, img, cfg.replace(streak_band=0.5), np.random.default_rng(s))[1][0].bool())
            for s in range(40)]
    assert 8 <= sum(half) <= 32
    with pytest.raises(ConfigError, match="streak_band"):
        cfg.replace(streak_band=1.5)


def test_streak_region_max_widens_streak_blobs_alone():
    cfg = profile_config("fast", anomaly_families=("streak",), opacity_min=1.0, region_min=0.01, region_max=0.05,
                         streak_own_grain=1.0, streak_region_max=0.0)
    img = _streaked()

    def areas(c):
        return [float(synthesize(img, img, c, np.random.default_rng(s))[1].mean()) for s in range(12)]

    wide = cfg.replace(streak_region_max=0.5)
    narrow_areas, wide_areas = areas(cfg), areas(wide)
    assert max(narrow_areas) < 0.08  # blobs of at most 5% (the mask may lose a few unchanged pixels, never gain)
    assert max(wide_areas) > 0.15 and np.median(wide_areas) > np.median(narrow_areas)
    assert areas(cfg.replace(streak_region_max=0.05)) == narrow_areas  # the same draws: 0 means region_max
    pastes = [float(synthesize(img, img, c.replace(anomaly_families=("paste",)), np.random.default_rng(s))[1].sum())
              for c in (cfg, wide) for s in range(4)]
    assert pastes[:4] == pastes[4:]  # other families keep region_max
    with pytest.raises(ConfigError, match="streak_region_max"):
        cfg.replace(streak_region_max=1.0)
    with pytest.raises(ConfigError, match="streak_region_max"):
        cfg.replace(streak_region_max=0.001)  # below region_min


def test_streak_family_marks_nothing_on_a_flat_surface():
    cfg = profile_config("fast", anomaly_families=("streak",), opacity_min=1.0)
    flat = torch.full((3, 64, 64), 0.5)
    for seed in range(4):
        out, mask = synthesize(flat, flat, cfg, np.random.default_rng(seed))
        assert torch.allclose(out, flat) and mask.sum() == 0  # nothing to streak: no change, no label
