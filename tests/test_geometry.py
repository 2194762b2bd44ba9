"""Aspect-ratio mode: working shapes, training crops with their place in the image, whole-image maps."""

import numpy as np
import pytest
import torch

from anoseg import AnoSegModel, profile_config
from anoseg.data import TrainingImages
from anoseg.geometry import Geometry
from anoseg.models import Generator, coord_channels


def working_shape(h, w, cfg, short_side=None):
    return Geometry.from_config(cfg).working_shape(h, w, short_side)


def test_working_shape():
    sq = profile_config("tiny", resize_mode="square", second_short_side=0)
    assert working_shape(640, 254, sq) == (64, 64)
    cfg = profile_config("tiny", resize_mode="aspect", second_short_side=0)  # image_size 64, unit 8
    assert working_shape(640, 254, cfg) == (160, 64)  # portrait: 64 * 2.52 = 161 -> 160
    assert working_shape(254, 640, cfg) == (64, 160)
    assert working_shape(500, 500, cfg) == (64, 64)
    assert working_shape(100, 5000, cfg) == (64, 256)  # capped at MAX_ASPECT (4)
    for h, w in [(37, 201), (300, 90), (9000, 9000), (1, 1)]:
        rows, cols = working_shape(h, w, cfg)
        assert rows % 8 == 0 and cols % 8 == 0 and min(rows, cols) == 64


def test_second_scale_gives_crops_from_both_scales():
    cfg = profile_config("tiny", resize_mode="aspect", second_short_side=128)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (3, 64, 160), dtype=np.uint8)
    large = rng.integers(0, 256, (3, 128, 320), dtype=np.uint8)
    images = TrainingImages([small], Geometry.from_config(cfg), second=[large])
    crops, coords, _ = images.crops(np.zeros(40, dtype=int), np.random.default_rng(1))
    assert crops.shape == (40, 3, 64, 64) and coords.shape == (40, 2, 64, 64)
    from_small = [bool((small[:, :, None] == c[:, :, :1].numpy()[:, :, None]).all(axis=(0, 1)).any()) for c in crops]
    assert 5 < sum(from_small) < 35  # about half of the crops from each scale
    one = images.subset(np.array([0]))
    assert not images.all_square and len(one) == 1 and one.n_scales == 2
    assert np.array_equal(one.image(0, 1), large)


def test_crops_say_which_came_from_the_coarser_scale():
    def spans_short_side(crops):  # a crop of the coarser scale covers the whole short side (rows -1 to 1)
        return (crops.coords[:, 1].amax((1, 2)) - crops.coords[:, 1].amin((1, 2))) > 1.9

    cfg = profile_config("tiny", resize_mode="aspect", second_short_side=128)
    small, large = np.zeros((3, 64, 160), dtype=np.uint8), np.zeros((3, 128, 320), dtype=np.uint8)
    images = TrainingImages([small], Geometry.from_config(cfg), second=[large])
    crops = images.crops(np.zeros(40, dtype=int), np.random.default_rng(1))
    assert torch.equal(crops.coarse, spans_short_side(crops)) and 5 < int(crops.coarse.sum()) < 35
    assert TrainingImages([small], Geometry(64, "aspect")).crops(
        np.array([0]), np.random.default_rng(0)).coarse is None


@pytest.mark.parametrize("settings, problem", [
    ({"resize_mode": "square", "second_short_side": 128}, "only applies with resize_mode=aspect"),
    ({"resize_mode": "aspect", "second_short_side": 64}, "must differ from image_size"),
    ({"resize_mode": "aspect", "second_short_side": 32}, "of at least image_size (64)"),
    ({"resize_mode": "aspect", "second_short_side": 70}, "multiple of image_size / 8"),
])
def test_bad_second_scale_is_refused_by_name(settings, problem):
    from anoseg import ConfigError

    with pytest.raises(ConfigError, match="second_short_side") as err:
        profile_config("tiny", **settings)
    assert problem in str(err.value)


@pytest.mark.parametrize("settings, problem", [
    ({"resize_mode": "aspect", "second_short_side": 128, "coarse_region_max": 1.0}, "region_min <= coarse_region_max"),
    ({"resize_mode": "aspect", "second_short_side": 128, "coarse_region_max": 0.001}, "region_min <= coarse_region"),
])
def test_bad_coarse_region_max_is_refused_by_name(settings, problem):
    from anoseg import ConfigError

    with pytest.raises(ConfigError, match="coarse_region_max") as err:
        profile_config("tiny", **settings)
    assert problem in str(err.value)


def test_coarse_region_max_is_unused_at_one_scale_not_refused():
    # the detector trains at the first scale alone: switching the second scale off must keep the setting valid
    cfg = profile_config("tiny", resize_mode="aspect", second_short_side=128, coarse_region_max=0.5)
    assert cfg.replace(second_short_side=0).coarse_region_max == 0.5


