"""Metrics against hand-computed cases and scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from anoseg import metrics


def test_auroc_hand_case():
    # positives 0.9, 0.4; negatives 0.8, 0.1: pairs ranked right are (0.9>0.8), (0.9>0.1), (0.4>0.1) -> 3/4
    assert metrics.auroc([1, 1, 0, 0], [0.9, 0.4, 0.8, 0.1]) == pytest.approx(0.75)


def test_auroc_ties_count_half():
    assert metrics.auroc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)


def test_ap_hand_case():
    # ranking 0.9(+), 0.8(-), 0.4(+), 0.1(-): precision at recalls 0.5 and 1.0 are 1 and 2/3
    assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(2000) < 0.2
    s = np.round(rng.random(2000) + y * 0.3, 2)  # rounding creates ties
    assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_f1_max_and_best_iou_hand_case():
    y = np.array([1, 1, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    # threshold 0.8: tp 2 fp 0 fn 1 -> F1 = 4/5, IoU = 2/3; threshold 0.1: tp 3 fp 2 -> F1 = 6/8, IoU 3/5
    f1, t = metrics.f1_max(y, s)
    assert f1 == pytest.approx(0.8) and t == pytest.approx(0.8)
    iou, t = metrics.best_iou(y, s)
    assert iou == pytest.approx(2 / 3) and t == pytest.approx(0.8)


def test_outline_counts():
    masks = np.array([[1, 1, 0, 0]])
    outlined = np.array([[True, False, True, False]])
    counts = metrics.outline_counts(masks, outlined)
    assert counts == (1, 1, 1)
    assert metrics.outline_counts(masks, None) == (0, 0, 2)  # nothing outlined
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.outline_counts(masks, outlined[:, :3])
    scores = metrics.outline_scores(*counts)
    assert scores["iou"] == pytest.approx(1 / 3) and scores["seg_f1"] == pytest.approx(0.5)
    assert metrics.outline_scores(0, 0, 0)["seg_f1"] == 1.0  # nothing to find, nothing found


def test_trapezoid_interpolates_at_limit():
    x = np.array([0.0, 0.2, 0.4])
    y = np.array([0.0, 1.0, 1.0])
    # area to 0.3: triangle 0.1 + rectangle 0.1
    assert metrics.trapezoid_to(x, y, 0.3) == pytest.approx(0.2)


def test_pro_curve_hand_case():
    # one image, two defect regions of 1 and 3 pixels, 4 normal pixels
    mask = np.array([[1, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)
    amap = np.array([[0.9, 0.1, 0.2, 0.8], [0.3, 0.4, 0.7, 0.6]])
    fpr, pro = metrics.pro_curve([mask], [amap])
    # thresholds 0.9: region A fully found -> pro 0.5; 0.8: +1/3 of B; 0.7, 0.6 complete B -> 1.0
    np.testing.assert_allclose(pro[:5], [0, 0.5, 0.5 + 1 / 6, 0.5 + 2 / 6, 1.0])
    np.testing.assert_allclose(fpr[:5], [0, 0, 0, 0, 0])
    np.testing.assert_allclose(fpr[-4:], [0.25, 0.5, 0.75, 1.0])


def test_aupro_perfect_and_chance():
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:10] = True
    assert metrics.aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    inverted = metrics.aupro([mask], [1.0 - mask.astype(float)])
    assert inverted == pytest.approx(0.0)


def test_aupro_regions_count_equally():
    # a big region found and a small one missed: PRO is 0.5 at low FPR, whatever the sizes
    mask = np.zeros((40, 40), dtype=bool)
    mask[0:20, 0:20] = True
    mask[30, 30] = True
    amap = np.zeros((40, 40))
    amap[0:20, 0:20] = 1.0
    fpr, pro = metrics.pro_curve([mask], [amap])
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="both"):
        metrics.auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in size"):
        metrics.auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([0, 1], [0.1, np.nan])
