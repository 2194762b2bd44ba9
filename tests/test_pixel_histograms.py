"""Streaming pixel metrics (fixed-size histograms) agree with the exact all-pixels computation."""

import numpy as np
import pytest

import anoseg
from anoseg import metrics
from anoseg.data import load_sample_mask, mvtec_test_samples
from anoseg.fileio import load_image
from anoseg.pixel_histograms import PixelHistograms

AGREEMENT = 1e-3  # issue 57: streaming and exact agree to 0.001 or better on every metric


def synthetic_set(seed: int, n_normal: int = 12, n_defect: int = 20, side: int = 96):
    """Maps like a model's: most pixels low, defects higher, some exact ties (0 and 1), two defect types."""
    rng = np.random.default_rng(seed)
    masks, maps, groups = [], [], []
    for i in range(n_normal + n_defect):
        m = np.zeros((side, side), bool)
        if i >= n_normal:
            for _ in range(rng.integers(1, 3)):
                y, x = rng.integers(0, side - 20, 2)
                m[y:y + rng.integers(1, 20), x:x + rng.integers(1, 20)] = True
        a = 1 / (1 + np.exp(-(rng.normal(-4, 1.2, (side, side)) + rng.uniform(2, 6) * m)))
        a[rng.random((side, side)) < 0.05] = 0.0
        a[:2, :2] = 1.0
        masks.append(m)
        maps.append(a.astype(np.float32))
        groups.append(None if i < n_normal else "cut" if i % 2 else "hole")
    return masks, maps, groups


def assert_agree(streamed: dict, exact: dict) -> None:
    assert set(exact) <= set(streamed)
    for k, v in exact.items():
        assert v is not None and streamed[k] is not None, k
        assert abs(streamed[k] - v) <= AGREEMENT, (k, streamed[k], v)


@pytest.mark.parametrize("seed", range(3))
def test_streaming_agrees_with_exact(seed):
    masks, maps, groups = synthetic_set(seed)
    cuts = [None if i % 3 == 0 else 0.3 + 0.1 * (i % 4) for i in range(len(maps))]  # some images unoutlined
    outlines = [None if t is None else a > t for a, t in zip(maps, cuts)]
    h = PixelHistograms(outlines=True)
    for g, m, a, t in zip(groups, masks, maps, outlines):
        h.add(g, a, m, t)
    normal = [g is None for g in groups]
    assert_agree(h.metrics(), metrics.exact_pixel_metrics(masks, maps, normal, outlines))
    for t in ("cut", "hole"):  # a defect type: its images and all normal ones
        idx = [i for i, g in enumerate(groups) if g in (None, t)]
        exact = metrics.exact_pixel_metrics([masks[i] for i in idx], [maps[i] for i in idx],
                                            [normal[i] for i in idx], [outlines[i] for i in idx])
        assert_agree(h.metrics([None, t]), exact)


def test_coarse_bins_disagree_so_the_check_can_fail():
    masks, maps, groups = synthetic_set(0)
    h = PixelHistograms(outlines=True, bins=16)
    for g, m, a in zip(groups, masks, maps):
        h.add(g, a, m, a > 0.4)
    exact = metrics.exact_pixel_metrics(masks, maps, [g is None for g in groups], [a > 0.4 for a in maps])
    with pytest.raises(AssertionError):
        assert_agree(h.metrics(), exact)


def test_outline_counts_are_exact_and_hand_checked():
    mask = np.array([[1, 1, 0, 0]], bool)
    amap = np.array([[0.9, 0.2, 0.8, 0.1]], np.float32)
    h = PixelHistograms(outlines=True)
    h.add("cut", amap, mask, amap > 0.5)
    m = h.metrics()
    # outline {0.9, 0.8}: tp 1, fp 1, fn 1
    assert m["iou"] == pytest.approx(1 / 3) and m["seg_f1"] == pytest.approx(0.5)
    assert m["seg_precision"] == pytest.approx(0.5) and m["seg_recall"] == pytest.approx(0.5)
    h.add("cut", amap, mask, None)  # an image without outline: its two defect pixels are missed
    m = h.metrics()
    assert m["seg_recall"] == pytest.approx(1 / 4) and m["seg_precision"] == pytest.approx(0.5)


