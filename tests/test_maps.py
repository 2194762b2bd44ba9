"""Map post-processing: a broad share added, peaks boosted above their surroundings; settings calibrate can change."""

import json

import numpy as np
import pytest
import torch

from anoseg import AnoSegModel, ConfigError, calibrate, load, profile_config
from anoseg.postprocess import MapPostprocessor
from anoseg.scoring import OUTLINE_EDGE, OUTLINE_REACH, Thresholds, outline_levels, outline_region


def boost_peaks(m, sigma, boost):
    assert sigma == 2.0  # PEAK_SIGMA
    return MapPostprocessor(peak_boost=boost).boost_peaks(m)


def add_broad(m, sigma, weight):
    return MapPostprocessor(broad_weight=weight, broad_sigma=sigma).add_broad(m)


def _spot_and_plateau() -> torch.Tensor:
    """A 1 x 1 x 64 x 64 map: background 0.1, a 2 px spot and a 24 px plateau, both at 0.6."""
    m = torch.full((1, 1, 64, 64), 0.1)
    m[..., 10:12, 10:12] = 0.6
    m[..., 30:54, 30:54] = 0.6
    return m


def test_boost_zero_changes_nothing():
    m = _spot_and_plateau()
    assert torch.equal(boost_peaks(m, 2.0, 0.0), m)


def test_narrow_peaks_rise_above_broad_areas_and_maps_stay_in_unit_range():
    m = _spot_and_plateau()
    out = boost_peaks(m, 2.0, 2.0)
    spot, plateau_centre, background = out[0, 0, 10, 10], out[0, 0, 42, 42], out[0, 0, 0, 63]
    assert spot > plateau_centre > background  # before, spot and plateau were equal
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(boost_peaks(torch.ones(1, 1, 16, 16), 2.0, 5.0).max()) <= 1.0


def test_a_flat_map_is_only_scaled():
    flat = torch.full((2, 1, 20, 30), 0.4)
    torch.testing.assert_close(boost_peaks(flat, 2.0, 2.0), flat / 3)


def test_broad_weight_zero_changes_nothing():
    m = _spot_and_plateau()
    assert torch.equal(add_broad(m, 8.0, 0.0), m)


def test_the_broad_share_raises_a_large_region_more_than_a_small_spot():
    m = _spot_and_plateau()
    out = add_broad(m, 8.0, 1.0)
    spot, plateau_centre, background = out[0, 0, 10, 10], out[0, 0, 42, 42], out[0, 0, 0, 63]
    assert plateau_centre > spot > background  # before, spot and plateau were equal
    # the plateau keeps most of its height (0.54 of 0.6), the 2 px spot about half of it
    assert float(plateau_centre) > 0.5 and float(spot) < 0.4
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(add_broad(torch.full((1, 1, 20, 30), 0.4), 8.0, 1.0), torch.full((1, 1, 20, 30), 0.4))


@pytest.mark.parametrize(("settings", "problem"), [({"peak_boost": -1.0}, "peak_boost"),
                                                   ({"broad_weight": -0.5}, "broad_weight"),
                                                   ({"broad_sigma": 0.0}, "broad_sigma")])
def test_bad_peak_settings_are_refused_by_name(settings, problem):
    with pytest.raises(ConfigError, match=problem):
        profile_config("tiny", **settings)


def test_a_config_saved_before_peak_boost_loads_with_it_off(tmp_path):
    from anoseg.modelfolder import read_config

    data = {k: v for k, v in profile_config("fast").to_dict().items() if k not in ("peak_boost", "hard_augmentation")}
    (tmp_path / "config.json").write_text(json.dumps({**data, "peak_sigma": 2.0, "tta_flips": "none"}))
    cfg = read_config(tmp_path / "config.json")
    assert cfg.peak_boost == 0.0 and cfg.broad_weight == 0.5  # old models keep the maps their thresholds came from


