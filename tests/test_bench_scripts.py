"""The bench scripts' own logic: the seed merge of bench/run_bench.py and the argument checks they share."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """Import a bench script as the scripts see each other (bench/ first on the path), then forget the path."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def run_bench():
    return load("run_bench")


@pytest.fixture(scope="module")
def arguments():
    return load("arguments")


@pytest.mark.parametrize("text, seeds", [("0", [0]), ("0,1,2", [0, 1, 2]), ("7,3", [7, 3])])
def test_seed_list_reads_whole_numbers(arguments, text, seeds):
    assert arguments.seed_list(text) == seeds


@pytest.mark.parametrize("text, says", [("x", "whole numbers"), ("0,", "whole numbers"), ("1.5", "whole numbers"),
                                        ("-1", "0 or more"), ("0,0", "twice")])
def test_seed_list_names_the_problem(arguments, text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        arguments.seed_list(text)


@pytest.mark.parametrize("text, says", [("0", "at least 1"), ("-2", "at least 1"), ("two", "not a whole number")])
def test_positive_int_names_the_problem(arguments, text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        arguments.positive_int(text)
    assert arguments.positive_int("3") == 3


def test_name_list_lists_the_known_names(arguments):
    known = ["bottle", "commutator"]
    assert arguments.name_list("commutator,bottle", known, "category") == ["commutator", "bottle"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown category 'tile'; choose from bottle, commutator"):
        arguments.name_list("bottle,tile", known, "category")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown category"):
        arguments.name_list(",", known, "category")


@pytest.mark.parametrize("script, argv", [
    ("run_bench", ["--jobs", "0"]), ("run_bench", ["--seeds", "x"]), ("run_bench", ["--only", "tile"]),
    ("ablation", ["--steps", "0"]), ("ablation", ["--jobs", "0"]), ("ablation", ["--variants", "nope"]),
    ("ablation", ["--seeds", "0,0"])])
def test_scripts_refuse_bad_arguments_before_running(script, argv, capsys, monkeypatch, tmp_path):
    """Once, --jobs 0 ended in a ZeroDivisionError, --seeds x in a traceback and ablation's --steps 0 trained the
    profile's full length; now each ends with argparse's one line naming the argument (exit 2), running nothing."""
    main = load(script).main
    # no data for ablation, so that a regression ends at "no data" instead of training on ../shared/data
    where = ["--work", str(tmp_path)] if script == "run_bench" else ["--data", str(tmp_path / "none")]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv, *where])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert f"argument {argv[0]}" in capsys.readouterr().err


def test_results_table_names_rows_trained_with_other_settings(run_bench, tmp_path, monkeypatch):
    monkeypatch.setattr(run_bench, "HERE", tmp_path)  # write the tables here, not over bench/results.*
    base = {"dataset": "d", "profile": "fast", "seeds": [0, 1], "train_seconds": 1.0,
            **{k: 0.5 for k in run_bench.KEYS}}
    records = [{**base, "category": "plain", "settings": []},
               {**base, "category": "older", "settings": ["crack_soft=false"]}]
    run_bench.write_tables(records, "python bench/run_bench.py")
    text = (tmp_path / "results.md").read_text()
    assert "Trained with settings other than the profile's: older (`--set crack_soft=false`)." in text
    assert "plain (" not in text
    run_bench.write_tables(records[:1], "python bench/run_bench.py")
    assert "other than the profile's" not in (tmp_path / "results.md").read_text()


def test_every_variant_is_a_table_row_of_settings_that_exist(tmp_path):
    from anoseg import ConfigError
    from anoseg.config import profile_config

    ablation = load("ablation")
    for name, variant in ablation.VARIANTS.items():
        assert set(variant) == {"set", "about"} and variant["about"], name
        try:
            profile_config("fast", **variant["set"])
        except ConfigError as e:
            raise AssertionError(f"variant {name}: {e}") from None
    row = {"dataset": "d", "category": "c", "seed": 0, "steps": 10, "train_seconds": 1.0,
           **{k: 0.5 for k in ablation.KEYS}}
    ablation.write_tables(tmp_path / "a.json", [{**row, "variant": "default"}, {**row, "variant": "opaque"}], "cmd")
    text = (tmp_path / "a.md").read_text()
    assert "| fast | c | opaque | 0 | 10 |" in text and "- `opaque`: every synthetic anomaly opaque." in text


def test_recorded_commands_name_no_folder_of_this_machine():
    line = load("arguments").recorded_command("run_bench.py", ["--work", "/home/me/runs/bw", "--seeds", "0,1", "--data",
                                             "/srv/x/shared/data", "--only", "bottle"])
    assert line == "python bench/run_bench.py --work RUNS/bw --seeds 0,1 --data DATA --only bottle"


def test_merged_records_keep_the_categories_order(run_bench):
    rec = {"profile": "fast"}
    records = [{**rec, "dataset": "magnetic_tile", "category": "magnetic_tile"},
               {**rec, "dataset": "kolektorsdd", "category": "commutator"},
               {**rec, "dataset": "mvtec_ad", "category": "bottle"}]
    merged = run_bench.merge_results(records, {}, None, "python bench/run_bench.py")
    assert [r["category"] for r in merged] == ["bottle", "commutator", "magnetic_tile"]


def test_ablation_resumes_a_kept_run_that_stopped_part_way(tiny_model_copy, monkeypatch):
    from anoseg.modelfolder import CONFIG_FILE, WEIGHTS_FILE, read_config

    ablation = load("ablation")
    (tiny_model_copy / WEIGHTS_FILE).unlink()  # a checkpoint, no model: as when the session ended mid-run
    cfg = read_config(tiny_model_copy / CONFIG_FILE)
    calls = []
    monkeypatch.setattr("anoseg.train", lambda *a, **kw: calls.append(kw) or "model")
    assert ablation.trained_model(cfg, Path("data"), tiny_model_copy, keep=True) == "model"
    assert calls[-1].get("resume") is True
    other = cfg.replace(seed=cfg.seed + 1)  # another run's settings: trained from scratch, not resumed
    assert not ablation.resumable(other, tiny_model_copy)
    ablation.trained_model(other, Path("data"), tiny_model_copy, keep=True)
    assert calls[-1].get("overwrite") is True and not calls[-1].get("resume")
    assert not ablation.resumable(cfg, tiny_model_copy.parent / "absent")


def test_ablation_scores_a_kept_model_with_the_settings_asked(tiny_model_copy):
    from anoseg import load as load_model
    from anoseg.modelfolder import CONFIG_FILE, read_config

    ablation = load("ablation")
    saved = read_config(tiny_model_copy / CONFIG_FILE)
    before = load_model(tiny_model_copy)
    asked = saved.replace(image_score_topk_weight=0.75)  # a scoring default changed after the model was kept
    model = ablation.trained_model(asked, Path("data"), tiny_model_copy, keep=True)
    assert model.config == asked and load_model(tiny_model_copy).config == asked  # reused, not trained again
    assert model.image_threshold < before.image_threshold  # chosen again for the blended score


@pytest.mark.parametrize("fix, says", [("broad_sigma=12,16", "one value only"), ("broad_weight=0.5", "already set"),
                                       ("steps=10", "only"), ("broad_sigma=-1", "broad_sigma")])
def test_eval_settings_refuses_a_bad_fix_before_loading_a_model(monkeypatch, tmp_path, fix, says):
    eval_settings = load("eval_settings")
    out = tmp_path / "out.json"
    argv = ["eval_settings.py", "--set", "broad_weight=0,0.25", "--fix", fix, "--out", str(out), "absent=absent"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=says):
        eval_settings.main()
    assert not out.exists()  # nothing written


def test_eval_settings_keeps_the_rows_another_sweep_wrote_meanwhile(tmp_path):
    eval_settings = load("eval_settings")
    out = tmp_path / "sweeps.json"
    eval_settings.append_record(out, {"model": "a", "pixel_auroc": 0.5})
    # a second sweep, running beside the first, writes its row in between
    out.write_text(json.dumps({"results": [*json.loads(out.read_text())["results"], {"model": "b"}]}))
    eval_settings.append_record(out, {"model": "a", "pixel_auroc": 0.6})
    assert [r["model"] for r in json.loads(out.read_text())["results"]] == ["a", "b", "a"]
    assert not list(tmp_path.glob(".*.tmp"))  # replaced whole, no temporary file left behind


def test_targets_table_says_by_how_much_a_target_is_missed_and_when_all_are_met(run_bench):
    met = {"category": "magnetic_tile", "profile": "fast", "pixel_auroc": 0.902, "aupro": 0.864, "image_auroc": 0.91,
           "seg_f1": 0.41, "pixel_f1_max": 0.5}
    lines = run_bench.target_lines([met])
    assert "| magnetic_tile | pixel_auroc | 0.9 | 0.902 | yes |" in lines and "Every target listed is met" in lines[-1]
    assert "| magnetic_tile | seg F1 / pixel F1-max | 0.8 | 0.820 | yes |" in lines
    lines = run_bench.target_lines([{**met, "seg_f1": 0.2}])
    assert "| magnetic_tile | seg F1 / pixel F1-max | 0.8 | 0.400 | missed by 0.400 |" in lines
    lines = run_bench.target_lines([{**met, "pixel_auroc": 0.896}])
    assert "| magnetic_tile | pixel_auroc | 0.9 | 0.896 | missed by 0.004 |" in lines
    assert lines[-1].startswith("What was tried for the missed ones")


def test_full_size_speed_table_says_when_no_record_measured_it(run_bench):
    row = {"category": "tire", "per_defect_type": {}}
    lines = run_bench.detail_lines([row])
    assert lines[-1].startswith("Not measured in these records") and "| category | image size |" not in lines
    lines = run_bench.detail_lines([row, {**row, "images_per_second_full_size": 4.5, "full_size": [384, 512]}])
    assert lines[-1] == "| tire | 384x512 | 4.5 |"


def test_headline_gives_the_mean_over_categories_and_the_outline_ratio(run_bench):
    base = {"dataset": "d", "profile": "fast", "seeds": [0], "pixel_ap": 0.5, "image_auroc": 0.9, "aupro": 0.8,
            "pixel_f1_max": 0.5, "aupimo": 0.3, "iou": 0.2, "best_iou": 0.3, "image_f1_max": 0.8, "train_seconds": 1.0}
    rows = [{**base, "category": "a", "pixel_auroc": 0.9, "seg_f1": 0.25},
            {**base, "category": "b", "pixel_auroc": 0.8, "seg_f1": 0.45}]
    lines = run_bench.headline_lines(rows)
    assert any(line.startswith("| d | a | fast | 0 | 0.900 |") and "| 0.250 | 0.500 | 0.300 |" in line
               for line in lines)
    mean = next(line for line in lines if line.startswith("| **mean** | 2 categories"))
    assert "| 0.850 |" in mean and "| 0.350 | 0.700 | 0.300 |" in mean


def test_scale_tables_and_plot_are_written_from_any_rows_so_far(tmp_path, monkeypatch):
    scale = load("scale")
    monkeypatch.setattr(scale, "HERE", tmp_path)
    evaluate = {"kind": "evaluate", "images": 100, "side": 512, "megapixels": 26.2, "seconds": 9.0,
                "cpu_seconds": 8.0, "cpu_seconds_per_megapixel": 0.305, "peak_rss_mb": 361}
    serve = {"kind": "serve", "uploads": 8, "seconds": 30.0, "status": [200], "idle_rss_mb": 270,
             "peak_rss_mb": 900, "held_after_mb": 380, "held_over_idle_mb": 110}
    for rows in ([evaluate], [evaluate, serve]):  # the first point alone, then more kinds
        scale.write(tmp_path / "scale.json", rows)
        assert (tmp_path / "scale.png").stat().st_size > 0
    text = (tmp_path / "scale.md").read_text()
    assert "| 100 | 512 | 26.2 | 9.0 | 8.0 | 0.305 | 361 |" in text
    assert "| 8 | 30.0 | [200] | 270 | 900 | 380 | 110 |" in text


def test_acceptance_rule_keeps_a_change_only_when_the_mean_rises_and_no_category_pays():
    ablation = load("ablation")

    def runs(variant, shift=0.0, hurt=None):
        out = []
        for c in ablation.CATEGORIES:
            for seed, wobble in ((0, 0.0), (1, 0.01)):  # the default's spread: 0.01 on every figure
                drop = 0.05 if c == hurt else 0.0
                out.append({"category": c, "seed": seed, "variant": variant, "steps": 100, "pixel_auroc": 0.9 + wobble
                            + shift - drop, "aupro": 0.8 + wobble + shift, "seg_f1": 0.5 + wobble + shift})
        return out

    default = runs("default")
    assert ablation.verdict(default, runs("better", 0.005))["keep"]
    worse = ablation.verdict(default, runs("worse", -0.005))
    assert not worse["keep"] and worse["falls"] == []  # within the spread, but the mean fell
    paid = ablation.verdict(default, runs("paid", 0.01, hurt="tire"))
    assert paid["score"] > paid["default"] and paid["falls"] == ["tire pixel_auroc"] and not paid["keep"]
    one_seed = [r for r in runs("better", 0.005) if r["seed"] == 0]
    assert ablation.verdict(default, one_seed) is None  # not judged on one seed
    lines = ablation.acceptance_lines(default + runs("better", 0.005))
    assert any("| better |" in line and line.endswith("| keep |") for line in lines)


def test_ablation_chooses_thresholds_for_a_map_only_variants_maps(demo_root, tmp_path, monkeypatch):
    """A variant that changes the maps is scored at thresholds chosen for its maps, not at the default's."""
    import json

    from anoseg import load as load_model
    from anoseg.calibrate import calibrate

    ablation = load("ablation")
    (tmp_path / "data" / "mvtec_ad").mkdir(parents=True)
    (tmp_path / "data" / "mvtec_ad" / "bottle").symlink_to(demo_root)
    monkeypatch.setenv("ABLATION_KEEP", str(tmp_path / "keep"))
    rows = ablation.run_one(["default", "no_broad"], "bottle", 0, 6, 1, data=tmp_path / "data", profile="tiny")
    assert [r["variant"] for r in rows] == ["default", "no_broad"]
    folder = tmp_path / "keep" / "tiny_bottle_default_0_6"
    used = {v: json.loads((folder / name / "metrics.json").read_text())["map_threshold"]
            for v, name in (("default", "eval"), ("no_broad", "eval_no_broad"))}
    model = load_model(folder)
    assert used["default"] == model.map_threshold
    model.config = model.config.replace(broad_weight=0.0)
    calibrate(model, [Path(f) for f in model.meta["holdout_files"]])
    assert used["no_broad"] == pytest.approx(model.map_threshold) and used["no_broad"] != used["default"]


@pytest.mark.parametrize("text, says", [("128,x", "short sides"), ("100", "multiple of 16"), ("0", "multiple of 16")])
def test_map_scales_refuses_a_side_the_network_cannot_take(text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        load("map_scales").side_list(text)
    assert load("map_scales").side_list("256,128,256") == [128, 256]


def test_map_scales_fuses_the_models_own_scales_as_the_model_does(tiny_model_dir):
    """The comparison of scales is only fair if a model's own combination gives the map the model gives."""
    import anoseg

    map_scales = load("map_scales")
    model = anoseg.load(tiny_model_dir, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    own = model.maps_for_batch([image])[0]
    raws = map_scales.raw_maps(model, image, list(model.geometry.scales))
    amap, score = map_scales.finished(model, raws, image.shape[:2])
    np.testing.assert_allclose(amap, own.anomaly_map, atol=2e-3)
    assert score == pytest.approx(own.map_score, abs=2e-3)
    one_scale, _ = map_scales.finished(model, raws[:1], image.shape[:2])
    assert np.abs(one_scale - own.anomaly_map).max() > 1e-3  # the second scale counts


def test_map_scales_other_fusions_finish_a_map_as_the_model_does(tiny_model_dir):
    """Each fusion only changes how scales combine: one scale alone gives the model's own finish, and two scales
    give another map; noise weights favour the scale that is quieter on normal images."""
    import anoseg

    map_scales = load("map_scales")
    model = anoseg.load(tiny_model_dir, device="cpu")
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    rng = np.random.default_rng(2)  # distinct scales (an untrained tiny model's two maps are nearly equal)
    raws = [rng.random(r.shape).astype(np.float16)
            for r in map_scales.raw_maps(model, image, list(model.geometry.scales))]
    mean_one, _ = map_scales.finished(model, raws[:1], image.shape[:2])
    mean_two, _ = map_scales.finished(model, raws, image.shape[:2])
    for fusion in ("geometric", "max"):
        alone, _ = map_scales.finished(model, raws[:1], image.shape[:2], fusion)
        np.testing.assert_allclose(alone, mean_one, atol=1e-4)
        both, _ = map_scales.finished(model, raws, image.shape[:2], fusion)
        assert np.abs(both - mean_two).max() > 1e-4
    quiet, noisy = (np.full_like(raws[0], 0.01), raws[1])
    noisy = np.clip(noisy.astype(np.float32) + 0.5, 0, 1).astype(np.float16)
    weights = map_scales.noise_weights(model, [{"raw": [quiet, noisy], "size": image.shape[:2]}], [0, 1])
    assert sum(weights) == pytest.approx(1.0) and weights[0] > 0.9


def test_map_scales_refuses_an_unknown_fusion():
    assert load("map_scales").fusion_list("max,mean,max") == ["max", "mean"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown fusion median"):
        load("map_scales").fusion_list("mean,median")