@pytest.mark.parametrize("settings, problem", [
    ({"resize_mode": "square"}, "set second_short_side=0 with square"),
    ({"image_size": 256}, "0 maps at one scale"),
])
def test_fast_profile_two_scales_name_the_fix_when_another_setting_clashes(settings, problem):
    from anoseg import ConfigError

    assert profile_config("fast").second_short_side == 256
    with pytest.raises(ConfigError, match="second_short_side") as err:
        profile_config("fast", **settings)
    assert problem in str(err.value)
    assert profile_config("fast", **settings, second_short_side=0).second_short_side == 0


def test_two_scale_maps_average_both_scales():
    # without the broad share and the peak boost, which act on the fused map, the map is a mean of both scales'
    cfg = profile_config("tiny", resize_mode="aspect", second_short_side=128, broad_weight=0.0, peak_boost=0.0,
                         smoothing_sigma=4.0,
                         precision="fp32")
    model = AnoSegModel(cfg, map_threshold=0.5, device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (200, 60), (30, 90)]]
    both = model.maps_for_batch(images)
    first = AnoSegModel(cfg.replace(second_short_side=0), model.generator, 0.5, device="cpu").maps_for_batch(images)
    second = AnoSegModel(cfg.replace(image_size=128, second_short_side=0), model.generator, 0.5,
                         device="cpu").maps_for_batch(images)  # the same weights: the networks take any size
    for im, b, f, s in zip(images, both, first, second):
        assert b.anomaly_map.shape == im.shape[:2]
        np.testing.assert_allclose(model.maps_for_batch([im])[0].anomaly_map, b.anomaly_map, atol=1e-5)
        gap = np.abs(b.anomaly_map - (f.anomaly_map + s.anomaly_map) / 2).mean()  # resampling differs a little
        assert gap < 0.1 * np.abs(f.anomaly_map - s.anomaly_map).mean()


def test_two_scale_model_exports_to_onnx_with_the_same_maps(tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from anoseg.detector import Detector
    from anoseg.export import OnnxModel, check_export, export_onnx

    cfg = profile_config("tiny", resize_mode="aspect", second_short_side=128, peak_boost=2.0,
                         broad_weight=0.5, broad_sigma=16.0, precision="fp32")
    model = AnoSegModel(cfg, map_threshold=0.5, device="cpu")
    model.detector = Detector(cfg, torch.device("cpu"))  # scores the first scale's input with the fused map
    export_onnx(model, tmp_path / "onnx")
    runner = OnnxModel(tmp_path / "onnx")
    assert [i.name for i in runner.session.get_inputs()] == ["image", "image2"]
    assert runner.meta["second_short_side"] == 128
    assert check_export(model, tmp_path / "onnx", n=3) < 1e-4
    rng = np.random.default_rng(1)  # images whose two scales group differently
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 150), (64, 160), (300, 100)]]
    for ours, theirs in zip(model.maps_for_batch(images), runner.maps_for_batch(images)):
        assert ours.anomaly_map.shape == theirs.anomaly_map.shape
        np.testing.assert_allclose(ours.anomaly_map, theirs.anomaly_map, atol=1e-4)
        assert ours.map_score == pytest.approx(theirs.map_score, abs=1e-4)
        assert ours.detector_score == pytest.approx(theirs.detector_score, rel=1e-4, abs=1e-4)


def test_crops_carry_their_place_in_the_whole_image():
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (3, 160, 64), dtype=np.uint8)
    images = TrainingImages([im], Geometry(64, "aspect"))
    crops, coords, _ = images.crops(np.array([0, 0, 0]), np.random.default_rng(1))
    whole = coord_channels(torch.zeros(1, 3, 160, 64))[0, 3:]
    assert crops.shape == (3, 3, 64, 64) and coords.shape == (3, 2, 64, 64)
    for crop, c in zip(crops, coords):
        top = int(np.flatnonzero(np.all(im == crop[:, :1, :1].numpy(), axis=0)[:, 0])[0])  # where the crop came from
        assert torch.equal(crop, torch.from_numpy(im[:, top:top + 64]))
        assert torch.allclose(c, whole[:, top:top + 64], atol=1e-6)


def test_square_images_give_whole_images_and_no_coordinates():
    cfg = profile_config("tiny", resize_mode="aspect")
    im = np.zeros((3, 64, 64), dtype=np.uint8)
    crops, coords, _ = TrainingImages([im, im], cfg).crops(np.array([1, 0]), np.random.default_rng(0))
    assert crops.shape == (2, 3, 64, 64) and coords is None