def test_a_config_saved_before_broad_weight_loads_with_it_off(tmp_path):
    from anoseg.modelfolder import read_config

    data = {k: v for k, v in profile_config("fast").to_dict().items()
            if k not in ("broad_weight", "broad_sigma", "hard_augmentation")}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert read_config(tmp_path / "config.json").broad_weight == 0.0


def test_a_config_with_a_retired_setting_loads_when_today_reproduces_it_else_is_refused(tmp_path):
    from anoseg.modelfolder import read_config

    old = {**profile_config("fast").to_dict(), "crack_points_max": 240, "lr_d": 3e-4, "extra": {}}
    (tmp_path / "same.json").write_text(json.dumps(old))
    assert read_config(tmp_path / "same.json", for_training=True) == profile_config("fast")
    (tmp_path / "other.json").write_text(json.dumps({**old, "crack_points_max": 80, "tta_flips": "none"}))
    assert read_config(tmp_path / "other.json") == profile_config("fast")  # a trained model: cracks are history
    with pytest.raises(ConfigError, match="crack_points_max=80, a setting that no longer exists"):
        read_config(tmp_path / "other.json", for_training=True)  # resuming would train another recipe
    (tmp_path / "maps.json").write_text(json.dumps({**old, "tta_flips": "hv"}))
    with pytest.raises(ConfigError, match="tta_flips='hv'.*train the model again"):
        read_config(tmp_path / "maps.json")


def test_a_retired_training_choice_loads_for_inference_and_is_refused_for_training(tmp_path):
    from anoseg.modelfolder import read_config

    old = {**profile_config("fast").to_dict(), "seg_loss": "balanced", "anomaly_families": ["paste", "shading"]}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = read_config(tmp_path / "config.json")  # the loss and the families play no part in a trained model's maps
    assert cfg == profile_config("fast", anomaly_families=("paste",))
    with pytest.raises(ConfigError, match="seg_loss='balanced': 'balanced' can no longer be trained"):
        read_config(tmp_path / "config.json", for_training=True)
    (tmp_path / "config.json").write_text(json.dumps({**old, "seg_loss": "bce"}))
    with pytest.raises(ConfigError, match="'shading' can no longer be trained.*paste, noise, crack, streak"):
        read_config(tmp_path / "config.json", for_training=True)


def test_a_model_an_older_anoseg_trained_predicts_and_calibrate_keeps_how_it_was_trained(tiny_model_copy):
    from anoseg.modelfolder import read_config

    folder = tiny_model_copy
    retired = {"seg_loss": "asymmetric", "anomaly_families": ["paste", "band"], "crack_points_max": 80}
    saved = {**json.loads((folder / "config.json").read_text()), **retired}
    (folder / "config.json").write_text(json.dumps(saved))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert load(folder).predict_images([image])[0].anomaly_map.shape == (64, 64)
    calibrate(folder, overrides={"peak_boost": 4.0})
    rewritten = json.loads((folder / "config.json").read_text())
    assert rewritten == {**saved, "peak_boost": 4.0}  # only what calibrate changes
    with pytest.raises(ConfigError, match="crack_points_max=80"):
        read_config(folder / "config.json", for_training=True)  # still refused where it would train again


def test_a_model_saved_elsewhere_takes_its_own_record_not_the_folders(tiny_model_copy, tmp_path):
    folder = tiny_model_copy
    saved = {**json.loads((folder / "config.json").read_text()), "seg_loss": "balanced"}
    (folder / "config.json").write_text(json.dumps(saved))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**saved, "seg_loss": "bce", "crack_points_max": 80}))
    load(folder).save(other)
    assert json.loads((other / "config.json").read_text()) == saved