def test_aupimo_hand_case():
    # normal image: 10^6 pixels at 0.1 and 5 pixels at 0.9: FPR 5e-6 at 0.9, so over 1e-5..1e-4 the threshold sits
    # just above 0.1; the defect image finds half its defect pixels (0.5 > 0.1) and misses half (0.05)
    normal = np.full((1000, 1000), 0.1, np.float32)
    normal[0, :5] = 0.9
    mask = np.zeros((10, 10), bool)
    mask[:2] = True
    amap = np.zeros((10, 10), np.float32)
    amap[0] = 0.5
    amap[1] = 0.05
    h = PixelHistograms()
    h.add(None, normal, np.zeros_like(normal, bool))
    h.add("cut", amap, mask)
    assert h.metrics()["aupimo"] == pytest.approx(0.5)
    exact = metrics.exact_pixel_metrics([normal, mask * 0.0, mask], [normal, amap * 0, amap], [True, True, False])
    assert exact["aupimo"] == pytest.approx(0.5)


def test_clear_errors():
    h = PixelHistograms()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        h.add(None, np.array([[1.5]]), np.zeros((1, 1), bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        h.add(None, np.array([[np.nan]]), np.zeros((1, 1), bool))
    with pytest.raises(ValueError, match="shape"):
        h.add(None, np.zeros((2, 2)), np.zeros((2, 3), bool))
    h.add(None, np.zeros((2, 2)), np.zeros((2, 2), bool))
    h.add("cut", np.zeros((2, 2)), np.eye(2, dtype=bool))
    with pytest.raises(RuntimeError, match="before"):
        h.add(None, np.zeros((2, 2)), np.zeros((2, 2), bool))


def test_model_maps_agree(tiny_model_dir, demo_root):
    """Maps of a trained model (the tiny test model on the demo data), streamed as evaluate does."""
    model = anoseg.load(tiny_model_dir)
    samples = sorted(mvtec_test_samples(demo_root), key=lambda s: s.label)
    images = [load_image(s.path) for s in samples]
    preds = model.maps_for_batch(images)
    maps = [p.anomaly_map for p in preds]
    masks = [load_sample_mask(s, im.shape[:2]) for s, im in zip(samples, images)]
    outlines = [p.outline(model.thresholds()) for p in preds]
    h = PixelHistograms(outlines=True)
    for s, a, m, t in zip(samples, maps, masks, outlines):
        h.add(None if s.label == 0 else s.defect_type, a, m, t)
    exact = metrics.exact_pixel_metrics(masks, maps, [s.label == 0 for s in samples], outlines)
    assert_agree(h.metrics(), exact)
    result = anoseg.evaluate(model, demo_root, None, progress=False)
    streamed = h.metrics()
    for k in exact:  # evaluate reports the streamed figures
        assert result["metrics"][k] == pytest.approx(streamed[k]), k


def brute_force_aupro(masks, maps, limit=0.3):
    """AUPRO as the official MVTec AD definition reads, one threshold at a time: at each distinct score t, the FPR
    over all normal pixels and the mean over 8-connected defect regions of their share of pixels >= t."""
    from scipy import ndimage

    normal = np.concatenate([a[~m] for a, m in zip(maps, masks)])
    owner = []  # (image, region mask) of every defect region
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        owner += [(i, lab == r) for r in range(1, n + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        fprs.append(float(np.mean(normal >= t)))
        pros.append(float(np.mean([np.mean(maps[i][region] >= t) for i, region in owner])))
    return metrics.trapezoid_to(np.array(fprs), np.array(pros), limit) / limit


@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_the_official_definition_computed_one_threshold_at_a_time(seed):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(4):
        m = np.zeros((24, 24), bool)
        m[rng.integers(0, 18):, rng.integers(0, 18):][:rng.integers(1, 6), :rng.integers(1, 6)] = True
        m[2, 2] = rng.random() < 0.5
        masks.append(m)
        maps.append(np.round(rng.random((24, 24)) * 0.6 + 0.4 * m, 2))  # rounding: ties, as real maps have
    reference = brute_force_aupro(masks, maps)
    h = PixelHistograms()
    for m, a in zip(masks, maps):
        h.add("cut", a, m)
    assert metrics.aupro(masks, maps) == pytest.approx(reference, abs=1e-9)
    assert h.metrics()["aupro"] == pytest.approx(reference, abs=AGREEMENT)