def test_explicit_coordinates_equal_the_default_for_whole_images():
    cfg = profile_config("tiny")
    g = Generator(cfg).eval()
    x = torch.rand(2, 3, 64, 128) * 2 - 1
    with torch.no_grad():
        a = g.anomaly_map(x)
        b = g.anomaly_map(x, coord_channels(x)[:, 3:])
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["square", "aspect"])
def test_maps_of_mixed_sizes_keep_order_and_size(mode):
    cfg = profile_config("tiny", resize_mode=mode, second_short_side=0 if mode == "square" else 128, precision="fp32")
    model = AnoSegModel(cfg, map_threshold=0.5, device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (200, 60), (64, 64), (30, 90)]]
    preds = model.maps_for_batch(images)
    for im, p in zip(images, preds):
        assert p.anomaly_map.shape == im.shape[:2]
        one = model.maps_for_batch([im])[0]  # the same image alone gives the same map
        np.testing.assert_allclose(one.anomaly_map, p.anomaly_map, atol=1e-5)


def _rect_category(root, n_train=6):
    """A tiny MVTec-layout category of 40 x 100 (portrait) images with one dark-spot defect."""
    from tests.conftest import write_png

    rng = np.random.default_rng(0)
    for i in range(n_train):
        write_png(root / "train" / "good" / f"{i:03d}.png", rng.integers(100, 140, (100, 40, 3), dtype=np.uint8))
    write_png(root / "test" / "good" / "000.png", rng.integers(100, 140, (100, 40, 3), dtype=np.uint8))
    bad = rng.integers(100, 140, (100, 40, 3), dtype=np.uint8)
    bad[60:70, 10:20] = 0
    mask = np.zeros((100, 40), dtype=np.uint8)
    mask[60:70, 10:20] = 255
    write_png(root / "test" / "spot" / "000.png", bad)
    write_png(root / "ground_truth" / "spot" / "000_mask.png", mask)
    return root


def test_aspect_mode_trains_predicts_evaluates_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    from anoseg import evaluate, load, train
    from anoseg.export import OnnxModel, export_onnx

    root = _rect_category(tmp_path / "rect")
    cfg = profile_config("tiny", steps=4, batch_size=4, second_short_side=0, precision="fp32")
    train(cfg, root, tmp_path / "model", progress=False)
    model = load(tmp_path / "model", device="cpu")
    assert model.config.resize_mode == "aspect"
    result = evaluate(model, root, tmp_path / "eval", progress=False)
    assert result["per_defect_type"]["spot"]["n_images"] == 1
    assert result["per_defect_type"]["spot"]["pixel_auroc"] == result["metrics"]["pixel_auroc"]  # one defect type
    assert "Per defect type" in (tmp_path / "eval" / "metrics.md").read_text()
    image = np.asarray(__import__("PIL.Image").Image.open(root / "test" / "spot" / "000.png").convert("RGB"))
    ours = model.maps_for_batch([image])[0]
    assert ours.anomaly_map.shape == (100, 40)
    export_onnx(model, tmp_path / "onnx")
    theirs = OnnxModel(tmp_path / "onnx").maps_for_batch([image])[0]
    assert np.abs(ours.anomaly_map - theirs.anomaly_map).max() <= 1e-4


def test_two_scale_model_trains_loads_and_evaluates(tmp_path):
    from anoseg import evaluate, load, train

    root = _rect_category(tmp_path / "rect")
    cfg = profile_config("tiny", resize_mode="aspect", steps=4, batch_size=4, second_short_side=96)
    train(cfg, root, tmp_path / "model", progress=False)
    model = load(tmp_path / "model", device="cpu")
    assert model.config.second_short_side == 96 and model.map_threshold is not None
    result = evaluate(model, root, None, progress=False)
    assert result["per_defect_type"]["spot"]["n_images"] == 1 and np.isfinite(result["metrics"]["pixel_auroc"])


def test_detector_of_a_two_scale_model_trains_on_first_scale_crops_with_fused_maps(tmp_path, monkeypatch):
    import importlib

    from anoseg import load, train, train_detector

    train_mod = importlib.import_module("anoseg.detector_training")

    root = _rect_category(tmp_path / "rect")
    cfg = profile_config("tiny", resize_mode="aspect", steps=2, batch_size=4, second_short_side=128)
    train(cfg, root, tmp_path / "m", progress=False)
    model = load(tmp_path / "m", device="cpu")
    seen = {}

    def spy(det, anoseg_map, images, **kw):
        seen["shape"] = tuple(images.shape)
        x = images[:2].float() / 127.5 - 1
        seen["maps"], seen["first"] = anoseg_map(x), model.raw_maps(x)
        return 0.0

    monkeypatch.setattr(train_mod, "fit_detector", spy)
    train_detector(tmp_path / "m", progress=False)
    assert seen["shape"][1:] == (3, 64, 64)  # one crop per image, from the first scale (64 x 160 here)
    assert seen["maps"].shape == seen["first"].shape == (2, 1, 64, 64)  # the fused map, at the crop's shape
    assert not torch.allclose(seen["maps"], seen["first"])  # ... not the first scale's alone
    assert load(tmp_path / "m", device="cpu").detector is not None