def test_train_from_a_saved_config_refuses_what_this_version_cannot_train(demo_root, tmp_path, capsys):
    from anoseg.cli import main

    old = {**profile_config("tiny").to_dict(), "crack_points_max": 80}
    (tmp_path / "config.json").write_text(json.dumps(old))
    out = tmp_path / "run"
    assert main(["train", str(demo_root), "--config", str(tmp_path / "config.json"), "--out", str(out)]) == 2
    assert "crack_points_max=80, a setting that no longer exists" in capsys.readouterr().err
    assert not out.exists()


def test_maps_follow_the_setting():
    cfg = profile_config("tiny", peak_boost=0.0, broad_weight=0.0)
    model = AnoSegModel(cfg, map_threshold=0.5, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    plain = model.maps_for_batch([image])[0].anomaly_map
    model.config = cfg.replace(peak_boost=2.0)
    boosted = model.maps_for_batch([image])[0].anomaly_map
    assert boosted.shape == plain.shape and not np.allclose(boosted, plain)
    model.config = cfg.replace(broad_weight=1.0, broad_sigma=8.0)
    broad = model.maps_for_batch([image])[0].anomaly_map
    assert broad.shape == plain.shape and not np.allclose(broad, plain)


def test_calibrate_applies_a_map_setting_and_chooses_thresholds_for_it(tiny_model_copy):
    folder = tiny_model_copy
    weights = (folder / "model.safetensors").read_bytes()
    before = load(folder)
    assert before.config.peak_boost == 2.0
    model = calibrate(folder, overrides={"peak_boost": 4.0})
    assert model.map_threshold != pytest.approx(before.map_threshold)  # chosen on the new maps
    assert json.loads((folder / "config.json").read_text())["peak_boost"] == 4.0
    assert load(folder).map_threshold == model.map_threshold
    assert (folder / "model.safetensors").read_bytes() == weights


def test_outline_follows_the_maps_own_peak_above_the_map_threshold():
    t = Thresholds(map=0.1, image=0.5)  # no background (a model calibrated before it existed): a floor everywhere
    levels = outline_levels(t, peak=0.9, score=0.9)
    assert levels.edge == pytest.approx(OUTLINE_EDGE * 0.9) and levels.reach == pytest.approx(OUTLINE_REACH * 0.9)
    faint = outline_levels(t, peak=0.2, score=0.6)  # a faint peak: the map threshold is the floor, a region passes it
    assert faint.edge == 0.1 and faint.reach == pytest.approx(OUTLINE_REACH * 0.2)
    assert outline_levels(t, peak=0.1, score=0.1).reach == 0.1  # never below the edge
    assert outline_levels(Thresholds(None, 0.5), peak=0.9, score=0.9) is None  # no map threshold, no outline
    assert not outline_region(np.ones((4, 4), np.float32), None).any()


def test_outline_edge_rises_from_the_map_background_and_the_floor_holds_in_images_judged_normal():
    t = Thresholds(map=0.1, image=0.5, background=0.02)
    defect = outline_levels(t, peak=0.2, score=0.6)  # judged defect: a faint peak's edge may lie below the floor
    assert defect.edge == pytest.approx(0.02 + OUTLINE_EDGE * (0.2 - 0.02)) and defect.edge < 0.1
    assert defect.reach == pytest.approx(OUTLINE_REACH * 0.2)
    assert outline_levels(t, peak=0.2, score=0.4).edge == 0.1  # judged normal: the map threshold is the floor
    assert outline_levels(Thresholds(0.1, None, 0.02), peak=0.2, score=0.9).edge == 0.1  # no verdict: the floor
    strong = outline_levels(t, peak=0.9, score=0.9)
    assert strong.edge == pytest.approx(0.02 + OUTLINE_EDGE * 0.88)  # measured from the background
    assert strong.edge > OUTLINE_EDGE * 0.9
    # a faint spot on a raised background: the edge stays above the background, so the outline cannot flood it
    amap = np.full((40, 40), 0.02, np.float32)
    amap[18:22, 18:22] = 0.05
    region = outline_region(amap, outline_levels(t, peak=0.05, score=0.6))
    assert region.sum() == 16 and region[18:22, 18:22].all()
    floorless = outline_region(amap, outline_levels(Thresholds(map=0.1, image=0.5, background=0.0), 0.05, 0.6))
    assert floorless.all()  # as an edge of 0.35 x the peak alone would draw it


def test_outline_keeps_the_regions_that_reach_the_peak():
    """A weak bump elsewhere in the image is above the edge but not outlined; a second strong region is."""
    amap = np.zeros((40, 40), np.float32)
    amap[5:10, 5:10] = 0.8  # the peak's region
    amap[25:30, 25:30] = 0.5  # above 0.35 x 0.8, below 0.9 x 0.8: left out
    amap[5:10, 30:35] = 0.75  # reaches 0.9 x 0.8: outlined
    region = outline_region(amap, outline_levels(Thresholds(map=0.1, image=0.3), peak=0.8, score=0.8))
    assert region[5:10, 5:10].all() and region[5:10, 30:35].all()
    assert not region[25:30, 25:30].any() and region.sum() == 50
    shrunk = outline_region(amap * 0.5, outline_levels(Thresholds(map=0.1, image=0.3), peak=0.8, score=0.8))
    assert shrunk[5:10, 5:10].all()  # a resized map below its levels' reach: its own peak's region still counts


def test_a_strong_and_a_faint_defect_get_outlines_of_their_own_width():
    """One height for both would draw the strong defect's halo and miss the faint one; the peak share does not."""
    y, x = np.mgrid[:64, :64]
    spot = np.exp(-((y - 32) ** 2 + (x - 32) ** 2) / (2 * 4.0**2))
    t = Thresholds(map=0.05, image=0.1)
    widths = []
    for height in (0.9, 0.3):
        amap = (height * spot).astype(np.float32)
        region = outline_region(amap, outline_levels(t, peak=float(amap.max()), score=float(amap.max())))
        widths.append(int(region[32].sum()))
    assert widths[0] == widths[1] > 0
    assert (0.9 * spot[32] > 0.05).sum() > (0.3 * spot[32] > 0.05).sum()  # as one height would draw them


@pytest.mark.parametrize("band_pixels", [1, 40, 97, 10_000])
def test_regions_found_band_by_band_are_the_whole_maps(band_pixels):
    """Bands of any height (one row; a region that joins only in a later band) give whole-map labelling's answer."""
    from scipy import ndimage

    from anoseg.regions import regions_reaching

    rng = np.random.default_rng(band_pixels)
    amap = ndimage.gaussian_filter(rng.random((60, 40)), 1.5).astype(np.float32)
    amap = (amap - amap.min()) / (amap.max() - amap.min())
    u = np.zeros((30, 20), np.float32)
    u[2:28, 3] = u[2:28, 16] = u[27, 3:17] = 0.6  # a U: its arms meet only at the bottom
    u[2, 16] = 0.9  # the reaching pixel, on the right arm
    u[10, 9] = 0.9  # a separate dot that also reaches
    u[5, 5] = 0.7  # two columns off the left arm: a region of its own, short of the reach
    for i in range(7):
        u[12 + i, 6 + i] = 0.6  # a diagonal line: its pixels touch only at corners
    u[18, 12] = 0.9  # ... and reaches at its lower end
    for m in (amap, u):
        for edge, reach in ((0.5, 0.8), (0.3, 0.95), (0.65, 0.65), (0.99, 1.0)):
            labels, n = ndimage.label(m > edge, structure=np.ones((3, 3), bool))
            reached = np.unique(labels[m >= reach])
            expected = np.isin(labels, reached[reached > 0])
            assert np.array_equal(regions_reaching(m, edge, reach, band_pixels), expected), (edge, reach)
    whole = regions_reaching(u, 0.5, 0.8, band_pixels)
    assert whole[2:28, 3].all() and whole[10, 9] and not whole[5, 5] and whole[12, 6]
