"""The real data in ../shared/data (skipped where it is absent): layouts load and masks fit their images."""

import pytest

from anoseg.data import load_sample_mask, mvtec_test_samples, train_images
from anoseg.fileio import load_image
from tests.conftest import REAL_DATA

CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/commutator", "magnetic_tile/magnetic_tile", "mvtec3d_tire/tire",
              "bsdata/ball_screw_drive"]


@pytest.mark.parametrize("category", CATEGORIES)
def test_real_category_loads(category):
    root = REAL_DATA / category
    if not root.is_dir():
        pytest.skip(f"{root} not present (real data lives beside the project, not in it)")
    assert len(train_images(root)) > 100
    samples = mvtec_test_samples(root)
    defects = [s for s in samples if s.label == 1]
    assert defects and len(defects) < len(samples)
    for s in defects[:5] + [s for s in samples if s.label == 0][:2]:
        image = load_image(s.path)
        mask = load_sample_mask(s, image.shape[:2])
        assert mask.shape == image.shape[:2]
        assert (mask.any() or category.startswith("magnetic")) if s.label else not mask.any()
