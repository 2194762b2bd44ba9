"""bench/run_bench.py's seed merge: the headline row is the mean over seeds, detector columns included."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "run_bench.py"


@pytest.fixture(scope="module")
def run_bench():
    spec = importlib.util.spec_from_file_location("run_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(seed: int, value: float, **extra) -> dict:
    metrics = {k: value for k in ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max", "image_auroc",
                                  "image_f1_max", "iou", "best_iou")}
    return {"seed": seed, **metrics, "train_seconds": 100.0 * (seed + 1), "images_per_second": 10.0,
            "images_per_second_single": 20.0, "peak_rss_mb": 1000.0 + seed,
            "per_defect_type": {"crack": {"n_images": 3, "pixel_auroc": value}}, **extra}


def test_headline_is_the_mean_over_seeds(run_bench):
    out = run_bench.merge_seeds([run(0, 0.8), run(1, 0.9)])
    assert out["seeds"] == [0, 1]
    assert out["pixel_auroc"] == pytest.approx(0.85)
    assert out["pixel_auroc_std"] == pytest.approx(0.05)
    assert out["train_seconds"] == pytest.approx(150.0)
    assert out["peak_rss_mb"] == 1001.0
    assert out["per_defect_type"]["crack"] == {"n_images": 3, "pixel_auroc": pytest.approx(0.85)}
    assert "detector_train_seconds" not in out


def test_detector_columns_are_averaged_not_taken_from_seed_0(run_bench):
    runs = [run(0, 0.8, image_auroc_detector=0.7, detector_train_seconds=1200.0,
                images_per_second_with_detector=16.9),
            run(1, 0.9, image_auroc_detector=0.9, detector_train_seconds=1300.0,
                images_per_second_with_detector=17.3)]
    out = run_bench.merge_seeds(runs)
    assert out["image_auroc_detector"] == pytest.approx(0.8)
    assert out["detector_train_seconds"] == pytest.approx(1250.0)
    assert out["images_per_second_with_detector"] == pytest.approx(17.1)
    assert [r["detector_train_seconds"] for r in out["runs"]] == [1200.0, 1300.0]
